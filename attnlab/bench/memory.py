"""Peak memory of one call: the most memory allocated during the call above what was allocated before it
(inputs, weights and caches that exist before the call are excluded), in MiB.

- CUDA: the caching allocator's statistics (``max_memory_allocated`` after ``reset_peak_memory_stats``).
- CPU: PyTorch keeps no CPU peak counter, so the call runs once under ``torch.profiler`` with
  ``profile_memory=True`` and the peak of the running sum of its allocation and free events is taken.
  Kineto prints a few status lines on the process's stderr each time; they are filtered out.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_KINETO_LINE = re.compile(r"^(STAGE|USDT):\S+ \S+ \S+ \S+\.cpp:\d+\]")


@contextmanager
def _quiet_kineto() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file for the block; replay every line but Kineto's own."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if line.strip() and not _KINETO_LINE.match(line):
                    print(line, file=sys.stderr)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_kineto(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak MiB allocated by one call of ``fn`` above the allocation before it; None if not measurable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type == "cpu":
        return _cpu_peak_bytes(fn) / 2**20
    return None
