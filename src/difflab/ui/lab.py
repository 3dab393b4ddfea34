"""What the web UI does, as plain functions: no Gradio in this module.

:class:`Lab` holds what every browser session shares (the runs and models folders, the
device, the job queue) and offers one method per action of the UI. Each method checks its
input first (one :class:`~difflab.errors.UsageError` line, nothing written), keeps every path
inside the runs folder (:func:`difflab.ui.paths.inside`), and hands heavy work to the job
queue. The Gradio layer (:mod:`difflab.ui.app`) only wires these to widgets, so the same
behaviour is tested without a browser.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.config import PRESETS, RunConfig, get_preset
from difflab.ddpm.data import DATASET_NAMES
from difflab.ddpm.runs import CONFIG, METRICS, TRAIN_STATE
from difflab.ddpm.sampling import SAMPLERS
from difflab.errors import UsageError
from difflab.files import read_jsonl
from difflab.ui.jobs import Job, JobQueue
from difflab.ui.paths import (
    ModelEntry,
    import_model,
    inside,
    list_models,
    list_runs,
    run_summary,
    safe_name,
)

SWEEPS = "sweeps"  # runs_dir/sweeps/NAME: DDPM sweeps started from the UI
SD_OUT = "sd"  # runs_dir/sd/...: Stable Diffusion images and sweeps
PREVIEW_SIZE = 640  # pixels: the longer side of a preview cell grid is at least this


def preview_grid(x: torch.Tensor, nrow: int) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> an uint8 RGB grid, enlarged (nearest) for the browser."""
    from torchvision.utils import make_grid

    grid = make_grid(x.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=1, pad_value=1.0)
    if grid.shape[0] == 1:
        grid = grid.repeat(3, 1, 1)
    img = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    scale = max(1, PREVIEW_SIZE // max(x.shape[-1] * nrow, 1))
    return np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else img


def _number(value: Any, kind: type, option: str, minimum: float | None = None) -> Any:
    try:
        v = kind(value)
        if kind is int and float(value) != v:
            raise ValueError
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise UsageError(f"{option} {value!r}: expected {what}") from None
    if minimum is not None and v < minimum:
        raise UsageError(f"{option} {value}: must be at least {minimum:g}")
    return v


class Lab:
    def __init__(
        self,
        runs_dir: str | Path = "runs",
        models_dir: str | Path = "models",
        device: str = "auto",
        jobs: JobQueue | None = None,
    ) -> None:
        from difflab.devices import resolve_device

        self.runs = Path(runs_dir).expanduser().resolve()
        self.runs.mkdir(parents=True, exist_ok=True)
        self.models = Path(models_dir).expanduser().resolve()
        self.device = resolve_device(device)
        self.jobs = jobs or JobQueue()

    # -- runs ---------------------------------------------------------------------------------
    def run_names(self) -> list[str]:
        return [str(p.relative_to(self.runs)) for p in list_runs(self.runs)]

    def run_path(self, name: str) -> Path:
        if not name:
            raise UsageError("run: choose a run first (train one in the Train tab)")
        path = inside(self.runs, name, "run")
        if not (path / CONFIG).is_file():
            raise UsageError(f"run {name!r}: not a run folder (no {CONFIG})")
        return path

    def runs_table(self) -> list[dict]:
        return [run_summary(self.runs, p) for p in list_runs(self.runs)]

    def run_details(self, name: str) -> dict[str, Any]:
        """Config, eval results, loss rows and figure files of one run."""
        run = self.run_path(name)
        ev = run / "eval.json"
        return {
            "config": json.loads((run / CONFIG).read_text(encoding="utf-8")),
            "eval": json.loads(ev.read_text(encoding="utf-8")) if ev.is_file() else None,
            "loss": self.loss_rows(run),
            "figures": sorted(str(p) for p in (run / "figures").glob("*.png")),
        }

    @staticmethod
    def loss_rows(run: Path) -> list[dict]:
        rows = read_jsonl(run / METRICS) if (run / METRICS).is_file() else []
        return [r for r in rows if isinstance(r.get("loss"), (int, float))]

    # -- training -----------------------------------------------------------------------------
    def start_training(
        self,
        name: str,
        dataset: str = "mnist5k",
        preset: str = "quick",
        minutes: float | None = 2.0,
        seed: int = 0,
        resume: bool = False,
    ) -> Job:
        """Queue a training (or its resumption) into ``runs/NAME``; returns the job."""
        name = safe_name(name, "run name")
        out = inside(self.runs, name, "run name")
        if preset not in PRESETS:
            raise UsageError(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
        if dataset not in DATASET_NAMES:
            raise UsageError(f"dataset {dataset!r}: choose one of {', '.join(DATASET_NAMES)}")
        seed = _number(seed, int, "seed", 0)
        if resume:
            if not (out / TRAIN_STATE).is_file():
                raise UsageError(f"run {name!r}: nothing to resume (no {TRAIN_STATE})")
            cfg = RunConfig.load(out / CONFIG)
        else:
            if (out / TRAIN_STATE).exists() or (out / CONFIG).exists():
                raise UsageError(
                    f"run {name!r}: already exists; tick 'resume' to continue it, or choose a new name"
                )
            minutes = _number(minutes, float, "minutes", 0.05)
            cfg = get_preset(preset)
            cfg = replace(
                cfg,
                train=replace(cfg.train, dataset=dataset, seed=seed, minutes=minutes, epochs=None),
            )
        for job in self.jobs.active("train"):
            if job.title == name:
                raise UsageError(f"run {name!r}: a training of this run is already {job.state}")
        title = name
        return self.jobs.submit("train", title, lambda job: self._train(job, cfg, out, resume))

    def _train(self, job: Job, cfg: RunConfig, out: Path, resume: bool) -> Any:
        from difflab.ddpm.training import Trainer

        job.update(0.0, "loading data and building the model")
        out.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, out, device=self.device, resume=resume, progress=False)
        total, budget = trainer.total_steps, (cfg.train.minutes or 0) * 60
        t_start, first_step = time.perf_counter(), trainer.step

        def done() -> float:
            return trainer.step / total if total else trainer.elapsed / max(budget, 1e-9)

        start = done()

        def should_stop() -> bool:
            now, spent = done(), time.perf_counter() - t_start
            rate = (trainer.step - first_step) * cfg.train.batch_size / max(spent, 1e-9)
            text = f"step {trainer.step}, {rate:.0f} images/s"
            if now > start:
                text += f", about {spent * (1 - now) / (now - start):.0f} s left"
            job.update(now, text)
            return job.cancelled()

        result = trainer.fit(should_stop=should_stop)
        from difflab.ddpm.processes import plot_run

        plot_run(out)  # loss and schedule figures for the Runs tab
        what = "stopped" if job.cancelled() else "finished"
        job.update(
            1.0 if not job.cancelled() else None,
            f"{what} at step {result.steps}; checkpoint saved in {out.name} "
            f"({result.images_per_s:.0f} images/s)",
        )
        return str(out)

    def training_status(self, name: str | None = None) -> tuple[str, Path | None]:
        """One line about the latest training job (of ``name``, if given) and its run folder."""
        jobs = [j for j in self.jobs.jobs() if j.kind == "train" and name in (None, j.title)]
        if not jobs:
            return "No training started from this UI yet.", None
        job = jobs[0]
        return job.status_line(), self.runs / job.title

    def stop_training(self, name: str) -> str:
        """Cancel the training of run ``name`` (running: it saves a checkpoint and stops)."""
        active = [j for j in self.jobs.active("train") if j.title == str(name).strip()]
        if not active:
            raise UsageError(f"run {name!r}: no training of it is running or queued")
        for job in active:
            job.cancel()
        return f"Stopping {name}: a checkpoint is saved first; tick 'resume' to continue it later."

    # -- sampling -----------------------------------------------------------------------------
    def start_sampling(
        self,
        run: str,
        classes: str = "",
        n_per_class: int = 4,
        guidance: float = 2.0,
        steps: int = 10,
        sampler: str = "dpm++",
        seed: int = 0,
    ) -> Job:
        """Queue sampling from a run: a live preview of x̂₀, then a PNG grid and an NPZ."""
        from difflab.ddpm.generate import parse_classes

        path = self.run_path(run)
        cfg = RunConfig.load(path / CONFIG)
        cls = parse_classes(classes or None, cfg.model.num_classes)
        n = _number(n_per_class, int, "samples per class", 1)
        if n * len(cls) > 2000:
            raise UsageError(f"samples per class {n}: at most 2,000 samples in all from the UI")
        guidance = _number(guidance, float, "guidance", 0)
        steps = _number(steps, int, "steps", 1)
        seed = _number(seed, int, "seed", 0)
        if sampler not in SAMPLERS:
            raise UsageError(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        from difflab.ddpm.sampling import check_sampling_args

        check_sampling_args(sampler, steps, guidance, cfg.sample.eta, cfg.diffusion.timesteps)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        png = path / "samples" / f"ui-{stamp}-seed{seed}.png"
        cls_text = ",".join(map(str, cls))
        command = shlex.join([
            "difflab", "sample", str(path), "--classes", cls_text, "--n-per-class", str(n),
            "--guidance", f"{guidance:g}", "--steps", str(steps), "--sampler", sampler,
            "--seed", str(seed), "--out", str(png),
        ])  # fmt: skip
        args = dict(classes=cls_text, n_per_class=n, guidance=guidance, steps=steps, sampler=sampler, seed=seed)  # fmt: skip
        return self.jobs.submit(
            "sample", f"{run} s={guidance:g} {steps} steps",
            lambda job: self._sample(job, path, png, command, len(cls) * n, n, args),
        )  # fmt: skip

    def _sample(
        self, job: Job, run: Path, png: Path, command: str, total: int, nrow: int, args: dict
    ) -> dict:
        from difflab.ddpm.generate import sample_run, save_npz

        png.parent.mkdir(parents=True, exist_ok=True)
        batches = -(-total // 500)
        seen = [0]

        def on_step(step) -> None:
            job.check()
            seen[0] += 1
            job.update(
                seen[0] / (batches * step.num_steps),
                f"step {step.index + 1}/{step.num_steps} (t = {step.t})",
                preview_grid(step.x0_pred[:64], nrow=min(nrow, 8) if nrow > 1 else 10),
            )

        result = sample_run(run, png, device=self.device, progress=False, on_step=on_step, **args)
        npz = png.with_suffix(".npz")
        save_npz(npz, result.images, result.labels)
        job.update(1.0, f"{total} samples in {result.seconds:.1f} s")
        return {"png": str(png), "npz": str(npz), "command": command, "seconds": result.seconds}

    # -- processes ----------------------------------------------------------------------------
    def forward_view(self, source: str, t: int, seed: int = 0) -> tuple[np.ndarray, str]:
        """x_t of one test image per class at paper step ``t`` (0 = data, T = the last step)."""
        from difflab.ddpm.data import load_dataset
        from difflab.ddpm.diffusion import GaussianDiffusion
        from difflab.ddpm.processes import column_label, forward_process

        if source in DATASET_NAMES:
            cfg, dataset = RunConfig(), source
        else:
            cfg = RunConfig.load(self.run_path(source) / CONFIG)
            dataset = cfg.train.dataset
        diffusion = GaussianDiffusion(cfg.diffusion, warn=False)
        T = diffusion.num_timesteps
        t = _number(t, int, "t", 0)
        if t > T:
            raise UsageError(f"t {t}: must be between 0 and T = {T}")
        data = load_dataset(dataset, "test", cfg.train.data_dir)
        idx = [int((data.labels == c).nonzero()[0]) for c in data.labels.unique()[:10]]
        x0 = data.images[idx].float() / 127.5 - 1
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        xt = forward_process(diffusion, x0, [t], noise)[:, 0]  # the forward figure's maths
        return preview_grid(xt, nrow=len(idx)), f"{dataset}, T = {T}: {column_label(diffusion, t)}"

    def start_reverse(
        self, run: str, cls: int = 0, guidance: float = 2.0, steps: int = 50, sampler: str = "ddim", seed: int = 0
    ) -> Job:  # fmt: skip
        """Queue one reverse trajectory per sample: x_t and x̂₀ at every step."""
        path = self.run_path(run)
        cfg = RunConfig.load(path / CONFIG)
        cls = _number(cls, int, "class", 0)
        if cls >= cfg.model.num_classes:
            raise UsageError(f"class {cls}: this run has classes 0..{cfg.model.num_classes - 1}")
        guidance, steps = _number(guidance, float, "guidance", 0), _number(steps, int, "steps", 1)
        seed = _number(seed, int, "seed", 0)
        from difflab.ddpm.sampling import check_sampling_args

        check_sampling_args(sampler, steps, guidance, cfg.sample.eta, cfg.diffusion.timesteps)
        return self.jobs.submit(
            "reverse", f"{run} class {cls}",
            lambda job: self._reverse(job, path, cls, guidance, steps, sampler, seed),
        )  # fmt: skip

    def _reverse(self, job, path, cls, guidance, steps, sampler, seed) -> list[dict]:
        from difflab.ddpm.runs import load_run
        from difflab.ddpm.sampling import sample_steps

        model, diffusion, cfg = load_run(path, device=self.device)
        labels = torch.full((8,), cls, dtype=torch.long)
        frames = []
        for step in sample_steps(
            model, diffusion, labels, guidance=guidance, steps=steps, sampler=sampler,
            eta=cfg.sample.eta, spacing=cfg.sample.spacing, seed=seed,
        ):  # fmt: skip
            job.check()
            frames.append({
                "t": step.t + 1, "x_t": preview_grid(step.x_t, 8), "x0": preview_grid(step.x0_pred, 8)
            })  # fmt: skip
            job.update((step.index + 1) / step.num_steps, f"step {step.index + 1}/{step.num_steps}")
        final = preview_grid(step.x_prev, 8)  # clamped to [-1, 1] like every preview
        frames.append({"t": 0, "x_t": final, "x0": final})
        return frames

    # -- sweeps -------------------------------------------------------------------------------
    def start_sweep(
        self, run: str, name: str, guidance: str = "0,1,2,4", steps: str = "5,10,25",
        sampler: str = "ddim", seeds: str = "0", n_per_class: int = 5,
    ) -> Job:  # fmt: skip
        from difflab.experiments.ddpm_sweep import check_folder, sweep_identity

        path = self.run_path(run)
        out = inside(self.runs, f"{SWEEPS}/{safe_name(name, 'sweep name')}", "sweep name")
        n = _number(n_per_class, int, "samples per class", 2)
        identity = sweep_identity(path, guidance, steps, sampler, seeds, n, device=self.device)
        out.parent.mkdir(parents=True, exist_ok=True)
        check_folder(out, identity)  # refuses another sweep's folder before queueing
        return self.jobs.submit(
            "sweep", out.name, lambda job: self._sweep(job, path, out, guidance, steps, sampler, seeds, n)
        )  # fmt: skip

    def _sweep(self, job, path, out, guidance, steps, sampler, seeds, n) -> str:
        from difflab.experiments.ddpm_sweep import sweep_run

        def on_cell(done: int, total: int) -> None:
            job.update(done / total, f"{done}/{total} cells")

        r = sweep_run(
            path, out, guidance=guidance, steps=steps, sampler=sampler, seeds=seeds,
            n_per_class=n, device=self.device, progress=False, should_stop=job.cancelled,
            on_cell=on_cell,
        )  # fmt: skip
        job.update(None, f"{len(r.rows)}/{r.cells_total} cells done ({r.cells_run} computed now)")
        return str(out)

    def sweep_names(self) -> list[str]:
        root = self.runs / SWEEPS
        found = [p.parent for p in root.glob("*/metrics.json")] if root.is_dir() else []
        return sorted(p.name for p in found)

    def sweep_results(self, name: str) -> dict[str, Any]:
        """Summary rows, grid and plot files of a DDPM sweep folder."""
        from difflab.experiments.report import mean_std_text

        out = inside(self.runs, f"{SWEEPS}/{name}", "sweep")
        if not (out / "metrics.json").is_file():
            raise UsageError(f"sweep {name!r}: no finished cell yet")
        doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        figs = sorted((out / "figures").glob("*.png")) if (out / "figures").is_dir() else []
        fmt = {"accuracy": ".1%", "fd": ".2f", "kid": ".4f", "diversity": ".2f", "seconds": ".1f"}
        table = [
            {"sampler": r["sampler"], "steps": r["steps"], "guidance": r["guidance"],
             **{m: mean_std_text(r, m, f) for m, f in fmt.items()}}
            for r in sorted(doc["summary"], key=lambda r: (r["sampler"], r["steps"], r["guidance"]))
        ]  # fmt: skip
        return {
            "summary": doc["summary"],
            "table": table,
            "complete": doc["complete"],
            "grids": [str(p) for p in figs if p.name.startswith("grid")],
            "plots": [str(p) for p in figs if not p.name.startswith("grid")],
            "folder": str(out),
        }

    def sweep_report(self, name: str, sd: bool = False) -> str:
        """Write ``report.html`` into a DDPM (or, with ``sd``, a Stable Diffusion) sweep folder."""
        from difflab.experiments.report import write_report

        where = f"{SD_OUT}/sweeps/{name}" if sd else f"{SWEEPS}/{name}"
        folder = inside(self.runs, where, "sweep")
        if not (folder / "metrics.json").is_file():
            raise UsageError(f"sweep {name!r}: no finished cell yet")
        return str(write_report([folder], folder / "report.html").html)

    # -- Stable Diffusion ---------------------------------------------------------------------
    def model_entries(self) -> list[ModelEntry]:
        return list_models(self.models)

    def import_model(self, path: str) -> Path:
        return import_model(path, self.models)

    def _sd_model(self, model: str) -> str:
        from difflab.sd.load import DEFAULT_MODEL

        return (model or "").strip() or DEFAULT_MODEL

    def start_sd(
        self, prompt: str, negative_prompt: str = "", guidance: float = 7.5, steps: int = 25,
        seed: int = 0, n: int = 1, size: str = "512x512", scheduler: str | None = None,
        model: str = "", safety_checker: bool = True,
    ) -> Job:  # fmt: skip
        from difflab.sd.generate import (  # fmt: skip
            check_count,
            check_guidance,
            check_prompt,
            check_seed,
            check_steps,
            parse_size,
        )
        from difflab.sd.load import check_scheduler

        check_prompt(prompt, unconditional=False)
        guidance = check_guidance(_number(guidance, float, "guidance"))
        steps = check_steps(_number(steps, int, "steps"))
        seed, n = (
            check_seed(_number(seed, int, "seed")),
            check_count(_number(n, int, "images"), "images"),
        )
        parse_size(size)
        scheduler = check_scheduler(scheduler or None)
        out = self.runs / SD_OUT / time.strftime("%Y%m%d-%H%M%S")
        kw = dict(
            negative_prompt=negative_prompt or "", guidance=guidance, steps=steps, seed=seed, n=n,
            size=size, scheduler=scheduler, model=self._sd_model(model), safety_checker=safety_checker,
        )  # fmt: skip
        return self.jobs.submit("sd", prompt[:40], lambda job: self._sd(job, prompt, out, kw))

    def _sd(self, job: Job, prompt: str, out: Path, kw: dict) -> dict:
        from difflab.sd.generate import generate

        job.update(None, "loading the pipeline")
        out.mkdir(parents=True, exist_ok=True)
        r = generate(prompt, out, device=self.device, progress=False, **kw)
        images = []
        for rec in r.images:
            d = rec.diagnosis
            if d.nsfw:
                caption = (
                    f"seed {rec.seed}: FILTERED by the safety checker (flagged as possibly "
                    "unsafe content; the pipeline returns a black image in its place)"
                )
            elif d.note:
                caption = f"seed {rec.seed}: {d.note}"
            else:
                caption = f"seed {rec.seed}"
            images.append({"png": str(rec.png), "caption": caption, "flagged": bool(d.nsfw), "black": d.black})  # fmt: skip
        job.update(1.0, f"{len(images)} image(s), {r.seconds_per_image:.1f} s each")
        return {"images": images, "settings": r.settings, "notes": r.notes, "folder": str(out)}

    def start_sd_sweep(
        self, prompts: str, name: str, guidance: str = "1,3,7.5", steps: str = "10,25",
        seeds: str = "0", size: str = "512x512", scheduler: str | None = None, model: str = "",
        clip_model: str = "none",
    ) -> Job:  # fmt: skip
        from difflab.experiments.sd_sweep import check_folder, parse_prompts, sweep_identity

        out = inside(self.runs, f"{SD_OUT}/sweeps/{safe_name(name, 'sweep name')}", "sweep name")
        lines = [p.strip() for p in str(prompts).splitlines() if p.strip()]
        parse_prompts(lines)
        kw = dict(
            guidance=guidance, steps=steps, seeds=seeds, size=size, scheduler=scheduler or None,
            model=self._sd_model(model), clip_model=clip_model or None,
        )  # fmt: skip
        identity = sweep_identity(
            lines, guidance, steps, seeds, "", size, scheduler or None, kw["model"], self.device,
            "auto", True, kw["clip_model"], False, None,
        )  # fmt: skip
        check_folder(out, identity)
        return self.jobs.submit(
            "sd-sweep", out.name, lambda job: self._sd_sweep(job, lines, out, kw)
        )

    def _sd_sweep(self, job: Job, prompts: list[str], out: Path, kw: dict) -> str:
        from difflab.experiments.sd_sweep import sd_sweep

        def on_cell(done: int, total: int) -> None:
            job.update(done / total, f"{done}/{total} cells")

        out.parent.mkdir(parents=True, exist_ok=True)
        r = sd_sweep(
            prompts, out, device=self.device, progress=False, should_stop=job.cancelled,
            on_cell=on_cell, **kw,
        )  # fmt: skip
        job.update(None, f"{len(r.rows)}/{r.cells_total} cells; {r.flagged} filtered by the safety checker")  # fmt: skip
        return str(out)

    def sd_sweep_results(self, name: str) -> dict[str, Any]:
        out = inside(self.runs, f"{SD_OUT}/sweeps/{name}", "sweep")
        if not (out / "metrics.json").is_file():
            raise UsageError(f"sweep {name!r}: no finished cell yet")
        doc = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        return {
            "summary": doc["summary"],
            "grids": [str(p) for p in sorted(out.glob("grid_p*.png"))],
            "plots": [str(p) for p in sorted(out.glob("clip_vs_guidance.png"))],
            "folder": str(out),
        }
