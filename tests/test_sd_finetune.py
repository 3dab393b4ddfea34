"""LoRA fine-tuning (``difflab sd finetune``) and LoRAs at inference (``--lora``), offline.

Everything runs on the tiny random pipeline of :mod:`difflab.sd.tiny` and four coloured 32x32
squares written by the tests; the module fixture trains one run through the command line and
the later tests use its LoRA.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.errors import UsageError

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from difflab.experiments.sd_sweep import sd_sweep, sweep_identity  # noqa: E402
from difflab.options import SDGeneration, SDPipelineSpec, SDSweepAxes  # noqa: E402
from difflab.sd.dataset import load_image_folder  # noqa: E402
from difflab.sd.finetune import (  # noqa: E402
    FinetuneConfig,
    FineTuner,
    batch_indices,
)
from difflab.sd.generate import generate  # noqa: E402
from difflab.sd.load import load_pipeline  # noqa: E402
from difflab.sd.lora import LORA_WEIGHTS, short_hash  # noqa: E402
from difflab.sd.metadata import read_parameters  # noqa: E402
from difflab.sd.tiny import WIDTH, build_tiny_sd  # noqa: E402

PROMPT = "a photo of sks square"
COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (240, 220, 20)]


def _squares(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    return folder


def _finetune_args(models, out: Path, *extra: str) -> list[str]:
    return ["sd", "finetune", "--data", str(models.data), "--instance-prompt", PROMPT,
            "--resolution", "32", "--model", str(models.sd), "--device", "cpu",
            "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("sd-lora")
    ns = SimpleNamespace(
        root=root, sd=build_tiny_sd(root / "tiny-sd"), data=_squares(root / "data")
    )
    ns.run = root / "run"
    ns.options = ["--lr", "0.1", "--rank", "8", "--checkpoint-every", "20",
                  "--validate-every", "20", "--validation-prompt", "a sks square"]  # fmt: skip
    assert main(_finetune_args(ns, ns.run, "--steps", "40", *ns.options)) == 0
    ns.lora = ns.run / LORA_WEIGHTS
    return ns


def _pixels(png: Path) -> np.ndarray:
    return np.asarray(Image.open(png), dtype=int)


# -- training --------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_fills_the_run_folder(models):
    run = models.run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert all(r["seconds_per_step"] > 0 for r in rows)
    config = json.loads((run / "config.json").read_text())
    assert config["rank"] == 8 and config["alpha"] == 8.0 and config["lr"] == 0.1
    assert config["instance_prompt"] == PROMPT and config["images"] == 4
    assert config["target_modules"]["unet"] == ["to_q", "to_k", "to_v", "to_out.0"]
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["step"] == 40 and state["files"] == ["0.png", "1.png", "2.png", "3.png"]
    names = sorted(p.name for p in (run / "validation").iterdir())
    assert names == ["step_000000.png", "step_000020.png", "step_000040.png"]
    with Image.open(run / "figures" / "loss.png") as im:
        assert im.width > 400
    weights = load_file(models.lora)
    assert weights and all(k.startswith("unet.") and "lora" in k for k in weights)


def test_batches_cover_every_image_once_per_epoch():
    order = [i for step in range(6) for i in batch_indices(4, 2, seed=3, step=step)]
    assert sorted(order[:4]) == sorted(order[4:8]) == [0, 1, 2, 3]
    assert order == [i for step in range(6) for i in batch_indices(4, 2, seed=3, step=step)]
    assert batch_indices(4, 8, seed=0, step=0) != batch_indices(4, 8, seed=1, step=0)


def test_resume_after_a_kill_gives_the_same_weights(models, tmp_path, monkeypatch):
    config = FinetuneConfig(
        str(models.data), PROMPT, rank=2, steps=12, lr=1e-2, batch_size=2, resolution=32,
        train_text_encoder=True, ema=True, checkpoint_every=5, model=str(models.sd),
    )  # fmt: skip
    FineTuner(config, tmp_path / "straight", device="cpu", progress=False).fit()
    real = FineTuner.train_step

    def killed(self):
        if self.step == 7:
            raise KeyboardInterrupt  # killed after the checkpoint of step 5
        return real(self)

    monkeypatch.setattr(FineTuner, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        FineTuner(config, tmp_path / "resumed", device="cpu", progress=False).fit()
    monkeypatch.setattr(FineTuner, "train_step", real)
    assert torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)["step"] == 5
    r = FineTuner(config, tmp_path / "resumed", device="cpu", resume=True, progress=False).fit()
    assert r.steps == 12 and r.steps_run == 7
    a = load_file(tmp_path / "straight" / LORA_WEIGHTS)
    b = load_file(tmp_path / "resumed" / LORA_WEIGHTS)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert steps == list(range(1, 13))  # the lines of steps 6 and 7 were dropped and redone


def test_a_kill_between_the_lora_and_the_state_resumes_from_the_state(
    models, tmp_path, monkeypatch, capsys
):
    config = FinetuneConfig(
        str(models.data), PROMPT, rank=2, steps=6, lr=1e-2, batch_size=2, resolution=32,
        checkpoint_every=3, model=str(models.sd),
    )  # fmt: skip
    FineTuner(config, tmp_path / "straight", device="cpu", progress=False).fit()
    run, real = tmp_path / "run", torch.save

    def killed(obj, *a, **k):  # the LoRA of step 6 is written, then the process dies
        if isinstance(obj, dict) and obj.get("step") == 6:
            raise KeyboardInterrupt
        return real(obj, *a, **k)

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        FineTuner(config, run, device="cpu", progress=False).fit()
    monkeypatch.undo()
    assert torch.load(run / "train_state.pt", weights_only=True)["step"] == 3
    stale = [run / ".train_state.pt.a1b2c3.tmp.pt", run / "figures" / ".loss.png.d4e5.tmp.png"]
    stale[1].parent.mkdir(exist_ok=True)
    for p in stale:
        p.write_bytes(b"half a file")
    tuner = FineTuner(config, run, device="cpu", resume=True, progress=False)
    assert f"{run / LORA_WEIGHTS} is not the one saved with train_state.pt (step 3)" in " ".join(
        tuner.notes
    )
    assert tuner.fit().steps_run == 3
    assert not any(p.exists() for p in stale)
    a, b = load_file(tmp_path / "straight" / LORA_WEIGHTS), load_file(run / LORA_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    # a damaged train state is one line naming it, and nothing is written
    (run / "train_state.pt").write_bytes(b"PK\x03\x04 truncated")
    listing = sorted(p.name for p in run.rglob("*"))
    resume = ["--rank", "2", "--lr", "0.01", "--batch-size", "2", "--checkpoint-every", "3"]
    assert main(_finetune_args(models, run, "--steps", "6", "--resume", *resume)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train_state.pt is damaged or truncated" in err, err
    assert sorted(p.name for p in run.rglob("*")) == listing


def test_sigterm_stops_finetuning_after_a_checkpoint(models, tmp_path, monkeypatch, capsys):
    import os
    import signal

    real = FineTuner.train_step

    def signalled(self):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(FineTuner, "train_step", signalled)
    out = tmp_path / "run"
    assert main(_finetune_args(models, out, "--steps", "6", "--rank", "2")) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"difflab sd: stopped by SIGTERM at step 2; checkpoint saved in {out}; "
        "resume with: the same difflab sd finetune command with --resume"
    )
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2
    assert load_file(out / LORA_WEIGHTS)


def test_resume_and_out_are_checked(models, tmp_path, capsys):
    before = sorted(p.name for p in models.run.rglob("*"))
    cases = [
        (["--resume", "--steps", "40", "--rank", "4"], "--rank is 4 here but 8"),
        (["--resume", "--steps", "40", *models.options, "--ema"], "--ema is on here but off"),
        (["--resume", "--steps", "30", *models.options], "already at step 40"),
        (["--steps", "5"], "is not empty; pass --resume"),
    ]
    for extra, message in cases:
        assert main(_finetune_args(models, models.run, *extra)) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (extra, err)
    assert sorted(p.name for p in models.run.rglob("*")) == before
    assert main(_finetune_args(models, tmp_path / "new", "--resume")) == 2
    assert "holds no checkpoint (train_state.pt) to resume" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# -- the LoRA at inference -------------------------------------------------------------------
def test_lora_loads_in_diffusers_and_through_generate(models, tmp_path, capsys):
    plain = StableDiffusionPipeline.from_pretrained(models.sd, safety_checker=None)
    plain.set_progress_bar_config(disable=True)

    def draw():
        return plain(
            PROMPT, num_inference_steps=4, height=32, width=32, output_type="np",
            generator=torch.Generator().manual_seed(5),
        ).images[0]  # fmt: skip

    base = draw()
    plain.load_lora_weights(str(models.lora))
    with_lora = draw()
    assert np.abs(with_lora - base).max() > 0.05  # the LoRA changes the images

    args = ["sd", "generate", "--model", str(models.sd), "--size", "32x32", "--steps", "4",
            "--seed", "5", "--guidance", "7.5", "--device", "cpu", "--prompt", PROMPT]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "g"), "--lora", f"{models.lora}:1"]) == 0
    png = next((tmp_path / "g").glob("*.png"))
    assert np.abs(_pixels(png) / 255 - with_lora).max() <= 1 / 255 + 1e-6
    p = read_parameters(png)
    assert p["prompt"] == f"{PROMPT} <lora:pytorch_lora_weights:1>"
    assert p["Lora hashes"] == f"pytorch_lora_weights: {short_hash(models.lora)}"
    assert p["Lora"] == "pytorch_lora_weights:1"
    side = json.loads(png.with_suffix(".json").read_text())
    assert side["prompt"] == PROMPT and side["loras"][0]["scale"] == 1.0
    assert side["loras"][0]["file"] == str(models.lora)
    assert main([*args, "--out", str(tmp_path / "z"), "--lora", f"{models.lora}:0"]) == 0
    spec = SDPipelineSpec(model=str(models.sd), device="cpu")
    plain_png = generate(SDGeneration(PROMPT, steps=4, seed=5, size="32x32"), tmp_path / "b", spec)
    zero = next((tmp_path / "z").glob("*.png"))
    assert np.array_equal(_pixels(zero), _pixels(plain_png.images[0].png))  # scale 0 = base

    loaded = load_pipeline(SDPipelineSpec(model=str(models.sd)))
    with_lora = SDPipelineSpec(model=str(models.sd), lora=[str(models.lora)])
    generate(SDGeneration(PROMPT, steps=1, size="32x32"), tmp_path / "r", with_lora, loaded=loaded)
    assert loaded.pipe.get_list_adapters() == {}  # a reused pipeline is left as it was


def test_validation_grid_shows_what_generate_makes(models, tmp_path):
    from difflab.figures.sd import validation_grid

    r = generate(
        SDGeneration("a sks square", steps=25, n=4, size="32x32"), tmp_path,
        SDPipelineSpec(model=str(models.sd), lora=[str(models.lora)]),
    )  # fmt: skip
    images = np.stack([np.asarray(Image.open(x.png)) for x in r.images])
    grid = validation_grid(images, [False] * 4, [0, 1, 2, 3], 40, "a sks square")
    assert np.array_equal(np.asarray(grid), _pixels(models.run / "validation" / "step_000040.png"))


def _other_base_lora(folder: Path, name: str, widths: tuple[int, int], blocks: tuple) -> Path:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel(
        block_out_channels=widths, layers_per_block=1, sample_size=16, down_block_types=blocks,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(blocks)),
        cross_attention_dim=WIDTH, norm_num_groups=8, attention_head_dim=4,
    )  # fmt: skip
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, weight_name=name,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )  # fmt: skip
    return folder / name


def test_bad_lora_files_are_refused_with_one_line(models, tmp_path, capsys):
    wide = _other_base_lora(
        tmp_path, "wide.safetensors", (16, 32), ("DownBlock2D", "CrossAttnDownBlock2D")
    )
    deeper = _other_base_lora(
        tmp_path, "deeper.safetensors", (8, 16), ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    )
    (tmp_path / "lora.ckpt").write_bytes(b"\x80\x04not really a pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    save_file({"conv.weight": torch.zeros(2, 2)}, tmp_path / "full.safetensors")
    cases = [
        (wide, "does not fit this model: layer unet.down_blocks.1"),
        (deeper, "has no layer unet.down_blocks.0"),
        (tmp_path / "missing.safetensors", "no such file"),
        (tmp_path / "lora.ckpt", "not a .safetensors file"),
        (tmp_path / "junk.safetensors", "not a readable safetensors file"),
        (tmp_path / "full.safetensors", "holds no LoRA weights"),
    ]
    out = tmp_path / "out"
    for lora, message in cases:
        args = ["sd", "generate", "--model", str(models.sd), "--size", "32x32", "--steps", "1",
                "--device", "cpu", "--prompt", "x", "--lora", str(lora), "--out", str(out)]  # fmt: skip
        assert main(args) == 2, lora
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--lora" in err and message in err, err
        assert not out.exists()


# -- the sweep axis --------------------------------------------------------------------------
def test_sweep_takes_the_lora_scale_as_an_axis(models, tmp_path):
    kw = dict(guidance="3", steps="2", seeds="0", size="32x32", clip_model="none")
    lora = SDPipelineSpec(model=str(models.sd), lora=[str(models.lora)])
    plain_spec = SDPipelineSpec(model=str(models.sd))

    def axes(**more):
        return SDSweepAxes(["a sks square"], **kw, **more)

    r = sd_sweep(axes(lora_scales="0,1"), tmp_path / "s", lora, progress=False)
    assert r.cells_total == 2 and {x["lora_scale"] for x in r.rows} == {0.0, 1.0}
    cells = tmp_path / "s" / "cells"
    assert sorted(p.name for p in cells.glob("*.png")) == [
        "p00_g3_steps2_seed0_lora0.png",
        "p00_g3_steps2_seed0_lora1.png",
    ]
    header = next(csv.reader(open(tmp_path / "s" / "metrics.csv")))
    assert header[:5] == ["prompt_index", "guidance", "steps", "seed", "lora_scale"]
    assert {p.name for p in r.figures} >= {"grid_p00_lora0.png", "grid_p00_lora1.png"}
    plain = sd_sweep(axes(), tmp_path / "plain", plain_spec, progress=False)
    base = _pixels(tmp_path / "plain" / "cells" / "p00_g3_steps2_seed0.png")
    assert np.array_equal(_pixels(cells / "p00_g3_steps2_seed0_lora0.png"), base)
    assert not np.array_equal(_pixels(cells / "p00_g3_steps2_seed0_lora1.png"), base)
    assert "lora_scale" not in plain.rows[0] and "lora" not in plain.rows[0]
    with pytest.raises(UsageError, match="--lora-scales 0,1, not 0,0.5,1"):
        sd_sweep(axes(lora_scales="0,.5,1"), tmp_path / "s", lora, progress=False)
    with pytest.raises(UsageError, match="without a LoRA"):
        sd_sweep(axes(), tmp_path / "plain", lora, progress=False)
    with pytest.raises(UsageError, match="--lora-scales needs --lora"):
        sd_sweep(axes(lora_scales="0,1"), tmp_path / "x", plain_spec, progress=False)
    a = SDSweepAxes(["a"], "3", "2", "0", size="32x32", clip_model=None)
    identity = sweep_identity(a, plain_spec)
    assert not any(k.startswith("lora") for k in identity)  # old sweeps keep their identity


# -- data and options ------------------------------------------------------------------------
def test_image_folder_converts_resizes_captions_and_skips(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    Image.new("RGB", (32, 32), "red").save(d / "a.png")
    Image.new("L", (32, 32), 128).save(d / "b.png")
    Image.new("RGBA", (32, 32), (0, 0, 255, 0)).save(d / "c.png")  # fully transparent
    Image.new("P", (32, 32), 3).save(d / "d.png")
    Image.new("RGB", (48, 40), "green").save(d / "e.jpg")
    Image.new("RGB", (32, 32), "white").save(d / "f.bmp")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "notes.md").write_text("not an image")
    (d / "b.txt").write_text("a grey square\n")
    (d / "metadata.jsonl").write_text('{"file_name": "e.jpg", "text": "a green square"}\n')
    data = load_image_folder(d, 32, PROMPT)
    assert data.files == ["a.png", "b.png", "c.png", "d.png", "e.jpg", "f.bmp"]
    assert data.captions == [PROMPT, "a grey square", PROMPT, PROMPT, "a green square", PROMPT]
    assert data.pixels.shape == (6, 3, 32, 32) and data.pixels.dtype == torch.uint8
    assert data.pixels[2].min() == 255  # transparency composited on white
    assert data.notes == [
        "skipped 1 unreadable file(s): broken.png",
        "converted 3 image(s) to RGB (L: 1, P: 1, RGBA: 1)",
        "resized and center-cropped 1 image(s) to 32x32 (from 48x40 (1))",
        f"4 of 6 images have no caption and use --instance-prompt {PROMPT!r}",
    ]
    with pytest.raises(UsageError, match="--instance-prompt is missing: 4 of 6"):
        load_image_folder(d, 32, None)
    (d / "metadata.jsonl").write_text('{"file": "e.jpg"}\n')
    with pytest.raises(UsageError, match="metadata.jsonl line 1"):
        load_image_folder(d, 32, PROMPT)


def test_bad_data_and_options_are_one_line_exit_2_nothing_written(models, tmp_path, capsys):
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"not a jpeg")
    cases = [
        (["--data", str(tmp_path / "nope")], "--data", "no such folder"),
        (["--data", str(empty)], "--data", "holds no images"),
        (["--data", str(broken)], "--data", "none of its 1 images can be read (x.jpg)"),
        (["--rank", "0"], "--rank 0", "whole number >= 1"),
        (["--steps", "0"], "--steps 0", ">= 1"),
        (["--lr", "0"], "--lr 0", "> 0"),
        (["--alpha", "-1"], "--alpha -1", "> 0"),
        (["--batch-size", "0"], "--batch-size 0", ">= 1"),
        (["--resolution", "30"], "--resolution 30", "multiple of 8"),
        (["--checkpoint-every", "0"], "--checkpoint-every 0", ">= 1"),
        (["--validate-every", "0"], "--validate-every 0", ">= 1"),
        (["--mixed-precision", "fp8"], "--mixed-precision 'fp8'", "choose one of"),
        (["--mixed-precision", "fp16"], "--mixed-precision fp16", "CUDA"),
        (["--adam-8bit"], "--adam-8bit", "CUDA"),
        (["--instance-prompt", " "], "--instance-prompt", "empty"),
        (["--model", str(tmp_path / "none.safetensors")], "--model", "no such file"),
    ]
    for extra, option, message in cases:
        out = tmp_path / "out"
        assert main(_finetune_args(models, out, *extra)) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and option in err and message in err, (extra, err)
        assert not out.exists(), extra


def test_cli_defaults_are_the_library_defaults():
    from difflab.cli import build_parser
    from difflab.cli.args import build

    args = build_parser().parse_args(["sd", "finetune", "--data", "d", "--out", "o"])
    assert build(FinetuneConfig, args) == FinetuneConfig("d")
