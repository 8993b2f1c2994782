"""Efficiency: latency (as called and kernel), peak memory, dense-equivalent TFLOP/s, speedup over dense
SDPA, density.

A run has two phases, so that no compilation competes with a measurement (on a 2-core CPU it did):

1. **Warm**: for every (pattern, length, mode) of the run, every side that will be timed is checked
   (parity against the reference), compiled and called a few times, and its peak memory is measured.
2. **Time**: every row is timed in interleaved rounds with the dense baseline
   (:func:`~attnlab.bench.timing.measure_interleaved`): a method row's rounds hold the baseline, the method
   as called and the method's kernel; a peer's hold the baseline and the peer; the baseline's own row
   holds the baseline twice (an A/A control: its ratio shows the noise floor). Speedups are ratios of
   medians from the same rounds; nothing is derived by subtraction. On a CPU this phase runs in
   ``BenchConfig.timing_processes`` passes (this process, then fresh ones; a row's speedups are the median of
   its passes': :mod:`~attnlab.bench.passes`).

On a CPU both phases run with the C allocator keeping freed memory in the process (``BenchConfig.malloc``,
:func:`~attnlab.bench.host.kept_freed_memory`: no page faults in a warmed call, whatever the process ran
before), and a row whose rounds shared the machine with other processes (more than ``CONTENDED_CORES``
cores' worth of their CPU beyond the cores the benchmark leaves idle while it was timed, column
``foreign_cpu``) is timed again, up to
``BenchConfig.retimes`` times after waiting for the machine to quieten; the attempt with the least foreign CPU is kept, its row
says how many attempts there were and is flagged ``contended`` if even that one shared the machine.

The baseline is SDPA restricted to cuDNN on CUDA (flash, mem-efficient are peers), PyTorch's default SDPA
on CPU. The control row ``softmax`` / ``sdpa`` is the same dense math through attnlab. What is timed:
:mod:`~attnlab.bench.planning`; a row's columns and flags: :mod:`~attnlab.bench.row_columns`.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend

import attnlab
from attnlab.backends.base import Call
from attnlab.bench import calls, host, passes
from attnlab.bench.checks import ParityChecks
from attnlab.bench.config import BenchConfig, shapes
from attnlab.bench.memory import peak_memory_mb
from attnlab.bench.planning import CONTROL, PEERS_CPU, PEERS_CUDA, PlannedRow, densities, planned_rows
from attnlab.bench.row_columns import busy_load, load_average
from attnlab.bench.timing import MIN_REPS, Timing, attention_flops, measure_interleaved
from attnlab.masks import dense_pairs
from attnlab.patterns import Pattern

#: untimed calls of each side in the warm phase (the first compiles; the rest warm caches)
WARM_CALLS = 2
#: a CPU row timed while other processes used more than this many cores' worth of CPU is timed again ...
CONTENDED_CORES = 0.25
#: ... at most ``BenchConfig.retimes`` times (default 2), each after waiting up to ``QUIET_WAIT_S`` for the
#: machine to quieten, ...
QUIET_WAIT_S = 5.0
#: ... while the run's re-timing (waits included) has taken less than this many seconds in all
RETIME_BUDGET_S = 180.0


def spare_cores() -> int:
    """Cores the benchmark's compute threads leave idle (the machine's cores minus torch's threads): other
    processes there do not slow a row, so they count as contention only beyond these."""
    return max(0, (os.cpu_count() or 1) - torch.get_num_threads())


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
        #: seconds spent re-timing contended rows (waits included), and the rows re-timed / still contended
        self.retime_s = 0.0
        self.retimed: list[str] = []
        self.contended: list[str] = []

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
        cpu = self.cfg.torch_device.type == "cpu"
        with host.kept_freed_memory(cpu and self.cfg.malloc == "keep") as kept:
            if cpu:
                if kept:
                    policy = "freed memory kept in the process (glibc mallopt: no mmap, no trim)"
                elif self.cfg.malloc == "default":
                    policy = "the C library's own policy (malloc='default')"
                else:
                    policy = "the C library's own policy (malloc='keep' needs glibc: not applied)"
                self.notes.append(f"C allocator while rows were warmed and timed: {policy}")
            yield from self._rows()
        if self.retimed:
            self.notes.append(
                f"{len(self.retimed)} row(s) were timed again because other processes used over {CONTENDED_CORES} "
                f"cores while they were timed ({self.retime_s:.0f} s); still contended: "
                + (", ".join(self.contended) if self.contended else "none")
            )

    def _rows(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        warmed = {}
        for group in self.groups():  # phase 1: every check and compilation before any timing
            todo = [r for r in plan if (r.pattern, r.n, r.mode) == group]
            warmed[group] = self._warm(*group, todo)
        busiest = 0.0
        processes = self.cfg.timing_processes
        if processes == 1:  # one pass: each row is timed and written at once (a run cut short keeps its rows)
            for group, entries in warmed.items():
                for row in self._group_rows(*group, entries, None):
                    busiest = max(busiest, row.get("load_avg") or 0.0)
                    yield row
                if self.cfg.torch_device.type == "cuda":
                    torch.cuda.empty_cache()
        else:  # rows are written once every pass has timed them (a run cut short before then keeps none)
            share = 1.0 / processes
            first: dict[str, passes.PassResult] = {}
            for group, entries in warmed.items():
                first.update(self._time_pass(*group, entries, share, advance=True))
                if self.cfg.torch_device.type == "cuda":
                    torch.cuda.empty_cache()
            keys = [k for k, r in first.items() if isinstance(r, passes.PassTiming)]
            others, failed, logged = passes.run_passes(self.cfg.as_json(), keys, processes - 1, self.log)
            self.notes.extend(failed)
            self.retimed += logged.retimed
            self.contended += logged.contended
            self.retime_s += logged.retime_s
            if others:
                self.notes.append(
                    f"timing in {1 + len(others)} passes (this process, then {len(others)} fresh one(s), one after "
                    "another, each with its share of the rounds): speedups are the mean of the passes', times "
                    "pool their calls (attnlab.bench.passes)"
                )
            else:
                self.notes.append("rows were timed in this process only: no other timing pass finished")
            for group, entries in warmed.items():
                for row in self._group_rows(*group, entries, [first, *others]):
                    busiest = max(busiest, row.get("load_avg") or 0.0)
                    yield row
        if self.cfg.torch_device.type == "cpu" and busiest > busy_load():
            self.notes.append(
                f"the 1-minute load average reached {busiest:.1f} on {os.cpu_count()} cores while rows were timed "
                f"(above {busy_load():.0f}: other processes competed for the CPU); ratios of rows timed then "
                "(column load_avg) may not repeat on a quiet machine"
            )

    def pass_timings(self, keys: set[str]) -> dict[str, passes.PassResult]:
        """One timing pass of the rows named by ``keys`` (:func:`~attnlab.bench.passes.row_key`), in this
        process: each group's rows are built and warmed (no parity checks, no memory measurement: the first
        pass made them), then timed with this pass's share of the rounds (:mod:`attnlab.bench.passes`)."""
        cpu = self.cfg.torch_device.type == "cpu"
        share = 1.0 / self.cfg.timing_processes
        out: dict[str, passes.PassResult] = {}
        with host.kept_freed_memory(cpu and self.cfg.malloc == "keep"):
            plan = self.plan()
            warmed = {}
            for group in self.groups():
                entries = [
                    Entry("softmax", label, {}, sdpa_kernel=k, peer=True) for label, k in self.peers().items()
                ]
                for r in plan:
                    if (r.pattern, r.n, r.mode) == group:
                        entries += [Entry(r.method, b.name, r.params) for b in r.backend_specs()]
                warmed[group] = entries = [e for e in entries if self._key(*group, e) in keys]
                n_q, n_k = shapes(group[0], group[1])
                x = calls.Inputs.make(self.cfg, n_q, n_k, group[2] == "fwd_bwd")
                for e in entries:
                    self._warm_entry(e, x, group[2], group[0].causal, memory=False)
            for group, entries in warmed.items():
                out.update(self._time_pass(*group, entries, share, strict=True))
        return out

    @staticmethod
    def _key(pattern: Pattern, n: int, mode: str, e: Entry) -> str:
        return passes.row_key(pattern.value, n, mode, e.method, e.backend, e.params)

    # -- phase 1 ------------------------------------------------------------------------------------

    def _warm_entry(
        self, entry: Entry, x: calls.Inputs, mode: str, causal: bool, memory: bool = True
    ) -> None:
        """Call each side of ``entry`` ``WARM_CALLS`` times and (``memory``) measure the as-called side's peak
        memory."""
        before = _unique_graphs()
        try:
            sides = entry.sides(x, mode, causal)
            for fn in sides.values():
                for _ in range(WARM_CALLS):
                    fn()
            if memory:
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
            density, block_density = densities(
                spec, params, n_q, n_k, causal, c.torch_device, x.q, x.k, calls.method_inputs(x, r.method)
            )
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

    def _time_pass(
        self,
        pattern: Pattern,
        n: int,
        mode: str,
        entries: list[Entry],
        share: float,
        advance: bool = False,
        strict: bool = False,
    ) -> dict[str, passes.PassResult]:
        """One pass's timing of a group's rows that warmed, by row key (each with ``share`` of the rounds).
        ``strict`` (a fresh process's pass): the baseline is the group's first peer, the one the first pass
        used; if it did not warm here, the group's rows fail in this pass rather than pair with another."""
        x = calls.Inputs.make(self.cfg, *shapes(pattern, n), mode == "fwd_bwd")
        base = self._baseline(entries, strict)
        out: dict[str, passes.PassResult] = {}
        for e in entries:
            if e.status == "ok":
                key = self._key(pattern, n, mode, e)
                if strict and base is None:
                    out[key] = "error: the baseline did not run in this timing pass"
                else:
                    out[key] = self._time_entry(pattern, n, mode, e, x, base, share)
            if advance:
                self.advance(1)
        return out

    def _time_entry(
        self, pattern: Pattern, n: int, mode: str, e: Entry, x: calls.Inputs, base: Entry | None, share: float
    ) -> passes.PassResult:
        base_fn = base.sides(x, mode, pattern.causal)["called"] if base else None
        label = f"{pattern.value} n={n} {mode} {e.method}/{e.backend}"
        return self._pass(e, x, mode, pattern.causal, base_fn, share, label)

    @staticmethod
    def _baseline(entries: list[Entry], strict: bool = False) -> Entry | None:
        """The group's baseline: its first peer that ran (``strict``: its first peer, if that ran)."""
        if strict:
            first = next((e for e in entries if e.peer), None)
            return first if first is not None and first.status == "ok" else None
        return next((e for e in entries if e.peer and e.status == "ok"), None)

    def _group_rows(
        self,
        pattern: Pattern,
        n: int,
        mode: str,
        entries: list[Entry],
        results: list[dict[str, passes.PassResult]] | None,
    ) -> Iterator[dict[str, Any]]:
        """A group's rows from its passes' results (:func:`~attnlab.bench.passes.merged_columns`); with
        ``results`` None each row is timed here, in one pass, right before it is yielded."""
        c = self.cfg
        n_q, n_k = shapes(pattern, n)
        flops = attention_flops(
            c.batch, c.heads, n_q, n_k, c.head_dim, c.head_dim, dense_pairs(n_q, n_k, pattern.causal), mode
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
        x: calls.Inputs | None = None
        base = self._baseline(entries)
        if base is None:
            self.notes.append(f"{pattern.value} n={n} {mode}: no dense SDPA baseline ran; no speedups")
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
                key = self._key(pattern, n, mode, e)
                if results is None:
                    if x is None:
                        x = calls.Inputs.make(c, n_q, n_k, mode == "fwd_bwd")
                    got = [self._time_entry(pattern, n, mode, e, x, base, 1.0)]
                else:
                    got = [r[key] for r in results if key in r]
                timed = [g for g in got if isinstance(g, passes.PassTiming)]
                if got and not isinstance(got[0], passes.PassTiming):
                    row["status"] = str(got[0])  # the first pass failed: the row failed
                elif timed:
                    row.update(self._columns(e, timed, flops))
                    if len(timed) < len(got):
                        self.notes.append(
                            f"{key}: {len(got) - len(timed)} timing pass(es) failed, left out of the row"
                        )
            self.log(f"{pattern.value} n={n} {mode} {e.method}{e.params} {e.backend}: "
                     f"{row.get('median_ms', row['status'])}")  # fmt: skip
            if results is None:
                self.advance(1)
            yield row

    def _pass(
        self,
        e: Entry,
        x: calls.Inputs,
        mode: str,
        causal: bool,
        base_fn: Callable[[], Any] | None,
        share: float = 1.0,
        label: str = "",
    ) -> passes.PassResult:
        fns = e.sides(x, mode, causal)
        if base_fn is not None:
            fns = {"baseline": base_fn, **fns}
        before = _unique_graphs()
        try:
            t, foreign, attempts = self._timed_rounds(fns, label or f"{e.method}/{e.backend}", share)
        except Exception as err:
            self.log(traceback.format_exc(limit=3))
            return _failure(err)
        return passes.PassTiming(t, foreign, attempts, load_average(), _unique_graphs() - before)

    def _columns(self, e: Entry, timed: list[passes.PassTiming], flops: float) -> dict[str, Any]:
        foreign = [p.foreign for p in timed if p.foreign is not None]
        worst = max(foreign) if foreign else None
        loads = [p.load_avg for p in timed if p.load_avg is not None]
        return {
            **passes.merged_columns(timed, flops),
            "peak_mem_mb": e.peak_mem_mb,
            "compiles": e.compiles,
            "timed_compiles": sum(p.compiles for p in timed),
            "load_avg": max(loads) if loads else None,  # (the highest of the passes')
            "foreign_cpu": worst,
            "attempts": sum(p.attempts for p in timed),
            "contended": worst is not None and worst > CONTENDED_CORES + spare_cores(),
        }

    def _timed_rounds(
        self, fns: dict[str, Callable[[], Any]], label: str, share: float = 1.0
    ) -> tuple[dict[str, Timing], float | None, int]:
        """The row's interleaved rounds, the cores' worth of CPU other processes used meanwhile (CPU, Linux;
        else None) and the attempts made: on a CPU a contended attempt is repeated (see ``BenchConfig.retimes``) and the
        attempt with the least foreign CPU is kept; the choice looks at the machine, never at the times."""
        c = self.cfg
        attempts: list[tuple[float, dict[str, Timing]]] = []
        limit = (
            CONTENDED_CORES + spare_cores()
        )  # other processes on cores the benchmark leaves idle are no contention
        while True:
            start = time.perf_counter()
            a = host.cpu_sample() if c.torch_device.type == "cpu" else None
            t = measure_interleaved(
                fns,
                c.torch_device,
                target_s=c.target_s * share,
                min_reps=MIN_REPS if share == 1.0 else passes.pass_min_reps(share),
                max_reps=max(1, math.ceil(c.max_reps * share)),
            )
            foreign = host.foreign_cores(a, host.cpu_sample())
            if foreign is None:
                return t, None, len(attempts) + 1
            if attempts:
                self.retime_s += time.perf_counter() - start
            attempts.append((foreign, t))
            if foreign <= limit or len(attempts) > c.retimes or self.retime_s >= RETIME_BUDGET_S:
                break
            if len(attempts) == 1:
                self.retimed.append(label)
            self.retime_s += host.wait_quiet(CONTENDED_CORES, QUIET_WAIT_S)
        foreign, t = min(attempts, key=lambda ft: ft[0])
        if foreign > limit:
            self.contended.append(label)
        return t, foreign, len(attempts)
