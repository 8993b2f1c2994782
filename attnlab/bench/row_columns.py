"""A timed row's columns from its sides' timings, and the flags that say how far to trust them."""

from __future__ import annotations

import os
from typing import Any

import torch

from attnlab.bench.timing import MIN_REPS, Timing, paired_ratio

#: a row whose timed calls spread wider than this (IQR / median, on any of its sides) is flagged
#: ``unstable`` and the report prints "unstable" instead of its ratios
UNSTABLE_SPREAD = 0.25
#: runnable threads beyond the benchmark's own that make a CPU machine count as busy (see ``busy_load``)
BUSY_LOAD_MARGIN = 1.0


def load_average() -> float | None:
    """The 1-minute load average of the machine (runnable threads, all processes); None where unknown."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def busy_load() -> float:
    """A load average above this means other processes competed with the benchmark's own threads."""
    return float(torch.get_num_threads()) + BUSY_LOAD_MARGIN


def _spread_columns(prefix: str, t: Timing) -> dict[str, Any]:
    return {f"{prefix}min_ms": t.min_ms, f"{prefix}q1_ms": t.q1_ms, f"{prefix}q3_ms": t.q3_ms}


def timing_columns(t: dict[str, Timing], flops: float) -> dict[str, Any]:
    """A row's columns from its sides' timings (``called``, optional ``kernel`` and ``baseline``).

    ``median_ms``: as called; ``kernel_ms``: the kernel alone; ``baseline_ms``: the baseline's median in
    the same rounds; ``speedup`` / ``kernel_speedup``: ``baseline_ms`` over ``median_ms`` / ``kernel_ms``;
    ``tflops``: dense-equivalent FLOPs over ``median_ms``; ``unstable``: some side's IQR / median exceeds
    ``UNSTABLE_SPREAD``; ``few_reps``: fewer than ``MIN_REPS`` rounds (a single call took over 1 s).
    ``paired_speedup`` / ``paired_kernel_speedup``: the same speedups round by round
    (:func:`~attnlab.bench.timing.paired_ratio`: the median of the baseline's call over the side's call
    in each round), less sensitive to a slow stretch of a shared machine than the ratio of medians.
    """
    called, kernel, base = t["called"], t.get("kernel"), t.get("baseline")
    row: dict[str, Any] = {
        "median_ms": called.median_ms,
        **_spread_columns("", called),
        "reps": called.reps,
        "tflops": flops / (called.median_ms * 1e-3) / 1e12,
    }
    if kernel is not None:
        row.update(kernel_ms=kernel.median_ms, **_spread_columns("kernel_", kernel))
    if base is not None:
        row.update(baseline_ms=base.median_ms, **_spread_columns("baseline_", base))
        row["speedup"] = base.median_ms / called.median_ms
        row["paired_speedup"] = paired_ratio(base, called)
        if kernel is not None:
            row["kernel_speedup"] = base.median_ms / kernel.median_ms
            row["paired_kernel_speedup"] = paired_ratio(base, kernel)
    spreads = [s.spread for s in t.values() if s.spread is not None]
    row["unstable"] = bool(spreads) and max(spreads) > UNSTABLE_SPREAD
    row["few_reps"] = called.reps < MIN_REPS
    return row
