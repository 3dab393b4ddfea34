"""The seeding rule of DDPM sampling: every image has its own seed and two noise streams.

Image ``i`` of a request with seed ``seed`` has the seed sequence
``numpy.random.SeedSequence(seed, spawn_key=(class_i, index_i))``, where ``index_i`` counts
the images of its class in the order they were asked for (:func:`indices_within_class`). Its
two 64-bit words seed two independent torch generators: word 0 draws the initial noise x_T,
``torch.randn((C, H, W))`` on the CPU (so a seed gives the same x_T on every device), and
word 1 draws the step noise of the stochastic samplers, one ``(C, H, W)`` draw per noisy
step, on the device that samples (on an accelerator the draws stay there, so no step waits
for the host). As EDM's ``StackedRandomGenerator``, :class:`ImageNoise` holds one generator
per image and stacks their draws, so an image never depends on the batch it is drawn in, on
how many images were drawn, or on which other classes were asked for; the step stream is the
one diffusers reads from a list of per-image generators. The noise is the same bit for bit
in any batch; the network's output for an image too, on the CPUs tested, once a forward pass
has at least 16 rows (smaller passes take other BLAS kernels and differ by about 1e-7).
Stable Diffusion keeps A1111's ``seed + i`` per image (:mod:`difflab.sd.generate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from difflab.errors import UsageError

MAX_SEED = 2**63 - 1


def check_seed(seed: int, option: str = "--seed") -> int:
    """``seed`` when it is a whole number from 0 to 2^63 - 1, else one line naming ``option``."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed <= MAX_SEED
    ):
        raise UsageError(f"{option} {seed}: must be a whole number from 0 to 2^63 - 1")
    return int(seed)


def indices_within_class(labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The running count of each class in the order given (B,): ``[3, 7, 3] -> [0, 0, 1]``."""
    seen: dict[int, int] = {}
    out = []
    for c in torch.as_tensor(labels).tolist():
        out.append(seen.get(c, 0))
        seen[c] = out[-1] + 1
    return torch.tensor(out, dtype=torch.long)


def image_seeds(
    seed: int, labels: torch.Tensor | Sequence[int], indices: torch.Tensor | Sequence[int]
) -> list[tuple[int, int]]:
    """(initial-noise seed, step-noise seed) of every image, from (seed, class, index)."""
    seed = check_seed(seed)
    labels, indices = torch.as_tensor(labels).tolist(), torch.as_tensor(indices).tolist()
    if len(labels) != len(indices):
        raise ValueError(f"{len(indices)} indices within class for {len(labels)} labels")
    out = []
    for c, i in zip(labels, indices, strict=True):
        words = np.random.SeedSequence(seed, spawn_key=(c, i)).generate_state(2, np.uint64)
        out.append((int(words[0]), int(words[1])))
    return out


class ImageNoise:
    """The noise of a batch under the seeding rule: one pair of generators per image.

    ``shape`` is one image's (C, H, W); ``indices`` default to :func:`indices_within_class`
    of ``labels``. :meth:`initial` draws x_T on the CPU; :meth:`step` draws the next step's
    noise on ``device``. The step generators are made on first use, so deterministic
    samplers pay only for x_T.
    """

    def __init__(
        self,
        seed: int | None,
        labels: torch.Tensor | Sequence[int],
        shape: Sequence[int],
        indices: torch.Tensor | Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ):
        labels = torch.as_tensor(labels).cpu()
        indices = indices_within_class(labels) if indices is None else indices
        self.seeds = image_seeds(0 if seed is None else seed, labels, indices)
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self._step_generators: list[torch.Generator] | None = None

    def __len__(self) -> int:
        return len(self.seeds)

    def initial(self) -> torch.Tensor:
        """x_T (B, C, H, W) on the CPU: image i is ``randn((C, H, W))`` from its word 0."""
        x = torch.empty((len(self), *self.shape))
        for i, (s, _) in enumerate(self.seeds):
            torch.randn(self.shape, generator=torch.Generator().manual_seed(s), out=x[i])
        return x

    def step_generators(self) -> list[torch.Generator]:
        """One generator per image on ``device``, seeded by its word 1 (made once)."""
        if self._step_generators is None:
            self._step_generators = [
                torch.Generator(self.device).manual_seed(s) for _, s in self.seeds
            ]
        return self._step_generators

    def step(self) -> torch.Tensor:
        """The next step's noise (B, C, H, W) on ``device``: one draw from each image's stream."""
        noise = torch.empty((len(self), *self.shape), device=self.device)
        for i, g in enumerate(self.step_generators()):
            torch.randn(self.shape, generator=g, out=noise[i])
        return noise


def initial_noise(
    seed: int | None,
    labels: torch.Tensor | Sequence[int],
    shape: Sequence[int],
    indices: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """x_T (B, C, H, W) on the CPU for ``labels`` under the seeding rule (see the module)."""
    return ImageNoise(seed, labels, shape, indices).initial()
