"""Layers point down only: the import graph of attnlab's own modules (read from the source, not run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "attnlab"

#: What each layer may import from attnlab (prefixes). Kernels are executors: tensors in, tensors out.
ALLOWED = {
    "kernels": ("attnlab.kernels", "attnlab.masks", "attnlab.settings", "attnlab.errors"),
    "core": ("attnlab.errors", "attnlab.params", "attnlab.patterns"),
    "plans": ("attnlab.plans", "attnlab.masks", "attnlab.settings", "attnlab.errors", "attnlab.kernels.flex"),
    "registry": ("attnlab.core", "attnlab.errors"),
    "backends": (
        "attnlab.backends", "attnlab.core", "attnlab.kernels", "attnlab.plans", "attnlab.masks",
        "attnlab.settings", "attnlab.reference", "attnlab.errors",
    ),
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("attnlab")}


def _files(layer: str) -> list[Path]:
    target = ROOT / layer
    return sorted(target.rglob("*.py")) if target.is_dir() else [ROOT / f"{layer}.py"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_lies_below_it(layer: str) -> None:
    for path in _files(layer):
        bad = sorted(m for m in _imports(path) if not m.startswith(ALLOWED[layer]))
        assert not bad, (
            f"{path.relative_to(ROOT.parent)} imports {bad}; {layer} may import only {ALLOWED[layer]}"
        )


def test_no_test_module_imports_another() -> None:
    tests = Path(__file__).resolve().parent
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("tests"), f"{path.name} imports {node.module}"
