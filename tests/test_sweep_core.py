"""The sweep folder core: lock before any write, identities compared key by key, torn cell
records counted as missing, tables byte for byte what the sweeps wrote before the core."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from difflab import files
from difflab.errors import UsageError
from difflab.experiments import core, ddpm_sweep, sd_sweep
from difflab.files import folder_lock


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones included) with its bytes; folders as None."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in folder.rglob("*")
    }


@dataclass(frozen=True)
class Cell:
    a: int
    b: float

    @property
    def key(self) -> str:
        return f"a{self.a}_b{self.b:g}"


FOLDER = core.SweepFolder(
    "toy.json", ".dat",
    core.Tables(
        lambda rows: core.summarise(rows, ("b",), ("m",)),
        lambda identity: ("a", "b", "m"), lambda identity: ("b", "seeds", "m_mean", "m_std"),
    ),
    options={"b": "--b"}, first={"model": lambda old, new: "holds a sweep of another model"},
    implied={"precision": "fp32"}, presentation=("look",),
)  # fmt: skip
IDENTITY = {"model": "m1", "b": [0.5, 2.0], "size": "8x8", "look": 0}


def toy_folder(out: Path) -> Path:
    """A resumable toy sweep: identity, one finished cell, temporary files of killed writes."""
    (out / "cells").mkdir(parents=True)
    (out / "toy.json").write_text(json.dumps(IDENTITY))
    FOLDER.write_cell(out, Cell(0, 0.5), {"a": 0, "b": 0.5, "m": 1.0}, lambda p: p.write_bytes(b"x"))  # fmt: skip
    (out / "cells" / ".a0_b2.json.k3j.tmp.json").write_text('{"a": 0,')
    (out / ".metrics.csv.p0q.tmp.csv").write_text("a,b")
    return out


# -- the lock comes first --------------------------------------------------------------------
def test_a_held_folder_is_refused_with_nothing_changed(tmp_path):
    out = toy_folder(tmp_path / "sw")
    with folder_lock(out):  # another writer holds the folder
        before = snapshot(out)
        look_changed = {**IDENTITY, "look": 3}  # would rewrite the identity
        with pytest.raises(UsageError, match="another process .* is writing into this folder"):
            with FOLDER.hold(out, look_changed):
                pytest.fail("the body ran without the lock")
        assert snapshot(out) == before  # no temporary file removed, no identity written

    new = tmp_path / "new"
    new.mkdir()
    with folder_lock(new):  # a new sweep's folder, already held: only the holder's lock file
        with pytest.raises(UsageError, match="another process"):
            with FOLDER.hold(new, IDENTITY):
                pytest.fail("the body ran without the lock")
        assert sorted(snapshot(new)) == [".lock"]  # no identity, no cells/


def test_hold_locks_then_cleans_then_writes_the_identity(tmp_path, monkeypatch):
    out = toy_folder(tmp_path / "sw")
    order = []
    real_lock, real_clean, real_write = core.folder_lock, core.remove_temporary, core.write_json
    monkeypatch.setattr(core, "folder_lock", lambda f: order.append("lock") or real_lock(f))
    monkeypatch.setattr(core, "remove_temporary", lambda f: order.append("clean") or real_clean(f))
    monkeypatch.setattr(core, "write_json", lambda p, o: order.append(p.name) or real_write(p, o))
    with FOLDER.hold(out, {**IDENTITY, "look": 3}):
        assert order == ["lock", "clean", "toy.json"]
        with pytest.raises(UsageError, match="another process"):  # held while the body runs
            with folder_lock(out):
                pass
    assert not [p for p in out.rglob(".*.tmp*")]
    assert json.loads((out / "toy.json").read_text())["look"] == 3
    assert FOLDER.load_cell(out, Cell(0, 0.5)) == {"a": 0, "b": 0.5, "m": 1.0}  # kept

    order.clear()
    with FOLDER.hold(out, {**IDENTITY, "look": 3}):  # the same sweep again: nothing to write
        assert order == ["lock", "clean"]


def test_a_folder_left_with_only_a_lock_and_temporary_files_is_new(tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    (out / ".lock").write_text("123\n")  # killed between taking the lock and the identity
    (out / ".toy.json.x1.tmp.json").write_text("{")
    assert FOLDER.check(out, IDENTITY) is False
    with FOLDER.hold(out, IDENTITY):
        pass
    assert json.loads((out / "toy.json").read_text()) == IDENTITY
    assert sorted(snapshot(out)) == [".lock", "cells", "toy.json"]


# -- identity --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "m2"}, "holds a sweep of another model"),
        ({"b": [0.5]}, "holds a sweep with --b 0.5,2, not 0.5; re-run the command"),
        ({"size": "16x16"}, "holds a sweep with --size 8x8, not 16x16"),  # --KEY by default
        ({"precision": "bf16"}, "holds a sweep with --precision fp32, not bf16"),  # implied
        ({"prompt": ""}, 'holds a sweep with --prompt none, not ""'),  # a new key
    ],
)
def test_another_sweep_is_refused_naming_what_differs(tmp_path, change, message):
    out = toy_folder(tmp_path / "sw")
    before = snapshot(out)
    for call in (FOLDER.check, lambda o, i: FOLDER.hold(o, i).__enter__()):
        with pytest.raises(UsageError) as err:
            call(out, {**IDENTITY, **change})
        assert str(err.value).startswith(f"--out {out}: ") and message in str(err.value)
        assert "\n" not in str(err.value)
    assert snapshot(out) == before
    assert FOLDER.check(out, {**IDENTITY, "precision": "fp32"}) is True  # what no key meant
    assert FOLDER.check(out, {**IDENTITY, "look": 5}) is True  # only how it looks


def test_the_sweeps_name_their_own_keys():
    old = {"run": "/r", "weights_sha256": "a", "steps": [2], "eta": 0.0, "grid_class": 0}
    differs = ddpm_sweep.FOLDER.differs
    assert "another run (/r)" in differs(old, {**old, "run": "/s"})
    assert "weights of /r changed" in differs(old, {**old, "weights_sha256": "b"})
    assert "the run's eta changed since this sweep started (0, now 1)" in differs(
        old, {**old, "eta": 1.0}
    )
    assert differs(old, {**old, "grid_class": 4}) is None
    sd = {"model": "/a", "model_fingerprint": {"sha256": "1"}, "scheduler": None, "steps": [1]}
    differs = sd_sweep.FOLDER.differs
    assert differs(sd, {**sd, "model": "/moved"}) is None  # the fingerprint stands for the path
    assert "another model (/a)" in differs(sd, {**sd, "model_fingerprint": {"sha256": "2"}})
    assert "holds a sweep without a LoRA" in differs(sd, {**sd, "lora_fingerprint": {"x": 1}})
    assert "--scheduler none, not euler" in differs(sd, {**sd, "scheduler": "euler"})


def test_file_sha256_is_the_whole_files_hash(tmp_path):
    data = bytes(range(256)) * 5000  # over one 1 MiB block
    (tmp_path / "w").write_bytes(data)
    assert files.file_sha256(tmp_path / "w") == hashlib.sha256(data).hexdigest()


# -- cell records ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "record",
    [
        b'{"a": 0, "b": 0.5, "m"',  # torn JSON
        '{"a": 0, "b": 0.5, "m": "\u00e9'.encode()[:-1],  # torn in a UTF-8 character
        b"[1, 2]",  # not a record
        b'{"a": 1, "b": 0.5, "m": 1.0}',  # another cell's
        b"",
    ],
)
def test_a_torn_or_foreign_record_is_a_missing_cell(tmp_path, record):
    out = toy_folder(tmp_path / "sw")
    cell = Cell(0, 0.5)
    assert FOLDER.load_cell(out, cell) is not None
    data, path = FOLDER.cell_paths(out, cell)
    path.write_bytes(record)
    assert FOLDER.load_cell(out, cell) is None
    assert FOLDER.read_tables(out, IDENTITY, [cell])[0] == []


def test_a_record_without_its_file_is_a_missing_cell(tmp_path):
    out = toy_folder(tmp_path / "sw")
    data, _ = FOLDER.cell_paths(out, Cell(0, 0.5))
    data.unlink()
    assert FOLDER.load_cell(out, Cell(0, 0.5)) is None


# -- tables ----------------------------------------------------------------------------------
def test_summarise_is_mean_and_std_over_seeds():
    rows = [{"g": 1, "m": 1.0}, {"g": 1, "m": 3.0}, {"g": 2, "m": 5.0}, {"g": 2, "m": None}]
    assert core.summarise(rows, ("g",), ("m",)) == [
        {"g": 1, "seeds": 2, "m_mean": 2.0, "m_std": pytest.approx(2**0.5)},
        {"g": 2, "seeds": 2, "m_mean": 5.0, "m_std": None},  # one value: no deviation
    ]
    assert core.mean_std([None]) == (None, None)


def _ddpm_records(out: Path) -> tuple[dict, list]:
    identity = {
        "format": 1, "run": "/runs/r", "weights_sha256": "ab" * 32, "dataset": "digits",
        "samplers": ["ddim", "ddpm"], "steps": [2, 3], "guidance": [0.0, 2.0], "seeds": [0, 1],
        "n_per_class": 2, "num_classes": 10, "eta": 0.0, "spacing": "trailing", "grid_class": 0,
    }  # fmt: skip
    (out / "cells").mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps(identity))
    cells = ddpm_sweep.all_cells(identity)
    for i, c in enumerate(cells[:-1]):  # the last cell is not finished
        x = (i * 37 % 11) / 11
        row = {
            "key": c.key, "sampler": c.sampler, "steps": c.steps, "guidance": c.guidance,
            "seed": c.seed, "n": 20, "accuracy": 0.5 + x / 4, "fd": 3.0 - x, "fd_ratio": 1.5 + x,
            "kid": 0.01 * x, "kid_std": 0.001, "diversity": 7 + x, "fd_floor": 1.25,
            "diversity_real": 7.5, "judge_test_accuracy": 0.97, "seconds": 0.1 * (i + 1),
            "eval_seconds": 0.05, "device": "cpu", "batched_cells": 1, "process": 0,
        }  # fmt: skip
        (out / "cells" / f"{c.key}.npz").write_bytes(b"")
        (out / "cells" / f"{c.key}.json").write_text(json.dumps(row))
    return identity, cells


def _sd_records(out: Path, lora: bool) -> tuple[dict, list]:
    identity = {
        "format": 1, "model": "/m", "model_fingerprint": {"folder": "m", "sha256": "cd" * 32},
        "vae": None, "prompts": ["a cat", "a dog"], "negative_prompt": "", "guidance": [1.0, 3.0],
        "steps": [1, 2], "seeds": [0, 1], "size": "32x32", "scheduler": None, "dtype": "fp32",
        "safety_checker": True, "clip_model": None,
    }  # fmt: skip
    if lora:
        identity |= {
            "lora": "/l.safetensors", "lora_fingerprint": {"name": "l", "sha256": "ef" * 32},
            "lora_scales": [0.0, 1.0],
        }  # fmt: skip
    (out / "cells").mkdir(parents=True)
    (out / "sd_sweep.json").write_text(json.dumps(identity))
    cells = sd_sweep.all_cells(identity)
    for i, c in enumerate(cells[:-1]):
        x = (i * 37 % 11) / 11
        nsfw, black = i % 5 == 0, i % 7 == 3
        scale = {} if c.lora_scale is None else {"lora_scale": c.lora_scale}
        row = {
            "key": c.key, "prompt_index": c.prompt_index, **scale,
            "prompt": identity["prompts"][c.prompt_index], "negative_prompt": "",
            "guidance": c.guidance, "steps": c.steps, "seed": c.seed,
            "clip_score": None if nsfw or black else 20 + 10 * x,
            "detail": None if nsfw or black else x / 100, "seconds_per_image": 0.2 + x,
            "batch": 2, "nsfw": nsfw, "black": black, "nan_fraction": 0.0,
            "note": "filtered" if nsfw else None, "png": f"cells/{c.key}.png",
        }  # fmt: skip
        (out / "cells" / f"{c.key}.png").write_bytes(b"")
        (out / "cells" / f"{c.key}.json").write_text(json.dumps(row))
    return identity, cells


# sha256 of the tables that the sweeps wrote from these records before they shared the core
BEFORE = {
    "ddpm": {
        "metrics.csv": "8932ead22b256ff5e3d415aaa49f5f7ee32335c57f76835571896c774a871bf7",
        "summary.csv": "720f7af64e5851dd9999a60b78f473dc6fb6080615f38eecb439750e7ce68889",
        "metrics.json": "cd4ba499cd46853b20c73cfcbe9a8d0ca905039c20c90e9a2496b9d70fdf597a",
    },
    "sd": {
        "metrics.csv": "71e6662a6e2443554c72a741c417ecd402b54ea25e3625dcd00daaa60876c714",
        "summary.csv": "feaa396d57f7e03a56d26cbea00ecc5e9b09812e4c093ce498b647a3ef99ad44",
        "metrics.json": "4637606f708f2f857b797d05f54ca09d8d89d15ca784264c8176c2ba92941903",
    },
    "sd-lora": {
        "metrics.csv": "3e18fdfc14e85b03db08acc4370a328ea07426f0a218c3fa62bcc097fcfb7bf7",
        "summary.csv": "df0bdbaf86b36d010c2d3e3b504a3526cdfae4dd5790c9d7f96b70beffe4ed02",
        "metrics.json": "f71028c111351306d7da574f7d3dee4f95afcadb5acd30313799bfc4b00d1a0f",
    },
}


@pytest.mark.parametrize("kind", list(BEFORE))
def test_tables_are_byte_for_byte_the_ones_before_the_core(tmp_path, kind):
    out = tmp_path / kind
    if kind == "ddpm":
        identity, cells = _ddpm_records(out)
        rows, summary = ddpm_sweep.FOLDER.write_tables(out, identity, cells)
        assert len(rows) == 15 and len(summary) == 8 and summary[-1]["accuracy_std"] is None
    else:
        identity, cells = _sd_records(out, lora=kind == "sd-lora")
        rows, summary = sd_sweep.FOLDER.write_tables(out, identity, cells)
        assert len(rows) == len(cells) - 1
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == ",".join(ddpm_sweep.CSV_COLUMNS if kind == "ddpm" else sd_sweep._columns(identity))  # fmt: skip
    for name, digest in BEFORE[kind].items():
        data = (out / name).read_bytes()
        if name.endswith(".csv"):  # the interval columns are new: all else is as it was
            rows_in = list(csv.reader(io.StringIO(data.decode(), newline="")))
            keep = [i for i, c in enumerate(rows_in[0]) if "_ci_" not in c]
            assert kind != "ddpm" or rows_in[0][-8:] == list(ddpm_sweep.CI_COLUMNS)
            buf = io.StringIO(newline="")
            csv.writer(buf, lineterminator="\n").writerows([[r[i] for i in keep] for r in rows_in])
            data = buf.getvalue().encode()
        if name == "metrics.json":  # so are the summary's intervals
            doc = json.loads(data)
            doc["summary"] = [
                {k: v for k, v in r.items() if "_ci_" not in k} for r in doc["summary"]
            ]
            if kind != "ddpm":  # the SD sweep's added measures: mini-SD's, and the intervals
                added = ("prompt_accuracy", "diversity", "ci")
                assert all(k in doc["measures"] for k in added)
                doc["measures"] = {k: v for k, v in doc["measures"].items() if k not in added}
            data = (json.dumps(doc, indent=2) + "\n").encode()
        assert hashlib.sha256(data).hexdigest() == digest, name
