"""The report: self-contained HTML, its Markdown twin, and conclusions drawn from the numbers."""

import base64
import json
import re

import numpy as np
import pytest

from difflab.cli import main
from difflab.ddpm.runs import save_config
from difflab.experiments.conclusions import sweep_conclusions
from difflab.experiments.ddpm_sweep import summarise
from difflab.experiments.report import write_report
from difflab.figures.images import save_png
from helpers import tiny_config

GUIDANCE = [0.0, 1.0, 2.0, 4.0, 8.0]
ACCURACY = {10: [0.2, 0.6, 0.85, 0.88, 0.75], 50: [0.3, 0.7, 0.93, 0.9, 0.8]}
DIVERSITY = [9.0, 8.8, 8.0, 5.5, 4.0]  # real images: 7.5, so below 6.0 counts as collapsed
FD = [20.0, 12.0, 8.0, 10.0, 15.0]


def synthetic_rows() -> list[dict]:
    rows = []
    for steps, acc in ACCURACY.items():
        for seed, jitter in ((0, -0.01), (1, 0.01)):
            for g, a, d, f in zip(GUIDANCE, acc, DIVERSITY, FD, strict=True):
                rows.append({
                    "sampler": "ddim", "steps": steps, "guidance": g, "seed": seed,
                    "accuracy": a + jitter, "fd": f + jitter, "kid": f / 100, "diversity": d,
                    "seconds": steps / 10,
                })  # fmt: skip
    return rows


@pytest.fixture
def folders(tmp_path):
    """A run folder (config, loss log, one figure, eval.json) and a finished sweep of it."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(tiny_config(), run)
    log = [{"step": s, "epoch": s / 10, "loss": 1 / s, "elapsed_s": s / 5} for s in range(1, 31)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (run / "figures").mkdir()
    save_png(run / "figures" / "forward.png", np.zeros((8, 24, 3), np.uint8))
    per_class = [0.9] * 9 + [0.5]
    ev = {
        "settings": {"n_per_class": 10, "guidance": 2.0, "steps": 5, "sampler": "ddim", "seed": 0},
        "n": 100, "accuracy": 0.86, "accuracy_per_class": per_class, "fd": 6.0, "fd_floor": 2.0,
        "fd_ratio": 3.0, "kid": 0.05, "kid_std": 0.01, "diversity": 7.0, "diversity_real": 7.5,
        "judge_test_accuracy": 0.97, "samples_per_s": 50.0, "class_names": [str(i) for i in range(10)],
    }  # fmt: skip
    (run / "eval.json").write_text(json.dumps(ev))
    sweep = tmp_path / "sweep"
    (sweep / "figures").mkdir(parents=True)
    identity = {
        "run": str(run), "samplers": ["ddim"], "steps": [10, 50], "guidance": GUIDANCE,
        "seeds": [0, 1], "n_per_class": 10, "num_classes": 10, "grid_class": 0,
    }  # fmt: skip
    (sweep / "sweep.json").write_text(json.dumps(identity))
    rows = synthetic_rows()
    doc = {
        "sweep": identity, "complete": True, "cells_done": 20, "cells_total": 20, "fd_floor": 2.0,
        "diversity_real": 7.5, "judge_test_accuracy": 0.97, "cells": rows, "summary": summarise(rows),
    }  # fmt: skip
    (sweep / "metrics.json").write_text(json.dumps(doc))
    save_png(sweep / "figures" / "heatmaps_ddim.png", np.full((16, 16, 3), 200, np.uint8))
    return run, sweep


def test_html_is_self_contained_with_conclusions_from_the_numbers(folders, tmp_path):
    run, sweep = folders
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    r = write_report([sweep], out)  # the sweep brings its run along
    page = out.read_text(encoding="utf-8")
    sources = re.findall(r"""src=['"]([^'"]*)""", page)
    assert len(sources) == 4  # loss (drawn from metrics.jsonl), schedule, forward, heat-maps
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    for s in sources:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"https?:|<link|<script|url\(|href=", page)

    text = " ".join(r.conclusions)
    assert (
        "The best conditional accuracy, 93% ± 1.4%, came with guidance s = 2 at 50 steps." in text
    )
    assert "from 30% at s = 0 (unconditional; chance is 10%) to 93% at s = 2" in text
    assert "depends on the step count (10 steps: s = 4; 50 steps: s = 2)" in text
    assert "(quality depends moderately on the step count)" in text  # 85% -> 93%, same FD
    assert "collapses from s = 4 on (5.50, 73% of the real test images' diversity" in text
    assert "lowest at s = 2 (8.00) and rises to 15.00 at s = 8" in text
    assert "recognises 86% of the samples (on real test images it scores 97%)" in text
    assert "hardest class is 9 (50%)" in text
    for sentence in r.conclusions:
        assert sentence in page.replace("&#x27;", "'")
    assert "Run: run" in page and "Sweep: sweep" in page and "mean ± std over seeds" in page
    assert "Not made yet: difflab reverse" in page  # a missing figure says how to make it

    md = r.markdown.read_text(encoding="utf-8")
    assert r.markdown == out.with_suffix(".md")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4 and all(not link.startswith(("/", "http")) for link in links)
    assert all((out.parent / link).is_file() for link in links)
    assert "came with guidance s = 2 at 50 steps" in md and "| 50 | 2 | 93.0% ± 1.4% |" in md


def test_conclusions_ties_and_no_collapse():
    rows = [
        {"sampler": "ddim", "steps": 20, "guidance": g, "seed": 0, "accuracy": a, "fd": 5.0,
         "kid": 0.1, "diversity": 7.0, "seconds": 1.0}
        for g, a in ((0.0, 0.5), (1.0, 0.9), (3.0, 0.9))
    ]  # fmt: skip
    text = " ".join(sweep_conclusions(summarise(rows), {"diversity": 7.5}))
    assert "came with guidance s = 1 at 20 steps" in text  # a tie goes to the smaller guidance
    assert "does not collapse in this range" in text and "93% of the real test images'" in text
    assert "no clear sign of over-guidance" in text
    assert "depends strongly on guidance" in text  # 50% -> 90%


def test_report_bad_input(folders, tmp_path, capsys):
    run, sweep = folders
    out = tmp_path / "r.html"
    cases = [
        ([str(tmp_path / "nope")], str(out), "neither a run folder"),
        ([str(run)], str(tmp_path / "r.pdf"), "--out"),
        ([str(run)], str(tmp_path / "missing" / "r.html"), "does not exist"),
    ]
    (sweep / "metrics.json").unlink()
    cases.append(([str(sweep)], str(out), "no finished cell yet"))
    for inputs, target, match in cases:
        assert main(["report", *inputs, "--out", target]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sweep"]  # nothing written


def test_report_cli_of_a_run_alone(folders, tmp_path, capsys):
    run, _ = folders
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--title", "Lab 3"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<title>Lab 3</title>" in page and "Sweep:" not in page
    assert (tmp_path / "r.md").is_file() and (tmp_path / "r_files").is_dir()
