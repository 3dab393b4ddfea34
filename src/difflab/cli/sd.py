"""``difflab sd generate``, ``sd sweep``, ``sd finetune`` and ``sd mini``: the Stable Diffusion lab.

``generate`` and ``sweep`` share the pipeline's arguments (one :class:`SDPipelineSpec`);
each builds its options object, calls one library function and prints its summary.
"""

from __future__ import annotations

import argparse
import sys

from difflab.cli.args import Parser, add_device, add_trust_pickle, build, command, default
from difflab.options import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_SD_MODEL,
    MINI_SD_PRESETS,
    SD_SCHEDULERS,
    MiniSDOptions,
    SDGeneration,
    SDPipelineSpec,
    SDSweepAxes,
)


def add(sub) -> None:
    sd = sub.add_parser(
        "sd",
        help="Stable Diffusion: generate images, sweep guidance x steps, LoRA fine-tuning, mini-SD",
    )
    sd_sub = sd.add_subparsers(dest="sd_command", required=True, parser_class=Parser)
    g = command(sd_sub, "generate", "images from a prompt, settings in every PNG", _generate)
    g.add_argument("--prompt", help="the prompt (empty only with --unconditional)")
    g.add_argument("--unconditional", action="store_true", help="sample without a prompt")
    g.add_argument("--guidance", help="CFG scale s: 0, 1 or > 1 (default: the model's, a mini-SD folder's own, else 7.5)")  # fmt: skip
    g.add_argument("--steps", help=f"inference steps (default {default(SDGeneration, 'steps')})")
    g.add_argument("--seed", type=int, help="seed of the first image (image i: seed+i; default 0)")
    g.add_argument("--n", help=f"number of images (default {default(SDGeneration, 'n')})")
    s = command(sd_sub, "sweep", "resumable prompts x guidance x steps x seeds sweep", _sweep)
    s.add_argument("--prompts", nargs="+", required=True, metavar="FILE.txt|TEXT",
                   help="prompts, or one .txt file with a prompt per line")  # fmt: skip
    s.add_argument("--guidance", help=f"CFG scales (default {default(SDSweepAxes, 'guidance')})")
    s.add_argument("--steps", help=f"step counts (default {default(SDSweepAxes, 'steps')})")
    s.add_argument("--seeds", help=f"seeds; each has its own latents (default {default(SDSweepAxes, 'seeds')})")  # fmt: skip
    s.add_argument("--clip-model", help=f"CLIP for the CLIP score: Hub id or folder, or none (default {DEFAULT_CLIP_MODEL})")  # fmt: skip
    s.add_argument("--lora-scales", help="LoRA scales as a sweep axis, e.g. 0,0.5,1 (needs --lora)")
    for p in (g, s):
        _add_pipeline(p)
    _add_finetune(sd_sub)
    _add_mini(sd_sub)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"Hub id, diffusers folder or FILE.safetensors (default {DEFAULT_SD_MODEL})")  # fmt: skip
    add_device(p)


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    """The arguments of an :class:`SDPipelineSpec`, the negative prompt, size and output."""
    p.add_argument("--negative-prompt", help="what to steer away from")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 8 (default: the model's own, "
                   "the UNet's sample_size x the VAE's scale factor: 512x512 for SD 1.5)")  # fmt: skip
    p.add_argument("--scheduler", help=f"{', '.join(SD_SCHEDULERS)} (default: the model's)")
    _add_model(p)
    p.add_argument("--model-config", help="local diffusers folder with the configs of a single file")  # fmt: skip
    p.add_argument("--vae", help="another VAE: Hub id or diffusers folder")
    p.add_argument("--dtype", help="auto (default: fp16 on GPU, fp32 on CPU), fp16, bf16, fp32")
    p.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                   help="do not screen images (warns)")  # fmt: skip
    add_trust_pickle(p, "a .ckpt pickle")
    p.add_argument("--batch-size", help=f"images per pipeline call (default {default(SDPipelineSpec, 'batch_size')})")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="LoRA weights (.safetensors) and scale (default 1); generate: repeatable")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (for sweep: the same command resumes it)")  # fmt: skip


def _generate(args: argparse.Namespace) -> None:
    from difflab.experiments.sd_alignment import accuracy_text, generate_measured

    opts, spec = build(SDGeneration, args), build(SDPipelineSpec, args)
    r, judged = generate_measured(opts, args.out, spec)
    names = ", ".join(rec.png.name for rec in r.images)
    for note in r.notes:
        print(f"difflab sd: warning: {note}", file=sys.stderr)
    print(f"wrote {len(r.images)} image(s) to {r.out} ({r.seconds_per_image:.2f} s/image): {names}")
    if r.flagged:
        print(
            f"{len(r.flagged)} of {len(r.images)} flagged by the safety checker and returned "
            f"black: {', '.join(x.png.name for x in r.flagged)}; try another seed or prompt"
        )
    for rec in r.black_unflagged:
        print(f"{rec.png.name}: {rec.diagnosis.note}")
    if judged is not None:
        print(accuracy_text(judged))


def _sweep(args: argparse.Namespace) -> None:
    from difflab import distributed
    from difflab.experiments.sd_sweep import sd_sweep

    axes, spec = build(SDSweepAxes, args), build(SDPipelineSpec, args)
    r = sd_sweep(axes, args.out, spec)
    distributed.shutdown()
    if not distributed.is_main_process():  # under torchrun: one summary, from rank 0
        return
    for note in r.notes:
        print(f"difflab sd: warning: {note}", file=sys.stderr)
    done = r.cells_total - r.cells_run
    black = f", {r.black_unflagged} black but NOT flagged (see metrics.csv)" if r.black_unflagged else ""  # fmt: skip
    print(
        f"sd sweep {r.out}: {r.cells_run} cells computed in {r.seconds:.0f} s"
        + (f", {done} already done" if done else "")
        + f"; {r.flagged} of {len(r.rows)} images filtered by the safety checker{black}"
        + f"; tables metrics.csv, summary.csv, metrics.json; {len(r.figures)} figures"
    )
    for st in sorted({row["steps"] for row in r.summary if row.get("prompt_accuracy_mean") is not None}):  # fmt: skip
        cells = [row for row in r.summary if row["steps"] == st and row.get("prompt_accuracy_mean") is not None]  # fmt: skip
        listed = ", ".join(
            f"s={row['guidance']:g}: {row['prompt_accuracy_mean']:.0%}"
            + ("" if row.get("diversity_mean") is None else f" (diversity {row['diversity_mean']:.2f})")
            for row in sorted(cells, key=lambda row: row["guidance"])
        )  # fmt: skip
        print(f"prompt accuracy at {st} steps: {listed}")


# -- finetune -------------------------------------------------------------------------------
def _add_finetune(sd_sub) -> None:
    f = command(sd_sub, "finetune", "LoRA fine-tuning on a folder of images (resumable)", _finetune)  # fmt: skip
    f.add_argument("--data", required=True, help="folder of images; captions from metadata.jsonl or .txt")  # fmt: skip
    f.add_argument("--instance-prompt", help="caption of images without one, e.g. 'a photo of sks dog'")  # fmt: skip
    f.add_argument("--rank", type=int, help="LoRA rank (default 4)")
    f.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default: the rank)")  # fmt: skip
    f.add_argument("--steps", type=int, help="training steps (default 500)")
    f.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    f.add_argument("--batch-size", type=int, help="images per step (default 1)")
    f.add_argument("--resolution", type=int, help="square training size (default 512)")
    f.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    f.add_argument("--ema", action="store_true", help="save an EMA of the LoRA weights")
    f.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower")
    f.add_argument("--mixed-precision", help="no (default), fp16 (CUDA) or bf16")
    f.add_argument("--adam-8bit", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA; less memory)")  # fmt: skip
    f.add_argument("--validation-prompt", help="prompt of the validation images (seeds 0-3)")
    f.add_argument("--validate-every", type=int, help="steps between validation images (default: start and end)")  # fmt: skip
    f.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    f.add_argument("--seed", type=int, help="seed of the LoRA init, data order and noise (default 0)")  # fmt: skip
    _add_model(f)
    f.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    f.add_argument("--resume", action="store_true", default=False, help="continue the run in --out exactly")  # fmt: skip


def _finetune(args: argparse.Namespace) -> None:
    from difflab.sd.finetune import FinetuneConfig, FineTuner

    config = build(FinetuneConfig, args)
    tuner = FineTuner(config, args.out, device=args.device, resume=args.resume)
    for note in tuner.notes:
        print(f"difflab sd finetune: note: {note}", file=sys.stderr)
    r = tuner.fit()
    print(
        f"trained {r.steps_run} steps in {r.seconds:.0f} s ({r.seconds_per_step:.3f} s/step; "
        f"loss {r.final_loss:.4f}, mean of the last 10 steps); run folder {r.out}, "
        f"LoRA {r.lora}" + (f", {len(r.validation)} validation grid(s)" if r.validation else "")
    )


# -- mini -----------------------------------------------------------------------------------
def _add_mini(sd_sub) -> None:
    m = command(sd_sub, "mini", "train mini-SD: a small SD-structured text-to-image model, offline", _mini)  # fmt: skip
    m.add_argument("--dataset", help="mnist5k (default), digits, mnist, fashion-mnist, cifar10 or folder:PATH")  # fmt: skip
    m.add_argument("--minutes", help="wall-time cap of the whole training (default: the step counts)")  # fmt: skip
    m.add_argument("--seed", type=int, help="seed of the weights, data order and noise (default 0)")  # fmt: skip
    m.add_argument("--flag", help="the class the lab safety checker flags: a class name, last (default) or none")  # fmt: skip
    m.add_argument("--preset", help=f"model size: {', '.join(MINI_SD_PRESETS)} (default {default(MiniSDOptions, 'preset')})")  # fmt: skip
    m.add_argument("--out", required=True, help="the pipeline folder to write (must not exist yet)")  # fmt: skip
    m.add_argument("--resume", action="store_true", default=False, help="continue the stopped training in --out exactly")  # fmt: skip


def _mini(args: argparse.Namespace) -> None:
    from pathlib import Path

    from difflab.ddpm.data import load_dataset
    from difflab.errors import UsageError
    from difflab.runfolder import check_same_options, load_train_state
    from difflab.sd.mini import MiniSDConfig, caption, caption_templates
    from difflab.sd.mini_train import train_mini_sd

    opts = build(MiniSDOptions, args)
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    flag_given = "none" if opts.flag is None else opts.flag
    mine = {"dataset": opts.dataset, "seed": opts.seed, "flag": flag_given, "preset": opts.preset}
    if args.resume:
        saved = load_train_state(out).get("options", {})
        check_same_options(saved, mine, mine, out, "--minutes")
    elif out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UsageError(f"--out {out}: already exists; choose a new folder (or --resume)")
    data = load_dataset(opts.dataset, "train")
    names = data.class_names
    flag = names[-1] if opts.flag == "last" else opts.flag
    if flag is not None and flag not in names:
        raise UsageError(
            f"--flag {flag!r}: not a class of {opts.dataset}; choose one of "
            f"{', '.join(names)}, last or none"
        )
    cfg = MiniSDConfig.preset(opts.preset)
    r = train_mini_sd(
        data.images.numpy(), data.labels.numpy(), names, out, data.name, cfg, flag,
        opts.minutes, opts.seed, resume=args.resume, options=mine,
    )  # fmt: skip
    prompt = caption(caption_templates(data.name, names)[0], names[0])
    steps = ", ".join(f"{k} {n} steps in {r.seconds[k]:.0f} s" for k, n in r.steps.items())
    checker = (
        f"; the lab safety checker flags {r.flagged_concept!r} "
        f"(balanced accuracy {r.safety_accuracy:.0%} on the training images)"
        if r.flagged_concept is not None else "; no safety checker"
    )  # fmt: skip
    print(
        f"mini-SD in {r.out}: {steps}; VAE scaling_factor {r.scaling_factor:.4f}{checker}; "
        f"try: difflab sd generate --model {r.out} "
        f"--prompt {prompt!r} --out OUT"
    )
