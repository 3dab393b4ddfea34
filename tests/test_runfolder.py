"""Nothing lost: atomic files reach the disk, a stopped or killed training resumes exactly.

Every run is tests/helpers.py's tiny config on the digits (44 steps of 32 per epoch). The
SIGKILL test starts real ``difflab train`` processes (about 6 s of start-up each on two cores)
and kills them at seeded random moments; the other tests signal or break training in-process.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab import files, runfolder
from difflab.cli import main
from difflab.ddpm import runs as ckpt
from difflab.ddpm.training import Trainer, train
from difflab.files import read_jsonl
from helpers import tiny_config, train_args


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "metrics.jsonl")]


def _lines(err: str) -> list[str]:
    """stderr without the progress bar."""
    return [x for x in err.splitlines() if x.strip() and not x.startswith("train digits")]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# -- files ---------------------------------------------------------------------------------
def test_atomic_path_flushes_the_file_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    target, synced, real = tmp_path / "a.json", [], os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        kind = "folder" if stat.S_ISDIR(st.st_mode) else "file"
        synced.append(
            (kind, target.exists(), kind == "file" or os.path.samestat(st, os.stat(tmp_path)))
        )
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    files.write_json(target, {"a": 1})
    assert synced == [("file", False, True), ("folder", True, True)]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    keep = [tmp_path / ".lock", tmp_path / ".keep", tmp_path / "model.tmp.safetensors"]
    stale = [tmp_path / ".model.safetensors.k2j4x9.tmp.safetensors", tmp_path / ".a.json.q1.tmp"]
    for p in keep + stale:
        p.write_text("x")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / ".loss.png.ab12.tmp.png").write_text("x")
    removed = runfolder.clean_folder(tmp_path, ["figures", "validation"])
    assert sorted(removed) == sorted([*stale, tmp_path / "figures" / ".loss.png.ab12.tmp.png"])
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


# -- signals -------------------------------------------------------------------------------
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_training_after_a_checkpoint_and_says_how_to_resume(
    tmp_path, monkeypatch, capsys, signum, code
):
    run, real = tmp_path / "run", Trainer.train_step

    def signalled(self, lr):
        if self.step == 3:
            os.kill(os.getpid(), signum)  # handled at once: the step still completes
        return real(self, lr)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    before = signal.getsignal(signum)
    assert main(train_args(run, 0.2)) == code
    assert signal.getsignal(signum) == before  # the handlers are put back
    err = _lines(capsys.readouterr().err)
    name = signal.Signals(signum).name
    assert err == [
        f"difflab train: stopped by {name} at step 4; checkpoint saved in {run}; resume with: "
        f"difflab train --resume --out {run} --epochs 0.2"
    ]
    assert ckpt.load_train_state(run)["step"] == 4 == _steps(run)[-1]
    assert ckpt.weights_metadata(run / "model.safetensors")["step"] == 4
    monkeypatch.undo()
    if signum == signal.SIGINT:  # the resumed run is the uninterrupted one
        assert main(train_args(run, 0.2, "--resume")) == 0
        assert _steps(run) == list(range(1, 10))
        assert main(train_args(tmp_path / "straight", 0.2)) == 0
        _same_weights(run, tmp_path / "straight")


# -- the checkpoint pair -------------------------------------------------------------------
def test_a_kill_between_weights_and_state_resumes_from_the_state(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=0.2).override(["train.checkpoint_every=3"])  # 9 steps
    train(cfg, tmp_path / "straight", device="cpu", progress=False)
    run = tmp_path / "run"
    train(cfg, run, device="cpu", progress=False, stop_at_step=3)

    def killed(*a, **k):  # the weights of step 6 are written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, device="cpu", progress=False, resume=True)
    monkeypatch.undo()
    state = ckpt.load_train_state(run)
    assert state["step"] == 3 and ckpt.weights_metadata(run / "model.safetensors")["step"] == 6
    assert not runfolder.weights_match(state, run / "model.safetensors")
    stale = run / ".train_state.pt.x1y2z3.tmp.pt"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"half a file")
    notes: list[str] = []
    train(cfg, run, device="cpu", progress=False, resume=True, stop_at_step=3, on_note=notes.append)
    assert notes == [
        f"{run / 'model.safetensors'} is not the one saved with train_state.pt (step 3): the run "
        "was stopped between the two writes, or the file is damaged; resuming from the train "
        "state and writing the weights of step 3 again"
    ]
    assert not stale.exists()
    assert ckpt.weights_metadata(run / "model.safetensors")["step"] == 3
    assert runfolder.weights_match(ckpt.load_train_state(run), run / "model.safetensors")
    train(cfg, run, device="cpu", progress=False, resume=True)
    _same_weights(run, tmp_path / "straight")
    assert _steps(run) == list(range(1, 10))


def test_damaged_files_on_resume_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, 0.1)) == 0
    capsys.readouterr()
    good = (run / "train_state.pt").read_bytes()
    listing = sorted(p.name for p in run.iterdir())
    state = ckpt.load_train_state(run)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, run / "train_state.pt")
    wrong_keys = (run / "train_state.pt").read_bytes()
    cases = [
        (good[: len(good) // 2], "train_state.pt is damaged or truncated"),
        (b"", "train_state.pt is damaged or truncated"),
        (b"\x80\x04not a pickle at all", "train_state.pt is damaged or truncated"),
        (wrong_keys, "train_state.pt does not fit this run's config.json"),
    ]
    for data, message in cases:
        (run / "train_state.pt").write_bytes(data)
        assert main(train_args(run, 0.2, "--resume")) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "--resume" in err[0] and message in err[0], err
        assert sorted(p.name for p in run.iterdir()) == listing
    # a damaged weights file beside a good state is written again from the state
    (run / "train_state.pt").write_bytes(good)
    (run / "model.safetensors").write_bytes(b"garbage")
    assert main(train_args(run, 0.1, "--resume")) == 0
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "model.safetensors is not the one saved with train_state.pt" in err[0]
    model, _, _ = ckpt.load_run(run)
    ema = ckpt.load_train_state(run)["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


# -- SIGKILL -------------------------------------------------------------------------------
def _wait_for_progress(proc: subprocess.Popen, run: Path, after: int, timeout: float = 180):
    """Wait until the process has logged a step after ``after`` with a checkpoint on disk."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return
        steps = _steps(run) if (run / "metrics.jsonl").is_file() else []
        if steps and steps[-1] > after and (run / "train_state.pt").is_file():
            return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("difflab train made no progress")


def _kill_and_resume(tmp_path: Path, kills: int, seed: int) -> None:
    """Kill ``difflab train`` ``kills`` times at random moments; after each kill the folder
    samples and resumes; the end is the uninterrupted run's weights."""
    rng = random.Random(seed)
    run = tmp_path / "run"
    args = train_args(run, 0.5, "--set", "train.checkpoint_every=2")  # 22 steps
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    at = 0
    for i in range(kills):
        cmd = [sys.executable, "-m", "difflab", *args, *(["--resume"] if i else [])]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for_progress(proc, run, at)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        _, err = proc.communicate()
        assert proc.returncode in (-signal.SIGKILL, 0), err.decode()[-2000:]
        at = ckpt.load_train_state(run)["step"]
        assert at > 0
        out = tmp_path / f"sample{i}.png"
        assert main(["sample", str(run), "--out", str(out), "--n-per-class", "1",
                     "--steps", "2", "--device", "cpu"]) == 0  # fmt: skip
        assert out.is_file()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed processes computed
    try:
        assert main([*args, "--resume"]) == 0
        assert (
            main(train_args(tmp_path / "straight", 0.5, "--set", "train.checkpoint_every=2")) == 0
        )
    finally:
        torch.set_num_threads(threads)
    assert _steps(run) == list(range(1, 23))
    _same_weights(run, tmp_path / "straight")
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]


@pytest.mark.slow  # 15-35 s; `make test-all` runs it
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    _kill_and_resume(tmp_path, kills=3, seed=14)


@pytest.mark.slow
def test_sigkill_many_times_loses_nothing(tmp_path):
    _kill_and_resume(tmp_path, kills=8, seed=2024)
