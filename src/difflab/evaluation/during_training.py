"""Quality during training: the evaluator that ``train --eval-every`` calls on the EMA weights.

:class:`TrainingEvaluator` is built once, before training starts (so the reference
classifier is loaded from its cache, or trained, off the training clock), from the run's
resolved configuration. Each call samples the same images: ``train.eval_n_per_class``
samples of every class, whose noise comes from the run's seed by the seeding rule
(:mod:`difflab.seeds`), with the run's sampler, guidance and spacing (``train.eval_steps``
steps, or ``sample.steps``). The same weights therefore give the same numbers, and a curve
moves only because the weights did. It measures the conditional accuracy by the judge, the
Fréchet distance and KID (on :data:`KID_SUBSETS` subsets) on its features against the test
split (:mod:`.distances`), the real-vs-real floor drawn with as many train images as there
are samples (so the floor has the samples' small-sample bias), and within-class diversity
(:mod:`.metrics`), and draws the samples as a grid (a row per class) for
``figures/progress/``. The training loop
(:mod:`difflab.ddpm.training`) writes the numbers and the grid; this module only measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from difflab.config import RunConfig, SampleConfig
from difflab.ddpm.data import load_dataset
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.generate import sample_labels
from difflab.devices import resolve_precision
from difflab.evaluation.distances import frechet_distance, kid
from difflab.evaluation.judge import Judge, get_judge
from difflab.evaluation.metrics import conditional_accuracy, diversity, features_of, real_floor
from difflab.figures.images import Panel, draw_table, to_uint8

GRID_COLUMNS = 10  # samples per class drawn in a progress grid (at most)
KID_SUBSETS = 20  # KID's subsets of the test features (eval's 100 cost ~0.8 s on 2 cores)


@dataclass
class Evaluation:
    """What one evaluation measured (``metrics``, JSON-ready) and its grid (H, W, 3) uint8."""

    metrics: dict[str, float]
    grid: np.ndarray


class TrainingEvaluator:
    """``evaluator(model, step)``: the quality of ``model`` on the run's fixed noise."""

    def __init__(
        self,
        cfg: RunConfig,
        device: str | torch.device = "cpu",
        judge: Judge | None = None,
        progress: bool = False,
    ) -> None:
        tc, sc = cfg.train, cfg.sample
        self.device = torch.device(device)
        dev = str(self.device)
        self.judge = (
            get_judge(tc.dataset, root=tc.data_dir, device=dev, progress=progress)
            if judge is None
            else judge
        )
        self.cfg = cfg
        self.train = train = load_dataset(tc.dataset, "train", tc.data_dir)
        self.test = test = load_dataset(tc.dataset, "test", tc.data_dir)
        self.class_names = list(train.class_names)
        k = self.judge.num_classes
        self.labels = torch.arange(k).repeat_interleave(tc.eval_n_per_class)  # (N,)
        self.test_features = features_of(self.judge, test)  # computed here, once
        n = min(len(self.labels), len(train))
        self.fd_floor = real_floor(self.judge, train, test, n=n)
        self.diffusion = GaussianDiffusion(cfg.diffusion, warn=False)
        self.seed = tc.seed
        self.settings = {
            "sampler": sc.sampler, "steps": tc.eval_steps or sc.steps, "guidance": sc.guidance,
            "eta": sc.eta, "spacing": sc.spacing, "guidance_interval": sc.guidance_interval,
            "guidance_schedule": sc.guidance_schedule, "guidance_rescale": sc.guidance_rescale,
            "guidance_method": sc.guidance_method,
        }  # fmt: skip
        self.autocast = resolve_precision("auto", self.device)

    @property
    def n(self) -> int:
        return int(self.labels.numel())

    def sample(self, model: torch.nn.Module) -> torch.Tensor:
        """The evaluation's samples (N, C, H, W) in [-1, 1]: the same noise at every call."""
        return sample_labels(
            model, self.diffusion, self.labels, seed=self.seed, progress=False,
            autocast=self.autocast, **self.settings,
        )  # fmt: skip

    def __call__(self, model: torch.nn.Module, step: int) -> Evaluation:
        t0 = time.perf_counter()
        images = self.sample(model)
        sampled = time.perf_counter() - t0
        acc = conditional_accuracy(self.judge, images, self.labels)
        feats = self.judge.features(images)
        fd = frechet_distance(feats, self.test_features)
        metrics = {
            "accuracy": acc["overall"],
            "fd": fd,
            "fd_floor": self.fd_floor,
            "fd_ratio": fd / self.fd_floor if self.fd_floor > 0 else float("inf"),
            "kid": kid(feats, self.test_features, subsets=KID_SUBSETS).mean,
            "diversity": diversity(feats, self.labels)["mean"],
            "n": self.n,
            "sampling_s": round(sampled, 3),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return Evaluation(metrics, self.grid(images, step, metrics))

    def choose_guidance(self, model: torch.nn.Module, show=None) -> tuple[SampleConfig, dict]:
        """The run's default guidance chosen from ``model``'s samples
        (:mod:`.guidance_choice`): its new sample settings and the record of the scales tried;
        ``show(line)``, when given, gets a line per scale as it is measured."""
        from difflab.evaluation.guidance_choice import GuidanceChooser, row_line

        on_row = None if show is None else (lambda row: show(row_line(row)))
        return GuidanceChooser(self).choose(model, on_row=on_row)

    def grid(self, images: torch.Tensor, step: int, metrics: dict[str, float]) -> np.ndarray:
        """The samples as a table: a row per class, the first few samples of each."""
        per_class = self.n // self.judge.num_classes
        cols = min(per_class, GRID_COLUMNS)
        arrays = to_uint8(images)  # (N, H, W, C), class-major
        tiles = arrays.reshape(self.judge.num_classes, per_class, *arrays.shape[1:])[:, :cols]
        s = self.settings
        title = (
            f"step {step}: accuracy {metrics['accuracy']:.0%}, FD {metrics['fd']:.2f} "
            f"(floor {metrics['fd_floor']:.2f}), KID {metrics['kid']:.3f}\n"
            f"{s['sampler']} {s['steps']} steps, guidance {s['guidance']:g}, seed {self.seed}"
        )
        h, w = tiles.shape[2:4]
        table = draw_table(
            [Panel(tiles, ())], row_labels=self.class_names, title=title,
            scale=max(1, round(64 / max(h, w))),
        )  # fmt: skip
        return np.asarray(table.image.convert("RGB"))
