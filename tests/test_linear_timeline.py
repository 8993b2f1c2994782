"""benchmarks/linear_timeline.py's accounting of a call's kernel intervals (busy time, idle gaps)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():  # type: ignore[no-untyped-def]
    bench = str(ROOT / "benchmarks")
    sys.path.insert(0, bench)  # (it imports linear_bench from its folder)
    try:
        spec = importlib.util.spec_from_file_location(
            "linear_timeline", ROOT / "benchmarks" / "linear_timeline.py"
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(bench)
    return mod


def test_busy_span_and_gaps_of_overlapping_and_separate_kernels() -> None:
    mod = _module()
    # spin ends at 100 us; kernels: a [110, 200], b [150, 260] (overlaps a), c [300, 400], d [1400, 1500]
    ks = [(110.0, 200.0, "a"), (150.0, 260.0, "b"), (300.0, 400.0, "c"), (1400.0, 1500.0, "d")]
    row = mod._iteration(ks, 100.0, top=2)
    assert row["busy_ms"] == 0.35  # (260 - 110) + 100 + 100 us
    assert row["span_ms"] == 1.4  # 1500 - 100
    assert row["lead_ms"] == 0.01
    assert row["idle_ms"] == 1.05  # 10 + 40 + 1000 us
    assert row["kernels"] == 4
    assert row["gaps"] == [
        {"us": 1000.0, "after": "c", "before": "d"},
        {"us": 40.0, "after": "b", "before": "c"},
    ]


def test_trace_events_other_than_device_work_are_ignored() -> None:
    mod = _module()
    trace = {
        "traceEvents": [
            {"cat": "kernel", "ts": 5, "dur": 2, "name": "k2"},
            {"cat": "cpu_op", "ts": 0, "dur": 50, "name": "aten::mm"},
            {"cat": "gpu_memset", "ts": 1, "dur": 1, "name": "Memset"},
            {"cat": "cuda_runtime", "ts": 0, "dur": 3, "name": "cudaLaunchKernel"},
        ]
    }
    assert mod._kernels(trace) == [(1.0, 2.0, "Memset"), (5.0, 7.0, "k2")]
