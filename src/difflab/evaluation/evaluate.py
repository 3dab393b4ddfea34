"""``difflab eval``: sample from a run and measure the samples against real data.

Draws ``n_per_class`` samples for every class through the one sampling generator, then
reports the reference classifier's conditional accuracy (overall and per class), the
Fréchet distance and KID on the classifier's features against the test split (the FD beside
the real-vs-real floor, train split vs test split), and within-class diversity. The result
is written to ``eval.json`` in the run folder, with the settings used.
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
from difflab.evaluation.metrics import conditional_accuracy, diversity, features_of, real_floor
from difflab.files import write_json
from difflab.options import EvalOptions


def evaluate_samples(
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: str,
    data_dir: str | None = None,
    device: str = "cpu",
    judge: Judge | None = None,
) -> dict[str, Any]:
    """Metrics of (N, C, H, W) samples in [-1, 1] with their intended ``labels``.

    Pass the same ``judge`` to many calls (a sweep) so that the features of the real splits
    are computed once: they are cached per judge object.
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
    metrics = evaluate_samples(images, labels, cfg.train.dataset, cfg.train.data_dir, device)
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
    return result


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
            f"conditional accuracy: {r['accuracy']:.2%}   (reference classifier's own test accuracy "
            f"{r['judge_test_accuracy']:.2%})",
            f"per class: {per}",
            f"Frechet distance (classifier features): {r['fd']:.3f}   real-vs-real floor {r['fd_floor']:.3f}"
            f"   ratio {r['fd_ratio']:.2f}x",
            *(
                [f"KID (classifier features): {r['kid']:.4f} ± {r['kid_std']:.4f}"]
                if "kid" in r
                else []
            ),
            f"diversity (mean pairwise feature distance): {r['diversity']:.3f}   real test split "
            f"{r['diversity_real']:.3f}",
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
