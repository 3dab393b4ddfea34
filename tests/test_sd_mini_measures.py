"""mini-SD in the SD lab: its own size without ``--size``, prompt accuracy (the dataset's
reference classifier recognises the class the prompt names) and diversity over seeds in ``sd
generate`` and ``sd sweep``, the sweep's 95 % intervals, and the report's account of it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from difflab.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from difflab.evaluation.sd_metrics import PromptJudge, load_prompt_judge, prompt_class  # noqa: E402
from difflab.experiments.sd_sweep import summarise  # noqa: E402
from difflab.options import SDGeneration, SDPipelineSpec, SDSweepAxes  # noqa: E402
from difflab.sd.load import configured_size, load_pipeline, own_size, resolve_model  # noqa: E402
from difflab.sd.mini import read_record, to_pixels  # noqa: E402

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
DIGITS = tuple("0123456789")


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mini") / "mini-digits"
    args = ["sd", "mini", "--dataset", "digits", "--preset", "tiny", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.mark.parametrize(
    "prompt, names, expected",
    [
        ("a handwritten digit 3", DIGITS, 3),
        ("the digit three", DIGITS, 3),
        ("the number 7, handwritten", DIGITS, 7),
        ("Seven", DIGITS, 7),
        ("a photo of a sneaker", FASHION, 7),
        ("two sneakers", FASHION, 7),
        ("a t-shirt", FASHION, 0),  # not also "shirt"
        ("a photo of a shirt", FASHION, 6),
        ("a pair of ankle boots", FASHION, 9),
        ("a photo of a top", FASHION, 0),
    ],
)
def test_prompt_class_reads_the_class_from_free_text(prompt, names, expected):
    assert prompt_class(prompt, names).index == expected


@pytest.mark.parametrize(
    "prompt, names, note",
    [
        ("a handwritten digit 3 next to a 5", DIGITS, "several classes (3, 5)"),
        ("a cat", DIGITS, "none of the classes"),
        ("a 35 mm photo", DIGITS, "none of the classes"),
        ("a dress and a coat", FASHION, "several classes (Dress, Coat)"),
    ],
)
def test_prompts_naming_no_class_or_several_are_not_measured(prompt, names, note):
    asked = prompt_class(prompt, names)
    assert asked.index is None and note in asked.note and "not measured" in asked.note


def test_own_size_is_sample_size_times_the_vae_scale_factor(mini):
    assert own_size({"sample_size": 64}, {"block_out_channels": [128, 256, 512, 512]}) == (512, 512)  # fmt: skip
    assert own_size({"sample_size": [6, 4]}, {"block_out_channels": [8, 16]}) == (8, 12)  # (W, H)
    assert configured_size(resolve_model(str(mini))) == (16, 16)  # not 512
    assert SDGeneration("a cat").size is None and SDSweepAxes(["a cat"]).size is None
    assert SDGeneration("a cat", size="auto").size is None
    assert SDGeneration("a cat", size="24x16").size == (24, 16)


def test_judge_reads_pipeline_images_at_its_own_size(mini):
    """Real digits, made into the pipeline's (H, W, 3) uint8 images at 16x16 RGB, are read by
    the 8x8 grey digits judge: the conversion keeps them recognisable."""
    from difflab.ddpm.data import load_dataset

    judge = load_prompt_judge(mini)
    assert isinstance(judge, PromptJudge) and judge.class_names == DIGITS
    data = load_dataset("digits", "test")
    x = to_pixels(data.images[:200].numpy(), 16)  # (N, 3, 16, 16) in [-1, 1]
    pixels = list(((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8))
    judged, feats = judge.measure(pixels)
    assert feats.shape == (200, 128)
    assert np.mean(np.array(judged) == data.labels[:200].numpy()) > 0.8


def test_no_prompt_judge_for_other_models(tmp_path):
    assert load_prompt_judge("stable-diffusion-v1-5/stable-diffusion-v1-5") is None
    assert load_prompt_judge(tmp_path) is None


def test_sd_generate_uses_the_own_size_and_reports_prompt_accuracy(mini, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["sd", "generate", "--model", str(mini), "--steps", "2", "--prompt", "the digit three",
            "--n", "3", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "prompt accuracy" in text and "of 3" in text and "digits reference classifier" in text
    sidecars = sorted(out.glob("*.json"))
    assert len(sidecars) == 3
    for path in sidecars:
        side = json.loads(path.read_text())
        assert (side["width"], side["height"]) == (16, 16)
        assert side["guidance"] == read_record(mini)["guidance"] == 5.0  # the folder's own
        assert side["prompt_class"] == "3" and side["prompt_correct"] in (0.0, 1.0)
        assert side["prompt_correct"] == float(side["judged_class"] == "3")
        assert "Size: 16x16" in side["parameters"]
    args[args.index("the digit three")] = "a cat"
    assert main([*args[:-1], str(tmp_path / "cat")]) == 0
    assert "prompt accuracy not measured: the prompt names none of the classes" in capsys.readouterr().out  # fmt: skip


def test_sd_sweep_on_mini_sd_has_prompt_accuracy_diversity_and_intervals(mini, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sd", "sweep", "--model", str(mini), "--prompts", "a handwritten digit 3", "a cat",
            "--guidance", "1,3", "--steps", "2", "--seeds", "0,1,2", "--clip-model", "none",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr()
    assert "prompt accuracy at 2 steps: s=1:" in text.out
    assert "--prompts #2 names none of the classes" in text.err
    identity = json.loads((out / "sd_sweep.json").read_text())
    assert identity["size"] == "16x16" and identity["judge"] == "digits"
    cells = list(csv.DictReader((out / "metrics.csv").open()))
    assert {c["prompt_class"] for c in cells} == {"3", ""}  # the cat: not measured
    assert all(c["prompt_correct"] == "" for c in cells if c["prompt_index"] == "1")
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert len(summary) == 2
    for row in summary:
        assert row["prompt_accuracy_images"] == "3"  # the digit prompt's 3 seeds
        acc, lo, hi = (float(row[f"prompt_accuracy_{k}"]) for k in ("mean", "ci_low", "ci_high"))
        assert lo <= acc <= hi
        div, dlo, dhi = (float(row[f"diversity_{k}"]) for k in ("mean", "ci_low", "ci_high"))
        assert div > 0 and dlo <= dhi
        assert float(row["detail_ci_low"]) <= float(row["detail_mean"]) <= float(row["detail_ci_high"])  # fmt: skip
    from difflab.experiments.report import write_report

    write_report([out], tmp_path / "report.html")
    md = (tmp_path / "report.md").read_text()
    assert "lab stand-in, not Stable Diffusion's NSFW checker" in md and "'9'" in md
    assert "| prompt accuracy | diversity |" in md
    assert "At 2 steps the highest prompt accuracy" in md
    assert "From guidance 1 to 3 prompt accuracy" in md and "can" in md
    assert "Diversity over the seeds" in md
    assert "lab stand-in safety checker (it flags the class '9')" in md


def test_summary_intervals_and_diversity_from_cell_records():
    def row(p, seed, correct, feat, clip):
        return {
            "steps": 10, "guidance": 3.0, "prompt_index": p, "seed": seed, "clip_score": clip,
            "detail": 0.01 * seed, "seconds_per_image": 0.1, "nsfw": False, "black": False,
            "prompt_correct": correct, "judge_features": feat,
        }  # fmt: skip

    same = [row(0, s, 1.0, [1.0, 2.0], 30.0) for s in range(4)]
    (r,) = summarise(same)
    assert r["prompt_accuracy_mean"] == 1.0 and r["diversity_mean"] == 0.0  # identical images
    assert r["clip_score_ci_low"] == r["clip_score_ci_high"] == 30.0
    spread = [row(0, s, float(s % 2), [3.0 * s, 4.0 * s], 20.0 + s) for s in range(4)]
    (r,) = summarise(spread)
    assert r["prompt_accuracy_mean"] == 0.5
    assert 0 <= r["prompt_accuracy_ci_low"] < 0.5 < r["prompt_accuracy_ci_high"] <= 1
    # pairwise distances 5 * |i - j| over the 6 pairs of 4 seeds: mean 5 * 10 / 6
    assert r["diversity_mean"] == pytest.approx(50 / 6)
    assert r["diversity_ci_low"] <= r["diversity_mean"] <= r["diversity_ci_high"]
    assert 20 <= r["clip_score_ci_low"] < r["clip_score_mean"] < r["clip_score_ci_high"] <= 23
    plain = [{k: v for k, v in x.items() if k not in ("prompt_correct", "judge_features")} for x in spread]  # fmt: skip
    assert "prompt_accuracy_mean" not in summarise(plain)[0]  # not a mini-SD sweep


def test_pipeline_loads_at_its_own_size_for_generate(mini, tmp_path):
    from difflab.experiments.sd_alignment import generate_measured

    spec = SDPipelineSpec(model=str(mini), device="cpu")
    loaded = load_pipeline(spec)
    r, judged = generate_measured(SDGeneration("a handwritten 5", steps=1, n=2), tmp_path, spec, loaded=loaded)  # fmt: skip
    assert r.settings["width"] == r.settings["height"] == 16
    assert judged["prompt_class"] == "5" and judged["images"] == 2
    assert len(judged["judged_classes"]) == 2
