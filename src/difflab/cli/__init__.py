"""The command line: parse, call one library function, print.

Bad input becomes one line on stderr and exit code 2 (no traceback unless ``--debug``);
a diverged training run exits with 1 and says which checkpoint was kept.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from difflab import __version__
from difflab.errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _float_list(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a class-conditional DDPM into a run folder")
    p.add_argument(
        "--preset",
        default="quick",
        help="quick (CPU, minutes), paper (GPU, MNIST) or cifar10 (GPU)",
    )
    p.add_argument(
        "--dataset", help="mnist5k, digits, mnist, fashion-mnist, cifar10 or folder:PATH"
    )
    p.add_argument("--data-dir", help="where torchvision datasets live (default ./data)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="passes over the training split")
    g.add_argument("--minutes", type=float, help="wall-clock training budget")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument(
        "--init-from", metavar="RUN", help="start from another run's weights (fine-tuning)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any option",
    )


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample a labelled grid (.png) or arrays (.npz) from a run")
    p.add_argument("run")
    p.add_argument("--classes", help="comma-separated class indices (default: all)")
    p.add_argument(
        "--n-per-class",
        type=int,
        help="samples per class (default 8, or 1 when --cols is not sample)",
    )
    p.add_argument(
        "--guidance",
        help="classifier-free guidance scale s (diffusers convention), or a list: 0,1,3",
    )
    p.add_argument("--steps", help="sampling steps, or a list: 10,50")
    p.add_argument("--sampler", help="ddpm, ddim, dpm++, unipc or euler")
    p.add_argument("--eta", type=float, help="DDIM eta (0 deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_precision(p)
    p.add_argument("--out", required=True, help="FILE.png or FILE.npz")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickle checkpoint (unsafe)")
    p.add_argument("--rows", default="class", help="grid rows: class, sample, guidance or steps")
    p.add_argument(
        "--cols", help="grid columns: class, sample, guidance or steps (default: the swept option)"
    )


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="conditional accuracy and Frechet distance of a run's samples")
    p.add_argument(
        "--inception", action="store_true", help="also Inception FID/KID (slow on a CPU)"
    )
    p.add_argument("run")
    p.add_argument("--n", type=int, default=100, help="samples per class")
    p.add_argument("--guidance", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_precision(p)


def _add_precision(p) -> None:
    p.add_argument(
        "--precision", default="auto",
        help="network precision while sampling: fp32, bf16 (autocast; 2-3x faster on a CPU too, "
        "docs/benchmarks.md) or auto (bf16 on CUDA, else fp32)",
    )  # fmt: skip


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole DDPM lab on the embedded data, on the CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument(
        "--minutes", type=float, default=None, help="training budget (default: the quick preset's)"
    )
    p.add_argument("--device", default="auto")


def _add_figures(sub) -> None:
    t_help = "comma-separated t in 0..T: integers or expressions like T, T/2, 3T/4 (default T,T/2,T/4,1,0)"
    p = sub.add_parser(
        "forward", help="figure of the forward process: real images dissolving into noise"
    )
    p.add_argument("--dataset", help="images to noise (default: the run's dataset, else mnist5k)")
    p.add_argument("--data-dir", help="where torchvision datasets live (default ./data)")
    p.add_argument("--run", help="use this run's noise schedule (default: linear, T = 1000)")
    p.add_argument("--t", default="T,T/2,T/4,1,0", help=t_help + "; columns run from 0 to T")
    p.add_argument("--per-class", type=int, default=1, help="images per class (rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="FILE.png")
    p = sub.add_parser(
        "reverse", help="figure of the reverse process: x_t and predicted x_0 per class"
    )
    p.add_argument("run")
    p.add_argument("--t", default="T,T/2,T/4,1,0", help=t_help + "; columns run from T to 0")
    p.add_argument("--classes", help="comma-separated class indices (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale s (default: the run's)"
    )
    p.add_argument("--sampler", help="ddpm (default), ddim, dpm++, unipc or euler")
    p.add_argument(
        "--steps", type=int, help="sampling steps (default: all T for ddpm, else the run's)"
    )
    p.add_argument("--eta", type=float, help="DDIM eta (0 deterministic)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="FILE.png")
    p.add_argument(
        "--gif", help="also an animation of every step (at most 120 frames, first and last kept)"
    )
    p.add_argument("--mp4", help="the same animation as an H.264 video")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickle checkpoint (unsafe)")
    p = sub.add_parser("plot", help="a run's training loss curve and noise schedule diagnostics")
    p.add_argument("run")
    p.add_argument("--out", help="folder for loss.png and schedule.png (default RUN/figures)")
    p.add_argument("--device", default="auto", help="for before_after.png of an --init-from run")


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="resumable sweep of a run over guidance x steps (x sampler x seed), measured"
    )
    p.add_argument("run")
    p.add_argument("--guidance", default="0,1,2,4,8", help="guidance scales (default 0,1,2,4,8)")
    p.add_argument("--steps", default="10,25,50,250", help="step counts (default 10,25,50,250)")
    p.add_argument("--sampler", default="ddim", help="samplers, e.g. ddim,ddpm (default ddim)")
    p.add_argument("--seeds", default="0", help="seeds; each has its own shared x_T (default 0)")
    p.add_argument("--n", "--n-per-class", dest="n", type=int, default=20,
                   help="samples per class per cell (default 20; --n-per-class under torchrun, "
                   "whose own options --n... would swallow --n)")  # fmt: skip
    p.add_argument("--grid-class", type=int, default=0, help="class shown in the image grid")
    p.add_argument("--device", default="auto")
    _add_precision(p)
    p.add_argument("--out", required=True, help="sweep folder; the same command resumes it")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="self-contained HTML report (+ Markdown) of runs and sweeps")
    p.add_argument("inputs", nargs="+", metavar="RUN|DIR", help="run folders and sweep folders")
    p.add_argument("--out", default="report.html", help="FILE.html; FILE.md is written beside it")
    p.add_argument("--title", help="report title")


def _add_sd(sub) -> None:
    from difflab.sd import DEFAULT_CLIP_MODEL, DEFAULT_MODEL, SCHEDULER_NAMES

    sd = sub.add_parser(
        "sd", help="Stable Diffusion: generate images, sweep guidance x steps, LoRA fine-tuning"
    )
    sd_sub = sd.add_subparsers(dest="sd_command", required=True, parser_class=_Parser)
    g = sd_sub.add_parser("generate", help="images from a prompt, settings in every PNG")
    s = sd_sub.add_parser("sweep", help="resumable prompts x guidance x steps x seeds sweep")
    f = sd_sub.add_parser("finetune", help="LoRA fine-tuning on a folder of images (resumable)")
    f.add_argument(
        "--data", required=True, help="folder of images; captions from metadata.jsonl or .txt"
    )
    f.add_argument(
        "--instance-prompt", help="caption of images without one, e.g. 'a photo of sks dog'"
    )
    f.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    f.add_argument(
        "--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default: the rank)"
    )
    f.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    f.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    f.add_argument("--batch-size", type=int, default=1, help="images per step (default 1)")
    f.add_argument("--resolution", type=int, default=512, help="square training size (default 512)")
    f.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    f.add_argument("--ema", action="store_true", help="save an EMA of the LoRA weights")
    f.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower")
    f.add_argument("--mixed-precision", default="no", help="no (default), fp16 (CUDA) or bf16")
    f.add_argument(
        "--adam-8bit", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA; less memory)"
    )
    f.add_argument("--validation-prompt", help="prompt of the validation images (seeds 0-3)")
    f.add_argument(
        "--validate-every",
        type=int,
        help="steps between validation images (default: start and end)",
    )
    f.add_argument(
        "--checkpoint-every", type=int, default=500, help="steps between checkpoints (500)"
    )
    f.add_argument(
        "--seed", type=int, default=0, help="seed of the LoRA init, data order and noise"
    )
    f.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub id, diffusers folder or FILE.safetensors (default {DEFAULT_MODEL})",
    )
    f.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    f.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    f.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    g.add_argument("--prompt", help="the prompt (empty only with --unconditional)")
    g.add_argument("--unconditional", action="store_true", help="sample without a prompt")
    g.add_argument("--guidance", type=float, default=7.5, help="CFG scale s: 0, 1 or > 1 (7.5)")
    g.add_argument("--steps", type=int, default=50, help="inference steps (default 50)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image (image i: seed+i)")
    g.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    s.add_argument("--prompts", nargs="+", required=True, metavar="FILE.txt|TEXT",
                   help="prompts, or one .txt file with a prompt per line")  # fmt: skip
    s.add_argument("--guidance", default="1,3,7.5,12,20", help="CFG scales (default 1,3,7.5,12,20)")
    s.add_argument("--steps", default="10,25,50", help="step counts (default 10,25,50)")
    s.add_argument(
        "--seeds", default="0,1,2", help="seeds; each has its own latents (default 0,1,2)"
    )
    s.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                   help=f"CLIP for the CLIP score: Hub id or folder, or none (default {DEFAULT_CLIP_MODEL})")  # fmt: skip
    s.add_argument("--lora-scales", help="LoRA scales as a sweep axis, e.g. 0,0.5,1 (needs --lora)")
    for p in (g, s):
        p.add_argument("--negative-prompt", default="", help="what to steer away from")
        p.add_argument("--size", default="512x512", help="WIDTHxHEIGHT, multiples of 8 (512x512)")
        p.add_argument("--scheduler", help=f"{', '.join(SCHEDULER_NAMES)} (default: the model's)")
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"Hub id, diffusers folder or FILE.safetensors (default {DEFAULT_MODEL})",
        )
        p.add_argument(
            "--model-config", help="local diffusers folder with the configs of a single file"
        )
        p.add_argument("--vae", help="another VAE: Hub id or diffusers folder")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
        p.add_argument(
            "--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp16, bf16, fp32"
        )
        p.add_argument(
            "--no-safety-checker", action="store_true", help="do not screen images (warns)"
        )
        p.add_argument("--trust-pickle", action="store_true", help="allow a .ckpt pickle (unsafe)")
        p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (4)")
        p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
        p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                       help="LoRA weights (.safetensors) and scale (default 1); generate: repeatable")  # fmt: skip
        p.add_argument(
            "--out", required=True, help="output folder (for sweep: the same command resumes it)"
        )


def _sd(args: argparse.Namespace, resolve_device) -> None:
    if args.sd_command == "finetune":
        from dataclasses import fields

        from difflab.sd.finetune import FinetuneConfig, FineTuner

        config = FinetuneConfig(**{x.name: getattr(args, x.name) for x in fields(FinetuneConfig)})
        tuner = FineTuner(config, args.out, device=args.device, resume=args.resume)
        for note in tuner.notes:
            print(f"difflab sd finetune: note: {note}", file=sys.stderr)
        r = tuner.fit()
        print(
            f"trained {r.steps_run} steps in {r.seconds:.0f} s ({r.seconds_per_step:.3f} s/step; "
            f"loss {r.final_loss:.4f}, mean of the last 10 steps); run folder {r.out}, "
            f"LoRA {r.lora}" + (f", {len(r.validation)} validation grid(s)" if r.validation else "")
        )
        return
    common = dict(
        negative_prompt=args.negative_prompt, size=args.size, scheduler=args.scheduler,
        model=args.model, device=resolve_device(args.device), dtype=args.dtype,
        safety_checker=not args.no_safety_checker, trust_pickle=args.trust_pickle,
        model_config=args.model_config, vae=args.vae, batch_size=args.batch_size,
        compile=args.compile, lora=args.lora,
    )  # fmt: skip
    if args.sd_command == "generate":
        from difflab.sd.generate import generate

        r = generate(
            args.prompt, args.out, guidance=args.guidance, steps=args.steps, seed=args.seed,
            n=args.n, unconditional=args.unconditional, **common,
        )  # fmt: skip
        names = ", ".join(rec.png.name for rec in r.images)
        for note in r.notes:
            print(f"difflab sd: warning: {note}", file=sys.stderr)
        print(
            f"wrote {len(r.images)} image(s) to {r.out} ({r.seconds_per_image:.2f} s/image): {names}"
        )
        if r.flagged:
            print(
                f"{len(r.flagged)} of {len(r.images)} flagged by the safety checker and returned "
                f"black: {', '.join(x.png.name for x in r.flagged)}; try another seed or prompt"
            )
        for rec in r.black_unflagged:
            print(f"{rec.png.name}: {rec.diagnosis.note}")
    else:
        from difflab import distributed
        from difflab.experiments.sd_sweep import sd_sweep

        r = sd_sweep(
            args.prompts, args.out, guidance=args.guidance, steps=args.steps, seeds=args.seeds,
            clip_model=args.clip_model, lora_scales=args.lora_scales, **common,
        )  # fmt: skip
        distributed.shutdown()
        if not distributed.is_main_process():  # under torchrun: one summary, from rank 0
            return
        for note in r.notes:
            print(f"difflab sd: warning: {note}", file=sys.stderr)
        done = r.cells_total - r.cells_run
        print(
            f"sd sweep {r.out}: {r.cells_run} cells computed in {r.seconds:.0f} s"
            + (f", {done} already done" if done else "")
            + f"; {r.flagged} of {len(r.rows)} images filtered by the safety checker"
            + (
                f", {r.black_unflagged} black but NOT flagged (see metrics.csv)"
                if r.black_unflagged
                else ""
            )
            + f"; tables metrics.csv, summary.csv, metrics.json; {len(r.figures)} figures"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="difflab", description="A lab bench for diffusion models.")
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_sample, _add_eval, _add_demo, _add_figures):
        add(sub)
    for add in (_add_sweep, _add_report):
        add(sub)
    _add_sd(sub)
    _add_ui(sub)
    return parser


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="open the lab's web UI (Gradio)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--runs-dir", default="runs", help="run folders; the only files the UI serves")
    p.add_argument(
        "--models-dir",
        default="models",
        help="Stable Diffusion models: diffusers folders and .safetensors files",
    )
    p.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help="require a login (needed off loopback); also --auth-file or DIFFLAB_UI_AUTH",
    )
    p.add_argument("--auth-file", metavar="FILE", help="a file holding one line USER:PASSWORD")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="allow a non-loopback --host without a login (anyone on the network)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host name to answer (besides localhost and --host); repeatable",
    )
    p.add_argument(
        "--allow-any-model",
        action="store_true",
        help="let the page load any server path or Hub id (default: --models-dir and the HF cache)",
    )
    p.add_argument(
        "--allow-unsafe-runs-dir",
        action="store_true",
        help="serve a --runs-dir that is /, your home folder or holds .git/.ssh",
    )
    p.add_argument("--device", default="auto")


def _train_config(args):
    from dataclasses import replace

    from difflab.config import get_preset

    cfg = get_preset(args.preset)
    tc = cfg.train
    changes = {
        k: getattr(args, k)
        for k in ("dataset", "data_dir", "batch_size", "lr", "seed", "init_from")
        if getattr(args, k) is not None
    }
    if args.epochs is not None:
        changes.update(epochs=args.epochs, minutes=None)
    elif args.minutes is not None:
        changes.update(minutes=args.minutes, epochs=None)
    cfg = replace(cfg, train=replace(tc, **changes))
    return cfg.override(args.set) if args.set else cfg


def run(args: argparse.Namespace) -> int:
    from difflab.devices import resolve_device

    if args.command == "train":
        from difflab import distributed
        from difflab.ddpm.training import train

        cfg = _train_config(args)
        result = train(cfg, args.out, device=resolve_device(args.device), resume=args.resume)
        distributed.shutdown()
        if distributed.is_main_process():  # under torchrun, one line for all processes
            print(
                f"trained {result.steps} steps in {result.seconds:.0f} s ({result.images_per_s:.0f} images/s); "
                f"run folder: {result.run_dir}"
            )
    elif args.command == "ui":
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UsageError("difflab ui needs Gradio: pip install 'difflab[ui]'") from None
        from difflab.ui.app import launch

        launch(
            args.runs_dir, args.models_dir, host=args.host, port=args.port, auth=args.auth,
            no_auth=args.no_auth, device=args.device, auth_file=args.auth_file,
            allowed_hosts=args.allowed_host, allow_any_model=args.allow_any_model,
            allow_unsafe_runs_dir=args.allow_unsafe_runs_dir,
        )  # fmt: skip
    elif args.command == "sample":
        from difflab.ddpm.generate import sample_run

        r = sample_run(
            args.run, args.out, classes=args.classes, n_per_class=args.n_per_class, guidance=args.guidance,
            steps=args.steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
            device=resolve_device(args.device), trust_pickle=args.trust_pickle, rows=args.rows, cols=args.cols,
            precision=args.precision,
        )  # fmt: skip
        n = r.images.shape[0]
        print(f"wrote {args.out}: {n} samples in {r.seconds:.1f} s ({n / r.seconds:.0f} images/s)")
    elif args.command == "eval":
        from difflab.evaluation.evaluate import evaluate_run, format_eval

        result = evaluate_run(
            args.run, n_per_class=args.n, guidance=args.guidance, steps=args.steps, sampler=args.sampler,
            seed=args.seed, device=resolve_device(args.device), inception=args.inception,
            precision=args.precision,
        )  # fmt: skip
        print(format_eval(result))
    elif args.command == "demo":
        from difflab.experiments.demo import run_demo

        run_demo(args.out, minutes=args.minutes, device=resolve_device(args.device))
    elif args.command == "sweep":
        from difflab import distributed
        from difflab.experiments.ddpm_sweep import sweep_run

        r = sweep_run(
            args.run, args.out, guidance=args.guidance, steps=args.steps, sampler=args.sampler,
            seeds=args.seeds, n_per_class=args.n, grid_class=args.grid_class,
            device=resolve_device(args.device), precision=args.precision,
        )  # fmt: skip
        distributed.shutdown()
        if not distributed.is_main_process():  # under torchrun: one summary, from rank 0
            return 0
        done = r.cells_total - r.cells_run
        print(
            f"sweep {r.out}: {r.cells_run} cells computed in {r.seconds:.0f} s"
            + (f", {done} already done" if done else "")
            + f"; tables metrics.csv, summary.csv, metrics.json; {len(r.figures)} figures"
        )
    elif args.command == "report":
        from difflab.experiments.report import write_report

        r = write_report(args.inputs, args.out, title=args.title)
        print(f"wrote {r.html} and {r.markdown} ({len(r.images)} images)")
        for line in r.conclusions:
            print(f"  - {line}")
    elif args.command == "sd":
        _sd(args, resolve_device)
    elif args.command in ("forward", "reverse", "plot"):
        _figures(args, resolve_device)
    return 0


def _figures(args: argparse.Namespace, resolve_device) -> None:
    from difflab.figures import process as figures
    from difflab.figures import runs as plots

    if args.command == "forward":
        r = figures.forward_figure(
            args.out, dataset=args.dataset, run=args.run, t=args.t, per_class=args.per_class,
            seed=args.seed, data_dir=args.data_dir,
        )  # fmt: skip
        print(f"wrote {r.path} (t = {', '.join(map(str, r.t))})")
    elif args.command == "reverse":
        r = figures.reverse_figure(
            args.run, args.out, t=args.t, classes=args.classes, seed=args.seed, guidance=args.guidance,
            sampler=args.sampler, steps=args.steps, eta=args.eta, gif=args.gif, mp4=args.mp4,
            device=resolve_device(args.device), trust_pickle=args.trust_pickle,
        )  # fmt: skip
        extra = "".join(f", {p}" for p in r.extra) + (f" ({r.frames} frames)" if r.frames else "")
        print(f"wrote {r.path}{extra} (t = {', '.join(map(str, r.t))})")
    else:
        r = plots.plot_run(args.run, args.out, device=resolve_device(args.device))
        for note in r.skipped:
            print(f"skipped {note}")
        print("wrote " + ", ".join(map(str, r.written)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return int(e.code or 0)
    try:
        return run(args)
    except UsageError as e:
        if args.debug:
            raise
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"difflab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a known failure mode gets its message, not a traceback
        from difflab.ddpm.training import TrainingDiverged

        if isinstance(e, TrainingDiverged) and not args.debug:
            print(f"difflab {args.command}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
