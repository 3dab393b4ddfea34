"""The file tree is the architecture: every import in difflab points down the layers.

Front ends (cli, ui) sit on experiments, experiments on evaluation, evaluation on the two
halves of the lab (ddpm, sd), which never import each other; both draw through figures, and
everything rests on the base modules (config, options, seeds, devices, files, errors, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import difflab

ROOT = Path(difflab.__file__).parent
LAYERS = {"cli": 6, "ui": 5, "experiments": 4, "evaluation": 3, "ddpm": 2, "sd": 2, "figures": 1}
BASE = 0
MAX_LINES = 450  # "modules of about 400 lines at most"


def layer_of(module: str) -> tuple[str, int]:
    """('ddpm', 2) for difflab.ddpm.sampling; base modules are layer 0; the package root is top."""
    parts = module.split(".")
    if len(parts) == 1:
        return "difflab", 99
    head = parts[1]
    return head, LAYERS.get(head, BASE)


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "difflab":
                found += [f"difflab.{a.name}" for a in node.names if a.name != "__version__"]
            elif node.module.startswith("difflab."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("difflab.")]
    return found


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        yield name, path


def test_imports_point_down():
    wrong = []
    for name, path in modules():
        if name in ("difflab", "difflab.__main__"):
            continue  # the Python face and `python -m difflab` sit on top
        head, layer = layer_of(name)
        for target in imports_of(path):
            t_head, t_layer = layer_of(target)
            if t_head == head and layer > BASE:
                continue  # within one package
            if t_layer >= layer and not (layer == BASE and t_layer == BASE):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_every_package_and_module_says_what_it_owns():
    missing = [
        name for name, path in modules() if not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert not missing, f"modules without a docstring: {missing}"


def test_modules_stay_small():
    big = {
        name: n for name, path in modules() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"
