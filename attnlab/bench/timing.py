"""Timing: functions timed in interleaved rounds after warm-up (CUDA events on GPU, wall clock on CPU).

Every number the benchmark reports about speed comes from :func:`measure_interleaved`: the sides of a
comparison (the dense baseline, a method as called, the same method's kernel) take turns call by call, so
they see the same clock, power, thermal and machine-load state, and each side keeps its own distribution
(min, quartiles, median). No time is ever derived by subtracting one measurement from another.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

#: at least this many timed calls per side and point ...
MIN_REPS = 12
#: ... unless one call of the slowest side takes longer than this many seconds; then only
#: ``LONG_CALL_REPS`` calls are timed and the row says so (``few_reps``)
LONG_CALL_S = 1.0
LONG_CALL_REPS = 3


@dataclass(frozen=True)
class Timing:
    """The distribution of one side's timed calls, in milliseconds.

    ``q1_ms``/``q3_ms``: first and third quartiles (inclusive method), so ``iqr_ms = q3 - q1``.
    ``peak_mem_mb`` is filled by callers that measured it (see :mod:`attnlab.bench.memory`).
    ``times_ms``: the timed calls in the order they ran (one per round of :func:`measure_interleaved`), so
    that two sides timed in the same rounds can be compared round by round (:func:`paired_ratio`).
    """

    median_ms: float
    min_ms: float
    reps: int
    peak_mem_mb: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    times_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @staticmethod
    def of(times_ms: Sequence[float]) -> Timing:
        ts = sorted(times_ms)
        if len(ts) >= 2:
            q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
        else:
            q1 = q3 = ts[0]
        return Timing(statistics.median(ts), ts[0], len(ts), None, q1, q3, tuple(times_ms))

    @property
    def iqr_ms(self) -> float | None:
        return None if self.q1_ms is None or self.q3_ms is None else self.q3_ms - self.q1_ms

    @property
    def spread(self) -> float | None:
        """IQR / median: the relative width of the middle half of the timed calls."""
        iqr = self.iqr_ms
        return None if iqr is None or self.median_ms <= 0 else iqr / self.median_ms


def paired_ratio(num: Timing, den: Timing) -> float | None:
    """The median over rounds of ``num``'s call / ``den``'s call in the same round (e.g. the baseline over
    a method: its speedup). Each round's two calls saw the same machine state, so a slow stretch that
    hits both cancels in their ratio, where a ratio of two medians keeps it when it hits one side's
    middle calls more than the other's. Both must come from the same :func:`measure_interleaved` call
    (only their lengths are checked here: two separately timed runs of equal length would pair without
    meaning); None when the lengths differ or a Timing was built without its calls."""
    a, b = num.times_ms, den.times_ms
    if not a or len(a) != len(b) or min(b) <= 0:
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


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


def repetitions(once_s: dict[str, float], target_s: float, min_reps: int, max_reps: int) -> int:
    """Rounds to time: enough to fill ``target_s``, within [``min_reps``, ``max_reps``]; only
    ``LONG_CALL_REPS`` when a single call of some side takes over ``LONG_CALL_S``."""
    if max(once_s.values()) > LONG_CALL_S:
        return min(min_reps, LONG_CALL_REPS)
    return int(min(max_reps, max(min_reps, target_s / sum(once_s.values()))))


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` sides in which every side directly follows every other equally often (a Williams
    design): rows ``(first + r) % n`` with first row ``0, 1, n-1, 2, n-2, ...``; for odd ``n`` the reversed
    rows too (2n rows). A GPU call right after a long one (cuDNN at 64K) can run a few percent slower;
    these orders give every side that position equally often."""
    if n <= 1:
        return [list(range(n))]
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    target_s: float = 0.3,
    min_reps: int = MIN_REPS,
    max_reps: int = 50,
) -> dict[str, Timing]:
    """Time each function over rounds that call them all in turn, in the orders of
    :func:`balanced_orders` (for three: a b c, b c a, c a b, c b a, a c b, b a c, ...); returns each one's
    :class:`Timing`. The rounds are rounded up to a whole number of those orders (unless the long-call
    rule leaves only ``LONG_CALL_REPS``).

    Within a round every function sees the same clock, power, thermal and load state, which back-to-back
    blocks of one function each do not (on an H100 a block of heavy calls can run a few percent slower
    than the same calls spread out; on a shared CPU another process can take a core for a while). The
    orders give every function every position and every predecessor equally often: on the H100 a kernel
    right after a long cuDNN call runs 2-5% slower at 64K, and a plain rotation (a b c, b c a, c a b) put
    one side after the baseline twice as often as another. On CUDA each call is bracketed by CUDA events
    with no synchronisation inside the loop. Peak memory is not tracked here.
    """
    once = {name: _warm_then_once(fn, device, warmup) for name, fn in fns.items()}
    reps = repetitions(once, target_s, min_reps, max_reps)
    names = list(fns)
    orders = balanced_orders(len(names))
    if reps > LONG_CALL_REPS:  # (the long-call rule's few rounds stay few)
        reps = -(-reps // len(orders)) * len(orders)
    times: dict[str, list[float]] = {name: [] for name in fns}
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in fns}
    for r in range(reps):
        for name in (names[i] for i in orders[r % len(orders)]):
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
    return {name: Timing.of(ts) for name, ts in times.items()}


def attention_flops(
    batch: int, heads: int, n_q: int, n_k: int, d: int, d_v: int, causal_pairs: int | None, mode: str
) -> float:
    """Dense-equivalent FLOPs: 2*N_q*N_k*(D + D_v) per head forward (causal: the causal pairs only);
    forward+backward counts 3.5x the forward (backward = 2.5x, FlashAttention's convention)."""
    pairs = causal_pairs if causal_pairs is not None else n_q * n_k
    fwd = 2.0 * batch * heads * pairs * (d + d_v)
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)
