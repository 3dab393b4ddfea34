"""The command line as a user meets it: exit codes, one-line errors, files written or not."""

import json

import numpy as np
import pytest
from PIL import Image

from difflab.cli import main
from difflab.figures.images import png_settings
from helpers import tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("cli"))


def one_line_error(capsys, match):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    return err


def test_sample_png_and_npz_are_deterministic(run, tmp_path, capsys):
    args = [str(run), "--classes", "0,3,7", "--n-per-class", "2", "--steps", "4", "--device", "cpu"]
    assert main(["sample", *args, "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", *args, "--out", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].dtype == np.uint8 and a["images"].shape == (6, 8, 8, 1)
    assert a["labels"].dtype == np.int64 and a["labels"].tolist() == [0, 0, 3, 3, 7, 7]
    assert np.array_equal(a["images"], b["images"])
    assert main(["sample", *args, "--seed", "1", "--out", str(tmp_path / "c.npz")]) == 0
    assert not np.array_equal(a["images"], np.load(tmp_path / "c.npz")["images"])
    assert main(["sample", *args, "--out", str(tmp_path / "grid.png")]) == 0
    settings = png_settings(tmp_path / "grid.png")
    assert settings["classes"] == [0, 3, 7] and settings["steps"] == 4 and settings["seed"] == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 64


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--classes", "0,12"], "--classes: 12 is out of range"),
        (["--classes", "a,b"], "--classes 'a,b'"),
        (["--steps", "0"], "--steps '0'"),
        (["--guidance", "-1"], "--guidance '-1'"),
        (["--sampler", "plms"], "--sampler 'plms'"),
        (["--n-per-class", "0"], "--n-per-class 0"),
    ],
)
def test_sample_bad_input(run, tmp_path, capsys, extra, match):
    out = tmp_path / "x.png"
    assert main(["sample", str(run), "--device", "cpu", *extra, "--out", str(out)]) == 2
    one_line_error(capsys, match)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_sample_bad_paths(run, tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    one_line_error(capsys, "no such run folder")
    assert main(["sample", str(run), "--out", str(tmp_path / "missing" / "x.png")]) == 2
    one_line_error(capsys, "does not exist")
    assert main(["sample", str(run), "--out", str(tmp_path / "x.jpg")]) == 2
    one_line_error(capsys, ".png or .npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({}))
    assert main(["sample", str(empty), "--out", str(tmp_path / "x.png")]) == 2
    one_line_error(capsys, "model.safetensors")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--preset", "huge"], "unknown preset"),
        (["--set", "diffusion.schedule=sigmoid"], "choose one of linear, cosine"),
        (["--set", "train.sampler=ddim"], "unknown key"),
        (["--set", "sample.sampler=plms"], "choose one of"),
        (["--epochs", "-1"], "must be positive"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--init-from", "/no/such/run"], "no such run folder"),
    ],
)
def test_train_bad_input(tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    assert (
        main(["train", "--dataset", "digits", "--epochs", "0.01", *extra, "--out", str(out)]) == 2
    )
    one_line_error(capsys, match)
    assert not out.exists()


def test_train_cli_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--dataset", "digits", "--device", "cpu", "--out", str(out)]
    small = [
        "--set",
        "model.base_channels=8",
        "--set",
        "model.time_embed_dim=16",
        "--batch-size",
        "64",
    ]
    assert main([*base, "--epochs", "0.1", *small]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert main([*base, "--epochs", "0.1", *small]) == 2
    one_line_error(capsys, "--resume")
    assert main([*base, "--epochs", "0.2", "--resume"]) == 0
    assert "trained 5 steps" in capsys.readouterr().out


def test_argparse_errors_are_one_line(capsys):
    assert main(["sample"]) == 2
    one_line_error(capsys, "error")


def test_sample_and_eval_precision(run, tmp_path, capsys):
    """bf16 autocast is recorded in the PNG and in eval.json; a bad value is one line, exit 2."""
    png = tmp_path / "bf16.png"
    args = ["--n-per-class", "2", "--steps", "3", "--device", "cpu"]
    assert main(["sample", str(run), *args, "--precision", "bf16", "--out", str(png)]) == 0
    assert png_settings(png)["precision"] == "bf16"
    assert main(["sample", str(run), *args, "--out", str(tmp_path / "fp32.png")]) == 0
    assert "precision" not in png_settings(tmp_path / "fp32.png")
    assert main(["eval", str(run), "--n", "2", "--steps", "3", "--precision", "bf16"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["settings"]["precision"] == "bf16"
    assert set(ev["ci95"]) == {"accuracy", "fd", "kid", "diversity"}
    for m, (low, high) in ev["ci95"].items():
        assert low <= ev[m] <= high, m
    assert 0 <= ev["copy_rate"] <= 1 and ev["copy_threshold"] >= 0 and len(ev["correct"]) == ev["n"]
    assert (run / "figures" / "nearest_train.png").is_file()
    assert "95% CI [" in capsys.readouterr().out
    capsys.readouterr()
    assert (
        main(["sample", str(run), *args, "--precision", "half", "--out", str(tmp_path / "h.png")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--precision 'half'" in err
    assert not (tmp_path / "h.png").exists()
