"""Efficiency: latency (as called and kernel), peak memory, dense-equivalent TFLOP/s, speedup over dense
SDPA, density.

A run has two phases, so that no compilation competes with a measurement (on a 2-core CPU it did):

1. **Warm**: for every (pattern, length, mode) of the run, every side that will be timed is checked
   (parity against the reference), compiled and called a few times, and its peak memory is measured.
2. **Time**: every row is timed in interleaved rounds with the dense baseline
   (:func:`~attnlab.bench.timing.measure_interleaved`): a method row's rounds hold the baseline, the method
   as called and the method's kernel; a peer's hold the baseline and the peer; the baseline's own row
   holds the baseline twice (an A/A control: its ratio shows the noise floor). Speedups are ratios of
   medians from the same rounds; nothing is derived by subtraction.

The baseline is SDPA restricted to cuDNN on CUDA (flash, mem-efficient are peers), PyTorch's default SDPA
on CPU. The control row ``softmax`` / ``sdpa`` is the same dense math through attnlab.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend

import attnlab
from attnlab.backends.base import Backend, Call
from attnlab.bench import calls
from attnlab.bench.checks import ParityChecks
from attnlab.bench.config import BenchConfig, shapes
from attnlab.bench.memory import peak_memory_mb
from attnlab.bench.timing import MIN_REPS, Timing, attention_flops, measure_interleaved
from attnlab.masks import dense_pairs
from attnlab.patterns import Pattern
from attnlab.plans import static_plan

PEERS_CUDA: dict[str, SDPBackend] = {
    "sdpa:cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa:flash": SDPBackend.FLASH_ATTENTION,
    "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION,
}
PEERS_CPU: dict[str, SDPBackend | None] = {"sdpa:default": None}
#: the control row: the baseline's dense math through attnlab (method, backend); in every group
CONTROL = ("softmax", "sdpa")
#: a row whose timed calls spread wider than this (IQR / median, on any of its sides) is flagged
#: ``unstable`` and the report prints "unstable" instead of its ratios
UNSTABLE_SPREAD = 0.25
#: runnable threads beyond the benchmark's own that make a CPU machine count as busy (see ``busy_load``)
BUSY_LOAD_MARGIN = 1.0
#: untimed calls of each side in the warm phase (the first compiles; the rest warm caches)
WARM_CALLS = 2


@dataclass(frozen=True)
class PlannedRow:
    method: str
    params: dict[str, Any]
    pattern: Pattern
    n: int
    mode: str
    #: only these backends (None: all of the method's)
    backends: tuple[str, ...] | None = None

    def backend_specs(self) -> list[Backend]:
        spec = attnlab.get(self.method)
        return [b for b in spec.backends if self.backends is None or b.name in self.backends]


def planned_rows(
    lengths: tuple[int, ...],
    methods: tuple[str, ...] | None,
    patterns: tuple[Pattern, ...] = (Pattern.CAUSAL_SELF,),
    modes: tuple[str, ...] = ("fwd",),
    budgets: str = "all",
) -> list[PlannedRow]:
    """Every (method, parameters, pattern, length, mode) a run will time, from the registry."""
    rows = []
    for name, spec in attnlab.methods().items():
        if methods is not None and name not in methods:
            continue
        for pattern in patterns:
            if pattern not in spec.patterns:
                continue
            for n in lengths:
                sets = spec.bench_params(n)
                for params in sets if budgets == "all" else sets[:1]:
                    for mode in modes:
                        rows.append(PlannedRow(name, dict(params), pattern, n, mode))
    return rows


def densities(
    spec: attnlab.MethodSpec, params: Any, n_q: int, n_k: int, causal: bool, device: torch.device
) -> tuple[float, float]:
    """(token density, block density) of the method's sparsity plan (:class:`attnlab.Plan`): the share of
    the dense pattern's (query, key) pairs it computes, and of the dense pattern's 128 x 128 tiles it
    visits. 1.0 for dense methods (no plan)."""
    if spec.mask is None:
        return 1.0, 1.0
    plan = static_plan(spec, params, n_q, n_k, causal, device)
    return plan.density, plan.block_density


@dataclass
class Entry:
    """One row of a (pattern, length, mode) group: a peer of the baseline or a (method, params, backend)."""

    method: str
    backend: str
    params: dict[str, Any]
    density: float = 1.0
    block_density: float = 1.0
    #: SDPA kernel of a dense peer (None with ``peer``: PyTorch's choice)
    sdpa_kernel: SDPBackend | None = None
    peer: bool = False
    status: str = "ok"
    peak_mem_mb: float | None = None
    compiles: int = 0

    def sides(self, x: calls.Inputs, mode: str, causal: bool) -> dict[str, Callable[[], Any]]:
        """The timed callables of this row other than the baseline: ``called`` (and ``kernel``)."""
        if self.peer:
            return {"called": calls.timed(calls.dense_fn(x, causal, self.sdpa_kernel), mode, x)}
        args = (x, self.method, causal, self.backend, self.params)
        return {
            "called": calls.timed(calls.as_called_fn(*args), mode, x),
            "kernel": calls.timed(calls.kernel_fn(*args), mode, x),
        }


def load_average() -> float | None:
    """The 1-minute load average of the machine (runnable threads, all processes); None where unknown."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def busy_load() -> float:
    """A load average above this means other processes competed with the benchmark's own threads."""
    return float(torch.get_num_threads()) + BUSY_LOAD_MARGIN


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _failure(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "oom"
    return f"error: {type(e).__name__}: {str(e)[:300]}"


class EfficiencyRun:
    """Warms every side of a config's planned rows, then times them; :meth:`rows` yields result dicts."""

    def __init__(
        self,
        cfg: BenchConfig,
        log: Callable[[str], None] = lambda s: None,
        advance: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.advance = advance
        self.checks = ParityChecks(cfg)
        self.notes: list[str] = []

    @property
    def check_rows(self) -> list[dict[str, Any]]:
        return self.checks.rows

    def plan(self) -> list[PlannedRow]:
        """The config's rows, plus the control row (softmax through attnlab's sdpa backend) in every
        group when ``methods`` leaves softmax out."""
        c = self.cfg
        rows = planned_rows(c.lengths, c.methods, c.patterns, c.modes, c.budgets)
        if c.methods is not None and "softmax" not in c.methods:
            control = planned_rows(c.lengths, ("softmax",), c.patterns, c.modes, "first")
            rows = [
                PlannedRow(r.method, r.params, r.pattern, r.n, r.mode, CONTROL[1:]) for r in control
            ] + rows
        return rows

    def groups(self) -> list[tuple[Pattern, int, str]]:
        return [(p, n, m) for p in self.cfg.patterns for n in self.cfg.lengths for m in self.cfg.modes]

    def peers(self) -> dict[str, SDPBackend | None]:
        """Dense SDPA rows; the first that runs is the baseline of its group."""
        peers: dict[str, SDPBackend | None] = (
            dict(PEERS_CUDA) if self.cfg.torch_device.type == "cuda" else dict(PEERS_CPU)
        )
        return peers if self.cfg.peers else dict(list(peers.items())[:1])

    def entry_count(self) -> int:
        """Rows the run will produce (for progress bars): peers plus (planned row x backend)."""
        plan = self.plan()
        rows = sum(len(r.backend_specs()) for r in plan)
        return rows + len(self.peers()) * len(self.groups())

    def rows(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        warmed = {}
        for group in self.groups():  # phase 1: every check and compilation before any timing
            todo = [r for r in plan if (r.pattern, r.n, r.mode) == group]
            warmed[group] = self._warm(*group, todo)
        busiest = 0.0
        for group, entries in warmed.items():  # phase 2: timing
            for row in self._time(*group, entries):
                busiest = max(busiest, row.get("load_avg") or 0.0)
                yield row
            if self.cfg.torch_device.type == "cuda":
                torch.cuda.empty_cache()
        if self.cfg.torch_device.type == "cpu" and busiest > busy_load():
            self.notes.append(
                f"the 1-minute load average reached {busiest:.1f} on {os.cpu_count()} cores while rows were timed "
                f"(above {busy_load():.0f}: other processes competed for the CPU); ratios of rows timed then "
                "(column load_avg) may not repeat on a quiet machine"
            )

    # -- phase 1 ------------------------------------------------------------------------------------

    def _warm_entry(self, entry: Entry, x: calls.Inputs, mode: str, causal: bool) -> None:
        """Call each side of ``entry`` ``WARM_CALLS`` times and measure the as-called side's peak memory."""
        before = _unique_graphs()
        try:
            sides = entry.sides(x, mode, causal)
            for fn in sides.values():
                for _ in range(WARM_CALLS):
                    fn()
            entry.peak_mem_mb = peak_memory_mb(sides["called"], self.cfg.torch_device)
        except Exception as e:
            self.log(traceback.format_exc(limit=3))
            entry.status = _failure(e)
        entry.compiles = _unique_graphs() - before
        self.advance(1)

    def _warm(self, pattern: Pattern, n: int, mode: str, todo: list[PlannedRow]) -> list[Entry]:
        c = self.cfg
        n_q, n_k = shapes(pattern, n)
        grad, causal = mode == "fwd_bwd", pattern.causal
        x = calls.Inputs.make(c, n_q, n_k, grad)
        entries = []
        for label, kernel in self.peers().items():
            entry = Entry("softmax", label, {}, sdpa_kernel=kernel, peer=True)
            self._warm_entry(entry, x, mode, causal)
            entries.append(entry)
        for r in todo:
            spec = attnlab.get(r.method)
            params = spec.make_params(r.params)
            density, block_density = densities(spec, params, n_q, n_k, causal, c.torch_device)
            call = attnlab.resolve(
                x.q, x.k, x.v, method=r.method, causal=causal, check_finite=False, **r.params
            )
            for backend in r.backend_specs():
                entry = Entry(r.method, backend.name, r.params, density, block_density)
                entries.append(entry)
                ok, why = backend.can_use(Call(spec, params, call.problem, call.scale))
                if not ok:
                    entry.status = f"refused: {why}"
                    self.advance(1)
                    continue
                passed, detail = self.checks.check(spec, backend.name, r.params, causal, pattern.cross, grad)
                if not passed:
                    entry.status = f"incorrect: {detail}"
                    self.advance(1)
                    continue
                self._warm_entry(entry, x, mode, causal)
        self.log(f"warmed {pattern.value} n={n} {mode}: {sum(e.status == 'ok' for e in entries)} rows")
        return entries

    # -- phase 2 ------------------------------------------------------------------------------------

    def _time(self, pattern: Pattern, n: int, mode: str, entries: list[Entry]) -> Iterator[dict[str, Any]]:
        c = self.cfg
        n_q, n_k = shapes(pattern, n)
        causal = pattern.causal
        x = calls.Inputs.make(c, n_q, n_k, mode == "fwd_bwd")
        flops = attention_flops(
            c.batch, c.heads, n_q, n_k, c.head_dim, c.head_dim, dense_pairs(n_q, n_k, causal), mode
        )
        common = {
            "pattern": pattern.value,
            "batch": c.batch,
            "heads": c.heads,
            "kv_heads": c.n_kv_heads,
            "n_q": n_q,
            "n_k": n_k,
            "head_dim": c.head_dim,
            "dtype": c.dtype,
            "mode": mode,
        }
        base = next((e for e in entries if e.peer and e.status == "ok"), None)
        if base is None:
            self.notes.append(f"{pattern.value} n={n} {mode}: no dense SDPA baseline ran; no speedups")
        base_fn = base.sides(x, mode, causal)["called"] if base else None
        for e in entries:
            row: dict[str, Any] = {
                **common,
                "method": e.method,
                "backend": e.backend,
                "params": json.dumps(e.params, sort_keys=True),
                "density": e.density,
                "block_density": e.block_density,
                "status": e.status,
                "baseline_of_run": e is base,
            }
            if e.status == "ok":
                row.update(self._measure(e, x, mode, causal, base_fn, flops))
            self.log(f"{pattern.value} n={n} {mode} {e.method}{e.params} {e.backend}: "
                     f"{row.get('median_ms', row['status'])}")  # fmt: skip
            self.advance(1)
            yield row

    def _measure(
        self,
        e: Entry,
        x: calls.Inputs,
        mode: str,
        causal: bool,
        base_fn: Callable[[], Any] | None,
        flops: float,
    ) -> dict[str, Any]:
        c = self.cfg
        fns = e.sides(x, mode, causal)
        if base_fn is not None:
            fns = {"baseline": base_fn, **fns}
        before = _unique_graphs()
        try:
            t = measure_interleaved(fns, c.torch_device, target_s=c.target_s, max_reps=c.max_reps)
        except Exception as err:
            self.log(traceback.format_exc(limit=3))
            return {"status": _failure(err)}
        return {
            **timing_columns(t, flops),
            "peak_mem_mb": e.peak_mem_mb,
            "compiles": e.compiles,
            "timed_compiles": _unique_graphs() - before,
            "load_avg": load_average(),
        }


def _spread_columns(prefix: str, t: Timing) -> dict[str, Any]:
    return {f"{prefix}min_ms": t.min_ms, f"{prefix}q1_ms": t.q1_ms, f"{prefix}q3_ms": t.q3_ms}


def timing_columns(t: dict[str, Timing], flops: float) -> dict[str, Any]:
    """A row's columns from its sides' timings (``called``, optional ``kernel`` and ``baseline``).

    ``median_ms``: as called; ``kernel_ms``: the kernel alone; ``baseline_ms``: the baseline's median in
    the same rounds; ``speedup`` / ``kernel_speedup``: ``baseline_ms`` over ``median_ms`` / ``kernel_ms``;
    ``tflops``: dense-equivalent FLOPs over ``median_ms``; ``unstable``: some side's IQR / median exceeds
    ``UNSTABLE_SPREAD``; ``few_reps``: fewer than ``MIN_REPS`` rounds (a single call took over 1 s).
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
        if kernel is not None:
            row["kernel_speedup"] = base.median_ms / kernel.median_ms
    spreads = [s.spread for s in t.values() if s.spread is not None]
    row["unstable"] = bool(spreads) and max(spreads) > UNSTABLE_SPREAD
    row["few_reps"] = called.reps < MIN_REPS
    return row
