"""Loading a Stable Diffusion pipeline: where the model is, on which device, in which dtype.

:func:`resolve_model` checks ``--model`` without loading anything: a Hub id (default
``stable-diffusion-v1-5/stable-diffusion-v1-5``; the removed ``runwayml/stable-diffusion-v1-5``
is redirected with a note), a local diffusers folder (``model_index.json`` naming a 1.x/2.x
pipeline) or a single ``.safetensors`` file; a ``.ckpt``/pickle file, or a folder whose
weights are pickles (``.bin``), is refused unless the user trusts it (``--trust-pickle``), and
diffusers and transformers load with ``use_safetensors=True`` otherwise. :func:`load_pipeline`
then builds the stock ``StableDiffusionPipeline`` (SDPA attention is diffusers' default),
swaps in the scheduler named as in A1111/diffusers
(:data:`SCHEDULERS`, through ``from_config`` so the model's betas are kept), optionally another
VAE, moves it to the device in the dtype (``auto``: fp16 on CUDA/MPS, fp32 on CPU;
:mod:`difflab.devices`) and keeps the safety checker unless it is switched off with a warning.
What to load is a :class:`~difflab.options.SDPipelineSpec`, checked when it was built. A model that cannot be fetched
(offline, not found) becomes one :class:`~difflab.errors.UsageError` line saying how to point
``--model`` at a local copy.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from difflab.checks import check_choice
from difflab.devices import torch_dtype as torch_dtype_of
from difflab.errors import UsageError
from difflab.files import read_json
from difflab.options import DEFAULT_SD_MODEL, SD_SCHEDULERS, SDPipelineSpec

MOVED = {"runwayml/stable-diffusion-v1-5": DEFAULT_SD_MODEL}  # removed from the Hub -> mirror
SAFETY_CHECKER_ID = "CompVis/stable-diffusion-safety-checker"
SD_GUIDANCE = 7.5  # diffusers' default guidance_scale
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
NEEDED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# name -> (diffusers class, from_config overrides, A1111 "Sampler" label)
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {  # in the order of SD_SCHEDULERS
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M",
    ),
    "dpm++_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}, "LMS"),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}, "Heun"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hub", "folder", "file"]
    location: str  # Hub id, or an absolute path
    label: str  # short name for the PNG "Model:" field
    notes: tuple[str, ...] = ()


@dataclass
class LoadedPipeline:
    pipe: Any  # diffusers.StableDiffusionPipeline
    source: ModelSource
    device: str
    dtype: str  # fp16, bf16 or fp32
    scheduler: str  # a SCHEDULERS name, or the class name of an unknown one
    sampler: str  # its A1111 label
    safety_checker: bool
    notes: list[str] = field(default_factory=list)


def _offline_hint(what: str) -> str:
    return (
        f"download it where the Hub is reachable (`hf download {what} --local-dir DIR`) "
        "and pass --model DIR, or pass --model FILE.safetensors"
    )


def resolve_model(model: str | Path, trust_pickle: bool = False) -> ModelSource:
    """Classify ``--model`` and check it is usable, without loading it."""
    text = str(model).strip()  # not empty: SDPipelineSpec checked it
    notes: list[str] = []
    if text in MOVED:
        notes.append(f"--model {text} was removed from the Hub; using its mirror {MOVED[text]}")
        text = MOVED[text]
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    where = f"--model {text}"
    if suffix in PICKLE_SUFFIXES or suffix == ".safetensors":
        if not path.is_file():
            raise UsageError(f"{where}: no such file")
        if suffix != ".safetensors" and not trust_pickle:
            raise UsageError(
                f"{where}: a {suffix} file is a pickle that can run code when loaded; convert it "
                "to .safetensors, or pass --trust-pickle if you trust where it came from"
            )
        return ModelSource("file", str(path.resolve()), path.stem, tuple(notes))
    if path.is_dir():
        _check_folder(path, where)
        if not trust_pickle:
            refuse_pickle_folder(path, where)
        return ModelSource("folder", str(path.resolve()), path.resolve().name, tuple(notes))
    if path.exists():
        raise UsageError(
            f"{where}: is not a Stable Diffusion pipeline; expected a diffusers folder "
            "(with model_index.json), a .safetensors file or a Hub id"
        )
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        raise UsageError(f"{where}: no such file or folder")
    if not _HUB_ID.match(text):
        raise UsageError(
            f"{where}: not a Hub id (owner/name), a diffusers folder or a .safetensors file"
        )
    return ModelSource("hub", text, text, tuple(notes))


def _check_folder(path: Path, where: str) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        hint = " (it holds one component; pass the pipeline folder above it)"
        raise UsageError(
            f"{where}: not a diffusers pipeline folder: no model_index.json"
            + (hint if (path / "config.json").is_file() else "")
        )
    spec = read_json(index)  # one line naming the file when it is not a JSON object
    name = str(spec.get("_class_name", "?"))
    if "text_encoder_2" in spec or not name.startswith("StableDiffusion") or "XL" in name:
        raise UsageError(
            f"{where}: is a {name}; difflab sd runs Stable Diffusion 1.x/2.x pipelines"
        )
    missing = [c for c in NEEDED if not (path / c).is_dir()]
    if missing:
        raise UsageError(
            f"{where}: pipeline folder lacks {', '.join(missing)} (needs {', '.join(NEEDED)})"
        )


def refuse_pickle_folder(path: Path, where: str) -> None:
    """One line when a component of the diffusers/transformers folder ``path`` has its weights
    only as a pickle (``.bin``, ``.pt``, ...) and no ``.safetensors`` beside them."""
    folders = [path, *sorted(p for p in path.iterdir() if p.is_dir())]
    for folder in folders:
        files = [p for p in folder.iterdir() if p.is_file()]
        pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            rel = pickles[0].relative_to(path).as_posix()
            raise UsageError(
                f"{where}: {rel} is a pickle that can run code when loaded; convert the folder "
                "to safetensors (save_pretrained(..., safe_serialization=True)), or pass "
                "--trust-pickle if you trust where it came from"
            )


def model_fingerprint(source: ModelSource) -> dict[str, Any]:
    """What identifies the weights, for a sweep's identity file. Cheap: every file of a folder
    (or the single file) counts by name, size and a hash of its first MiB, which covers the
    configs and the first tensors of each weight file (fine-tunes differ there)."""
    if source.kind == "hub":
        return {"hub_id": source.location}
    path = Path(source.location)
    files = [path] if source.kind == "file" else sorted(path.rglob("*"))
    h = hashlib.sha256()
    for p in files:
        rel = p.name if source.kind == "file" else p.relative_to(path).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            h.update(f"{rel}\0{p.stat().st_size}\0".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
    return {source.kind: path.name, "sha256": h.hexdigest()}


def own_size(unet_config: Any, vae_config: Any) -> tuple[int, int]:
    """(width, height) the pipeline makes when ``height`` and ``width`` are None: the UNet's
    ``sample_size`` (an int, or (height, width)) x the VAE's scale factor
    ``2 ** (len(block_out_channels) - 1)``, as diffusers computes it; 512x512 for SD 1.5."""
    size = unet_config["sample_size"]
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    f = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return w * f, h * f


def pipeline_size(pipe: Any) -> tuple[int, int]:
    """:func:`own_size` of a loaded pipeline."""
    return own_size(pipe.unet.config, pipe.vae.config)


def configured_size(source: ModelSource, vae: str | None = None) -> tuple[int, int] | None:
    """:func:`own_size` read from the configs without loading weights: a folder's
    ``unet/config.json`` and ``vae/config.json`` (or those of ``vae``, a folder), a Hub id's
    when they are in the local Hub cache; None when they cannot be read (load to know)."""

    def config(part: str) -> dict | None:
        if part == "vae" and vae is not None:
            path = Path(vae).expanduser() / "config.json"
            return read_json(path) if path.is_file() else None
        if source.kind == "folder":
            path = Path(source.location) / part / "config.json"
            return read_json(path) if path.is_file() else None
        if source.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(source.location, f"{part}/config.json")
            return read_json(Path(hit)) if isinstance(hit, str) else None
        return None

    try:
        unet, vae_config = config("unet"), config("vae")
        return None if unet is None or vae_config is None else own_size(unet, vae_config)
    except (KeyError, TypeError, IndexError, ValueError, UsageError):
        return None


def model_guidance(source: ModelSource) -> float:
    """The guidance scale a model is run at without ``--guidance``: a mini-SD folder's own
    (``mini_sd.json``'s ``guidance``, the one it was tuned for), else :data:`SD_GUIDANCE`."""
    from difflab.sd.mini import read_record

    record = read_record(source.location) if source.kind == "folder" else None
    value = (record or {}).get("guidance")
    return float(value) if isinstance(value, (int, float)) else SD_GUIDANCE


def make_scheduler(name: str, config: Any) -> Any:
    """The diffusers scheduler for ``name``, built from the model's scheduler ``config``."""
    import diffusers

    cls, overrides, _ = SCHEDULERS[check_choice(name, SD_SCHEDULERS, "--scheduler")]
    return getattr(diffusers, cls).from_config(config, **overrides)


def scheduler_name(scheduler: Any) -> tuple[str, str]:
    """(difflab name, A1111 label) of a scheduler object; its class name when not in the table."""
    cls, config = type(scheduler).__name__, scheduler.config
    for name, (c, overrides, label) in SCHEDULERS.items():
        if c == cls and all(config.get(k, v) == v for k, v in overrides.items()):
            return name, label
    return cls, cls


def load_pipeline(spec: SDPipelineSpec, progress: bool = False) -> LoadedPipeline:
    """Build the stock ``StableDiffusionPipeline`` of ``spec`` (see module doc); its LoRAs
    are not loaded here (:func:`difflab.sd.lora.applied` does, per call)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    source = resolve_model(spec.model, spec.trust_pickle)
    device, dtype, scheduler = spec.device, spec.resolved_dtype, spec.scheduler
    safety_checker, model_config, vae = spec.safety_checker, spec.model_config, spec.vae
    trust_pickle = spec.trust_pickle
    torch_dtype = torch_dtype_of(dtype)
    notes = list(source.notes)
    if dtype == "fp16" and device.split(":")[0] == "cpu":
        notes.append("--dtype fp16 on the CPU is slow and rarely used; fp32 is the CPU default")
    # safetensors only, unless the user trusts pickles (then diffusers prefers safetensors)
    safe = {"use_safetensors": None if trust_pickle else True}
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype, **safe}
    if vae is not None:
        if not trust_pickle and Path(vae).is_dir():
            refuse_pickle_folder(Path(vae), f"--vae {vae}")
        kwargs["vae"] = _load_part(AutoencoderKL, vae, "--vae", torch_dtype, **safe)
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
        notes.append(
            "--no-safety-checker: images are NOT screened for unsafe content; "
            "you are responsible for what you generate and share"
        )
    try:
        with quiet_loading():
            if source.kind == "file":
                pipe = _load_single_file(source, kwargs, safety_checker, model_config, torch_dtype)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(source.location, **kwargs)
    except UsageError:
        raise
    except (OSError, ValueError, KeyError) as e:
        moved = f" ({source.notes[0]})" if source.notes else ""
        raise UsageError(_load_error(source, e) + moved) from None
    if safety_checker and pipe.safety_checker is None:
        notes.append(
            f"{source.label} ships no safety checker: images are NOT screened for unsafe content"
        )
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    name, label = scheduler_name(pipe.scheduler)
    with quiet_loading():  # diffusers' fp16-on-CPU warning: our note above says it
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    if spec.compile:
        pipe.unet = torch.compile(pipe.unet)
    return LoadedPipeline(
        pipe, source, device, dtype, name, label, pipe.safety_checker is not None, notes
    )


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' per-component loading bars (Hub download bars stay),
    their loading warnings (a failure becomes one UsageError line; transformers' "LOAD
    REPORT" lists the base weights a LoRA adapter does not carry) and the ``torch_dtype``
    renaming notice (``torch_dtype`` works from diffusers 0.30 on)."""
    from diffusers.utils import logging as dlog
    from huggingface_hub import utils as hub
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    hub_off, level, t_level = (
        hub.are_progress_bars_disabled(),
        dlog.get_verbosity(),
        tlog.get_verbosity(),
    )
    dlog.set_verbosity_error()  # "Couldn't connect to the Hub" etc.: our error line says it
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()  # this one also turns the Hub's bars off: turn them back on
    if not hub_off:
        hub.enable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
            yield
    finally:
        dlog.set_verbosity(level)
        tlog.set_verbosity(t_level)
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()
        (hub.disable_progress_bars if hub_off else hub.enable_progress_bars)()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _load_error(source: ModelSource, e: BaseException) -> str:
    where = f"--model {source.location}"
    if source.kind == "hub":
        text = str(e)
        why = (
            "offline, and not in the local cache" if "cached" in text or "connect" in text.lower()
            else "no such model on the Hub, or it needs a login" if "404" in text or "401" in text
            or "not found" in text.lower() else _first_line(e)
        )  # fmt: skip
        return f"{where}: cannot load it ({why}); {_offline_hint(source.location)}"
    if source.kind == "file":
        return (
            f"{where}: cannot build a pipeline from this file ({_first_line(e)}); a single file "
            "needs its pipeline's configs: pass --model-config DIR (a local diffusers copy of the "
            "same architecture), or convert it to a diffusers folder and pass --model DIR"
        )
    return f"{where}: is not a loadable Stable Diffusion pipeline ({_first_line(e)})"


def _load_part(cls: Any, where: str | Path, option: str, torch_dtype: torch.dtype, **kw) -> Any:
    try:
        return cls.from_pretrained(str(where), torch_dtype=torch_dtype, **kw)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"{option} {where}: cannot load it ({_first_line(e)}); pass a local diffusers folder"
        ) from None


def _load_single_file(
    source: ModelSource, kwargs: dict, safety_checker: bool, model_config, torch_dtype
) -> Any:
    """``from_single_file`` leaves the safety checker out; load it (and its image processor)
    from ``model_config`` when that holds one, else from :data:`SAFETY_CHECKER_ID`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    kwargs = dict(kwargs)
    use_safetensors = kwargs.pop("use_safetensors")  # for the parts loaded here, not the file
    if model_config is not None:
        if not (Path(model_config) / "model_index.json").is_file():
            raise UsageError(f"--model-config {model_config}: not a diffusers pipeline folder")
        kwargs["config"] = str(model_config)
    if safety_checker:
        local = model_config is not None and (Path(model_config) / "safety_checker").is_dir()
        where = str(model_config) if local else SAFETY_CHECKER_ID
        sub = {"subfolder": "safety_checker"} if local else {}
        try:
            kwargs["safety_checker"] = StableDiffusionSafetyChecker.from_pretrained(
                where, torch_dtype=torch_dtype, use_safetensors=use_safetensors, **sub
            )
            kwargs["feature_extractor"] = CLIPImageProcessor.from_pretrained(
                where, **({"subfolder": "feature_extractor"} if local else {})
            )
        except (OSError, ValueError) as e:
            raise UsageError(
                f"--model {source.location}: a single file has no safety checker and {where} "
                f"cannot be loaded ({_first_line(e)}); pass --model-config DIR with a local "
                "pipeline copy that has safety_checker/, or --no-safety-checker"
            ) from None
    return StableDiffusionPipeline.from_single_file(source.location, **kwargs)
