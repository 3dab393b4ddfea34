"""Checkpoints as a sweep axis: snapshots of a run swept like any other setting, paired."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.ddpm.runs import load_run, save_weights, snapshot_path, weights_metadata
from difflab.errors import UsageError
from difflab.evaluation import judge as judge_mod
from difflab.experiments import ddpm_sweep as sweep_mod
from difflab.experiments.ddpm_sweep import sweep_identity, sweep_run
from difflab.experiments.ddpm_tables import CSV_COLUMNS, SUMMARY_COLUMNS
from difflab.experiments.report import write_report
from difflab.options import DDPMSweepAxes
from helpers import tiny_run

QUIET = dict(progress=False, plots=False, max_group=8)
AXES = dict(guidance="1", steps="2", seeds="0", n_per_class=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with snapshots at steps 1 and 2 (its weights, perturbed, so they differ)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp / "cache"))
        real = judge_mod.train_judge
        mp.setattr(judge_mod, "train_judge", lambda *a, **k: real(*a, **{**k, "epochs": 1}))
        path = tiny_run(tmp)
        write_snapshots(path, (1, 2))
        yield path


def write_snapshots(run, steps, scale=0.3, seed=0):
    model = load_run(run)[0]
    gen = torch.Generator().manual_seed(seed)
    snapshot_path(run, 0).parent.mkdir(exist_ok=True)
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen) * p.abs().mean().clamp_min(1e-3))
        save_weights(model, snapshot_path(run, step))


def final(run) -> int:
    return weights_metadata(run / "model.safetensors")["step"]


def header(path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def test_all_checkpoints_are_an_axis_with_shared_noise(run, tmp_path, monkeypatch):
    seen = []
    real = sweep_mod.sample_cells

    def spy(model, diffusion, labels, x_T, cells, *a, **k):
        seen.append((cells[0].checkpoint, x_T.clone(), model.state_dict()["class_embed.weight"].clone()))  # fmt: skip
        return real(model, diffusion, labels, x_T, cells, *a, **k)

    monkeypatch.setattr(sweep_mod, "sample_cells", spy)
    out = tmp_path / "sw"
    r = sweep_run(run, DDPMSweepAxes(**AXES, checkpoints="all"), out, **{**QUIET, "plots": True})
    last = final(run)
    assert [c for c, _, _ in seen] == [1, 2, last]
    assert all(torch.equal(seen[0][1], x) for _, x, _ in seen)  # one x_T for every checkpoint
    assert not torch.equal(seen[0][2], seen[1][2])  # but the weights of each
    assert header(out / "metrics.csv")[:2] == ["checkpoint", "images_seen"]
    assert header(out / "summary.csv")[:2] == ["checkpoint", "images_seen"]
    assert [(row["checkpoint"], row["images_seen"]) for row in r.rows] == [
        (s, s * 32) for s in (1, 2, last)
    ]
    assert [row["checkpoint"] for row in r.summary] == [1, 2, last]
    ident = json.loads((out / "sweep.json").read_text())
    assert ident["checkpoints"] == [1, 2, last]
    assert ident["checkpoint_files"][str(last)] == "model.safetensors"
    assert set(ident["checkpoint_sha256"]) == {"1", "2", str(last)}
    images = [np.load(out / "cells" / f"{row['key']}.npz")["images"] for row in r.rows]
    assert not np.array_equal(images[0], images[2])
    with np.load(out / "cells" / f"{r.rows[0]['key']}.npz") as z:
        assert z["features"].shape[0] == len(z["labels"]) == 2 * 10
    assert (out / "figures" / "vs_checkpoint_ddim.png").is_file()
    # the report follows the best setting through training, paired in accuracy and FD
    rep = write_report([out], tmp_path / "r.html")
    text = " ".join(rep.conclusions)
    assert (
        "Over training" in text
        and f"step {last} (final weights, {last * 32:,} images seen)" in text
    )
    assert "From the first checkpoint to the last" in text
    assert " in FD " in text or "has FD" in text
    assert "| checkpoint | images seen |" in (md := (tmp_path / "r.md").read_text())
    assert f"| {last} (final) | {last * 32:,} |" in md


def test_default_tables_have_no_checkpoint_column(run, tmp_path):
    r = sweep_run(run, DDPMSweepAxes(**AXES), tmp_path / "sw", **QUIET)
    assert tuple(header(tmp_path / "sw" / "metrics.csv")) == CSV_COLUMNS
    assert tuple(header(tmp_path / "sw" / "summary.csv")) == SUMMARY_COLUMNS
    assert "checkpoint" not in r.rows[0] and "ckpt" not in r.rows[0]["key"]
    assert "checkpoints" not in json.loads((tmp_path / "sw" / "sweep.json").read_text())


def test_a_retrained_snapshot_is_not_mixed_in(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    out = tmp_path / "sw"
    sweep_run(copy, DDPMSweepAxes(**AXES, checkpoints="1"), out, **QUIET)
    argv = ["sweep", str(copy), "--guidance", "1", "--steps", "2", "--n", "2", "--device", "cpu"]
    assert main([*argv, "--checkpoints", "1,2", "--out", str(out)]) == 2
    assert "--checkpoints 1, not 1,2" in capsys.readouterr().err
    write_snapshots(copy, (1,), seed=7)  # step 1 trained again
    before = sorted(p.name for p in (out / "cells").iterdir())
    assert main([*argv, "--checkpoints", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "checkpoints changed since this sweep started" in err
    assert sorted(p.name for p in (out / "cells").iterdir()) == before


@pytest.mark.parametrize(
    "value, match",
    [("-5", "below the smallest"), ("1.5", "whole numbers"), ("", "whole numbers"),
     ("999", "kept no weights of step 999 (kept: 1, 2, "), (str(2**64), "kept no weights"),
     ("1,1", "given twice"), ("al", "whole numbers")],
)  # fmt: skip
def test_bad_checkpoints_one_line_exit_2(run, tmp_path, capsys, value, match):
    out = tmp_path / "sw"
    assert main(["sweep", str(run), "--checkpoints", value, "--n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--checkpoints" in err, err
    assert match in err, err
    assert not out.exists()


def test_all_on_a_run_without_snapshots_sweeps_the_final_weights(run, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("snapshots"))
    ident = sweep_identity(bare, DDPMSweepAxes(**AXES, checkpoints="all"))
    err = capsys.readouterr().err
    assert "kept no snapshots (train with --snapshot-every N" in err and "final weights" in err
    assert ident["checkpoints"] == [final(bare)]
    assert ident["checkpoint_files"] == {str(final(bare)): "model.safetensors"}
    with pytest.raises(UsageError, match="kept no weights of step 1 .kept: " + str(final(bare))):
        sweep_identity(bare, DDPMSweepAxes(**AXES, checkpoints="1"))


def test_the_sweep_tab_takes_checkpoints():
    from difflab.ui.tabs.sweep import sweep_axes

    assert sweep_axes("0", "2", "ddim", "0", 2).checkpoints is None  # blank: as the CLI
    assert sweep_axes("0", "2", "ddim", "0", 2, " ").checkpoints is None
    assert sweep_axes("0", "2", "ddim", "0", 2, "2,1").checkpoints == (1, 2)
    assert sweep_axes("0", "2", "ddim", "0", 2, "all").checkpoints == "all"
    many = ",".join(map(str, range(20)))
    with pytest.raises(UsageError, match=r"cells \(guidance x steps x samplers x seeds x checkpoints\) 300"):  # fmt: skip
        sweep_axes(many, "1,2,3,4,5", "ddim", "0", 2, "1,2,3")


def test_a_checkpoint_sweep_resumes_only_its_missing_cells(run, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    axes = DDPMSweepAxes(**AXES, checkpoints="1,2")
    first = sweep_run(run, axes, out, **QUIET)
    victim = next((out / "cells").glob("*_ckpt2.json"))
    victim.unlink()  # as if killed while writing that cell
    calls, real = [], sweep_mod.sample_cells
    monkeypatch.setattr(
        sweep_mod,
        "sample_cells",
        lambda *a, **k: calls.extend(c.key for c in a[4]) or real(*a, **k),
    )
    again = sweep_run(run, axes, out, **QUIET)
    assert calls == [victim.stem] and again.cells_run == 1
    assert [r["fd"] for r in again.rows] == [r["fd"] for r in first.rows]  # made again, the same
