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


def test_the_newest_run_is_ordered_by_session_then_recorded_time(tmp_path: Path) -> None:
    """Session folders order by date and session number (s9 before s10, which plain path order reverses),
    then by the time the benchmark recorded."""
    import json

    spec = importlib.util.spec_from_file_location("bst", ROOT / "benchmarks" / "block_sparse_table.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = {
        "h100-2026-11-24/x/block_sparse_a.json": {},
        "h100-2026-11-24-s9/x/block_sparse_b.json": {},
        "h100-2026-11-24-s10/y/block_sparse_c.json": {"time_utc": "2026-11-24T10:00:00+00:00"},
        "h100-2026-11-24-s10/x/block_sparse_d.json": {"time_utc": "2026-11-24T09:00:00+00:00"},
        "h100-2026-11-23-s12/x/block_sparse_e.json": {},
    }
    for rel, doc in runs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(doc))
    assert mod.newest(tmp_path).name == "block_sparse_c.json"
    (tmp_path / "h100-2026-11-24-s10/y/block_sparse_c.json").unlink()
    assert mod.newest(tmp_path).name == "block_sparse_d.json"
    for name in ("y", "x"):
        for f in (tmp_path / "h100-2026-11-24-s10" / name).glob("*.json"):
            f.unlink()
    assert mod.newest(tmp_path).name == "block_sparse_b.json"
