"""DDPM run folders: safetensors weights, config.json, and the resumable training state.

A run folder holds ``config.json`` (every option, resolved), ``model.safetensors`` (the EMA
weights used for sampling) and ``train_state.pt`` (raw and EMA weights, optimizer, step and
RNG states for an exact resume; read with ``torch.load(weights_only=True)``); the names, the
checkpoint protocol and the resume checks it shares with SD fine-tuning are
:mod:`difflab.runfolder`'s. Every file is written atomically. Weights are never unpickled: a
pickle file where weights are expected is refused unless the caller passes
``trust_pickle=True``. :func:`init_from_run` starts a new run from another run's weights.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difflab import runfolder
from difflab.config import RunConfig
from difflab.ddpm.data import ImageData
from difflab.ddpm.diffusion import GaussianDiffusion
from difflab.ddpm.model import ContextUnet
from difflab.errors import UsageError
from difflab.files import atomic_path, write_text
from difflab.runfolder import CONFIG, METRICS, TRAIN_STATE

__all__ = [
    "CONFIG", "GUIDANCE", "METRICS", "SNAPSHOTS", "TRAIN_STATE", "WEIGHTS", "check_run_dir", "init_from_run",
    "load_run", "load_train_state", "snapshot_path", "snapshot_steps",
    "load_weights", "save_checkpoint", "save_config", "save_weights", "weights_metadata",
]  # fmt: skip

WEIGHTS = "model.safetensors"
GUIDANCE = "guidance.json"  # the scales tried when the run chose its default guidance
SNAPSHOTS = "snapshots"  # EMA weights kept at chosen steps: snapshots/step-0001000.safetensors

_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol >= 2, or a torch zip archive


def save_weights(
    model: torch.nn.Module | dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, Any] | None = None,
) -> None:
    """A model's weights (or a state dict) as safetensors, written atomically."""
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _refuse_pickle(path: Path, trust_pickle: bool) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if any(head.startswith(m) for m in _PICKLE_MAGIC) and not trust_pickle:
        raise UsageError(
            f"{path}: this is a pickle checkpoint, which can run arbitrary code when loaded; "
            "difflab reads safetensors only (pass --trust-pickle if you trust the file)"
        )


def load_weights(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: weights file not found")
    if path.suffix != ".safetensors":
        _refuse_pickle(path, trust_pickle)
        if trust_pickle:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        _refuse_pickle(path, trust_pickle)
        raise UsageError(f"{path}: not a readable safetensors file ({e})") from None


def save_config(cfg: RunConfig, run_dir: str | Path) -> None:
    write_text(Path(run_dir) / CONFIG, cfg.to_json())


def check_run_dir(run: str | Path, need_weights: bool = True) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise UsageError(f"RUN {run}: no such run folder")
    if not (run / CONFIG).is_file():
        raise UsageError(f"RUN {run}: not a run folder (no {CONFIG})")
    if need_weights and not (run / WEIGHTS).is_file():
        raise UsageError(
            f"RUN {run}: has no {WEIGHTS} yet (train it first, or wait for its first checkpoint)"
        )
    return run


def snapshot_path(run: str | Path, step: int) -> Path:
    """Where the EMA weights kept at ``step`` live (``train --snapshot-every``)."""
    return Path(run) / SNAPSHOTS / f"step-{int(step):07d}.safetensors"


def snapshot_steps(run: str | Path) -> list[int]:
    """The steps a run kept snapshots of, ascending (empty when it kept none)."""
    folder = Path(run) / SNAPSHOTS
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.glob("step-*.safetensors"):
        digits = p.name[len("step-") : -len(".safetensors")]
        if digits.isdigit():
            steps.append(int(digits))
    return sorted(steps)


def load_run(
    run: str | Path,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
    step: int | None = None,
) -> tuple[ContextUnet, GaussianDiffusion, RunConfig]:
    """Everything needed to sample from a run folder: the EMA model, its diffusion, its config.

    ``step`` picks a snapshot kept by ``train --snapshot-every`` instead of the last weights.
    """
    run = check_run_dir(run)
    cfg = RunConfig.load(run / CONFIG)
    model = ContextUnet(cfg.model)
    path = run / WEIGHTS
    if step is not None:
        path = snapshot_path(run, step)
        if not path.is_file():
            kept = ", ".join(map(str, snapshot_steps(run))) or "none"
            raise UsageError(
                f"--checkpoints {step}: {run} kept no snapshot of that step (kept: {kept})"
            )
    state = load_weights(path, trust_pickle=trust_pickle)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise UsageError(
            f"{path}: weights do not fit config.json's model ({'missing' if missing else 'unexpected'} {key!r})"
        )
    model.to(device).eval()
    return model, GaussianDiffusion(cfg.diffusion), cfg


def weights_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def save_checkpoint(
    run_dir: str | Path, ema: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any]
) -> None:
    """The EMA weights, then the train state that records their hash (see runfolder)."""
    runfolder.save_checkpoint(run_dir, WEIGHTS, lambda path: save_weights(ema, path, meta), state)


def load_train_state(run_dir: str | Path) -> dict[str, Any]:
    """``train_state.pt``; a missing or damaged file is one line naming it."""
    return runfolder.load_train_state(run_dir)


def init_from_run(model: ContextUnet, run: str | Path) -> None:
    """Load another run's EMA weights into ``model`` (continued training / fine-tuning).

    The architectures must match except for the number of classes: the known classes keep
    their embeddings, the "no class" token moves to its new index, and new classes start
    from the "no class" embedding, i.e. as the unconditional model.
    """
    src = check_run_dir(run)
    src_cfg = RunConfig.load(src / CONFIG).model
    for name in ("in_channels", "height", "width", "base_channels", "channel_mults", "num_res_blocks",
                 "attention", "patch_size", "time_embed_dim"):  # fmt: skip
        a, b = getattr(src_cfg, name), getattr(model.cfg, name)
        if a != b:
            raise UsageError(
                f"--init-from {run}: its model.{name} is {a}, this run needs {b}; they must match"
            )
    state = load_weights(src / WEIGHTS)
    old = state.pop("class_embed.weight")  # (old_classes + 1, D)
    emb = model.class_embed.weight.detach().clone()
    n_old, n_new = old.shape[0] - 1, model.cfg.num_classes
    keep = min(n_old, n_new)
    emb[:keep] = old[:keep]
    emb[keep:n_new] = old[n_old]  # new classes start as "no class"
    emb[n_new] = old[n_old]
    state["class_embed.weight"] = emb
    model.load_state_dict(state)


def resolve_config(cfg: RunConfig, data: ImageData) -> RunConfig:
    """Fit the model's input shape and class count to the dataset."""
    model = replace(
        cfg.model,
        in_channels=data.channels,
        height=data.height,
        width=data.width,
        num_classes=data.num_classes,
        class_names=tuple(data.class_names),
    )
    levels, p = len(model.channel_mults), model.patch_size
    while p > 1 and (data.height % p or data.width % p):
        p -= 1
    while levels > 1 and (
        data.height % (p * 2 ** (levels - 1)) or data.width % (p * 2 ** (levels - 1))
    ):
        levels -= 1  # e.g. 8x8 digits cannot be halved three times
    model = replace(model, channel_mults=model.channel_mults[:levels], patch_size=p)
    return replace(cfg, model=model)
