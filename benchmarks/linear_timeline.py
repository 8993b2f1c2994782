"""Where the wall time of a linear-family forward + backward goes beyond its kernels' time (diagnostic).

``linear_bench.py`` times each side with CUDA events while the GPU is still busy with the previous side
(the host runs ahead); its profile sums kernel time. When the two differ, this script says why: per side,
the GPU is first kept busy by a spin kernel (``torch.cuda._sleep``) so that the host enqueues the whole
call ahead of it, as in the benchmark's rounds, then the call runs under torch.profiler (CPU and CUDA
activity). Per iteration it reports the CUDA-event time, the union of the call's kernel intervals (busy),
the span from the spin's end to the call's last kernel, the host time of the call (perf_counter, no
sync), and the largest idle gaps between the call's kernels with the kernels on each side, and (without
the profiler) the event time with and without the spin ahead. cuDNN SDPA runs the same way.

    python benchmarks/linear_timeline.py --shape 1x32x32768 --methods gated_delta --out timeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linear_bench import sides

#: Spin-kernel cycles enqueued ahead of each profiled call (about 10 ms at the H100's clocks).
SPIN_CYCLES = 20_000_000


def _kernels(trace: dict[str, Any]) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every GPU kernel, memcpy and memset in a Chrome trace, by start."""
    cats = {"kernel", "gpu_memcpy", "gpu_memset"}
    ev = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), str(e.get("name", "?")))
          for e in trace.get("traceEvents", []) if e.get("cat") in cats]  # fmt: skip
    return sorted(ev)


def _iteration(ks: list[tuple[float, float, str]], spin_end: float, top: int) -> dict[str, Any]:
    busy, cur_s, cur_e = 0.0, None, None
    gaps: list[tuple[float, str, str]] = []
    prev_name = "(spin)"
    prev_end = spin_end
    for s, e, name in ks:
        if s > prev_end:
            gaps.append((s - prev_end, prev_name, name))
        if cur_e is None or s > cur_e:
            if cur_e is not None and cur_s is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
        if e >= prev_end:
            prev_end, prev_name = e, name
    if cur_e is not None and cur_s is not None:
        busy += cur_e - cur_s
    gaps.sort(reverse=True)
    return {
        "busy_ms": round(busy / 1000, 4),
        "span_ms": round((prev_end - spin_end) / 1000, 4),
        "lead_ms": round((ks[0][0] - spin_end) / 1000, 4) if ks else None,
        "idle_ms": round(sum(g for g, _, _ in gaps) / 1000, 4),
        "kernels": len(ks),
        "gaps": [{"us": round(g, 1), "after": a[:60], "before": b[:60]} for g, a, b in gaps[:top]],
    }


def _event_ms(fn: Callable[[], Any], reps: int, spin: bool) -> list[float]:
    out = []
    for _ in range(reps):
        if spin:
            torch.cuda._sleep(SPIN_CYCLES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def _host_ms(fn: Callable[[], Any], reps: int = 5) -> list[float]:
    """Host seconds of ``fn`` (ms) while a long spin keeps the GPU busy: the launch work alone when the
    call never waits for the GPU (>= the spin's length when it does)."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(SPIN_CYCLES * 5)
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
        torch.cuda.synchronize()
    return out


def _checks_off(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with ``attnlab.settings.check_values`` off (no gate / beta reduction, no host wait)."""
    from attnlab import settings

    def call() -> Any:
        old = settings.check_values
        settings.check_values = False
        try:
            return fn()
        finally:
            settings.check_values = old

    return call


def _count_kernels(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return len(_kernels(json.load(f)))


def timeline(
    fn: Callable[[], Any], iters: int = 3, top: int = 8, before: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """The report above for one side's call ``fn`` (already warm); ``before``: the GPU is kept busy by that
    call (another side's, as in the benchmark's rounds, its kernels counted first and left out) instead
    of the spin kernel."""
    from torch.profiler import ProfilerActivity, profile

    n_before = _count_kernels(before) if before is not None else 0
    rows = []
    for _ in range(iters):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            if before is None:
                torch.cuda._sleep(SPIN_CYCLES)
            else:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            host = time.perf_counter() - t0
            end.record()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                ks = _kernels(json.load(f))
        if before is None:
            spin = [k for k in ks if "sleep" in k[2].lower() or "spin" in k[2].lower()]
        else:
            spin = ks[:n_before]
        spin_end = max((k[1] for k in spin), default=ks[0][0] if ks else 0.0)
        own = [k for k in ks if k not in spin]
        row = _iteration(own, spin_end, top)
        row["event_ms"] = round(start.elapsed_time(end), 4)
        row["host_ms"] = round(host * 1000, 4)
        rows.append(row)
    med = statistics.median
    if before is not None:
        return {"after": "another side's call", "iterations": rows}
    return {
        "after": "spin",
        "iterations": rows,
        "event_ms_back_to_back_median": round(med(_event_ms(fn, 10, spin=False)), 4),
        "event_ms_spin_ahead_median": round(med(_event_ms(fn, 10, spin=True)), 4),
        "host_ms_median": round(med(_host_ms(fn)), 4),
        "checks_off": {
            "event_ms_back_to_back_median": round(med(_event_ms(_checks_off(fn), 10, spin=False)), 4),
            "host_ms_median": round(med(_host_ms(_checks_off(fn))), 4),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="1x32x32768", help="BxHxN")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--methods", default="gated_delta")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument(
        "--after", default="", help="also profile each side right after this side's call (e.g. cudnn_sdpa)"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    b, h, n = (int(x) for x in args.shape.split("x"))
    s = sides(b, h, n, args.head_dim, tuple(args.methods.split(",")), fla=False)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "shape": args.shape, "sides": {}}
    calls: dict[str, Callable[[], Any]] = {}
    for name, (fn, wrt, do) in s.items():

        def call(fn: Callable[[], Tensor] = fn, wrt: list[Tensor] = wrt, do: Tensor = do) -> Any:
            return torch.autograd.grad(fn(), wrt, do)

        for _ in range(3):
            call()
        calls[name] = call
    torch.cuda.synchronize()
    for name, call in calls.items():
        result["sides"][name] = timeline(call, args.iters)
        if args.after and args.after != name:
            result["sides"][f"{name} after {args.after}"] = timeline(
                call, args.iters, before=calls[args.after]
            )
        print(json.dumps({name: result["sides"][name]})[:4000], flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
