"""Where a dynamic sparse call's time goes at long lengths (issue 8): its estimator (q, k -> plan), the
executor's tables of that plan, and the whole call, each profiled on its own.

    PYTHONPATH=$PWD python benchmarks/dynamic_profile.py --out FILE.json [--methods block_topk,dhsa]
        [--n 131072]

Causal, B=1 H=32 H_kv=8 D=128 bf16, random inputs, each method with its defaults. Per method: one warm
call, then per stage the median of ``--reps`` CUDA-event timings (the stage alone, a fresh plan each
time so no memo is reused), then one ``torch.profiler`` pass per stage: the 12 largest CUDA kernels and
the 12 largest host operators by self time, and the count of host synchronisations (``cudaStreamSynchronize``
/ ``cudaMemcpy*`` / ``cudaDeviceSynchronize`` calls). On a CPU it runs a tiny smoke shape (interpreted).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import attnlab
from attnlab.bench.env import environment
from attnlab.plans.executor import executor_tables

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def _timed(fn: Callable[[], Any], reps: int) -> list[float]:
    """Milliseconds of ``reps`` calls, each alone between events (CUDA) or wall clock (CPU)."""
    out = []
    for _ in range(reps):
        if DEV.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _profiled(fn: Callable[[], Any]) -> dict[str, Any]:
    """The largest kernels and host operators of one call, and its host synchronisations."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if DEV.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    dev_attr = (
        "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    )
    kernels = sorted(
        ((e.key, getattr(e, dev_attr, 0.0) / 1e3, e.count) for e in events if getattr(e, dev_attr, 0.0) > 0),
        key=lambda r: -r[1],
    )[:12]
    host = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in events), key=lambda r: -r[1])[:12]
    syncs = {e.key: e.count for e in events if e.key.startswith(SYNC_OPS)}
    return {
        "kernels_ms": [{"name": k[:120], "ms": round(ms, 4), "count": c} for k, ms, c in kernels],
        "host_ms": [{"name": k[:120], "ms": round(ms, 4), "count": c} for k, ms, c in host],
        "syncs": syncs,
    }


def profile_method(method: str, n: int, reps: int) -> dict[str, Any]:
    h, h_kv, d = (32, 8, 128) if DEV.type == "cuda" else (4, 2, 32)
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, hh, n, d, device=DEV, dtype=dtype, generator=g) for hh in (h, h_kv, h_kv))
    spec = attnlab.get(method)
    op = attnlab.prepare(method, causal=True)
    op(q, k, v)  # compile, tune
    scale = d**-0.5
    params = spec.param_class()

    def estimate() -> Any:
        return spec.estimate(q, k, params, causal=True, scale=scale)

    def tables() -> Any:
        return executor_tables(estimate())

    def call() -> Any:
        return op(q, k, v)

    stages = {"estimate": estimate, "estimate+tables": tables, "call": call}
    row: dict[str, Any] = {"method": method, "n": n, "shape": [1, h, h_kv, n, d], "dtype": str(dtype)}
    for name, fn in stages.items():
        fn()
        ms = _timed(fn, reps)
        row[name] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "reps": reps}
        row[name]["profile"] = _profiled(fn)
        print(method, name, round(row[name]["median_ms"], 3), "ms", row[name]["profile"]["syncs"], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default="block_topk,dhsa,hip")
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    n = args.n if DEV.type == "cuda" else 256
    rows = []
    for m in args.methods.split(","):
        try:
            rows.append(profile_method(m, n, args.reps))
        except Exception as exc:  # a method that cannot run is recorded, the others still run
            rows.append({"method": m, "n": n, "error": repr(exc)[:500]})
            print(m, "error", repr(exc)[:200], flush=True)
        args.out.write_text(
            json.dumps({"environment": environment(DEV), "rows": rows}, indent=1, default=str)
        )


if __name__ == "__main__":
    main()
