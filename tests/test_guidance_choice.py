"""A run's own default guidance, chosen from its samples when training ends."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.cli.main import main
from difflab.config import RunConfig, get_preset
from difflab.ddpm.training import train
from difflab.evaluation.during_training import TrainingEvaluator
from difflab.evaluation.guidance_choice import (
    INTERVAL,
    SCALES,
    SEED_OFFSET,
    bisect_scales,
    describe,
    margin,
    pick,
    search,
)
from helpers import tiny_config


@pytest.fixture(scope="module", autouse=True)
def judge_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.mark.parametrize("lowest", range(len(SCALES) + 1))  # len(SCALES): none reaches
def test_bisection_finds_the_lowest_scale_that_reaches_in_four_tries(lowest):
    reaches = {s: i >= lowest for i, s in enumerate(SCALES)}
    tried = bisect_scales(reaches.__getitem__)
    assert len(tried) <= 4 and len(set(tried)) == len(tried)  # ten scales: log2(11) rounded up
    rows = [{"guidance": s, "accuracy": 0.995 if reaches[s] else 0.9 + s / 100, "fd": s}
            for s in tried]  # fmt: skip
    chosen = pick(rows, 0.99)["guidance"]
    assert chosen == (SCALES[lowest] if lowest < len(SCALES) else max(tried))
    if lowest < len(SCALES):
        assert SCALES[lowest] in tried  # it was measured, not guessed
        if lowest > 0:
            assert SCALES[lowest - 1] in tried  # and the scale below it was seen to fall short


def test_pick_by_hand():
    rows = [
        {"guidance": 2.5, "accuracy": 0.995, "fd": 3.0},
        {"guidance": 1.75, "accuracy": 0.991, "fd": 2.0},
        {"guidance": 1.5, "accuracy": 0.97, "fd": 1.0},
    ]
    assert pick(rows, 0.99)["guidance"] == 1.75  # the lowest that reaches, not the first tried
    assert pick(rows, 0.999)["guidance"] == 2.5  # none reaches: the most accurate
    tie = [
        {"guidance": 3.0, "accuracy": 0.9, "fd": 5.0},
        {"guidance": 4.0, "accuracy": 0.9, "fd": 4.0},
    ]
    assert pick(tie, 0.99)["guidance"] == 4.0  # equals: the lower FD


def test_the_margin_by_hand():
    """Each distance inside its limit in its own sampling error: binomial at the target for
    the accuracy, 6.5 % of the FD (at 1,000 samples, as 1 / sqrt(n)) for the FD / floor."""
    row = {"accuracy": 0.996, "fd_ratio": 1.31}
    acc = (0.996 - 0.99) / math.sqrt(0.99 * 0.01 / 1000)  # 1.91
    fd = (1.5 - 1.31) / (0.065 * 1.31)  # 2.23
    assert margin(row, 0.99, 1.5, 1000) == pytest.approx(min(acc, fd))
    assert margin({"accuracy": 0.9999, "fd_ratio": 1.48}, 0.99, 1.5, 1000) == pytest.approx(
        0.02 / (0.065 * 1.48)
    )  # the FD is the nearer limit
    assert margin(row, 0.99, 1.5, 250) == pytest.approx(min(acc, fd) / 2)  # errors double
    assert margin({"accuracy": 0.98, "fd_ratio": 1.0}, 0.99, 1.5, 1000) < 0  # outside one


def _curve(draws, zero_at, rise):
    """Accuracy and FD / floor rising with the scale, from hypothesis's draws."""
    acc, fd = [], []
    a, r = zero_at, rise
    for da, dr in draws:
        a, r = min(1.0, a + da), r + dr
        acc.append(round(a, 4)), fd.append(round(r, 3))
    return acc, fd


@settings(max_examples=300, deadline=None)
@given(
    draws=st.lists(st.tuples(st.floats(0, 0.01), st.floats(0.0, 0.4)), min_size=10, max_size=10),
    start=st.floats(0.95, 0.995),
    fd0=st.floats(0.5, 2.5),
)
def test_the_search_finds_the_widest_margin_when_both_limits_can_be_met(draws, start, fd0):
    """Over any accuracy and FD that rise with the scale: where some scale meets both limits,
    the chosen one has the widest margin of all ten (found with few measurements); where
    none does, the lowest scale that reaches the accuracy, else the most accurate."""
    acc, fd = _curve(draws, start, fd0)
    table = {s: {"guidance": s, "accuracy": a, "fd": r, "fd_ratio": r,
                 "margin": margin({"accuracy": a, "fd_ratio": r}, 0.99, 1.5, 1000)}
             for s, a, r in zip(SCALES, acc, fd, strict=True)}  # fmt: skip
    asked = []

    def measure(scale):
        asked.append(scale)
        return dict(table[scale])

    chosen, rows, widened = search(measure, 0.99, 1.5)
    assert len(asked) == len(set(asked)) == len(rows)  # each scale measured once at most
    both = [s for s in SCALES if acc[SCALES.index(s)] >= 0.99 and fd[SCALES.index(s)] <= 1.5]
    reach = [s for s in SCALES if table[s]["accuracy"] >= 0.99]
    if both:
        best = max(table[s]["margin"] for s in SCALES)
        assert chosen["margin"] == best
        first = min(s for s in SCALES if table[s]["margin"] == best)
        assert chosen["guidance"] == first  # the lowest scale of the widest margin
        assert widened == (first != reach[0])
        last = SCALES.index(first)  # the end of the run of scales as wide as the widest
        while last + 1 < len(SCALES) and table[SCALES[last + 1]]["margin"] == best:
            last += 1
        assert len(asked) <= 4 + last - SCALES.index(reach[0]) + 1
    elif reach:
        assert chosen["guidance"] == reach[0] and len(asked) <= 4 and not widened
    else:
        assert chosen["accuracy"] == max(r["accuracy"] for r in rows) and not widened


def test_the_quick_preset_chooses_its_guidance():
    tc = get_preset("quick").train
    assert tc.choose_guidance and (tc.guidance_target, tc.guidance_fd_target) == (0.99, 1.5)
    assert tc.guidance_n_per_class == 100  # as many as `difflab eval`: the floors agree
    assert get_preset("quick").diffusion.schedule == "cosine"
    assert not get_preset("paper").train.choose_guidance


def test_training_ends_by_writing_the_chosen_guidance(tmp_path):
    cfg = tiny_config(epochs=0.2, choose_guidance=True, guidance_n_per_class=3, guidance_target=0.0,
                      guidance_fd_target=1e-3)  # fmt: skip
    run = tmp_path / "run"
    result = train(cfg, run, device="cpu", progress=False, make_evaluator=TrainingEvaluator)
    record = json.loads((run / "guidance.json").read_text())
    assert result.guidance == record
    # every scale reaches a target of 0: the bisection walks down to the lowest, and as no
    # FD is within 1e-3 of the floor, it stays there
    assert [r["guidance"] for r in record["rows"]] == [2.0, 1.5, 1.4, 1.25]
    assert record["chosen"] == {"guidance": 1.25, "guidance_interval": list(INTERVAL)}
    assert record["n"] == 30 and record["reached_target"] and not record["within_fd_target"]
    assert record["seed"] == cfg.train.seed + SEED_OFFSET  # held out from eval's samples
    for r in record["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["fd"] > 0
        assert r["fd_ratio"] == pytest.approx(r["fd"] / record["fd_floor"])
        assert r["margin"] == pytest.approx(margin(r, 0.0, 1e-3, 30), abs=1e-3) and r["margin"] < 0
    saved = RunConfig.load(run / "config.json")
    assert (saved.sample.guidance, saved.sample.guidance_interval) == (1.25, INTERVAL)
    assert saved.sample.steps == cfg.sample.steps  # only the guidance changed
    assert "s = 1.25 for sigma in [0.5, 1e+06]" in describe(record)
    assert "none is also within 0.001x" in describe(record)

    # an unreachable target: the most accurate of the scales tried (bisecting upwards)
    other = tmp_path / "other"
    cfg = tiny_config(epochs=0.2, choose_guidance=True, guidance_n_per_class=3, guidance_target=1.0)
    record = train(
        cfg, other, device="cpu", progress=False, make_evaluator=TrainingEvaluator
    ).guidance
    tried = [r["guidance"] for r in record["rows"]]
    if not record["reached_target"]:
        assert tried == [2.0, 3.0, 4.0]  # up from the middle: 2.25 and 2.5 are not needed
        assert record["chosen"]["guidance"] == pick(record["rows"], 1.0)["guidance"]
    assert RunConfig.load(other / "config.json").sample.guidance == record["chosen"]["guidance"]

    # the same weights make the same choice: resuming a finished run chooses again, alike
    again = train(cfg, other, device="cpu", progress=False, resume=True,
                  make_evaluator=TrainingEvaluator).guidance  # fmt: skip

    def measured(rec):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rec["rows"]]

    assert measured(again) == measured(record)


def test_training_without_an_evaluator_refuses_to_choose(tmp_path):
    from difflab.errors import UsageError

    with pytest.raises(UsageError, match="train.choose_guidance: this caller"):
        train(tiny_config(choose_guidance=True), tmp_path / "r", device="cpu", progress=False)


@pytest.mark.parametrize(
    "setting", ["train.guidance_target=2", "train.guidance_target=nan",
                "train.guidance_n_per_class=1", "train.choose_guidance=maybe"],
)  # fmt: skip
def test_bad_choice_options_get_one_line(setting, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--minutes", "0.01", "--set", setting, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and setting.split("=")[0].split(".")[1] in err[0]
    assert not out.exists()
