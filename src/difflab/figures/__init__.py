"""Every picture difflab draws, from arrays and labels: the drawing layer of the lab.

:mod:`~difflab.figures.images` holds the primitives (uint8 conversion, the one image grid
:func:`~difflab.figures.images.draw_table`, PNGs with their settings in a text chunk, GIF/MP4,
matplotlib canvases), :mod:`~difflab.figures.process` the forward and reverse process strips,
animations and before/after tables, :mod:`~difflab.figures.runs` the one loss curve and the
schedule diagnostics, :mod:`~difflab.figures.memorisation` samples beside their nearest
training images, :mod:`~difflab.figures.sweeps` the sweep heat-maps and curves, and
:mod:`~difflab.figures.sd` the Stable Diffusion grids. These modules import only the base
modules (:mod:`difflab.files`, :mod:`difflab.errors`) besides numpy, torch, matplotlib and
Pillow; loading runs, data and samplers happens in the callers (e.g.
:mod:`difflab.ddpm.processes`).
"""
