"""LoRA weights at inference: ``--lora FILE[:SCALE]`` checked, fitted, loaded and described.

:func:`parse_lora` checks a LoRA file without loading a model: it must exist, be a
``.safetensors`` file (a pickle is never read) and hold LoRA tensors. :func:`applied` loads
LoRAs into a pipeline with diffusers' ``load_lora_weights`` (kohya/A1111 files are
converted by diffusers) as named adapters weighted by ``set_adapters``, and removes them
again on exit, so a reused pipeline is left as it was. Before loading, :func:`check_fits`
compares every LoRA tensor with the layer it adapts, so a LoRA trained on another base model
is refused with one line instead of a wall of size-mismatch errors. :func:`a1111_fields`
describes the LoRAs as A1111 does in a PNG: ``<lora:NAME:SCALE>`` after the prompt and a
``Lora hashes`` field (the sha256 of the tensor data, first 12 hex digits: A1111's and
Civitai's "AutoV3" short hash), plus a plain ``Lora`` field with each name and scale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from difflab.checks import split_scale
from difflab.errors import UsageError
from difflab.sd.load import _first_line, quiet_loading

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' training scripts write


@dataclass(frozen=True)
class LoraSpec:
    path: Path  # absolute
    scale: float
    name: str  # the file's stem, as in A1111's <lora:NAME:SCALE>
    hash: str  # A1111's short hash (see module doc)
    option: str = "--lora"

    @property
    def where(self) -> str:
        return f"{self.option} {self.path}"

    def with_scale(self, scale: float) -> LoraSpec:
        return replace(self, scale=float(scale))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": str(self.path), "scale": self.scale, "hash": self.hash}


def short_hash(path: str | Path) -> str:
    """sha256 of a safetensors file's tensor data (its header skipped), first 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def parse_lora(text: str | Path, option: str = "--lora") -> LoraSpec:
    """``FILE`` or ``FILE:SCALE`` (scale 1 when omitted) -> a checked :class:`LoraSpec`."""
    from safetensors import SafetensorError, safe_open

    path, scale = split_scale(text)  # a finite scale: SDPipelineSpec checked it
    scale = 1.0 if scale is None else scale
    where = f"{option} {str(text).strip()}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"{where}: no such file")
    if file.suffix.lower() != ".safetensors":
        raise UsageError(
            f"{where}: not a .safetensors file; difflab reads LoRA weights from safetensors only "
            "(a .ckpt/.pt/.bin pickle can run code when loaded)"
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError):
        raise UsageError(f"{where}: not a readable safetensors file") from None
    if not any("lora" in k.lower() for k in keys):
        raise UsageError(
            f"{where}: holds no LoRA weights (no 'lora' tensors); a full model goes to --model"
        )
    return LoraSpec(file.absolute(), scale, file.stem, short_hash(file), option)


def parse_loras(items: Sequence[str | Path], option: str = "--lora") -> list[LoraSpec]:
    """Every ``--lora`` of a :class:`~difflab.options.SDPipelineSpec` read and checked."""
    return [parse_lora(item, option) for item in items]


def _widths(module: Any) -> tuple[int | None, int | None]:
    """(input, output) width of a linear or convolution layer."""
    return (
        getattr(module, "in_features", getattr(module, "in_channels", None)),
        getattr(module, "out_features", getattr(module, "out_channels", None)),
    )


def check_fits(pipe: Any, spec: LoraSpec) -> None:
    """Refuse ``spec`` unless every LoRA tensor matches a layer of ``pipe`` in width."""
    try:
        with quiet_loading():  # diffusers converts kohya/A1111 layouts to its own here
            state_dict = pipe.lora_state_dict(str(spec.path), use_safetensors=True)[0]
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise UsageError(
            f"{spec.where}: not a LoRA diffusers can read ({_first_line(e)})"
        ) from None
    hint = "it was trained on another base model"
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in models:
            if component.startswith("text_encoder"):  # text_encoder_2: SDXL
                raise UsageError(f"{spec.where}: has weights for {component}; {hint} (SDXL?)")
            continue  # an old layout: left to diffusers, whose errors are caught by applied()
        module_name, _, part = rest.partition(".lora")
        if not part or tensor.ndim < 2:
            continue  # alpha values and the like
        if component == "text_encoder" and not hasattr(models[component], "text_model"):
            module_name = module_name.removeprefix("text_model.")  # flattened CLIP
        try:
            module = models[component].get_submodule(module_name)
        except AttributeError:
            raise UsageError(
                f"{spec.where}: does not fit this model, which has no layer "
                f"{component}.{module_name}; {hint}"
            ) from None
        down = "down" in part or "_A" in part
        width_in, width_out = _widths(module)
        want, got = (width_in, tensor.shape[1]) if down else (width_out, tensor.shape[0])
        if want is not None and want != got:
            side = "input" if down else "output"
            raise UsageError(
                f"{spec.where}: does not fit this model: layer {component}.{module_name} has "
                f"{side} width {want}, the LoRA {got}; {hint}"
            )


def set_scales(pipe: Any, names: Sequence[str], scales: Sequence[float]) -> None:
    """Weight the loaded adapters ``names`` by ``scales`` (0 turns one off)."""
    pipe.set_adapters(list(names), adapter_weights=[float(s) for s in scales])


@contextmanager
def applied(pipe: Any, specs: Sequence[LoraSpec]) -> Iterator[list[str]]:
    """Load ``specs`` into ``pipe`` as adapters weighted by their scales; yield the adapter
    names; delete the adapters on exit."""
    names: list[str] = []
    try:
        for i, spec in enumerate(specs):
            check_fits(pipe, spec)
            name = f"difflab_lora{i}"
            try:
                with quiet_loading():
                    pipe.load_lora_weights(str(spec.path), adapter_name=name, use_safetensors=True)
            except (RuntimeError, ValueError, KeyError, OSError) as e:
                raise UsageError(
                    f"{spec.where}: cannot be loaded into this model ({_first_line(e)})"
                ) from None
            names.append(name)
        if names:
            set_scales(pipe, names, [s.scale for s in specs])
        yield names
    finally:
        if names:
            pipe.delete_adapters(names)


def a1111_fields(specs: Sequence[LoraSpec]) -> tuple[str, dict[str, str]]:
    """The ``<lora:NAME:SCALE>`` tags for the prompt line and the PNG fields (module doc)."""
    if not specs:
        return "", {}
    tags = "".join(f" <lora:{s.name}:{s.scale:g}>" for s in specs)
    return tags, {
        "Lora hashes": ", ".join(f"{s.name}: {s.hash}" for s in specs),
        "Lora": ", ".join(f"{s.name}:{s.scale:g}" for s in specs),
    }
