"""How the lab report is written out: its blocks, rendered as HTML and as Markdown.

A report is a list of :class:`Block` (headings, paragraphs, notes, lists, tables, images).
:func:`render_html` writes one self-contained page (images inlined as base64 ``data:`` URIs,
every text escaped); :func:`render_markdown` its twin, whose images are files in a folder
beside it. :mod:`difflab.experiments.report` builds the blocks.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

__all__ = ["Block", "render_html", "render_markdown"]


@dataclass
class Block:
    kind: str  # h1, h2, h3, p, note, list, table, image
    text: str = ""
    items: list[str] = field(default_factory=list)  # list items
    rows: list[list[str]] = field(default_factory=list)  # table: header first
    png: bytes = b""
    name: str = ""  # image file name in the Markdown twin's folder


CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #08519c;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ccc;color:#08519c}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#eef3f9}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;height:auto;display:block;margin:.5em 0}
.note{color:#555;font-size:.9em}.conclusions li{margin:.3em 0}"""


def render_html(blocks: list[Block], title: str) -> str:
    esc = html.escape
    out = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{CSS}</style></head><body>"]  # fmt: skip
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{esc(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{esc(b.text)}</p>")
        elif b.kind == "note":
            out.append(f"<p class='note'>{esc(b.text)}</p>")
        elif b.kind == "list":
            items = "".join(f"<li>{esc(i)}</li>" for i in b.items)
            out.append(f"<ul class='{esc(b.text)}'>{items}</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{esc(c)}</th>" for c in b.rows[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in b.rows[1:]
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "image":
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f"<img alt='{esc(b.text)}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], files_dir: str) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "note":
            out.append(f"*{b.text}*")
        elif b.kind == "list":
            out.append("\n".join(f"- {i}" for i in b.items))
        elif b.kind == "table":
            rows = [[_md_cell(c) for c in r] for r in b.rows]
            lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            out.append("\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]))
        elif b.kind == "image":
            out.append(f"![{b.text}]({files_dir}/{b.name})")
    return "\n\n".join(out) + "\n"
