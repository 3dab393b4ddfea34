"""``difflab eval``: sample from a run and measure the samples against real data.

Draws ``n_per_class`` samples for every class through the one sampling generator, then
reports the reference classifier's conditional accuracy (overall and per class), the
Fréchet distance and KID on the classifier's features against the test split (the FD beside
the real-vs-real floor, train split vs test split), and within-class diversity, each with its
95 % bootstrap interval over the samples (``ci95``, :mod:`.stats`), the per-sample
correctness (``correct``, for paired comparisons) and the share of near-copies of training
images (``copy_rate``, :mod:`.memorisation`). The result is written to ``eval.json`` in the
run folder, with the settings used, and the samples nearest to their training images are
drawn beside them in ``figures/nearest_train.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from difflab.ddpm.data import load_dataset
from difflab.ddpm.runs import load_run
from difflab.evaluation.distances import frechet_distance, kid
from difflab.evaluation.judge import Judge, get_judge
from difflab.evaluation.memorisation import copy_rate
from difflab.evaluation.metrics import conditional_accuracy, diversity, features_of, real_floor
from difflab.evaluation.stats import sample_intervals
from difflab.files import write_json
from difflab.options import EvalOptions


def evaluate_samples(
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: str,
    data_dir: str | None = None,
    device: str = "cpu",
    judge: Judge | None = None,
    seed: int = 0,
    memorisation: bool = False,
) -> dict[str, Any]:
    """Metrics of (N, C, H, W) samples in [-1, 1] with their intended ``labels``.

    Pass the same ``judge`` to many calls (a sweep) so that the features of the real splits
    are computed once: they are cached per judge object. ``ci95`` holds the bootstrap
    intervals (resamples seeded by ``seed``); ``memorisation`` adds ``copy_rate`` and its
    ``copy_threshold`` (and ``nearest_train``: per sample, distance and train index).
    """
    judge = get_judge(dataset, root=data_dir, device=device) if judge is None else judge
    train = load_dataset(dataset, "train", data_dir)
    test = load_dataset(dataset, "test", data_dir)
    acc = conditional_accuracy(judge, images, labels)
    feats = judge.features(images)
    test_feats = features_of(judge, test)
    fd = frechet_distance(feats, test_feats)
    kd = kid(feats, test_feats)
    floor = real_floor(judge, train, test)
    div = diversity(feats, labels)
    real_div = diversity(features_of(judge, test), test.labels)
    t0 = time.perf_counter()
    measured = {"fd": fd, "kid": kd.mean, "diversity": div["mean"]}
    ci = sample_intervals(acc["correct"], feats, labels, test_feats, measured, seed=seed)
    extra: dict[str, Any] = {"stats_seconds": time.perf_counter() - t0}
    if memorisation:
        mem = copy_rate(feats, features_of(judge, train), test_feats, seed=seed)
        extra |= {
            "copy_rate": mem["copy_rate"], "copy_threshold": mem["threshold"],
            "copy_quantile": mem["quantile"], "copy_reference": mem["reference"],
            "nearest_train": {"distance": mem["nearest_distance"].tolist(),
                              "index": mem["nearest_index"].tolist()},
        }  # fmt: skip
    return {
        "accuracy": acc["overall"],
        "accuracy_per_class": acc["per_class"],
        "fd": fd,
        "fd_floor": floor,
        "fd_ratio": fd / floor if floor > 0 else float("inf"),
        "kid": kd.mean,
        "kid_std": kd.std,
        "diversity": div["mean"],
        "diversity_real": real_div["mean"],
        "judge_test_accuracy": judge.test_accuracy,
        "n": int(labels.numel()),
        "ci95": ci,
        "correct": acc["correct"],
        **extra,
    }


def inception_against_test(
    images: torch.Tensor, dataset: str, data_dir: str | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Inception FID/KID of samples against the test split, with the train-vs-test floor."""
    from difflab.evaluation.inception import InceptionFeatures, inception_scores

    net = InceptionFeatures(device)
    test = load_dataset(dataset, "test", data_dir)
    train = load_dataset(dataset, "train", data_dir)
    real = torch.cat([net(chunk) for chunk in test.images.split(100)])  # (N, 2048), once
    scores = inception_scores(images, real, device, extractor=net)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: len(test)]
    floor = inception_scores(train.images[pick], real, device, extractor=net)
    return {**scores, "fid_floor": floor["inception_fid"], "kid_floor": floor["inception_kid"]}


def evaluate_run(
    run: str | Path,
    opts: EvalOptions | None = None,
    device: str = "cpu",
    progress: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """``difflab eval``: sample ``opts`` (default :class:`~difflab.options.EvalOptions`) from
    ``run``, measure the samples and write ``eval.json`` into the run folder."""
    from difflab.ddpm.generate import guidance_shape, sample_labels
    from difflab.devices import resolve_precision

    opts = EvalOptions() if opts is None else opts
    autocast = resolve_precision(opts.precision, device)
    if opts.inception:
        from difflab.evaluation.inception import inception_weights

        inception_weights()  # refuse before any sampling when the weights are missing
    model, diffusion, cfg = load_run(run, device=device)
    opts = opts.for_run(cfg)
    sc = cfg.sample
    labels = torch.arange(cfg.model.num_classes).repeat_interleave(opts.n_per_class)
    t0 = time.perf_counter()
    images = sample_labels(
        model, diffusion, labels, guidance=opts.guidance, steps=opts.steps, sampler=opts.sampler,
        eta=sc.eta, spacing=sc.spacing, seed=opts.seed, progress=progress, autocast=autocast,
        **guidance_shape(opts),
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    metrics = evaluate_samples(
        images, labels, cfg.train.dataset, cfg.train.data_dir, device, seed=opts.seed,
        memorisation=True,
    )  # fmt: skip
    nearest = metrics.pop("nearest_train")
    if opts.inception:
        metrics["inception"] = inception_against_test(
            images, cfg.train.dataset, cfg.train.data_dir, device
        )
    result = {
        "run": str(run),
        "settings": {"n_per_class": opts.n_per_class, "guidance": opts.guidance, "steps": opts.steps,
                     "sampler": opts.sampler, "eta": sc.eta, "spacing": sc.spacing, "seed": opts.seed,
                     "precision": autocast or "fp32", **guidance_shape(opts, only_set=True)},
        "sampling_seconds": seconds,
        "samples_per_s": labels.numel() / seconds,
        **metrics,
        "class_names": list(cfg.model.class_names),
        "note": "fd and kid are measured on the reference classifier's features; they are not comparable with Inception FID/KID",
    }  # fmt: skip
    if write:
        write_json(Path(run) / "eval.json", result)
        write_nearest_figure(Path(run) / "figures" / "nearest_train.png", images, labels,
                             nearest, result, cfg.train.dataset, cfg.train.data_dir)  # fmt: skip
    return result


def write_nearest_figure(
    path: Path, images: torch.Tensor, labels: torch.Tensor, nearest: dict, result: dict,
    dataset: str, data_dir: str | None, rows: int = 8,
) -> None:  # fmt: skip
    """The ``rows`` samples nearest to the training set beside their nearest training images."""
    from difflab.figures.images import save_png, to_uint8
    from difflab.figures.memorisation import nearest_train_figure

    dist = torch.tensor(nearest["distance"])
    order = dist.argsort()[:rows]
    train = load_dataset(dataset, "train", data_dir)
    neighbours = train.images[torch.tensor(nearest["index"])[order]]  # (R, C, H, W) uint8
    names = result.get("class_names") or [str(i) for i in range(int(labels.max()) + 1)]
    table = nearest_train_figure(
        to_uint8(images[order]), neighbours.permute(0, 2, 3, 1).numpy(), dist[order].tolist(),
        result["copy_threshold"], result["copy_rate"], [names[int(c)] for c in labels[order]],
        result["copy_quantile"],
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, table.image, {"run": result["run"], "copy_rate": result["copy_rate"]})


def interval_text(r: dict[str, Any], metric: str, fmt: str) -> str:
    """``"  95 % CI [low, high]"`` of ``metric`` in an eval result, or "" (older eval.json)."""
    ci = (r.get("ci95") or {}).get(metric)
    return "" if not ci else f"  95% CI [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def format_eval(r: dict[str, Any]) -> str:
    s = r["settings"]
    names = r.get("class_names") or [str(i) for i in range(len(r["accuracy_per_class"]))]
    per = "  ".join(
        f"{n}:{a:.0%}"
        for n, a in zip(names, r["accuracy_per_class"], strict=False)
        if a is not None
    )
    return "\n".join(
        [
            f"{r['n']} samples ({s['sampler']} {s['steps']} steps, guidance {s['guidance']:g}, seed {s['seed']}) "
            f"in {r['sampling_seconds']:.1f} s",
            f"conditional accuracy: {r['accuracy']:.2%}{interval_text(r, 'accuracy', '.2%')}   "
            f"(reference classifier's own test accuracy {r['judge_test_accuracy']:.2%})",
            f"per class: {per}",
            f"Frechet distance (classifier features): {r['fd']:.3f}{interval_text(r, 'fd', '.3f')}"
            f"   real-vs-real floor {r['fd_floor']:.3f}   ratio {r['fd_ratio']:.2f}x",
            *(
                [
                    f"KID (classifier features): {r['kid']:.4f} ± {r['kid_std']:.4f}{interval_text(r, 'kid', '.4f')}"
                ]
                if "kid" in r
                else []
            ),
            f"diversity (mean pairwise feature distance): {r['diversity']:.3f}"
            f"{interval_text(r, 'diversity', '.3f')}   real test split {r['diversity_real']:.3f}",
            *(
                [
                    f"near-copies of training images: {r['copy_rate']:.1%} (nearest-training distance "
                    f"<= {r['copy_threshold']:.3f}, the {r['copy_quantile']:.0%} quantile of held-out "
                    "test images')"
                ]
                if "copy_rate" in r
                else []
            ),
            *(
                [
                    f"Inception FID: {r['inception']['inception_fid']:.2f}   real-vs-real floor "
                    f"{r['inception']['fid_floor']:.2f}   Inception KID {r['inception']['inception_kid']:.4f}"
                ]
                if "inception" in r
                else []
            ),
        ]
    )
