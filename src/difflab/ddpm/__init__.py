"""The DDPM half of the lab: everything needed to train and sample a class-conditional DDPM.

:mod:`~difflab.ddpm.data` loads the datasets, :mod:`~difflab.ddpm.model` is the
``ContextUnet``, :mod:`~difflab.ddpm.diffusion` the noise schedules and the conversions of
the paper (``q_sample``, eps/x0/v), :mod:`~difflab.ddpm.sampling` the one sampling generator,
:mod:`~difflab.ddpm.training` the training loop, :mod:`~difflab.ddpm.runs` the run folders
(safetensors weights, resumable state, on :mod:`difflab.runfolder`) and :mod:`~difflab.ddpm.generate` writes samples of a
run to PNG grids and ``.npz`` arrays.
"""
