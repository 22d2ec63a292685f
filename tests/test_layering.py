"""Imports point only down the layer order the README names (function-level imports too).

A module may import its own layer and the layers listed before it; two packages on the same
layer (training and evaluation) may not import each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pixelrepa"

LAYERS: list[tuple[str, ...]] = [
    ("version", "extras"),
    ("files", "rng"),
    ("images",),
    ("config",),
    ("weights",),
    ("distributed",),
    ("data",),
    ("models",),
    ("align",),
    ("device",),
    ("objective",),
    ("sampling",),
    ("checkpoint",),
    ("loading",),
    ("interop",),
    ("training", "evaluation"),
    ("cli",),
    ("__main__",),
]
"""Top-level names under `pixelrepa/`, lowest first; the package root (`pixelrepa/__init__.py`)
re-exports the public API and is imported by nobody inside the package."""

RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def unit_of(module_path: Path) -> str:
    """The top-level name a file belongs to: `training` for training/trainer.py, `files` for files.py."""
    relative = module_path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def imported_units(tree: ast.AST, module_path: Path) -> list[tuple[int, str]]:
    """(line, top-level pixelrepa name) of every import in the file, at any depth."""
    found = []
    package_parts = ("pixelrepa", *module_path.relative_to(PACKAGE).parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pixelrepa":
                    found.append((node.lineno, parts[1] if len(parts) > 1 else ""))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package_parts[:len(package_parts) - node.level + 1]
                parts = [*base, *(node.module.split(".") if node.module else [])]
            else:
                parts = node.module.split(".") if node.module else []
            if parts and parts[0] == "pixelrepa":
                if len(parts) > 1:
                    found.append((node.lineno, parts[1]))
                else:  # `from pixelrepa import x`: x is a top-level name, or the root's re-export
                    found.extend((node.lineno, alias.name if alias.name in RANK else "") for alias in node.names)
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_top_level_name_has_a_layer():
    names = {unit_of(p) for p in modules()}
    assert names - set(RANK) == set(), "add the new module or package to LAYERS (and the README's layout)"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    own = unit_of(path)
    wrong = []
    for line, target in imported_units(ast.parse(path.read_text(), str(path)), path):
        if target == "":
            wrong.append(f"line {line}: imports the package root (import from the module that defines it)")
        elif target != own and RANK[target] >= RANK[own]:
            wrong.append(f"line {line}: {own} (layer {RANK[own]}) imports {target} (layer {RANK[target]})")
    assert not wrong, f"{path.relative_to(PACKAGE.parent)}:\n" + "\n".join(wrong)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    source = "def f():\n    from pixelrepa.cli import main\n    from ..training import trainer\n"
    fake = PACKAGE / "evaluation" / "fake.py"
    units = imported_units(ast.parse(source), fake)
    assert units == [(2, "cli"), (3, "training")]


def test_the_readme_names_the_same_layers_in_the_same_order():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    items = re.findall(r"^\s*\d+\. (.*(?:\n   .*)*)", layout, re.M)
    named = [tuple(name for m in re.findall(r"`([a-z_]+(?:\.py|/))`", item)
                   if (name := m.removesuffix(".py").removesuffix("/")) in RANK) for item in items]
    assert named == [names for names in LAYERS if names != ("__main__",)]
