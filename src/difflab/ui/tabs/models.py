"""The Models tab: Stable Diffusion models in the models folder and the Hugging Face cache.

Lists diffusers folders and single ``.safetensors`` files (what ``--model`` takes) and, when
the server allows any model (``--allow-any-model``), imports a ``.safetensors`` checkpoint
from elsewhere on the server into the models folder; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from difflab.errors import UsageError
from difflab.ui.lab import Lab
from difflab.ui.paths import import_model, list_models

COLUMNS = ["name", "type", "size", "--model"]


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def model_rows(lab: Lab) -> list[dict]:
    return [
        {"name": m.name, "type": m.kind, "size": size_text(m.bytes), "--model": m.path}
        for m in list_models(lab.models)
    ]


def import_file(lab: Lab, path: str) -> Path:
    """Copy a server-side ``.safetensors`` file into the models folder (if the server allows)."""
    if not lab.allow_any_model:
        raise UsageError(
            f"import {str(path)!r}: the web UI reads no server files outside {lab.models}; copy "
            "the file there yourself, or start the UI with --allow-any-model"
        )
    return import_model(path, lab.models)


def build(lab: Lab, page) -> None:
    import gradio as gr

    from difflab.ui.widgets import friendly, table

    with gr.Tab("Models", id="models"):
        gr.Markdown(
            f"Stable Diffusion models in `{lab.models}` (diffusers folders and single "
            "`.safetensors` files) and pipelines already in the Hugging Face cache. Nothing "
            "is downloaded here."
        )
        models = gr.Dataframe(label="Models", interactive=False)
        refresh = gr.Button("↻ refresh", size="sm")
        with gr.Row():
            path = gr.Textbox(
                label="Import a local .safetensors file (path on the server)",
                interactive=lab.allow_any_model,
                placeholder="" if lab.allow_any_model else "needs difflab ui --allow-any-model",
            )
            go = gr.Button("Import", interactive=lab.allow_any_model)
        status = gr.Markdown()

    def models_table():
        return table(model_rows(lab), COLUMNS)

    @friendly
    def on_import(path):
        dest = import_file(lab, path)
        return f"Imported as `{dest}`.", models_table()

    refresh.click(models_table, None, models, api_name="models")
    go.click(on_import, path, [status, models], api_name="import_model")
    page.load(models_table, None, models, api_name=False)
