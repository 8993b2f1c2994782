"""The block-sparse block of SUMMARY.md is generated from the committed H100 JSON, and is current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_summary_carries_the_current_block_sparse_block() -> None:
    spec = importlib.util.spec_from_file_location("bst", ROOT / "benchmarks" / "block_sparse_table.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    block = "\n".join(mod.section(ROOT / "benchmarks" / "results"))
    assert "| 32768 | 1024 |" in block and "| 131072 | 128 |" in block
    summary = (ROOT / "benchmarks" / "results" / "SUMMARY.md").read_text()
    assert block in summary, "run: python benchmarks/block_sparse_table.py benchmarks/results"
