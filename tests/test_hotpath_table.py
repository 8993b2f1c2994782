"""The hot-path block of SUMMARY.md is generated from the committed H100 JSON, and is current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("hotpath_table", ROOT / "benchmarks" / "hotpath_table.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_carries_the_current_hot_path_block() -> None:
    mod = _module()
    block = "\n".join(mod.section(ROOT / "benchmarks" / "results"))
    assert (
        "| softmax |" in block and "| sliding_window_N32768_causal |" in block and "| softmax_nq1 |" in block
    )
    summary = (ROOT / "benchmarks" / "results" / "SUMMARY.md").read_text()
    assert block in summary, "run: python benchmarks/hotpath_table.py benchmarks/results"
