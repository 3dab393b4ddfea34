"""Every picture difflab draws.

:mod:`~difflab.figures.images` holds the primitives (uint8 conversion, labelled grids, PNGs
with their settings in a text chunk), :mod:`~difflab.figures.process` the forward and
reverse process strips and animations, :mod:`~difflab.figures.runs` the plots of a run (loss
curve, schedule diagnostics), :mod:`~difflab.figures.sweeps` the sweep heat-maps and curves,
and :mod:`~difflab.figures.sd` the Stable Diffusion grids.
"""
