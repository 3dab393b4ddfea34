"""Bad files and contradicting options: one line naming the file or option, nothing changed."""

from __future__ import annotations

import errno

import pytest

from difflab.cli import main
from difflab.config import RunConfig, TrainConfig
from difflab.errors import UsageError
from difflab.files import folder_lock, read_json, read_jsonl


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--lr", "-1"], "--lr -1.0: must be positive"),
        (["--lr", "nan"], "--lr nan"),
        (["--epochs", "nan"], "--epochs nan"),
        (["--minutes", "inf"], "--minutes inf"),
        (["--seed", "-1"], "--seed -1: must be a whole number from 0"),
        (["--seed", str(2**64)], "--seed 18446744073709551616"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--set", "train.ema_decay=1"], "--set train.ema_decay 1.0"),
        (["--set", "diffusion.beta_end=2"], "--set diffusion.beta_end 2.0"),
        (["--set", "model.channel_mults=[]"], "model.channel_mults"),
    ],
)
def test_train_values_are_refused_before_anything_is_written(tmp_path, capsys, argv, words):
    code = main(["train", "--dataset", "digits", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1
    assert _files(tmp_path) == []


def test_config_values_are_checked_wherever_a_config_is_built():
    with pytest.raises(UsageError, match="--lr"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(UsageError, match="label_dropout"):
        RunConfig.from_dict({"train": {"label_dropout": 1.5}})


def test_resume_refuses_options_that_contradict_the_run(tmp_path, capsys):
    from helpers import tiny_run

    run = tiny_run(tmp_path, epochs=0.05)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for extra, words in (
        (["--lr", "0.1"], "--lr 0.1 differs from the run's"),
        (["--batch-size", "8"], "--batch-size 8 differs"),
        (["--dataset", "mnist5k"], "--dataset 'mnist5k' differs"),
        (["--set", "model.base_channels=16"], "--set model.base_channels 16 differs"),
    ):
        code = main(["train", "--resume", *extra, "--epochs", "0.1", "--out", str(run)])
        err = capsys.readouterr().err
        assert code == 2 and words in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # the run's own values are no contradiction
    code = main(["train", "--resume", "--batch-size", "32", "--epochs", "0.1", "--out", str(run)])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\xff\xfe{", "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON dict"),
    ],
)
def test_a_broken_config_is_one_line_naming_the_file(tmp_path, capsys, content, words):
    from helpers import tiny_run

    run = tiny_run(tmp_path, epochs=0.05)
    (run / "config.json").write_bytes(content)
    code = main(["sample", str(run), "--n-per-class", "1", "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "config.json" in err and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.png").exists()


def test_json_files_are_read_with_one_line_errors(tmp_path):
    path = tmp_path / "eval.json"
    path.write_bytes(b'{"a": 1')
    with pytest.raises(UsageError, match=r"eval.json: not valid JSON"):
        read_json(path)
    with pytest.raises(UsageError, match="no such file"):
        read_json(tmp_path / "missing.json")
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_bytes(b'{"step": 1}\n{"step": 2}\n{"st')  # a kill mid-append: torn last line
    assert read_jsonl(jsonl) == [{"step": 1}, {"step": 2}]
    jsonl.write_bytes(b'{"step": 1}\n\xff\xfe\n{"step": 3}\n')
    with pytest.raises(UsageError, match="metrics.jsonl: line 2"):
        read_jsonl(jsonl)


def test_report_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    from helpers import tiny_run

    run = tiny_run(tmp_path, epochs=0.05)
    readme = tmp_path / "README.md"
    readme.write_text("# my notes\n")
    code = main(["report", str(run), "--out", str(tmp_path / "README.html")])
    err = capsys.readouterr().err
    assert code == 2 and "README.md exists and was not written by difflab report" in err
    assert readme.read_text() == "# my notes\n" and not (tmp_path / "README.html").exists()
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0  # its own: replaced


def test_a_file_system_without_locks_writes_with_a_warning(tmp_path, monkeypatch):
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="no locks"):
        with folder_lock(tmp_path):
            (tmp_path / "x").write_text("written")
    assert (tmp_path / "x").read_text() == "written"


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    import os

    from helpers import tiny_run

    run = tiny_run(tmp_path, epochs=0.05)
    out = tmp_path / "out"
    out.mkdir()
    real = os.fsync

    def full(fd):
        real(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code = main(["sample", str(run), "--n-per-class", "1", "--out", str(out / "s.png")])
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (after the progress bar)
    assert code == 2 and last.startswith("difflab sample: error: cannot write") and "s.png" in last
    assert "No space left on device" in last
    assert list(out.iterdir()) == []  # no file, no temporary file


@pytest.mark.parametrize("where", ["folder", "unwritable"])
def test_out_is_checked_before_sampling(tmp_path, capsys, where):
    import os

    from helpers import tiny_run

    run = tiny_run(tmp_path, epochs=0.05)
    if where == "folder":
        out = tmp_path / "taken.png"
        out.mkdir()
        words = "is a folder, not a file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into any folder")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out, words = locked / "s.png", "is not writable"
    code = main(["sample", str(run), "--n-per-class", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and words in err


def test_broken_files_of_sweeps_reports_and_fine_tuning_are_one_line(tmp_path, capsys):
    from PIL import Image

    from difflab.sd.dataset import load_image_folder
    from helpers import tiny_run

    run = tiny_run(tmp_path, epochs=0.05)
    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "sweep.json").write_bytes(b"\xff\xfe{")
    code = main(
        ["sweep", str(run), "--guidance", "0", "--steps", "2", "--n", "2", "--out", str(sweep)]
    )
    assert code == 2 and "sweep.json" in capsys.readouterr().err
    assert (sweep / "sweep.json").read_bytes() == b"\xff\xfe{"  # left as it was

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xfea cube\n")
    code = main(["sd", "sweep", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "sd")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "prompts.txt: not UTF-8 text" in err and len(err.splitlines()) == 1

    (run / "eval.json").write_text('{"accuracy":')
    code = main(["report", str(run), "--out", str(tmp_path / "r.html")])
    assert code == 2 and "eval.json: not valid JSON" in capsys.readouterr().err

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "a.png")
    for content in (b"\xff\xfe\n", b'{"file_name": "a.png"\n'):
        (images / "metadata.jsonl").write_bytes(content)
        with pytest.raises(UsageError, match="metadata.jsonl"):
            load_image_folder(str(images), 16, "a photo")
