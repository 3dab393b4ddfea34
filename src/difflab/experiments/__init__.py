"""Experiments over both halves of the lab: sweeps, reports and their conclusions.

:mod:`~difflab.experiments.core` owns the resumable sweep folder (identity, lock, cell records,
temporary-file clean-up, summaries over seeds, tables) on which
:mod:`~difflab.experiments.ddpm_sweep` and :mod:`~difflab.experiments.sd_sweep` measure grids
of settings, each keeping only its cell type and how to make one cell;
:mod:`~difflab.experiments.report` turns runs and sweeps into one HTML/Markdown report whose
sentences come from :mod:`~difflab.experiments.conclusions`, and
:mod:`~difflab.experiments.demo` runs the whole DDPM lab on the embedded data.
"""
