"""Hostile command lines: every option of every command, thrown generated bad values.

For each command a fast, valid baseline command line is taken and one option's value is
replaced by a value drawn by hypothesis (huge, negative, NaN, inf, empty, non-UTF-8, the
wrong type, an existing folder). The command must then either work (exit 0) or refuse with
exit 2 and one line on stderr naming the option, never a traceback, and on exit 2 nothing
in the working folders may have changed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difflab.cli import build_parser, main

NON_UTF8 = os.fsdecode(b"\xff\xfe")  # what argv holds for bytes that are not UTF-8
SPECIAL = [
    "nan", "inf", "-inf", "-1", "0", "-0", str(2**64), str(2**63), "1e308", "1e-320", "",
    " ", "abc", NON_UTF8, "1,,2", "0.5", ",", "1,nan", "1e999", "-9999999999999999999",
]  # fmt: skip
# free text and paths: almost any value is valid (and does real work), so the default run
# throws only what no text may be at them
TEXT_OPTIONS = {
    "--out", "--prompt", "--negative-prompt", "--prompts", "--title", "--model", "--model-config",
    "--vae", "--data-dir", "--run", "--gif", "--mp4", "--lora", "--clip-model", "--dataset",
    "--init-from", "--set",
}  # fmt: skip
NEVER_VALID = [v for v in SPECIAL if v not in ("-1", "0", "-0", "0.5", "1e-320")]
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
SECONDS = 40  # an exit-0 example that runs longer than this has no cap


def subparsers() -> dict[str, argparse.ArgumentParser]:
    """{"sample": parser, "sd generate": parser, ...}: every (sub)command's own parser."""
    found = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, p in action.choices.items():
                    walk(p, f"{prefix} {name}".strip())
                return
        found[prefix] = parser

    walk(build_parser(), "")
    return found


def value_options(parser: argparse.ArgumentParser) -> list[str]:
    """The long options of a parser that take a value (flags and --help are left out)."""
    out = []
    for action in parser._actions:
        if action.nargs == 0 or not action.option_strings:
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and longs[0] not in ("--device",):
            out.append(longs[0])
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny run, a tiny SD pipeline, and the baseline command line of every command."""
    from helpers import tiny_run

    root = tmp_path_factory.mktemp("hostile")
    run = tiny_run(root, epochs=0.05)
    os.environ.setdefault("DIFFLAB_CACHE", str(root / "cache"))
    out = root / "out"
    out.mkdir()
    sd_model = root / "tiny-sd"
    from difflab.sd.tiny import build_tiny_sd

    build_tiny_sd(sd_model)
    prompts = root / "prompts.txt"
    prompts.write_text("a red square\n")
    r, o, m = str(run), str(out), str(sd_model)
    base = {
        "train": ["--dataset", "digits", "--epochs", "0.02", "--set", "model.base_channels=8",
                  "--set", "model.channel_mults=[1,2]", "--set", "diffusion.timesteps=50",
                  "--batch-size", "32", "--seed", "0", "--out", f"{o}/train"],
        "sample": [r, "--n-per-class", "1", "--steps", "2", "--seed", "0", "--out", f"{o}/s.png"],
        "eval": [r, "--n", "2", "--steps", "2", "--seed", "0"],
        "forward": ["--dataset", "digits", "--t", "T,0", "--per-class", "1", "--seed", "0",
                    "--out", f"{o}/f.png"],
        "reverse": [r, "--t", "T,0", "--classes", "0", "--steps", "2", "--seed", "0",
                    "--out", f"{o}/r.png"],
        "plot": [r, "--out", f"{o}/plot"],
        "sweep": [r, "--guidance", "0,1", "--steps", "2", "--seeds", "0", "--n", "2",
                  "--out", f"{o}/sweep"],
        "report": [r, "--out", f"{o}/report.html"],
        "distill": [r, "--steps", "1", "--teacher-steps", "2", "--round-steps", "1", "--seed", "0",
                    "--out", f"{o}/distill"],
        "demo": None,  # trains for minutes: its options are the train options
        "ui": None,  # serves forever: its checks are tested in test_ui.py
        "sd generate": ["--model", m, "--prompt", "a red square", "--steps", "1", "--n", "1",
                        "--seed", "0", "--size", "32x32", "--out", f"{o}/sd"],
        "sd sweep": ["--model", m, "--prompts", str(prompts), "--guidance", "1", "--steps", "1",
                     "--seeds", "0", "--size", "32x32", "--clip-model", "none", "--out", f"{o}/sdsweep"],
        "sd finetune": None,  # in test_sd_finetune.py
    }  # fmt: skip
    return {"root": root, "base": base, "out": o}


def fresh_base(bench, command: str, kind: str) -> list[str] | None:
    """The baseline of ``command`` writing into a folder of this test's own."""
    base = bench["base"].get(command)
    if base is None:
        return None
    out = bench["root"] / f"{kind}-{command.replace(' ', '-')}"
    (out / "plot").mkdir(parents=True)
    os.chdir(out)  # a relative --out lands in the watched folder
    return [a.replace(bench["out"], str(out)) for a in base]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    skip = root / "cache"
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and skip not in p.parents
    }


def replace_option(argv: list[str], option: str, value: str) -> list[str]:
    if option in argv:
        i = argv.index(option)
        return argv[: i + 1] + [value] + argv[i + 2 :]
    return argv + [option, value]


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()

    def too_long(*_):
        raise TimeoutError(f"ran past {SECONDS} s: {argv}")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue()


COMMANDS = [c for c in subparsers() if c]


@pytest.mark.parametrize(
    "command, values",
    [(c, NEVER_VALID) for c in COMMANDS]
    + [pytest.param(c, SPECIAL, marks=pytest.mark.slow, id=f"{c}-all") for c in COMMANDS],
)
def test_every_option_refuses_every_special_value(bench, command, values, monkeypatch):
    """The systematic part: each listed hostile value in each option, one at a time (the
    values that no option takes in the default run; with the slow tests, all of them)."""
    monkeypatch.chdir(bench["root"])
    base = fresh_base(bench, command, f"special{len(values)}")
    if base is None:
        pytest.skip(f"{command}: covered by its own tests")
    code, err = run_cli(command.split() + base)  # the baseline itself works
    assert code == 0, f"baseline of {command}: exit {code}\n{err}"
    for option in value_options(subparsers()[command]):
        thrown = values
        if option in TEXT_OPTIONS and values is NEVER_VALID:
            thrown = [NON_UTF8, ""]
        for value in thrown:
            check_one(bench, command.split() + replace_option(base, option, value))


def check_one(bench, argv: list[str]) -> None:
    before = snapshot(bench["root"])
    code, err = run_cli(argv)
    assert code in (0, 2), f"{argv}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{argv}:\n{err}"
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, f"{argv}: expected one line, got:\n{err}"
        assert snapshot(bench["root"]) == before, f"{argv}: exit 2 but files changed"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_refuses_hostile_values(bench, command, monkeypatch):
    monkeypatch.chdir(bench["root"])
    base = fresh_base(bench, command, "random")
    if base is None:
        pytest.skip(f"{command}: covered by its own tests")
    options = value_options(subparsers()[command])
    assert options, command
    code, err = run_cli(command.split() + base)  # the baseline itself works
    assert code == 0, f"baseline of {command}: exit {code}\n{err}"

    @settings(
        max_examples=12, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(option=st.sampled_from(options), value=VALUES)
    def check(option, value):
        check_one(bench, command.split() + replace_option(base, option, value))

    check()


BAD_CHECKPOINTS = [
    "-1", "-9999999999999999999", "1.5", "1e3", "abc", "al", "", " ", ",", "1,,2", "3,3", "999",
    str(2**64), "1e999", "nan", NON_UTF8,
]  # fmt: skip


@pytest.mark.parametrize("i", range(len(BAD_CHECKPOINTS)))
def test_checkpoints_refuses_bad_steps(bench, i, monkeypatch):
    """``sweep --checkpoints``: negative, non-integer, empty, repeated, not kept (the bench
    run kept no snapshots) and huge steps are one line naming the option, nothing written."""
    monkeypatch.chdir(bench["root"])
    base = fresh_base(bench, "sweep", f"checkpoints{i}")
    argv = ["sweep", *replace_option(base, "--checkpoints", BAD_CHECKPOINTS[i])]
    before = snapshot(bench["root"])
    code, err = run_cli(argv)
    assert code == 2, f"{argv}: exit {code}\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--checkpoints" in lines[0], err
    assert snapshot(bench["root"]) == before


def test_checkpoints_all_of_a_run_without_snapshots_is_its_final_weights(bench, monkeypatch):
    monkeypatch.chdir(bench["root"])
    base = fresh_base(bench, "sweep", "checkpoints-all")
    code, err = run_cli(["sweep", *replace_option(base, "--checkpoints", "all")])
    assert code == 0, err
    assert "kept no snapshots" in err and "--snapshot-every" in err
