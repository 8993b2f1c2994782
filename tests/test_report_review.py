"""The benchmark report says what it shows: the speedup and spread of multi-pass rows, the tile size of block
density, and rows of two devices kept apart when results are merged (:mod:`attnlab.bench.sources`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from attnlab.bench import plots
from attnlab.bench.report import write_report
from attnlab.bench.report_tables import efficiency_tables
from attnlab.bench.sources import ROW_KEY, merged
from attnlab.bench.store import ResultsDB


def row(method: str = "sliding_window", **kw: Any) -> dict[str, Any]:
    base = {"pattern": "causal_self", "mode": "fwd", "method": method, "params": '{"window": 64}',
            "backend": "flex", "n_q": 256, "n_k": 256, "density": 0.5, "block_density": 0.5, "status": "ok",
            "median_ms": 1.0, "q1_ms": 0.7, "q3_ms": 1.4, "speedup": 2.0, "tflops": 1.0, "baseline_ms": 2.0,
            "dtype": "float32", "batch": 1, "heads": 4, "kv_heads": 4, "head_dim": 64, "reps": 30}  # fmt: skip
    return {**base, **kw}


def test_multi_pass_rows_say_their_spread_is_pooled_and_list_each_pass_speedup() -> None:
    """A row merged from 3 passes: its q1-q3 pool every pass's calls (wider than the unstable threshold
    although the row is stable) and its speedup is the median of the passes': the cells say both."""
    multi = row(passes=3, pass_speedups=json.dumps([1.9, 2.0, 2.4]))
    single = row(method="dilated", passes=1, pass_speedups=None)
    (table,) = efficiency_tables([multi, single])
    by = {r["method"]: r for r in table["rows"]}
    assert by["sliding_window"]["spread"] == "0.7–1.4 (pooled, 3 passes)"
    assert by["sliding_window"]["pass_speedups"] == "1.90, 2.00, 2.40x"
    assert "3 passes" in by["sliding_window"]["reps"]
    assert by["dilated"]["spread"] == "0.7–1.4" and by["dilated"]["pass_speedups"] == ""


@pytest.mark.duckdb
def test_the_legend_states_what_speedup_spread_and_block_density_are(tmp_path: Path) -> None:
    with ResultsDB(tmp_path / "r.duckdb") as db:
        rid = db.new_run({"device": "CPU x", "commit": "abc", "dirty": False}, {})
        db.insert("efficiency", [row(passes=3, pass_speedups=json.dumps([1.9, 2.0, 2.4]))], rid)
    html = write_report(tmp_path / "r.duckdb", tmp_path).read_text()
    assert "Speedup = baseline median / row median;" not in html  # (false for multi-pass rows)
    assert "the median over the passes of each pass's (baseline median / row median)" in html
    assert "pooled q1–q3 printed can be" in html and "(pooled, 3 passes)" in html
    assert "passes 1.90, 2.00, 2.40x" in html
    assert "128x128 tiles" not in html and "in the plan's own tile size" in html
    assert "64 x 64 for vertical_slash" in html


def test_speedup_plot_labels_block_density_without_a_fixed_tile_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    captured: list[matplotlib.figure.Figure] = []
    real_png = plots._png

    def keep(fig: matplotlib.figure.Figure) -> bytes:
        captured.append(fig)
        return real_png(fig)

    monkeypatch.setattr(plots, "_png", keep)
    assert plots.speedup_vs_density([row()]) is not None
    (ax,) = captured[0].axes
    assert "128x128" not in ax.get_xlabel() and "tile size per method" in ax.get_xlabel()


@pytest.mark.duckdb
def test_merged_keeps_a_cpu_row_and_a_gpu_row_of_the_same_shape(tmp_path: Path) -> None:
    """The same row key timed on a CPU and on a GPU: two rows (the device is part of the key), each with
    its own run; on one device the later run still replaces the earlier one."""
    assert ROW_KEY[0] == "device"
    for folder, device, speedup in (("cpu", "CPU x86_64 x2", 1.1), ("gpu", "NVIDIA H100", 9.0),
                                    ("cpu2", "CPU x86_64 x2", 1.3)):  # fmt: skip
        with ResultsDB(tmp_path / folder / "results.duckdb") as db:
            rid = db.new_run({"device": device, "commit": "x"}, {})
            db.insert("efficiency", [row(speedup=speedup)], rid)
        time.sleep(0.01)  # (a later start time)
    rows, runs = merged(tmp_path, "efficiency")
    got = sorted((json.loads(r["_run"]["env"])["device"], r["speedup"]) for r in rows)
    assert got == [("CPU x86_64 x2", 1.3), ("NVIDIA H100", 9.0)]
    assert len(runs) == 2
