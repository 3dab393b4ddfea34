"""mini-SD at tiny sizes: trained a few steps on scikit-learn's 8x8 digits through
``difflab sd mini``, saved as a standard diffusers folder, loaded by a plain
``StableDiffusionPipeline.from_pretrained`` and by difflab's loader, run through
``difflab sd generate``, and its lab safety checker (SD's checker class on a chosen concept)
returning a black image and the flag exactly as the real one, diagnosed by difflab unchanged."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.cli import main

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.pipelines.stable_diffusion.safety_checker import (  # noqa: E402
    StableDiffusionSafetyChecker,
)

from difflab.options import MiniSDOptions, SDPipelineSpec  # noqa: E402
from difflab.runfolder import StopRequest, TrainingInterrupted  # noqa: E402
from difflab.sd import mini_train  # noqa: E402
from difflab.sd.load import load_pipeline  # noqa: E402
from difflab.sd.mini import DIGIT_TEMPLATES, MiniSDConfig, caption_templates, read_record, to_pixels  # noqa: E402
from difflab.sd.mini_safety import clip_inputs, flags  # noqa: E402
from difflab.sd.mini_train import train_mini_sd  # noqa: E402
from difflab.sd.safety import FILTERED, diagnose  # noqa: E402


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mini") / "mini-digits"
    args = ["sd", "mini", "--dataset", "digits", "--preset", "tiny", "--flag", "3", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


def test_folder_is_a_standard_pipeline_with_a_measured_scaling_factor(mini):
    index = json.loads((mini / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker"):
        assert (mini / part).is_dir(), part
    assert not list(mini.rglob("*.bin"))  # safetensors only
    record = read_record(mini)
    vae = json.loads((mini / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(record["scaling_factor"])
    assert vae["scaling_factor"] != pytest.approx(0.18215)  # measured, not SD's
    assert record["flagged_concept"] == "3" and record["text_encoder"] == "trained with the UNet"
    assert record["steps"] == {"vae": 3, "unet": 3, "safety": 3}
    assert not any(p.name.endswith(".partial") for p in mini.parent.iterdir())


def test_plain_diffusers_pipeline_loads_and_generates(mini):
    pipe = StableDiffusionPipeline.from_pretrained(str(mini))
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert size == 16
    g = torch.Generator().manual_seed(0)
    out = pipe("a handwritten digit 3", num_inference_steps=2, height=size, width=size,
               guidance_scale=3.0, generator=g, output_type="np")  # fmt: skip
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
    assert len(out.nsfw_content_detected) == 1


def test_difflab_loader_and_sd_generate(mini, tmp_path, capsys):
    loaded = load_pipeline(SDPipelineSpec(model=str(mini), device="cpu", dtype="fp32"))
    assert loaded.safety_checker and loaded.source.kind == "folder"
    out = tmp_path / "gen"
    args = ["sd", "generate", "--model", str(mini), "--size", "16x16", "--steps", "2",
            "--prompt", "a handwritten digit 3", "--n", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "wrote 2 image(s)" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == 2


def test_sd_sweep_runs_on_mini_sd(mini, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sd", "sweep", "--model", str(mini), "--prompts", "a handwritten digit 3", "the digit 7",
            "--guidance", "1,3", "--steps", "2", "--seeds", "0", "--size", "16x16",
            "--clip-model", "none", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "4 cells computed" in capsys.readouterr().out
    assert (out / "metrics.csv").is_file()


def test_lab_checker_blacks_out_and_flags_exactly_as_the_real_one(mini):
    pipe = StableDiffusionPipeline.from_pretrained(str(mini))
    checker, extractor = pipe.safety_checker, pipe.feature_extractor
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 1.0, (6, 16, 16, 3)).astype(np.float32)  # (N, H, W, 3) in [0, 1]
    clip = clip_inputs(extractor, torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    with torch.no_grad():  # put the threshold between the cosines, so some are flagged
        e = torch.nn.functional.normalize(checker.visual_projection(checker.vision_model(clip)[1]))
        cos = e @ torch.nn.functional.normalize(checker.concept_embeds[:1], dim=-1).T
        checker.concept_embeds_weights.fill_(float(cos.median()) - 1e-3)
    expected = flags(checker, clip)
    assert expected.any() and not expected.all()
    out, has_nsfw = checker(images=images.copy(), clip_input=clip)
    assert has_nsfw == expected.tolist()
    for img, before, flagged in zip(out, images, has_nsfw, strict=True):
        if flagged:
            assert np.all(img == 0)  # black, as the real checker returns it
            d = diagnose(img, flagged)
            assert d.nsfw is True and d.black and d.note == FILTERED
        else:
            assert np.array_equal(img, before)
            assert diagnose(img, flagged).note is None
    nan = np.full((16, 16, 3), np.nan, np.float32)  # a NaN image the checker did not flag
    assert "NOT flagged by the safety checker" in diagnose(nan, False).note


def test_sd_generate_reports_a_flagged_mini_sd_image(mini, tmp_path, capsys):
    flagging = tmp_path / "mini-flags-all"
    shutil.copytree(mini, flagging)
    pipe = StableDiffusionPipeline.from_pretrained(str(flagging))
    pipe.safety_checker.concept_embeds_weights.data.fill_(-10.0)  # every cosine is above
    pipe.save_pretrained(flagging)
    args = ["sd", "generate", "--model", str(flagging), "--size", "16x16", "--steps", "2",
            "--prompt", "a handwritten digit 3", "--device", "cpu", "--out", str(tmp_path / "g")]  # fmt: skip
    assert main(args) == 0
    assert "1 of 1 flagged by the safety checker" in capsys.readouterr().out
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "g").glob("*.json")]
    assert [(s["nsfw"], s["black"], s["note"]) for s in sidecars if "nsfw" in s] == [
        (True, True, FILTERED)
    ]


def test_captions_are_free_text_over_class_names():
    assert "a handwritten digit {c}" in caption_templates("digits", tuple("0123456789"))
    assert caption_templates("mnist5k", tuple("0123456789")) == DIGIT_TEMPLATES
    assert "a photo of a {c}" in caption_templates("cifar10", ("airplane", "cat"))
    x = to_pixels(np.zeros((2, 1, 8, 8), np.uint8), 16)
    assert x.shape == (2, 3, 16, 16) and float(x.min()) == -1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "imagenet"], "--dataset 'imagenet': choose one of mnist5k"),
        (["--minutes", "0"], "--minutes 0: must be a number > 0"),
        (["--preset", "huge"], "--preset 'huge': choose one of small, tiny"),
        (["--dataset", "digits", "--flag", "cat"], "--flag 'cat': not a class of digits"),
        (["--dataset", "folder:"], "--dataset 'folder:': give a folder"),
    ],
)
def test_bad_options_are_one_line_exit_2(args, message, tmp_path, capsys):
    assert main(["sd", "mini", *args, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_existing_out_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("keep")
    assert main(["sd", "mini", "--dataset", "digits", "--out", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert MiniSDOptions(flag="none").flag is None and MiniSDOptions().flag == "last"


class _StopAfter(StopRequest):
    """A SIGINT that arrives after ``n`` training steps."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __bool__(self) -> bool:
        self.n -= 1
        if self.n <= 0:
            self.signum = signal.SIGINT
        return self.signum is not None


def _train(out: Path, **kw):
    from difflab.ddpm.data import load_dataset

    d = load_dataset("digits")
    cfg = dataclasses.replace(
        MiniSDConfig.preset("tiny"), vae_steps=3, unet_steps=4, safety_steps=2
    )
    return train_mini_sd(
        d.images.numpy()[:200], d.labels.numpy()[:200], d.class_names, out, "digits", cfg,
        "3", seed=1, progress=False, checkpoint_every=2, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("stop_after", [2, 5])  # in the VAE phase, in the UNet phase
def test_resume_after_a_stop_gives_the_weights_of_an_unstopped_run(
    tmp_path, monkeypatch, stop_after
):
    from safetensors.torch import load_file

    whole = _train(tmp_path / "whole")
    monkeypatch.setattr(mini_train, "stop_on_signals", lambda: contextlib.nullcontext(_StopAfter(stop_after)))  # fmt: skip
    with pytest.raises(TrainingInterrupted, match="--resume"):
        _train(tmp_path / "stopped")
    assert (tmp_path / "stopped" / "train_state.pt").is_file()
    assert not (tmp_path / "stopped" / "model_index.json").exists()
    monkeypatch.setattr(mini_train, "stop_on_signals", lambda: contextlib.nullcontext(StopRequest()))  # fmt: skip
    resumed = _train(tmp_path / "stopped", resume=True)
    assert resumed.steps == whole.steps == {"vae": 3, "unet": 4, "safety": 2}
    assert resumed.scaling_factor == whole.scaling_factor
    for part in ("unet", "vae", "text_encoder", "safety_checker"):
        a = load_file(next((whole.out / part).glob("*.safetensors")))
        b = load_file(next((resumed.out / part).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert not (resumed.out / "train_state.pt").exists()


def test_resume_refuses_other_options(tmp_path, capsys):
    out = tmp_path / "m"
    args = ["sd", "mini", "--dataset", "digits", "--preset", "tiny", "--out", str(out)]
    out.mkdir()
    torch.save({"step": 1, "options": {"dataset": "digits", "seed": 0, "flag": "last", "preset": "tiny"}}, out / "train_state.pt")  # fmt: skip
    assert main([*args, "--seed", "4", "--resume"]) == 2
    assert "--seed is 4 here but 0 in the run" in capsys.readouterr().err


def test_minutes_cap_every_phase_and_keep_one_step_each(tmp_path):
    from difflab.ddpm.data import load_dataset

    d = load_dataset("digits")
    cfg = dataclasses.replace(MiniSDConfig.preset("tiny"), vae_steps=10**6, unet_steps=10**6, safety_steps=10**6)  # fmt: skip
    r = train_mini_sd(
        d.images.numpy()[:100], d.labels.numpy()[:100], d.class_names, tmp_path / "m",
        "digits", cfg, None, minutes=1e-4, progress=False,
    )  # fmt: skip
    assert r.steps == {"vae": 1, "unet": 1} and r.flagged_concept is None
    pipe = StableDiffusionPipeline.from_pretrained(str(r.out))
    assert pipe.safety_checker is None  # --flag none: no checker, as a pipeline saved without one
