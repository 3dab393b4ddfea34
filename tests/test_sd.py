"""Stable Diffusion lab on a tiny pipeline built from configs (no download, seconds per test).

The module fixture saves (``save_pretrained``) the tiny pipelines of :mod:`difflab.sd.tiny`:
tiny UNet, VAE and CLIP text model, a tokenizer generated from a byte-level vocab, a real
``StableDiffusionSafetyChecker`` on a tiny CLIP with thresholds that never flag (``tiny-sd``)
or always flag (``tiny-sd-flags``), and a tiny CLIP model for the CLIP score; the tests run the
real code paths (``difflab.cli.main`` included) on them.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.errors import UsageError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import AutoencoderKL, StableDiffusionPipeline  # noqa: E402
from diffusers.pipelines.stable_diffusion.safety_checker import (  # noqa: E402
    StableDiffusionSafetyChecker,
)
from transformers import CLIPModel  # noqa: E402

from difflab.devices import resolve_dtype  # noqa: E402
from difflab.evaluation.sd_metrics import ClipScorer, laplacian_variance  # noqa: E402
from difflab.experiments.sd_sweep import sd_sweep, sweep_identity  # noqa: E402
from difflab.options import SDGeneration, SDPipelineSpec, SDSweepAxes  # noqa: E402
from difflab.sd import SCHEDULER_NAMES  # noqa: E402
from difflab.sd.generate import generate, run_pipeline, truncation_note  # noqa: E402
from difflab.sd.load import (  # noqa: E402
    SCHEDULERS,
    load_pipeline,
    make_scheduler,
    resolve_model,
    scheduler_name,
)
from difflab.sd.metadata import format_parameters, parse_parameters, read_parameters  # noqa: E402
from difflab.sd.tiny import build_tiny_clip, build_tiny_sd  # noqa: E402

SIZE = "32x32"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("sd")
    return SimpleNamespace(
        root=root,
        sd=build_tiny_sd(root / "tiny-sd"),
        flags=build_tiny_sd(root / "tiny-sd-flags", flags=True),  # same weights, flags all
        clip=build_tiny_clip(root / "tiny-clip"),
    )


@pytest.fixture(scope="module")
def loaded(models):
    return load_pipeline(SDPipelineSpec(model=str(models.sd), device="cpu", dtype="fp32"))


def _gen_args(models, out: Path, *extra: str) -> list[str]:
    return ["sd", "generate", "--model", str(models.sd), "--size", SIZE, "--steps", "2",
            "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


# -- generate --------------------------------------------------------------------------------
def test_generate_writes_a1111_parameters_and_sidecar(models, tmp_path, capsys):
    out = tmp_path / "gen"
    args = _gen_args(models, out, "--prompt", "a red cube, studio light", "--negative-prompt",
                     "blurry", "--guidance", "7.5", "--seed", "41", "--n", "2")  # fmt: skip
    assert main(args) == 0
    assert "wrote 2 image(s)" in capsys.readouterr().out
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00001-41.png", "00002-42.png"]
    p = read_parameters(pngs[1])
    assert p["prompt"] == "a red cube, studio light"
    assert p["negative_prompt"] == "blurry"
    assert p["Steps"] == "2" and p["Sampler"] == "Euler" and p["CFG scale"] == "7.5"
    assert p["Seed"] == "42" and p["Size"] == "32x32" and p["Model"] == "tiny-sd"
    side = json.loads(pngs[1].with_suffix(".json").read_text())
    assert side["seed"] == 42 and side["nsfw"] is False and side["black"] is False
    assert side["dtype"] == "fp32" and side["scheduler"] == "euler" and side["note"] is None
    assert "AttnProcessor2_0" in side["attention"]  # SDPA, diffusers' default
    with Image.open(pngs[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    assert main(args) == 0  # a second run adds files, never overwrites
    assert len(list(out.glob("*.png"))) == 4


def test_generate_reproduces_a_plain_pipeline_call_per_seed(models, loaded, tmp_path):
    embeds = loaded.pipe.encode_prompt("a cat", torch.device("cpu"), 1, True)
    ours, flags = run_pipeline(loaded, embeds, 5.0, 2, [3, 4], 32, 32)
    assert flags == [False, False] and ours.shape == (2, 32, 32, 3)
    plain = StableDiffusionPipeline.from_pretrained(models.sd)
    plain.set_progress_bar_config(disable=True)
    for i, seed in enumerate((3, 4)):
        ref = plain(
            "a cat", guidance_scale=5.0, num_inference_steps=2, height=32, width=32,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        ).images[0]  # fmt: skip
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)
    a = generate(SDGeneration("a cat", steps=2, seed=3, size=SIZE), tmp_path / "a", loaded=loaded)
    b = generate(SDGeneration("a cat", steps=2, seed=3, size=SIZE), tmp_path / "b", loaded=loaded)
    c = generate(SDGeneration("a cat", steps=2, seed=4, size=SIZE), tmp_path / "c", loaded=loaded)
    pix = [np.asarray(Image.open(r.images[0].png)) for r in (a, b, c)]
    assert np.array_equal(pix[0], pix[1]) and not np.array_equal(pix[0], pix[2])


def test_guidance_0_is_unconditional_and_1_is_conditional(loaded, tmp_path):
    def pixels(prompt, guidance, folder, **kw):
        opts = SDGeneration(prompt, guidance=guidance, steps=2, size=SIZE, **kw)
        r = generate(opts, tmp_path / folder, loaded=loaded)
        return np.asarray(Image.open(r.images[0].png))

    uncond = pixels(None, 1, "u", unconditional=True)
    assert np.array_equal(pixels("a cat", 0, "g0"), uncond)  # eps_uncond alone
    assert not np.array_equal(pixels("a cat", 1, "g1"), uncond)  # eps_cond alone


def test_long_prompt_warns_what_was_cut(models, loaded, tmp_path):
    words = " ".join(f"w{i}" for i in range(40))  # 'wN' is 2-3 tokens here: > 75
    note = truncation_note(loaded.pipe.tokenizer, words, "--prompt")
    cut = note.split("no effect: ")[1]
    assert "CLIP reads 75" in note and "w39" in cut and "w20" not in cut
    assert truncation_note(loaded.pipe.tokenizer, "a cat", "--prompt") is None
    r = generate(SDGeneration(words, steps=1, size=SIZE), tmp_path, loaded=loaded)
    assert any("w39" in n for n in r.notes)


def test_flagged_images_are_reported_and_safety_checker_can_be_disabled(models, tmp_path, capsys):
    out = tmp_path / "flagged"
    assert main(_gen_args(models, out, "--prompt", "x", "--model", str(models.flags))) == 0
    assert "1 of 1 flagged by the safety checker" in capsys.readouterr().out
    png = next(out.glob("*.png"))
    side = json.loads(png.with_suffix(".json").read_text())
    assert side["nsfw"] is True and side["black"] is True and "safety checker" in side["note"]
    assert np.asarray(Image.open(png)).max() == 0  # the checker's black square

    out = tmp_path / "unchecked"
    args = _gen_args(
        models, out, "--prompt", "x", "--model", str(models.flags), "--no-safety-checker"
    )
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "NOT screened" in cap.err and "flagged by" not in cap.out
    side = json.loads(next(out.glob("*.json")).read_text())
    assert side["nsfw"] is None and side["safety_checker"] is False and side["black"] is False


@pytest.mark.parametrize("decoded", [float("nan"), -1.0], ids=["nan", "zeros"])
def test_black_image_not_flagged_is_diagnosed(models, tmp_path, capsys, monkeypatch, decoded):
    real = AutoencoderKL.decode

    def broken(self, z, *args, **kwargs):
        image = real(self, z, *args, **kwargs)[0]
        return (torch.full_like(image, decoded),)  # NaN (fp16 overflow) or -1 (black)

    monkeypatch.setattr(AutoencoderKL, "decode", broken)
    assert main(_gen_args(models, tmp_path, "--prompt", "a cat")) == 0
    out = capsys.readouterr().out
    assert "NOT flagged by the safety checker" in out and "--dtype fp32" in out
    side = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert side["nsfw"] is False and side["black"] is True
    assert side["nan_fraction"] == (1.0 if decoded != decoded else 0.0)
    assert np.asarray(Image.open(next(tmp_path.glob("*.png")))).max() == 0


# -- sweep -----------------------------------------------------------------------------------
def _sweep(models, out: Path, **kw):
    args = dict(guidance="1,3", steps="1,2", seeds="0,1", size=SIZE, clip_model=str(models.clip))
    axes = SDSweepAxes(["a red cube", "a blue ball"], **(args | kw))
    spec = SDPipelineSpec(model=str(models.sd), device="cpu", batch_size=2)
    return sd_sweep(axes, out, spec, progress=False)


def test_sweep_resumes_after_kill_without_recomputing(models, tmp_path, monkeypatch):
    calls, kill_at = [], [3]
    real = StableDiffusionPipeline.__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs["num_inference_steps"])
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt  # killed during the third batch
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        _sweep(models, out)
    assert len(list((out / "cells").glob("*.json"))) == 4  # 2 batches x 2 seeds finished
    calls.clear()
    kill_at[0] = 0
    r = _sweep(models, out)
    assert r.cells_total == 16 and r.cells_run == 12 and r.pipeline_calls == len(calls) == 6
    calls.clear()
    again = _sweep(models, out)
    assert again.cells_run == 0 and calls == []  # a finished sweep computes nothing
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 16 and all(float(x["clip_score"]) >= 0 for x in rows)
    assert all(float(x["detail"]) > 0 and float(x["seconds_per_image"]) > 0 for x in rows)
    assert {x["nsfw"] for x in rows} == {"False"}
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert len(summary) == 4 and {s["images"] for s in summary} == {"4"}
    assert sorted(p.name for p in r.figures) == [
        "clip_vs_guidance.png",
        "grid_p00.png",
        "grid_p01.png",
    ]
    # every cell of a seed starts from the latents `sd generate --seed` draws
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", real)
    g = generate(
        SDGeneration("a blue ball", guidance=3, steps=2, seed=1, size=SIZE), tmp_path / "g",
        SDPipelineSpec(model=str(models.sd), device="cpu"),
    )  # fmt: skip
    cell = np.asarray(Image.open(out / "cells" / "p01_g3_steps2_seed1.png"), dtype=int)
    assert np.abs(cell - np.asarray(Image.open(g.images[0].png), dtype=int)).max() <= 1


def test_sweep_refuses_other_settings_or_model_in_the_same_folder(models, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    axes = SDSweepAxes(["a cat"], "1,3", "2", "0", size=SIZE, clip_model=str(models.clip))
    identity = sweep_identity(axes, SDPipelineSpec(model=str(models.sd), device="cpu"))
    (out / "sd_sweep.json").write_text(json.dumps(identity))
    base = ["sd", "sweep", "--prompts", "a cat", "--steps", "2", "--seeds", "0", "--size", SIZE,
            "--clip-model", str(models.clip), "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main([*base, "--guidance", "1,3,7.5", "--model", str(models.sd)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--guidance 1,3, not 1,3,7.5" in err
    assert main([*base, "--guidance", "1,3", "--model", str(models.flags)]) == 2
    assert "another model" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sd_sweep.json"]  # nothing written


def test_sweep_into_a_held_folder_changes_nothing(models, tmp_path):
    from difflab.files import folder_lock

    out = tmp_path / "sweep"
    out.mkdir()
    axes = dict(guidance="1", steps="1", seeds="0")
    with folder_lock(out):  # another writer holds the new folder
        with pytest.raises(UsageError, match="another process"):
            _sweep(models, out, **axes)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no sd_sweep.json, no cells/
    _sweep(models, out, **axes)
    leftover = out / "cells" / ".p00_g1_steps1_seed0.png.k2.tmp.png"  # from a killed write
    leftover.write_bytes(b"x")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with folder_lock(out):
        with pytest.raises(UsageError, match="another process"):
            _sweep(models, out, **axes)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _sweep(models, out, **axes).cells_run == 0 and not leftover.exists()


def test_sweep_marks_flagged_cells_in_grid_and_tables(models, tmp_path):
    r = sd_sweep(
        SDSweepAxes("a cat", guidance="1", steps="1", seeds="0,1", size=SIZE, clip_model="none"),
        tmp_path, SDPipelineSpec(model=str(models.flags), device="cpu"), progress=False,
    )  # fmt: skip
    assert r.flagged == 2 and r.black_unflagged == 0
    assert all(x["nsfw"] and x["clip_score"] is None and x["detail"] is None for x in r.rows)
    assert r.summary[0]["nsfw_share"] == 1.0
    from difflab.figures.sd import RED, prompt_grid

    identity = json.loads((tmp_path / "sd_sweep.json").read_text())
    table = prompt_grid(tmp_path, identity, r.rows, 0)
    x0, y0, x1, y1 = table.tiles[(0, 0, 0)]
    tile = np.asarray(table.image)[y0:y1, x0:x1].reshape(-1, 3)
    assert (tile == RED).all(axis=1).sum() > 50  # red frame and label on the black tile
    meta = json.loads(Image.open(tmp_path / "grid_p00.png").text["parameters"])
    assert meta["prompt"] == "a cat"


def test_report_of_an_sd_sweep(models, tmp_path):
    from difflab.experiments.report import write_report

    sweep = tmp_path / "sw"
    r = _sweep(models, sweep, steps="1", seeds="0")
    flagged = tmp_path / "flagged"
    sd_sweep(
        SDSweepAxes("a cat", guidance="1", steps="1", seeds="0", size=SIZE, clip_model="none"),
        flagged, SDPipelineSpec(model=str(models.flags), device="cpu"), progress=False,
    )  # fmt: skip
    rep = write_report([sweep, flagged], tmp_path / "report.html")
    page = rep.html.read_text()
    assert "Stable Diffusion sweep: sw" in page and "a blue ball" in page
    assert page.count("data:image/png;base64,") == (2 + 1) + (1 + 1)  # grids + curves of each
    best = max(r.summary, key=lambda x: x["clip_score_mean"])
    assert any(
        f"best prompt alignment, CLIP score {best['clip_score_mean']:.1f}" in c
        and f"guidance {best['guidance']:g}" in c
        for c in rep.conclusions
    ), rep.conclusions
    assert "The safety checker filtered 1 image(s)" in page and "1 of 1 at guidance 1" in page
    assert "The safety checker filtered no image" in page  # the first sweep's sentence
    assert "| 1 | 3 | 2 |" in rep.markdown.read_text()  # steps 1, guidance 3, two prompts


# -- loading, schedulers, metrics ------------------------------------------------------------
def test_scheduler_names_map_to_diffusers_classes(loaded):
    assert tuple(SCHEDULERS) == SCHEDULER_NAMES
    config = loaded.pipe.scheduler.config
    for name, (cls, overrides, label) in SCHEDULERS.items():
        s = make_scheduler(name, config)
        assert type(s).__name__ == cls and scheduler_name(s) == (name, label)
        assert all(s.config[k] == v for k, v in overrides.items())
        assert s.config.beta_end == 0.012  # the model's betas are kept
    with pytest.raises(UsageError, match="euler_a, dpm"):
        make_scheduler("k_euler", config)
    embeds = loaded.pipe.encode_prompt("a cat", torch.device("cpu"), 1, True)
    for name in ("euler_a", "dpm++_2m_karras", "heun", "pndm", "unipc"):
        loaded.pipe.scheduler = make_scheduler(name, config)
        images, _ = run_pipeline(loaded, embeds, 7.5, 3, [0], 32, 32)
        assert np.isfinite(images).all()
    loaded.pipe.scheduler = make_scheduler("euler", config)


def test_resolve_model_sources(models, tmp_path):
    src = resolve_model("runwayml/stable-diffusion-v1-5")
    assert src.kind == "hub" and src.location == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "moved" in src.notes[0] or "mirror" in src.notes[0]
    assert resolve_model(models.sd).kind == "folder"
    part = tmp_path / "no-unet"
    shutil.copytree(models.sd, part)
    shutil.rmtree(part / "unet")
    with pytest.raises(UsageError, match="lacks unet"):
        resolve_model(part)
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(UsageError, match="StableDiffusionXLPipeline"):
        resolve_model(xl)
    assert resolve_dtype("auto", "cpu") == "fp32" and resolve_dtype("auto", "cuda") == "fp16"


def test_pickle_folders_are_refused_without_trust_pickle(models, tmp_path, capsys, monkeypatch):
    """Folder loads ask diffusers and transformers for safetensors only; a folder whose weights
    are ``.bin`` pickles is refused with one line unless --trust-pickle is given."""
    pickled = tmp_path / "pickled"
    StableDiffusionPipeline.from_pretrained(models.sd).save_pretrained(
        pickled, safe_serialization=False
    )
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not list((pickled / "unet").glob("*.safetensors"))  # (transformers saves both ways)
    args = ["sd", "generate", "--model", str(pickled), "--size", SIZE, "--steps", "1",
            "--device", "cpu", "--prompt", "a cube", "--seed", "3"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--model" in err and ".bin is a pickle" in err and "--trust-pickle" in err, err
    assert not (tmp_path / "refused").exists()
    with pytest.raises(UsageError, match="--vae .*diffusion_pytorch_model.bin is a pickle"):
        load_pipeline(SDPipelineSpec(model=str(models.sd), device="cpu", vae=str(pickled / "vae")))

    seen = []
    real = StableDiffusionPipeline.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.append(kw.get("use_safetensors", "missing"))
        return real(cls, *a, **kw)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(spy))
    load_pipeline(SDPipelineSpec(model=str(models.sd), device="cpu"))
    assert seen == [True]  # safetensors only
    assert main([*args, "--out", str(tmp_path / "trusted"), "--trust-pickle"]) == 0
    assert seen[-1] is None  # trusted: diffusers may fall back to the pickles
    assert main([*args, "--out", str(tmp_path / "safe")]) == 2  # still refused without it
    monkeypatch.undo()
    main([*args[:3], str(models.sd), *args[4:], "--out", str(tmp_path / "safe")])
    trusted = np.asarray(Image.open(next((tmp_path / "trusted").glob("*.png"))))
    safe = np.asarray(Image.open(next((tmp_path / "safe").glob("*.png"))))
    assert np.array_equal(trusted, safe)  # the same weights, loaded from the pickles


def test_single_file_keeps_the_safety_checker(models, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        return StableDiffusionPipeline.from_pretrained(
            models.sd, safety_checker=kwargs["safety_checker"]
        )

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", staticmethod(fake))
    file = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, file)
    got = load_pipeline(SDPipelineSpec(model=str(file), model_config=str(models.sd)))
    assert isinstance(seen["safety_checker"], StableDiffusionSafetyChecker)
    assert seen["config"] == str(models.sd) and got.safety_checker and got.source.label == "model"
    got = load_pipeline(
        SDPipelineSpec(model=str(file), model_config=str(models.sd), safety_checker=False)
    )
    assert seen["safety_checker"] is None and not got.safety_checker
    assert any("NOT screened" in n for n in got.notes)


def test_metadata_round_trip_quotes_commas():
    text = format_parameters(
        "a cat, on a mat", "", {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7.0,
                                "Seed": 5, "Size": "512x768", "Model": 'my, "odd": model'}
    )  # fmt: skip
    assert text.splitlines()[0] == "a cat, on a mat" and "Negative prompt" not in text
    assert "CFG scale: 7," in text  # A1111 writes 7, not 7.0
    p = parse_parameters(text)
    assert p["prompt"] == "a cat, on a mat" and p["negative_prompt"] == ""
    assert p["Sampler"] == "DPM++ 2M Karras" and p["Model"] == 'my, "odd": model'


def test_diagnose_tells_filtered_from_nan_black():
    from difflab.sd.safety import FILTERED, diagnose

    black, nan = np.zeros((4, 4, 3)), np.full((4, 4, 3), np.nan)
    assert diagnose(black, True).note == FILTERED
    d = diagnose(nan, False)
    assert d.black and d.nan_fraction == 1.0 and "NOT flagged" in d.note and "NaN" in d.note
    assert "no safety checker ran" in diagnose(black, None).note
    assert diagnose(np.full((4, 4, 3), 0.5), False).note is None


def test_laplacian_variance_values():
    assert laplacian_variance(np.full((16, 16, 3), 128, np.uint8)) == 0.0
    board = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)
    assert laplacian_variance(np.repeat(board[..., None], 3, -1)) == pytest.approx(16.0)


def test_clip_score_matches_torchmetrics(models):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    scorer = ClipScorer(str(models.clip))

    class Features(CLIPModel):  # torchmetrics 1.9 expects tensors from get_*_features
        def get_image_features(self, *a, **k):
            return super().get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return super().get_text_features(*a, **k).pooler_output

    model = Features.from_pretrained(models.clip).eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red cube", "a blue ball"]
    ours = scorer.score(list(images), prompts)
    with torch.no_grad():
        ref, _ = _clip_score_update(
            list(torch.from_numpy(images).permute(0, 3, 1, 2)), prompts, model, scorer.processor
        )
    np.testing.assert_allclose(ours, ref.clamp(min=0).numpy(), atol=1e-4)


# -- bad input: one line, exit 2, nothing written --------------------------------------------
def _bad_cases(models, tmp: Path) -> list[tuple[list[str], str]]:
    notpipe = tmp / "notpipe"
    notpipe.mkdir(exist_ok=True)
    (tmp / "model.ckpt").write_bytes(b"not really a pickle")
    (tmp / "empty.txt").write_text("# nothing\n\n")
    g = ["--prompt", "a cat"]
    return [
        ([], "--prompt is empty"),
        (["--prompt", "  "], "--prompt is empty"),
        ([*g, "--unconditional"], "--unconditional"),
        ([*g, "--guidance", "-1"], "--guidance -1"),
        ([*g, "--guidance", "0.5"], "--guidance 0.5"),
        ([*g, "--steps", "0"], "--steps 0"),
        ([*g, "--size", "500x512"], "multiples of 8"),
        ([*g, "--size", "big"], "--size 'big'"),
        ([*g, "--n", "0"], "--n 0"),
        ([*g, "--batch-size", "0"], "--batch-size 0"),
        ([*g, "--scheduler", "k_lms"], "choose one of euler, euler_a"),
        ([*g, "--dtype", "fp8"], "--dtype 'fp8'"),
        ([*g, "--model", str(notpipe)], "no model_index.json"),
        ([*g, "--model", str(tmp / "model.ckpt")], "--trust-pickle"),
        ([*g, "--model", str(tmp / "missing.safetensors")], "no such file"),
        ([*g, "--model", "difflab-test/no-such-model"], "--model DIR"),
        ([*g, "--vae", "difflab-test/no-such-vae"], "--vae"),
        (["sweep", "--prompts", str(tmp / "empty.txt")], "holds no prompt"),
        (["sweep", "--prompts", "a", "--guidance", "1,x"], "--guidance '1,x'"),
        (["sweep", "--prompts", "a", "--seeds", "0,0"], "given twice"),
        (["sweep", "--prompts", "a", "a"], "given twice"),
        (["sweep", "--prompts", "a", "--clip-model", "difflab-test/no-clip"], "--clip-model none"),
    ]


def test_bad_input_is_one_line_exit_2_nothing_written(models, tmp_path, capsys):
    for extra, message in _bad_cases(models, tmp_path):
        out = tmp_path / "out"
        if extra and extra[0] == "sweep":
            argv = ["sd", "sweep", *extra[1:], "--size", SIZE, "--steps", "1", "--model",
                    str(models.sd), "--device", "cpu", "--out", str(out)]  # fmt: skip
        else:
            argv = ["sd", "generate", "--model", str(models.sd), "--size", SIZE, "--steps", "1",
                    "--device", "cpu", *extra, "--out", str(out)]  # fmt: skip
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (extra, err)
        assert not out.exists(), extra


@pytest.mark.network
def test_real_sd15_generates_one_image(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = generate(
        SDGeneration("a photograph of an astronaut riding a horse", steps=20, seed=0),
        tmp_path, SDPipelineSpec(device=device), progress=False,
    )  # fmt: skip
    img = np.asarray(Image.open(r.images[0].png))
    assert img.shape == (512, 512, 3)
    assert r.images[0].diagnosis.nsfw is not None  # the real safety checker ran
    assert (
        read_parameters(r.images[0].png)["Model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )


def test_sd15_shaped_components_have_sd15s_sizes():
    """The random stand-in for SD 1.5 (speed measurements without the download) has SD 1.5's
    layers: the published parameter counts of its UNet, VAE and ViT-L/14 text encoder."""
    from difflab.sd.tiny import sd15_components, tiny_tokenizer

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        parts = sd15_components(tiny_tokenizer())
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    assert count["unet"] == 859_520_964
    assert count["vae"] == 83_653_863
    assert count["text_encoder"] == 123_060_480
    assert parts["unet"].config.cross_attention_dim == parts["text_encoder"].config.hidden_size
