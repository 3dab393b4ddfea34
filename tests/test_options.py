"""Options as data: documented defaults, the one list parser, and every check with its line."""

import dataclasses
import math

import pytest

from difflab.checks import (
    check_float,
    check_int,
    check_seed,
    check_trajectory,
    parse_list,
    parse_size,
    parse_t_list,
)
from difflab.cli.args import build
from difflab.cli.main import build_parser
from difflab.config import RunConfig, SampleConfig, replace
from difflab.errors import UsageError
from difflab.options import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_SD_MODEL,
    DDPMSweepAxes,
    EvalOptions,
    ForwardOptions,
    ReverseOptions,
    SampleOptions,
    SDGeneration,
    SDPipelineSpec,
    SDSweepAxes,
)

# a run with T = 100, 10 classes and its own sampling defaults
RUN = replace(
    RunConfig(),
    diffusion=replace(RunConfig().diffusion, timesteps=100),
    sample=SampleConfig(sampler="dpm++", steps=10, guidance=2.0, eta=0.0),
)


def refused(match: str, make, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as e:
        make(*args, **kwargs)
    text = str(e.value)
    assert "\n" not in text and match in text, text
    return text


# -- defaults -------------------------------------------------------------------------------
def test_defaults_are_the_documented_ones():
    s = SampleOptions()
    assert (s.classes, s.guidance, s.steps, s.sampler, s.eta) == (None,) * 5  # the run's
    assert (s.seed, s.precision, s.rows, s.cols, s.n_per_class) == (0, "auto", "class", None, 8)
    assert SampleOptions(guidance="0,1,3", cols="guidance").n_per_class == 1
    e = EvalOptions()
    assert (e.n_per_class, e.seed, e.precision, e.inception) == (100, 0, "auto", False)
    r = ReverseOptions()
    assert (r.sampler, r.steps, r.guidance, r.seed) == ("ddpm", None, None, 0)
    assert r.t == ("T", "T/2", "T/4", "1", "0") == ForwardOptions().t
    assert ForwardOptions().per_class == 1
    a = DDPMSweepAxes()
    assert a.guidance == (0.0, 1.0, 2.0, 4.0, 8.0) and a.steps == (10, 25, 50)
    assert (a.samplers, a.seeds, a.n_per_class, a.grid_class) == (("ddim",), (0,), 10, 0)
    g = SDGeneration("a cat")
    assert (g.guidance, g.steps, g.seed, g.n, g.size) == (None, 25, 0, 1, None)  # the model's
    sw = SDSweepAxes("a cat")
    assert sw.guidance == (1.0, 3.0, 7.5, 12.0, 20.0) and sw.steps == (10, 25, 50)
    assert sw.seeds == (0, 1, 2) and sw.clip_model == DEFAULT_CLIP_MODEL
    spec = SDPipelineSpec(device="cpu")
    assert spec.model == DEFAULT_SD_MODEL and spec.scheduler is None and spec.safety_checker
    assert (spec.dtype, spec.resolved_dtype, spec.batch_size, spec.lora) == ("auto", "fp32", 4, ())


@pytest.mark.parametrize(
    "argv, cls, dests",
    [
        (["sample", "RUN", "--out", "x.png"], SampleOptions, {}),
        (["eval", "RUN"], EvalOptions, {"n_per_class": "n"}),
        (["reverse", "RUN", "--out", "x.png"], ReverseOptions, {}),
        (["forward", "--out", "x.png"], ForwardOptions, {}),
        (
            ["sweep", "RUN", "--out", "d"],
            DDPMSweepAxes,
            {"samplers": "sampler", "n_per_class": "n"},
        ),
        (["sd", "generate", "--prompt", "a cat", "--out", "d"], SDGeneration, {}),
        (["sd", "sweep", "--prompts", "a cat", "--out", "d"], SDSweepAxes, {}),
        (
            ["sd", "generate", "--prompt", "a cat", "--device", "cpu", "--out", "d"],
            SDPipelineSpec,
            {},
        ),
    ],
)
def test_the_command_line_takes_its_defaults_from_the_options(argv, cls, dests):
    args = build_parser().parse_args(argv)
    built = build(cls, args, **dests)
    positional = {"prompt": "a cat"} if cls is SDGeneration else {"prompts": "a cat"} if cls is SDSweepAxes else {}  # fmt: skip
    device = {"device": "cpu"} if cls is SDPipelineSpec else {}
    assert built == cls(**positional, **device)


def test_options_are_frozen_and_rebuilt_checked():
    s = SampleOptions(guidance="2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 3
    refused("--guidance '-1'", dataclasses.replace, s, guidance="-1")


# -- the one list parser --------------------------------------------------------------------
def test_the_list_parser_keeps_order_and_takes_text_numbers_and_sequences():
    assert parse_list(" 3, 0,1", float, "--guidance", "0,1") == (3.0, 0.0, 1.0)
    assert parse_list([25, 10.0], int, "--steps", "10") == (25, 10)
    assert parse_list(2, float, "--guidance", "0") == (2.0,)
    assert parse_list("ddpm, ddim", str, "--sampler", "ddim") == ("ddpm", "ddim")
    assert parse_list("-0", float, "--guidance", "0", minimum=0) == (0.0,)
    assert SampleOptions(guidance="3,0,1", cols="guidance").guidance == (3.0, 0.0, 1.0)
    assert DDPMSweepAxes(guidance="3,0,1").guidance == (0.0, 1.0, 3.0)  # a sweep's axes: sorted


@pytest.mark.parametrize(
    "value, kind, match",
    [
        ("1,,2", float, "--x '1,,2': expected comma-separated numbers like 1,2"),
        ("", float, "--x '': expected comma-separated numbers like 1,2"),
        ("1,x", float, "--x '1,x': expected comma-separated numbers"),
        ("1,nan", float, "--x '1,nan': nan is not a finite number"),
        ("inf", float, "--x 'inf': inf is not a finite number"),
        ([1, math.inf], float, "--x 1,inf: inf is not a finite number"),
        ("10,2.5", int, "--x '10,2.5': expected comma-separated whole numbers"),
        ([10, 2.5], int, "--x 10,2.5: expected comma-separated whole numbers"),
        ("0,-1", float, "--x '0,-1': -1 is below the smallest allowed, 0"),
        ("5,5", int, "--x '5,5': 5 is given twice"),
        ("1,1.0", float, "--x '1,1.0': 1 is given twice"),
        ([True], int, "--x True: expected comma-separated whole numbers"),
        ("a,a", str, "--x 'a,a': a is given twice"),
    ],
)
def test_the_list_parser_refuses_with_one_line(value, kind, match):
    refused(match, parse_list, value, kind, "--x", "1,2", minimum=0)


# -- single values --------------------------------------------------------------------------
def test_seeds_are_whole_numbers_from_0_to_2_63_minus_1():
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63, 1.0, True, "3"):
        refused("must be a whole number from 0 to 2^63 - 1", check_seed, bad)
    refused("--seeds '-1': -1 is below the smallest allowed, 0", DDPMSweepAxes, seeds="-1")
    refused("--seeds 9223372036854775808: must be a whole number", DDPMSweepAxes, seeds=str(2**63))
    refused("--seed + --n - 1 9223372036854775808", SDGeneration, "x", seed=2**63 - 1, n=2)


def test_numbers_and_counts():
    assert check_int("7", "--n") == 7 and check_int(7.0, "--n") == 7
    refused("--n '2.5': expected a whole number", check_int, "2.5", "--n")
    refused("--n 0: must be a whole number >= 1", check_int, 0, "--n", 1)
    refused("--n 20001: must be at most 10,000", check_int, 20001, "--n", 1, 10_000)
    refused("--eta nan: must be a finite number", check_float, "nan", "--eta", 0, 1)
    refused("--eta 2: must be between 0 and 1", check_float, 2, "--eta", 0, 1)
    refused("--eta 'x': expected a number", check_float, "x", "--eta")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"classes": "a,b"}, "--classes 'a,b': expected comma-separated whole numbers"),
        ({"classes": "3,3"}, "--classes '3,3': 3 is given twice"),
        ({"classes": "-1"}, "--classes '-1': -1 is below the smallest allowed, 0"),
        ({"n_per_class": 0}, "--n-per-class 0: must be a whole number >= 1"),
        ({"n_per_class": 10_001}, "--n-per-class 10001: must be at most 10,000"),
        ({"guidance": "-1"}, "--guidance '-1': -1 is below the smallest allowed, 0"),
        ({"guidance": "nan"}, "--guidance 'nan': nan is not a finite number"),
        ({"steps": "0"}, "--steps '0': 0 is below the smallest allowed, 1"),
        ({"steps": "10,10"}, "--steps '10,10': 10 is given twice"),
        ({"sampler": "plms"}, "--sampler 'plms': unknown sampler; choose one of ddpm, ddim"),
        ({"eta": "1.5"}, "--eta 1.5: must be between 0 and 1"),
        ({"seed": -1}, "--seed -1: must be a whole number from 0 to 2^63 - 1"),
        ({"precision": "fp16"}, "--precision 'fp16': choose one of auto, fp32, bf16"),
        ({"rows": "x"}, "--rows 'x': choose one of class, sample, guidance, steps"),
        ({"cols": "class"}, "--cols class: must differ from --rows class"),
        ({"guidance": "0,1", "steps": "5,10"}, "--guidance and --steps both have several values"),
        ({"guidance": "0,1", "cols": "sample"}, "--guidance: several values need --rows guidance"),
    ],
)
def test_sample_options_refused(kwargs, match):
    refused(match, SampleOptions, **kwargs)


def test_sample_options_for_run_fill_the_run_defaults_and_check_t_and_classes():
    o = SampleOptions().for_run(RUN)
    assert (o.classes, o.guidance, o.steps, o.sampler, o.eta) == (
        tuple(range(10)), (2.0,), (10,), "dpm++", 0.0
    )  # fmt: skip
    assert SampleOptions(guidance="0", sampler="ddim").for_run(RUN).guidance == (0.0,)
    refused("--steps 500: must be at most the run's T = 100", SampleOptions(steps="5,500").for_run, RUN)  # fmt: skip
    refused("--classes: 12 is out of range; this run has classes 0..9", SampleOptions(classes="0,12").for_run, RUN)  # fmt: skip
    refused("--steps 101: must be at most the run's T = 100", check_trajectory, "ddim", 101, 1.0, 0.0, 100)  # fmt: skip


def test_eval_reverse_forward_and_sweep_options():
    refused("--n 1: need at least 2 samples per class", EvalOptions, n_per_class=1)
    assert EvalOptions(guidance="0").for_run(RUN).guidance == 0.0  # 0 is not "the run's"
    assert EvalOptions().for_run(RUN).steps == 10
    refused("--steps 200: must be at most the run's T = 100", EvalOptions(steps=200).for_run, RUN)
    assert ReverseOptions().for_run(RUN).steps == 100  # ddpm: every step, as DDPMPipeline
    assert ReverseOptions(sampler="ddim").for_run(RUN).steps == 10  # else the run's
    assert ReverseOptions(guidance=0).for_run(RUN).guidance == 0.0
    refused("--t '2T': 200 is beyond T = 100", ReverseOptions(t="T,2T").for_run, RUN)
    refused("--per-class 21: must be at most 20", ForwardOptions, per_class=21)
    assert parse_t_list(ForwardOptions(t=" T / 2 , 0").t, 100) == [50, 0]
    refused("--n 1: need at least 2 samples per class (for diversity)", DDPMSweepAxes, n_per_class=1)  # fmt: skip
    refused("--sampler 'plms': unknown sampler", DDPMSweepAxes, samplers="ddim,plms")
    refused("--grid-class 10: out of range; this run has classes 0..9", DDPMSweepAxes(grid_class=10).for_run, RUN)  # fmt: skip
    refused("--steps 250: must be at most the run's T = 100", DDPMSweepAxes(steps="10,250").for_run, RUN)  # fmt: skip


# -- Stable Diffusion -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": " "}, "--prompt is empty"),
        ({"prompt": "a", "unconditional": True}, "--unconditional samples without a prompt"),
        ({"guidance": -1}, "--guidance -1: must be a number >= 0"),
        (
            {"guidance": "0.5"},
            "--guidance 0.5: diffusers' StableDiffusionPipeline skips guidance below 1",
        ),  # fmt: skip
        ({"guidance": "inf"}, "--guidance inf: must be a finite number"),
        ({"steps": 0}, "--steps 0: must be a whole number >= 1"),
        ({"steps": 1001}, "--steps 1001: must be at most 1,000"),
        ({"n": 0}, "--n 0: must be a whole number >= 1"),
        ({"n": 1001}, "--n 1001: must be at most 1,000"),
        ({"size": "500x512"}, "--size 500x512: width and height must be multiples of 8"),
        ({"size": "big"}, "--size 'big': expected WIDTHxHEIGHT like 512x512"),
        ({"size": "8192x512"}, "--size 8192x512: width and height must be at most 4096"),
    ],
)
def test_sd_generation_refused(kwargs, match):
    refused(match, SDGeneration, **{"prompt": "a cat", **kwargs})


def test_sd_generation_accepts_text_and_the_unconditional_model():
    g = SDGeneration("a cat", guidance="0", steps="30", n="2", size="640x512")
    assert (g.guidance, g.steps, g.n, g.size) == (0.0, 30, 2, (640, 512))
    assert SDGeneration(None, unconditional=True).prompt == ""
    assert parse_size(512) == (512, 512) and parse_size((64, 32)) == (64, 32)


def test_sd_pipeline_spec_refused():
    refused("--model is empty", SDPipelineSpec, model=" ", device="cpu")
    refused("--dtype 'fp8': choose one of auto, fp16, bf16, fp32", SDPipelineSpec, dtype="fp8", device="cpu")  # fmt: skip
    refused("--scheduler 'k_lms': choose one of euler, euler_a", SDPipelineSpec, scheduler="k_lms", device="cpu")  # fmt: skip
    refused("--device 'tpu'", SDPipelineSpec, device="tpu")
    refused(
        "--batch-size 0: must be a whole number >= 1", SDPipelineSpec, batch_size=0, device="cpu"
    )
    refused("--lora a.safetensors:inf: the scale must be a finite number", SDPipelineSpec, lora=["a.safetensors:inf"], device="cpu")  # fmt: skip
    refused("is given twice; give it once with the summed scale", SDPipelineSpec, lora=["a.safetensors", "a.safetensors:0.5"], device="cpu")  # fmt: skip
    refused("--lora with --compile", SDPipelineSpec, lora=["a.safetensors"], compile=True, device="cpu")  # fmt: skip
    assert SDPipelineSpec(dtype="bf16", device="cpu").resolved_dtype == "bf16"


def test_sd_sweep_axes_and_the_lora_axis(tmp_path):
    refused(
        "--guidance 0.5: diffusers' StableDiffusionPipeline", SDSweepAxes, "a", guidance="1,0.5"
    )
    refused("--guidance '1,x': expected comma-separated numbers", SDSweepAxes, "a", guidance="1,x")
    refused("--seeds '0,0': 0 is given twice", SDSweepAxes, "a", seeds="0,0")
    refused("--prompts: 'a' is given twice", SDSweepAxes, ["a", "a"])
    refused("--prompts: a prompt is empty", SDSweepAxes, ["a", " "])
    (tmp_path / "p.txt").write_text("# a comment\na cat\n\na dog\n")
    assert SDSweepAxes(str(tmp_path / "p.txt")).prompts == ("a cat", "a dog")
    assert SDSweepAxes("a", clip_model="none").clip_model is None
    cpu = dict(device="cpu")
    axes, scaled = SDSweepAxes("a"), SDSweepAxes("a", lora_scales="1,0,0.5")
    assert scaled.lora_scales == (0.0, 0.5, 1.0)
    assert axes.lora_axis(SDPipelineSpec(**cpu)) == (None, None)
    assert axes.lora_axis(SDPipelineSpec(lora=["l.safetensors:0.8"], **cpu)) == ("l.safetensors", (0.8,))  # fmt: skip
    assert scaled.lora_axis(SDPipelineSpec(lora=["l.safetensors"], **cpu)) == ("l.safetensors", (0.0, 0.5, 1.0))  # fmt: skip
    refused("--lora-scales needs --lora FILE", scaled.lora_axis, SDPipelineSpec(**cpu))
    refused("sd sweep takes one LoRA", axes.lora_axis, SDPipelineSpec(lora=["a.safetensors", "b.safetensors"], **cpu))  # fmt: skip
    refused("not both", scaled.lora_axis, SDPipelineSpec(lora=["l.safetensors:0.8"], **cpu))
