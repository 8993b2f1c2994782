"""benchmarks/hotpath.py (the hot-path measurement of issue 7) runs end to end on CPU with --quick."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_hotpath_quick_cpu(tmp_path: Path) -> None:
    # no TRITON_INTERPRET (conftest sets it for this process): sigmoid then runs its eager backend on CPU,
    # as a user's CPU call does, instead of seconds per call in Triton's interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hotpath.py"), "--device", "cpu", "--quick"]
    res = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-4000:]
    data = json.loads((tmp_path / "hotpath.json").read_text())
    assert data["env"]["commit"] and data["env"]["torch"] and data["env"]["device"]

    host = data["host"]
    assert "error" not in host, host.get("error")
    variants = {"sdpa", "sliding_window.raw_flex"} | {
        f"{m}.{kind}"
        for m in ("softmax", "sliding_window", "sigmoid")
        for kind in ("bind", "op", "attention")
    }
    assert set(host["us_per_call"]) == variants
    assert all(s["median_us"] > 0 and s["min_us"] > 0 for s in host["us_per_call"].values())
    assert isinstance(host["derived"]["sigmoid.overhead_attention_median_us"], float)

    rows = data["first_call"]["rows"]
    assert "error" not in data["first_call"]
    assert {(r["method"], r["n"]) for r in rows} == {
        (m, n) for m in ("sigmoid", "sliding_window", "sdpa") for n in (256, 320, 384)
    }
    assert all(r["first_s"] > 0 and r["second_s"] > 0 for r in rows)
    assert all(r["gc_in_first_call"] >= 0 and r["cuda_segments_in_first_call"] == 0 for r in rows)  # CPU
    assert all(
        r["cuda_device_allocs_in_first_call"] == 0 and r["cuda_reserved_mb_in_first_call"] == 0 for r in rows
    )
    assert isinstance(data["first_call"]["expandable_segments"], bool)
    assert all(r["bucket"] is None and "meets_5ms" not in r for r in rows if r["method"] == "sdpa")

    configs = data["as_called_vs_kernel"]["configs"]
    assert len(configs) == 6  # 3 methods x causal / non-causal at N=512
    for tag, c in configs.items():
        assert "error" not in c, (tag, c.get("error"))
        assert c["correct"] and c["checks"], (tag, c["checks"])
        assert {"sdpa", "as_called", "kernel"} <= set(c["timing"])
        assert all(s["median_ms"] > 0 for s in c["timing"].values())
        assert c["derived"]["as_called_over_kernel"] > 0
    assert "raw_flex_dynamic" in configs["sliding_window_N512_causal"]["timing"]

    assert isinstance(data["cuda_graph"]["error"], str)  # CUDA only
    assert "== hotpath at" in res.stdout and "called/kernel" in res.stdout  # the summary table
