"""Sweeps: resumable after a kill, refused on another run or settings, shared x_T, bad input."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from difflab.checks import parse_list
from difflab.cli import main
from difflab.experiments import ddpm_sweep as sweep_mod
from difflab.experiments.ddpm_sweep import sweep_run
from difflab.figures.images import png_settings
from difflab.files import file_sha256
from difflab.options import DDPMSweepAxes
from helpers import judged_tiny_run

AXES = DDPMSweepAxes(guidance="0,2", steps="2,3", seeds="0", n_per_class=2)
QUIET = dict(progress=False, plots=False, max_group=8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny digits run; the judge is cached in a temporary folder and trained for one epoch."""
    tmp = tmp_path_factory.mktemp("sweep")
    with judged_tiny_run(tmp) as path:
        yield path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line_error(capsys, match: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    return err


def test_resume_after_kill_recomputes_nothing(run, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    real, calls = sweep_mod.sample_cells, []

    def killed_after_one_group(*args, **kwargs):
        if calls:
            raise RuntimeError("killed")
        calls.extend(c.key for c in args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "sample_cells", killed_after_one_group)
    with pytest.raises(RuntimeError, match="killed"):
        sweep_run(run, AXES, out, **QUIET)
    table = (out / "metrics.csv").read_text().splitlines()
    assert len(table) == 1 + 2  # the table holds exactly the two finished cells
    assert sorted(p.stem for p in (out / "cells").glob("*.json")) == sorted(calls)
    finished = snapshot(out / "cells")

    first, calls2 = list(calls), []
    monkeypatch.setattr(
        sweep_mod,
        "sample_cells",
        lambda *a, **k: calls2.extend(c.key for c in a[4]) or real(*a, **k),
    )
    result = sweep_run(run, AXES, out, **QUIET)
    assert result.cells_total == 4 and result.cells_run == 2
    assert len(calls2) == 2 and not set(calls2) & set(first)  # finished cells not recomputed
    after = snapshot(out / "cells")
    assert all(after[name] == data for name, data in finished.items())  # left untouched
    rows = json.loads((out / "metrics.json").read_text())
    assert rows["complete"] and len(rows["cells"]) == 4
    keys = {(r["steps"], r["guidance"]) for r in rows["cells"]}
    assert keys == {(2, 0.0), (2, 2.0), (3, 0.0), (3, 2.0)}
    for r in rows["cells"]:
        assert 0 <= r["accuracy"] <= 1 and r["fd"] >= 0 and np.isfinite(r["kid"])
        assert r["diversity"] > 0 and r["seconds"] > 0 and r["n"] == 20
    assert len((out / "metrics.csv").read_text().splitlines()) == 5
    assert not list((out / "cells").glob(".*"))  # no temporary files left

    sweep_run(run, AXES, out, **QUIET)  # a finished sweep: nothing to compute
    assert len(calls2) == 2


def test_ctrl_c_exits_130_and_resumes(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sw"
    real = sweep_mod.sample_cells
    state = {"n": 0}

    def interrupted(*args, **kwargs):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "sample_cells", interrupted)
    args = ["sweep", str(run), "--guidance", "0", "--steps", "2,3", "--n", "2", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 130
    assert "1/2 cells; the same command continues it" in capsys.readouterr().err
    assert main([*args, "--out", str(out)]) == 0
    assert "1 cells computed" in capsys.readouterr().out and state["n"] == 3


def test_cells_share_x_T_and_match_difflab_sample(run, tmp_path, monkeypatch):
    axes = DDPMSweepAxes(guidance="0,2", steps="2,3", seeds="0,1", n_per_class=2)
    quiet = dict(progress=False, plots=False)
    seen = []
    real = sweep_mod.sample_steps
    monkeypatch.setattr(
        sweep_mod,
        "sample_steps",
        lambda *a, **k: seen.append((k["seed"], k["x_T"])) or real(*a, **k),
    )
    sweep_run(run, axes, tmp_path / "a", **quiet, max_group=8)
    assert len(seen) == 4  # one call per seed and step count: both guidance values batched
    by_seed = {0: [x for s, x in seen if s == 0], 1: [x for s, x in seen if s == 1]}
    assert all(torch.equal(x, by_seed[0][0]) for x in by_seed[0])  # one x_T for all cells of a seed
    assert all(torch.equal(x, by_seed[1][0]) for x in by_seed[1])
    assert not torch.equal(by_seed[0][0], by_seed[1][0])

    monkeypatch.setattr(sweep_mod, "sample_steps", real)
    sweep_run(run, axes, tmp_path / "b", **quiet)
    # the same sweep unbatched (the CPU default), into another folder: the same images
    for p in (tmp_path / "a" / "cells").glob("*.npz"):
        a, b = np.load(p), np.load(tmp_path / "b" / "cells" / p.name)
        assert np.array_equal(a["images"], b["images"]) and a["images"].shape == (20, 8, 8, 1)
    g0, g2 = (np.load(tmp_path / "a" / "cells" / f"ddim_steps3_g{g}_seed0.npz") for g in (0, 2))
    assert not np.array_equal(g0["images"], g2["images"])  # the swept parameter does matter

    # a cell is what `difflab sample` gives with the same settings and seed (DDIM is deterministic)
    npz = tmp_path / "s.npz"
    cli = [
        "--n-per-class",
        "2",
        "--guidance",
        "2",
        "--steps",
        "3",
        "--seed",
        "1",
        "--device",
        "cpu",
    ]
    assert main(["sample", str(run), *cli, "--out", str(npz)]) == 0
    cell = np.load(tmp_path / "a" / "cells" / "ddim_steps3_g2_seed1.npz")
    assert np.array_equal(np.load(npz)["images"], cell["images"])


def test_tables_summary_and_figures(run, tmp_path):
    out = tmp_path / "sw"
    axes = DDPMSweepAxes(guidance="0,1,3", steps="2,4", seeds="0,1", n_per_class=2)
    r = sweep_run(run, axes, out, progress=False)
    assert len(r.rows) == 12 and len(r.summary) == 6
    head = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert head[:4] == ["sampler", "steps", "guidance", "seed"] and "kid" in head
    ci_columns = [f"{m}_ci_{e}" for m in ("accuracy", "fd", "kid", "diversity") for e in ("low", "high")]  # fmt: skip
    assert head[-8:] == ci_columns
    summary_head = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert summary_head[-8:] == ci_columns
    for m in ("accuracy", "fd", "kid", "diversity"):
        for x in r.rows:
            assert x[f"{m}_ci_low"] <= x[m] + 1e-12 <= x[f"{m}_ci_high"] + 2e-12, (m, x["key"])
        for s in r.summary:
            assert s[f"{m}_ci_low"] <= s[f"{m}_mean"] + 1e-12 <= s[f"{m}_ci_high"] + 2e-12, m
    assert all(len(x["correct"]) == x["n"] and set(x["correct"]) <= {0, 1} for x in r.rows)
    for s in r.summary:
        same = [
            x["accuracy"]
            for x in r.rows
            if (x["steps"], x["guidance"]) == (s["steps"], s["guidance"])
        ]
        assert s["seeds"] == 2 and s["accuracy_mean"] == pytest.approx(np.mean(same))
        assert s["accuracy_std"] == pytest.approx(np.std(same, ddof=1))
    names = sorted(p.name for p in r.figures)
    assert names == [
        "grid_ddim.png",
        "heatmaps_ddim.png",
        "vs_guidance_ddim.png",
        "vs_steps_ddim.png",
    ]
    assert png_settings(out / "figures" / "grid_ddim.png")["figure"] == "grid"
    identity = json.loads((out / "sweep.json").read_text())
    assert identity["guidance"] == [0.0, 1.0, 3.0] and len(identity["weights_sha256"]) == 64


def test_other_run_or_settings_refused_and_nothing_lost(run, tmp_path, capsys):
    out = tmp_path / "sw"
    base = [
        "sweep",
        "--guidance",
        "0,2",
        "--steps",
        "2",
        "--n",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main([base[0], str(run), *base[1:]]) == 0
    capsys.readouterr()
    before = snapshot(out)

    changed = [base[0], str(run), *base[1:]]
    changed[changed.index("--guidance") + 1] = "0,3"
    assert main(changed) == 2
    one_line_error(capsys, "holds a sweep with --guidance 0,2, not 0,3")
    other = tmp_path / "copy"
    shutil.copytree(run, other)
    assert main([base[0], str(other), *base[1:]]) == 2
    one_line_error(capsys, "holds a sweep of another run")
    assert snapshot(out) == before
    assert main([base[0], str(run), *base[1:], "--grid-class", "3"]) == 0  # only the figure changes
    assert "0 cells computed in" in capsys.readouterr().out
    assert json.loads((out / "sweep.json").read_text())["grid_class"] == 3

    out2 = tmp_path / "sw2"
    args2 = [base[0], str(other), *base[1:-1], str(out2)]
    assert main(args2) == 0
    state = load_file(other / "model.safetensors")
    save_file(
        {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()},
        other / "model.safetensors",
    )
    capsys.readouterr()
    assert main(args2) == 2
    one_line_error(capsys, "changed since this sweep started")

    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "mine.txt").write_text("keep me")
    assert main([base[0], str(run), *base[1:-1], str(stranger)]) == 2
    one_line_error(capsys, "is not empty and holds no sweep.json")
    assert (stranger / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--guidance", "1,,2"], "--guidance '1,,2': expected comma-separated numbers"),
        (["--guidance", ""], "--guidance '': expected comma-separated numbers"),
        (["--guidance", "1,x"], "--guidance '1,x': expected comma-separated numbers"),
        (["--guidance", "0,-1"], "--guidance '0,-1': -1 is below the smallest allowed, 0"),
        (["--guidance", "1,nan"], "--guidance '1,nan'"),
        (["--steps", "10,2.5"], "--steps '10,2.5': expected comma-separated whole numbers"),
        (["--steps", "0,5"], "--steps '0,5': 0 is below the smallest allowed, 1"),
        (["--steps", "5,500"], "--steps 500: must be at most the run's T = 100"),
        (["--steps", "5,5"], "--steps '5,5': 5 is given twice"),
        (["--seeds", "-1"], "--seeds '-1': -1 is below"),
        (["--sampler", "ddim,plms"], "--sampler 'plms': unknown sampler"),
        (["--n", "1"], "--n 1: need at least 2 samples per class"),
        (["--steps", "5", "--grid-class", "10"], "--grid-class 10: out of range"),
    ],
)
def test_bad_input_one_line_exit_2(run, tmp_path, capsys, extra, match):
    out = tmp_path / "sw"
    assert main(["sweep", str(run), "--device", "cpu", *extra, "--out", str(out)]) == 2
    one_line_error(capsys, match)
    assert not out.exists()


def test_bad_run_folders(run, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", str(tmp_path / "nope"), "--out", str(out)]) == 2
    one_line_error(capsys, "no such run folder")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.json", bare / "config.json")
    assert main(["sweep", str(bare), "--out", str(out)]) == 2
    one_line_error(capsys, "has no model.safetensors yet")
    assert not out.exists()


def test_sweep_axes_are_sorted_and_accept_lists():
    """A sweep's axes are sets: --guidance 2,0 and 0,2 are the same sweep (the list parser
    itself keeps the user's order)."""
    axes = DDPMSweepAxes(guidance="4, 0,1", steps=[25, 10], samplers="ddpm,ddim")
    assert axes.guidance == (0.0, 1.0, 4.0) and axes.steps == (10, 25)
    assert axes.samplers == ("ddim", "ddpm")
    assert parse_list("4, 0,1", float, "--guidance", "0,1") == (4.0, 0.0, 1.0)


def test_demo_sweep_and_report_redoes_a_stale_sweep(run, tmp_path, monkeypatch):
    from difflab.experiments import demo

    monkeypatch.setattr(demo, "SWEEP", DDPMSweepAxes(guidance="0,2", steps="2", n_per_class=2))
    mine = tmp_path / "demo"
    shutil.copytree(run, mine)
    page = demo.sweep_and_report(mine)
    assert page == mine / "report.html" and (mine / "report.md").is_file()
    assert "Sweep: sweep" in page.read_text(encoding="utf-8")
    state = load_file(mine / "model.safetensors")  # trained further: the old sweep is stale
    save_file(
        {k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()},
        mine / "model.safetensors",
    )
    demo.sweep_and_report(mine)  # redone, not refused
    identity = json.loads((mine / "sweep" / "sweep.json").read_text())
    assert identity["weights_sha256"] == file_sha256(mine / "model.safetensors")


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
def test_batched_guidance_cells_equal_cells_sampled_alone(run, sampler):
    """One forward for several guidance values gives what each value gives alone."""
    from difflab.ddpm.runs import load_run
    from difflab.seeds import initial_noise

    model, diffusion, _ = load_run(run, device="cpu")
    identity = {"eta": 0.0, "spacing": "trailing"}
    labels = torch.arange(10).repeat_interleave(2)
    x_T = initial_noise(3, labels, (1, 8, 8))
    cells = [sweep_mod.Cell(sampler, 4, g, 3) for g in (0.0, 1.0, 2.5)]
    together = sweep_mod.sample_cells(model, diffusion, labels, x_T, cells, identity, batch_size=8)
    for cell, images in zip(cells, together, strict=True):
        (alone,) = sweep_mod.sample_cells(model, diffusion, labels, x_T, [cell], identity, 8)
        assert images.shape == (20, 1, 8, 8)
        torch.testing.assert_close(images, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[2], atol=1e-2)


def test_cell_groups_share_seed_sampler_and_steps():
    cells = sweep_mod.all_cells(
        {"seeds": [0, 1], "samplers": ["ddim"], "steps": [2, 5], "guidance": [0.0, 1.0, 2.0]}
    )
    groups = sweep_mod.cell_groups(cells, max_cells=2)
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1, 2, 2, 2, 2]
    for g in groups:
        assert len({(c.seed, c.sampler, c.steps) for c in g}) == 1
    assert sorted(c.key for g in groups for c in g) == sorted(c.key for c in cells)


def test_second_sweep_into_a_busy_folder_is_refused(run, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "sw"
    sweep_run(run, replace(AXES, guidance="0", steps="2"), out, **QUIET)
    before = snapshot(out)
    capsys.readouterr()
    holder = subprocess.Popen(  # another process holds the folder's lock
        [sys.executable, "-c", "import sys, time; from difflab.files import folder_lock\n"
         f"with folder_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["sweep", str(run), "--guidance", "0", "--steps", "2", "--n", "2", "--device", "cpu"]
        assert main([*args, "--out", str(out)]) == 2
        err = one_line_error(capsys, f"pid {holder.pid}")
        assert "another process" in err and "--out" in err
    finally:
        holder.kill()
        holder.wait()
    after = snapshot(out)
    assert after.pop(".lock") == f"{holder.pid}\n".encode()  # the holder's pid, for the message
    before.pop(".lock")
    assert after == before  # nothing else touched
    assert main([*args, "--out", str(out)]) == 0  # the lock went with the process


def test_a_held_folder_is_refused_before_anything_in_it_changes(run, tmp_path):
    from difflab.errors import UsageError
    from difflab.files import folder_lock

    axes = replace(AXES, guidance="0", steps="2")
    out, fresh = tmp_path / "sw", tmp_path / "fresh"
    sweep_run(run, axes, out, **QUIET)
    (out / "cells" / ".ddim_steps3_g0_seed0.json.k2.tmp.json").write_text("{")  # a killed write
    fresh.mkdir()
    before = snapshot(out)
    with folder_lock(out), folder_lock(fresh):  # another writer holds both folders
        with pytest.raises(UsageError, match="another process"):
            sweep_run(run, replace(axes, grid_class=3), out, **QUIET)  # would rewrite sweep.json
        with pytest.raises(UsageError, match="another process"):
            sweep_run(run, axes, fresh, **QUIET)
    assert snapshot(out) == before  # the temporary file kept, sweep.json as it was
    assert sorted(p.name for p in fresh.iterdir()) == [".lock"]  # no sweep.json, no cells/
    sweep_run(run, axes, out, **QUIET)  # the next writer clears what the killed one left
    assert not list((out / "cells").glob(".*.tmp*"))


def test_a_torn_cell_record_is_made_again(run, tmp_path):
    out = tmp_path / "sw"
    axes = replace(AXES, guidance="0", steps="2,3")
    sweep_run(run, axes, out, **QUIET)
    record = out / "cells" / "ddim_steps3_g0_seed0.json"
    whole = record.read_bytes()
    images = np.load(record.with_suffix(".npz"))["images"]
    record.write_bytes(whole[: len(whole) // 2])  # cut off, as by a copy that died half-way
    again = sweep_run(run, axes, out, **QUIET)
    assert again.cells_run == 1 and len(again.rows) == 2
    assert json.loads(record.read_text())["key"] == "ddim_steps3_g0_seed0"
    assert np.array_equal(np.load(record.with_suffix(".npz"))["images"], images)
    assert json.loads((out / "metrics.json").read_text())["complete"]


def test_bf16_sweep_has_its_own_identity_and_matches_sample(run, tmp_path, capsys):
    """--precision bf16 samples under bf16 autocast: the sweep says so in sweep.json (an fp32
    sweep keeps the identity it always had), a cell equals `difflab sample --precision bf16`,
    and the two precisions never share a folder."""
    base = ["--guidance", "0,2", "--steps", "3", "--n", "2", "--device", "cpu"]
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert main(["sweep", str(run), *base, "--out", str(fp32)]) == 0
    assert main(["sweep", str(run), *base, "--precision", "bf16", "--out", str(bf16)]) == 0
    assert "precision" not in json.loads((fp32 / "sweep.json").read_text())
    assert json.loads((bf16 / "sweep.json").read_text())["precision"] == "bf16"
    a, b = (np.load(d / "cells" / "ddim_steps3_g2_seed0.npz")["images"] for d in (fp32, bf16))
    assert not np.array_equal(a, b)  # the network ran in another precision ...
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 8  # ... on the same trajectory
    npz = tmp_path / "s.npz"
    sample = ["--n-per-class", "2", "--guidance", "2", "--steps", "3", "--device", "cpu"]
    assert main(["sample", str(run), *sample, "--precision", "bf16", "--out", str(npz)]) == 0
    assert np.array_equal(np.load(npz)["images"], b)
    capsys.readouterr()
    assert main(["sweep", str(run), *base, "--out", str(bf16)]) == 2
    one_line_error(capsys, "holds a sweep with --precision bf16, not fp32")
    assert main(["sweep", str(run), *base, "--precision", "bf16", "--out", str(fp32)]) == 2
    one_line_error(capsys, "holds a sweep with --precision fp32, not bf16")
    assert (
        main(["sweep", str(run), *base, "--precision", "fp16", "--out", str(tmp_path / "x")]) == 2
    )
    one_line_error(capsys, "--precision 'fp16': choose one of auto, fp32, bf16")
    assert not (tmp_path / "x").exists()
