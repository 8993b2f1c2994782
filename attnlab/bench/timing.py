"""Timing and memory: median latency after warm-up (CUDA events on GPU), and peak memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    reps: int
    peak_mem_mb: float | None  # None on CPU (PyTorch tracks no CPU peak)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_then_once(fn: Callable[[], object], device: torch.device, warmup: int) -> float:
    """Seconds of one call of ``fn`` after ``warmup`` untimed calls (compilation happens there)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return max(time.perf_counter() - t0, 1e-6)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 2,
    target_s: float = 0.3,
    min_reps: int = 3,
    max_reps: int = 50,
) -> Timing:
    """Median wall time of ``fn`` over repeated runs after ``warmup`` calls (compilation happens there).

    The repetition count adapts: enough runs to fill about ``target_s`` seconds, within
    [``min_reps``, ``max_reps``]. On CUDA each run is bracketed by CUDA events.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    once = _warm_then_once(fn, device, warmup)
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    reps = int(min(max_reps, max(min_reps, target_s / once)))
    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends, strict=True):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return Timing(statistics.median(times), min(times), reps, peak)


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    target_s: float = 0.3,
    min_reps: int = 3,
    max_reps: int = 50,
) -> dict[str, Timing]:
    """Median time of each function over rounds that call them in turn, each round starting one function
    later (a, b, c, b, c, a, c, a, b, ...).

    Used for ratios between kernels: within a round every function sees the same clock, power and thermal
    state, which back-to-back blocks of one function each do not (on an H100 a block of heavy calls can
    run a few percent slower than the same calls spread out). The rotation gives every function every
    position: on the H100 a kernel that always ran right after cuDNN measured 3% slower than the same kernel
    further down the round. Peak memory is not tracked here.
    """
    once = {name: _warm_then_once(fn, device, warmup) for name, fn in fns.items()}
    reps = int(min(max_reps, max(min_reps, target_s / sum(once.values()))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            if device.type == "cuda":  # no sync inside the loop: the GPU queue stays full
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name].append((start, end))
            else:
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}
    return {name: Timing(statistics.median(ts), min(ts), len(ts), None) for name, ts in times.items()}


def attention_flops(
    batch: int, heads: int, n_q: int, n_k: int, d: int, d_v: int, causal_pairs: int | None, mode: str
) -> float:
    """Dense-equivalent FLOPs: 2*N_q*N_k*(D + D_v) per head forward (causal: the causal pairs only);
    forward+backward counts 3.5x the forward (backward = 2.5x, FlashAttention's convention)."""
    pairs = causal_pairs if causal_pairs is not None else n_q * n_k
    fwd = 2.0 * batch * heads * pairs * (d + d_v)
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)
