"""What one click of the web UI may ask for: caps that keep a shared lab server responsive.

The options objects (:mod:`difflab.options`) say what a value means and refuse nonsense for
the command line and the UI alike; these caps are the server's own, stricter, bounds on what
one request may cost (images, steps, pixels, sweep cells, minutes of training), each refused
with one line that names the cap and points to the command line for more.
"""

from __future__ import annotations

from difflab.errors import UsageError

SAMPLES = 2_000  # DDPM images of one sampling job
SWEEP_CELLS = 200  # cells of one DDPM sweep
SWEEP_N = 100  # samples per class per cell of a DDPM sweep
REVERSE_FRAMES = 100  # frames of a reverse trajectory kept for the page (evenly thinned)
SD_IMAGES = 16  # Stable Diffusion images of one Generate click
SD_STEPS = 150  # denoising steps of one SD image
SD_SIDE = 1024  # pixels: the longer side of an SD image
SD_SWEEP_CELLS = 100  # cells of one SD sweep
TRAIN_MINUTES = 24 * 60.0  # minutes of one training job


def at_most(value: float, cap: float, what: str) -> None:
    """Refuse ``value`` above ``cap`` with one line naming ``what``."""
    if value > cap:
        shown = f"{value:,}" if isinstance(value, int) else f"{value:g}"
        limit = f"{cap:,}" if isinstance(cap, int) else f"{cap:g}"
        raise UsageError(
            f"{what} {shown}: the web UI takes at most {limit}; use the command line for more"
        )
