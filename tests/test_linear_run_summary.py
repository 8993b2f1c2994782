"""benchmarks/gpu/linear_run_summary.py reads the committed device runs' JSON (bench rows, checks, profile,
sweep, timeline)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "h100-2026-11-25-s23" / "linear"


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "linear_run_summary", ROOT / "benchmarks" / "gpu" / "linear_run_summary.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_json_gives_checks_rows_and_profile() -> None:
    out = _module().lines(json.loads((RUNS / "run5_final_40b9564.json").read_text()))
    assert any(x.startswith("check attnlab gated_delta pass") for x in out)
    assert "1x32x32768 fwd_bwd gated_delta 10.0386 (0.557)" in out
    assert any(x.startswith("profile gated_delta 9.287") for x in out)


def test_sweep_and_timeline_json() -> None:
    mod = _module()
    sweep = mod.lines(json.loads((RUNS / "run4_sweep_11be7ff.json").read_text()))
    assert any(x.startswith("sweep gated_delta dh_v2 BV64 1.02") for x in sweep)
    timeline = mod.lines(json.loads((RUNS / "run2_timeline_136a220.json").read_text()))
    assert any(x.startswith("timeline gated_delta after cudnn_sdpa") for x in timeline)
    assert sum(x.startswith("   {'event_ms'") for x in timeline) >= 3
