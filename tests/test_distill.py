"""Distilled students: progressive distillation into a run folder that every command reads.

Tiny teachers on the 8x8 digits, a few distillation steps each: the target formula, the
student's config and sampling cost, an exact resume, and the one-line refusals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.config import DistillConfig, RunConfig
from difflab.ddpm.adversarial import adversarial_step, make_critic
from difflab.ddpm.distill import Distiller, distill
from difflab.ddpm.distill_steps import distillation_target, teacher_grid
from difflab.ddpm.runs import load_run
from difflab.errors import UsageError
from difflab.files import file_sha256
from helpers import tiny_run


def tiny_distill(teacher: Path, **kw) -> DistillConfig:
    kw = {"steps": 1, "teacher_steps": 4, "round_steps": 3, "log_every": 1, **kw}
    return DistillConfig(teacher=str(teacher), **kw)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("teacher"), "teacher", epochs=0.05)


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "k1"
    distill(tiny_distill(teacher), out, device="cpu", progress=False)
    return out


def test_the_target_makes_one_student_step_land_on_the_teachers_two():
    """x~ (Salimans & Ho 2022, Algorithm 2): DDIM from z_t with x0 = x~ hits z_t'' exactly."""
    g = torch.Generator().manual_seed(0)
    z, z2 = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    a = torch.tensor([0.01, 0.3, 0.8]).view(-1, 1, 1, 1)
    a2 = torch.tensor([0.2, 0.6, 1.0]).view(-1, 1, 1, 1)  # 1.0: t'' is the end, x~ = z2
    x = distillation_target(z, z2, a, a2)
    eps = (z - a.sqrt() * x) / (1 - a).sqrt()
    torch.testing.assert_close(a2.sqrt() * x + (1 - a2).sqrt() * eps, z2)
    torch.testing.assert_close(x[2], z2[2])


def test_teacher_grid_nests_the_students():
    assert teacher_grid(1000, 1).tolist() == [999, 499, -1]
    assert teacher_grid(1000, 2).tolist() == [999, 749, 499, 249, -1]
    assert teacher_grid(100, 4).tolist()[::2] == [99, 74, 49, 24, -1]


def test_the_student_is_a_run_folder_that_records_its_teacher(teacher, student):
    cfg = RunConfig.load(student / "config.json")
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance) == ("ddim", 1, 1.0)
    assert cfg.sample.spacing == "trailing" and cfg.diffusion.objective == "v"  # eps teacher
    d = cfg.distill
    assert d.teacher == str(teacher.resolve()) and d.method == "progressive"
    assert d.teacher_sha256 == file_sha256(teacher / "model.safetensors")
    assert (d.steps, d.teacher_steps, d.rounds, d.teacher_guidance) == (1, 4, 2, 2.0)
    rows = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(
        range(1, 10)
    )  # two progressive rounds, one adversarial
    assert [r["round"] for r in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [r["student_steps"] for r in rows] == [2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert all(r["loss"] > 0 for r in rows[:6])  # squared errors; the adversarial loss is signed
    assert all("epoch" in r and "elapsed_s" in r for r in rows)
    assert ["critic_loss" in r for r in rows] == [False] * 6 + [True] * 3
    assert all(0 <= r["critic_loss"] < 10 for r in rows[6:])  # the hinge loss, about 2 at first
    assert d.adversarial == 0.4
    # a trained run's config.json has no distill section, and old files load without one
    t = json.loads((teacher / "config.json").read_text())
    assert "distill" not in t and RunConfig.from_dict(t).distill is None
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_a_student_samples_in_k_passes_without_the_unconditional_one(student):
    from difflab.ddpm.sampling import sample

    model, diffusion, cfg = load_run(student)
    batches = []
    model.register_forward_hook(lambda _m, args, _out: batches.append(args[0].shape[0]))
    sc = cfg.sample
    sample(model, diffusion, torch.arange(10), guidance=sc.guidance, steps=sc.steps,
           sampler=sc.sampler, spacing=sc.spacing)  # fmt: skip
    assert batches == [10]  # one pass of the batch, not a doubled one


def test_resume_is_exact(teacher, tmp_path):
    """N steps in one go == stop at N/2 (mid-round, and at a round's end) + resume."""
    dc = tiny_distill(teacher)
    straight = tmp_path / "straight"
    distill(dc, straight, device="cpu", progress=False)
    for stop in (4, 3, 6, 8):  # mid-round, a round's end, the adversarial round's start and middle
        split = tmp_path / f"split{stop}"
        distill(dc, split, device="cpu", progress=False, stop_at_step=stop)
        assert json.loads((split / "metrics.jsonl").read_text().splitlines()[-1])["step"] == stop
        distill(dc, split, device="cpu", progress=False, resume=True)
        a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (stop, k)
        steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").open()]
        assert steps == list(range(1, 10))
        assert RunConfig.load(split / "config.json") == RunConfig.load(straight / "config.json")


def test_bf16_distillation_resumes_exactly_and_keeps_its_precision(teacher, tmp_path):
    """``--mixed-precision bf16`` runs the passes under bf16 autocast (other weights than
    fp32's, which ``auto`` gives where the CPU is pinned to fp32), resumes bit for bit, and
    a resume may not change it."""
    dc = tiny_distill(teacher, mixed_precision="bf16")
    straight, split, fp32 = tmp_path / "bf16", tmp_path / "split", tmp_path / "fp32"
    assert distill(dc, straight, device="cpu", progress=False).precision == "bf16"
    distill(dc, split, device="cpu", progress=False, stop_at_step=4)
    distill(dc, split, device="cpu", progress=False, resume=True)
    assert distill(tiny_distill(teacher), fp32, device="cpu", progress=False).precision == "fp32"
    a, b, c = (load_file(d / "model.safetensors") for d in (straight, split, fp32))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(UsageError, match="--mixed-precision is 'no' here but 'bf16'"):
        distill(tiny_distill(teacher, mixed_precision="no"), split, device="cpu", resume=True)


def test_the_students_loss_leaves_the_critics_gradients_alone():
    """The critic's weights get the gradient of its own loss only: the student's loss (which
    back-propagates through the critic into x_hat) adds nothing to them."""
    critic, opt = make_critic(1, 10, 0, "cpu")
    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(4, 1, 8, 8, generator=g, requires_grad=True)
    real, y = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 3])
    loss, _ = adversarial_step(critic, opt, x_hat, x_hat.detach(), y, real, y)
    before = [p.grad.clone() for p in critic.parameters()]
    loss.backward()
    assert all(torch.equal(p.grad, q) for p, q in zip(critic.parameters(), before, strict=True))
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(p.requires_grad for p in critic.parameters())


def test_distillation_learns(teacher, tmp_path):
    """More steps of the first round bring the loss down (the student fits the teacher)."""
    out = tmp_path / "k4"
    distill(tiny_distill(teacher, steps=4, teacher_steps=8, round_steps=40, lr=2e-3), out,
            device="cpu", progress=False)  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open() if '"round": 1,' in line]
    assert len(rows) == 40
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first


def test_the_adversarial_round_trains_a_critic_and_can_be_left_out(teacher, tmp_path):
    """The critic learns to tell real images from the student's (its hinge loss falls from
    about 2, chance); ``adversarial = 0`` is progressive distillation alone."""
    out = tmp_path / "adv"
    distill(tiny_distill(teacher, teacher_steps=2, round_steps=40), out, device="cpu",
            progress=False)  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    critic = [r["critic_loss"] for r in rows if r["round"] == 2]
    assert len(critic) == 40 and 1.5 < critic[0] < 2.5
    assert sum(critic[-5:]) / 5 < 0.9 * sum(critic[:5]) / 5
    plain = tmp_path / "plain"
    distill(tiny_distill(teacher, adversarial=0.0), plain, device="cpu", progress=False)
    rows = [json.loads(line) for line in (plain / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [1, 1, 1, 2, 2, 2] and "critic_loss" not in rows[-1]
    assert RunConfig.load(plain / "config.json").distill.adversarial == 0.0


def test_resume_refuses_other_options_and_missing_state(teacher, student, tmp_path):
    with pytest.raises(UsageError, match="--steps is 2 here but 1"):
        distill(tiny_distill(teacher, steps=2), student, device="cpu", resume=True)
    with pytest.raises(UsageError, match="--lr"):
        distill(tiny_distill(teacher, lr=1e-2), student, device="cpu", resume=True)
    with pytest.raises(UsageError, match="--out .*already exists"):
        distill(tiny_distill(teacher), student, device="cpu")
    with pytest.raises(UsageError, match="--resume: .* holds no distillation"):
        distill(tiny_distill(teacher), tmp_path / "none", device="cpu", resume=True)
    with pytest.raises(UsageError, match="trained run, not a distilled student"):
        distill(tiny_distill(teacher), teacher, device="cpu", resume=True)
    with pytest.raises(UsageError, match="TEACHER .*is itself a distilled student"):
        distill(tiny_distill(student), tmp_path / "again", device="cpu")
    assert not (tmp_path / "again").exists()
    changed = tmp_path / "teacher2"
    shutil.copytree(teacher, changed)
    out = tmp_path / "s2"
    distill(tiny_distill(changed), out, device="cpu", progress=False, stop_at_step=1)
    other = load_file(changed / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in other.items()}, str(changed / "model.safetensors"))
    with pytest.raises(UsageError, match="TEACHER .*weights changed"):
        distill(tiny_distill(changed), out, device="cpu", resume=True)


def test_a_finished_student_resumes_to_itself(teacher, tmp_path):
    out = tmp_path / "done"
    distill(tiny_distill(teacher), out, device="cpu", progress=False)
    before = file_sha256(out / "model.safetensors")
    r = distill(tiny_distill(teacher), out, device="cpu", progress=False, resume=True)
    assert r.steps == 0 and file_sha256(out / "model.safetensors") == before


@pytest.mark.parametrize(
    "args, words",
    [
        (["--steps", "3"], "--steps 3"),
        (["--steps", "8"], "--steps 8"),
        (["--steps", "1", "--teacher-steps", "6"], "--teacher-steps 6"),
        (["--steps", "2", "--teacher-steps", "2"], "--teacher-steps 2"),
        (["--steps", "1", "--minutes", "nan"], "--minutes nan"),
        (["--steps", "1", "--minutes", "-1"], "--minutes -1"),
        (["--steps", "1", "--round-steps", "0"], "--round-steps 0"),
        (["--steps", "1", "--teacher-steps", "256"], "--teacher-steps 256"),  # T = 100
        (["--steps", "1", "--mixed-precision", "fp16"], "--mixed-precision 'fp16'"),
    ],
)
def test_bad_options_are_one_line(teacher, tmp_path, capsys, args, words):
    out = tmp_path / "s"
    assert main(["distill", str(teacher), *args, "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_teacher_that_is_not_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for teacher in (tmp_path / "nothing", tmp_path / "empty"):
        code = main(["distill", str(teacher), "--steps", "1", "--out", str(tmp_path / "s")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"TEACHER {teacher}" in err[0], err


def test_every_command_reads_a_student(student, tmp_path, capsys):
    r, o = str(student), tmp_path
    (o / "plot").mkdir()
    commands = [
        ["sample", r, "--n-per-class", "2", "--out", f"{o}/s.npz"],
        ["eval", r, "--n", "4"],
        ["sweep", r, "--guidance", "1", "--steps", "1,2", "--seeds", "0", "--n", "2",
         "--out", f"{o}/sweep"],
        ["reverse", r, "--t", "T,0", "--classes", "0,1", "--out", f"{o}/r.png"],
        ["plot", r, "--out", f"{o}/plot"],
        ["report", r, f"{o}/sweep", "--out", f"{o}/report.html"],
    ]  # fmt: skip
    for argv in commands:
        assert (
            main([*argv, "--device", "cpu"] if argv[0] not in ("plot", "report") else argv) == 0
        ), (
            argv,
            capsys.readouterr().err,
        )
    settings = json.loads((student / "eval.json").read_text())["settings"]
    assert settings["steps"] == 1 and settings["guidance"] == 1.0
    assert (o / "plot" / "loss.png").is_file() and (o / "report.html").is_file()


def test_the_ui_samples_a_student(student, tmp_path):
    pytest.importorskip("gradio")
    from difflab.ui.lab import Lab
    from difflab.ui.paths import run_summary
    from difflab.ui.tabs.sample import start_sampling

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(student, runs / "k1")
    lab = Lab(runs, tmp_path / "models", device="cpu")
    assert lab.run_names() == ["k1"]
    assert run_summary(runs, runs / "k1")["steps"] == 9
    job = start_sampling(lab, "k1", classes="0,1", n_per_class=1)
    assert job.wait(60) and job.state == "done", job.status_line()
    assert "1 steps" in job.title and "s=1" in job.title


def test_distiller_uses_the_teachers_guidance_by_default(teacher, tmp_path):
    d = Distiller(tiny_distill(teacher, teacher_guidance=3.0), tmp_path, device="cpu")
    assert d.dc.teacher_guidance == 3.0 and bool((d.scales == 3.0).all())


def test_default_teacher_steps_take_one_or_two_rounds():
    got = {
        k: (DistillConfig(steps=k).teacher_steps, DistillConfig(steps=k).rounds) for k in (1, 2, 4)
    }
    assert got == {1: (4, 2), 2: (4, 1), 4: (8, 1)}
    assert DistillConfig(steps=1, teacher_steps=16).rounds == 4


def test_a_student_from_before_the_adversarial_round_reads_as_progressive_only(student):
    data = json.loads((student / "config.json").read_text())
    del data["distill"]["adversarial"]
    assert RunConfig.from_dict(data).distill.adversarial == 0.0
