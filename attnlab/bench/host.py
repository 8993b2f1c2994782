"""The CPU host under a benchmark run: the C allocator's page faults, and CPU taken by other processes.

Two things made the same CPU row's speedup differ by more than 10% between two runs of ``attnlab bench`` on a
2-core VM (``benchmarks/results/cpu-2026-11-24-s13/NOTES.md``), and neither is the method's own speed:

- **Page faults that depend on the process's history.** glibc's ``malloc`` serves a large block from a fresh
  ``mmap`` (zeroed pages, one page fault per 4 KiB on first touch, about 2 us each on that VM) or from its
  heap (no faults when the memory is reused), and moves the boundary between the two after every free
  (its "dynamic mmap threshold"), and gives heap memory back to the kernel past a trim threshold that moves
  with it. So the same call faulted 24K-49K times per round in three processes that had run the same rows in
  different orders; in eager rows the faults were half of the call's CPU time. :func:`kept_freed_memory`
  fixes the allocator's policy for the timed phase instead: no ``mmap`` for allocations and no trimming, so a
  block freed by one call is reused by the next, as PyTorch's caching allocator does on CUDA and as
  tcmalloc / jemalloc (which ``torch.backends.xeon.run_cpu`` preloads) do on CPU. A timed call then
  measures the computation, with no page fault in a warmed call, whatever ran before it.
- **Other processes.** Two compute threads on two cores: while another process takes a core, every
  parallel region waits for the descheduled thread, and methods made of many small operations (chunked
  linear attention, plan estimation) slowed 2-10x while the SDPA baseline slowed 3x. :func:`cpu_sample` and
  :func:`foreign_cores` measure the CPU the rest of the machine used while a row was timed (Linux
  ``/proc``); the benchmark re-times a row that shared the machine (:mod:`attnlab.bench.efficiency`).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: glibc's defaults, restored after the timed phase
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
#: the allocator policies of ``BenchConfig.malloc``
MALLOC_POLICIES = ("keep", "default")


#: environment variables that mean the allocator's policy was chosen outside (glibc's tunables) or another
#: allocator serves malloc (a preload): the benchmark then leaves the allocator alone
_ALLOCATOR_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc and glibc's malloc is in charge (whose ``mallopt`` this
    module sets), else None: also None when the environment sets glibc's malloc policy itself or preloads a
    library (``LD_PRELOAD``, e.g. tcmalloc or jemalloc, which glibc's settings would not reach)."""
    if os.environ.get("LD_PRELOAD") or any(v in os.environ for v in _ALLOCATOR_ENV):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def kept_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """For the block, glibc's ``malloc`` keeps freed memory in the process (``mallopt``: no ``mmap`` for
    allocations, no trimming of the heap), so that a call reuses what the previous call freed instead of
    page-faulting fresh pages in. After the block glibc's default values are set back, but not its exact
    earlier state: setting either parameter turns glibc's *dynamic* mmap threshold off for the rest of the
    process (the threshold stays at the value it had reached), a lasting change of the process that runs
    the benchmark. Yields whether the policy was applied (False where ``enabled`` is False, the C library
    is not glibc (musl, macOS), another allocator is preloaded or the environment sets glibc's malloc
    policy: then nothing is changed)."""
    libc = _glibc() if enabled else None
    applied = bool(libc) and libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1  # type: ignore[union-attr]
    try:
        yield applied
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)


@dataclass(frozen=True)
class CpuSample:
    """Wall-clock seconds, the machine's busy CPU ticks (all CPUs, steal included) and this process's own."""

    t: float
    busy_ticks: int
    own_ticks: int


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> int:
    """Busy ticks of all CPUs from /proc/stat: every field but idle and iowait (steal included: time the
    hypervisor gave away is time the benchmark did not get)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


def _own_ticks() -> int:
    """User + system ticks of this process, all its threads; its child processes (compile workers) count
    as other processes, which they are for the cores."""
    with open("/proc/self/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def cpu_sample() -> CpuSample | None:
    """The machine's and this process's CPU ticks now; None where /proc is not there (not Linux)."""
    try:
        return CpuSample(time.perf_counter(), _busy_ticks(), _own_ticks())
    except (OSError, ValueError, IndexError):
        return None


def foreign_cores(a: CpuSample | None, b: CpuSample | None) -> float | None:
    """Cores' worth of CPU that other processes (and the hypervisor's steal) used between two samples:
    0.0 on a quiet machine, 1.0 when another process kept one core busy throughout; None if unknown.
    Ticks are 10 ms, so over a row's 0.3 s or more this resolves about 0.05 cores (clamped at 0)."""
    if a is None or b is None or b.t <= a.t:
        return None
    foreign = (b.busy_ticks - a.busy_ticks) - (b.own_ticks - a.own_ticks)
    return max(0.0, foreign / _HZ / (b.t - a.t))


def wait_quiet(threshold: float, max_s: float, step_s: float = 1.0) -> float:
    """Sleep in ``step_s`` steps until other processes use at most ``threshold`` cores over a step, or
    ``max_s`` seconds have passed; returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        a = cpu_sample()
        time.sleep(step_s)
        f = foreign_cores(a, cpu_sample())
        if f is None or f <= threshold:
            break
    return time.perf_counter() - start
