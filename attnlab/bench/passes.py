"""Timing passes in fresh processes (CPU): a row is timed in ``BenchConfig.timing_processes`` processes, one
after another, and its speedups are the mean of theirs.

Why: on a 2-core VM the same CPU row's speedup moved 10-30% between two runs of ``attnlab bench`` even with the
allocator fixed and contended rows re-timed (``benchmarks/results/cpu-2026-11-24-s13/NOTES.md``): one process
out of three, or one stretch of minutes, ran one kind of kernel slower, and more rounds in the same process do
not average that out. So on a CPU the timing phase makes K passes: the benchmark's own process times every row
with 1/K of the rounds, then K - 1 fresh processes of the same Python (``python -m attnlab.bench.passes``)
each warm the rows that pass timed (no parity checks: the first process made them) and time them again, the
same way. The passes of one row are minutes apart and in different processes. Seven passes (the CPU default
since session 20; three before): with three, odd passes of a row still moved its speedup in 1-12 rows of 108
between a first run and a warm rerun. A row's speedups are the mean of its passes', not their median: some
rows' passes fall on two levels, process by process (eager softcap forward+backward: 0.32 or 0.38 in a run's
seven passes, about half on each), and a median then flips between the levels with the majority (0.87 and
1.16 between two runs in s20), where the mean moves by a fraction of the gap (the same two runs: every row
within 0.95-1.07; ``benchmarks/results/cpu-2026-11-25-s20/NOTES.md``).

A row's columns (:func:`merged_columns`): ``speedup``, ``paired_speedup``, ``kernel_speedup`` and
``paired_kernel_speedup`` are the mean over the passes of each pass's value; the time columns (median, min,
quartiles, reps) pool every pass's calls; ``unstable`` uses each side's median over the passes of its spread
(IQR / median within a pass: the levels of different passes do not widen it); ``passes`` counts the passes and
``pass_speedups`` lists each pass's speedup (as called); ``few_reps`` says a pass had the long-call rule's few
rounds. A pass that timed other sides than the first (its baseline missing) is not merged. With one pass the
columns are that pass's, as before.

On a CPU with several passes the rows reach the database only once every pass is done (a run killed during the
fresh processes' passes keeps no efficiency rows); with one pass (CUDA) each row is written as it is timed.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.bench.row_columns import UNSTABLE_SPREAD, timing_columns
from attnlab.bench.timing import LONG_CALL_REPS, MIN_REPS, Timing

#: seconds one fresh process may take for its pass (warm and time every row) before it is stopped
PASS_TIMEOUT_S = 3600.0
#: the speedup columns whose merged value is the mean of the passes' values
SPEEDUPS = ("speedup", "paired_speedup", "kernel_speedup", "paired_kernel_speedup")


@dataclass(frozen=True)
class PassTiming:
    """One pass's timing of one row: each side's :class:`Timing` (``baseline``, ``called``, ``kernel``), the
    cores' worth of CPU other processes used meanwhile (None where unknown), the attempts made, the 1-minute
    load average right after the row's rounds and the graphs compiled while they ran."""

    timings: dict[str, Timing]
    foreign: float | None
    attempts: int
    load_avg: float | None = None
    compiles: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "times": {side: list(t.times_ms) for side, t in self.timings.items()},
            "foreign": self.foreign,
            "attempts": self.attempts,
            "load_avg": self.load_avg,
            "compiles": self.compiles,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> PassTiming:
        times = {s: Timing.of(ts) for s, ts in d["times"].items()}
        return PassTiming(times, d["foreign"], d["attempts"], d.get("load_avg"), d.get("compiles", 0))


@dataclass
class PassLog:
    """What a pass's process re-timed because other processes took the CPU (labels), what stayed contended
    and the seconds that took: the parent adds every pass's to its notes."""

    retimed: list[str] = field(default_factory=list)
    contended: list[str] = field(default_factory=list)
    retime_s: float = 0.0


#: a pass's result for one row: its timing, or the status of a failure ("error: ...", "oom")
PassResult = PassTiming | str


def row_key(pattern: str, n: int, mode: str, method: str, backend: str, params: dict[str, Any]) -> str:
    """The key that names one row in every pass (a JSON string)."""
    return json.dumps([pattern, n, mode, method, backend, params], sort_keys=True)


def pass_min_reps(share: float) -> int:
    """Rounds per side at least in one pass when a pass takes ``share`` of a row's rounds (>= 4, so that a
    pass's quartiles mean something; balanced orders round it up further)."""
    return max(4, math.ceil(MIN_REPS * share))


def merged_columns(passes: list[PassTiming], flops: float) -> dict[str, Any]:
    """A row's timing columns from its passes (see the module docstring)."""
    sides = list(passes[0].timings)
    passes = [p for p in passes if list(p.timings) == sides]  # (a pass that timed other sides: not merged)
    if len(passes) == 1:
        return {**timing_columns(passes[0].timings, flops), "passes": 1, "pass_speedups": None}
    pooled = {s: Timing.of([x for p in passes for x in p.timings[s].times_ms]) for s in sides}
    row = timing_columns(pooled, flops)
    per = [timing_columns(p.timings, flops) for p in passes]
    for col in SPEEDUPS:
        values = [r[col] for r in per if r.get(col) is not None]
        if col in row:
            row[col] = statistics.fmean(values) if values else None
    spreads: list[float] = []
    for s in sides:
        within = [x for x in (p.timings[s].spread for p in passes) if x is not None]
        if within:
            spreads.append(statistics.median(within))
    row["unstable"] = bool(spreads) and max(spreads) > UNSTABLE_SPREAD
    # (a pass with the long-call rule's few rounds; a pass's own minimum is at least 4, above that rule's 3)
    row["few_reps"] = any(p.timings[sides[0]].reps <= LONG_CALL_REPS for p in passes)
    row["passes"] = len(passes)
    row["pass_speedups"] = (
        json.dumps([round(r["speedup"], 4) for r in per]) if all(r.get("speedup") for r in per) else None
    )
    return row


def run_passes(
    cfg_json: dict[str, Any], keys: list[str], count: int, log: Callable[[str], None] = lambda s: None
) -> tuple[list[dict[str, PassResult]], list[str], PassLog]:
    """Time the rows ``keys`` of the config ``cfg_json`` (``BenchConfig.as_json()``) in ``count`` fresh
    processes, one after another: ([each pass's results by key], notes on passes that failed, their
    re-timing together)."""
    results: list[dict[str, PassResult]] = []
    notes: list[str] = []
    total = PassLog()
    if not keys:
        return results, notes, total
    with tempfile.TemporaryDirectory(prefix="attnlab-pass-") as tmp:
        cfg_path, keys_path = Path(tmp) / "config.json", Path(tmp) / "keys.json"
        cfg_path.write_text(json.dumps(cfg_json))
        keys_path.write_text(json.dumps(keys))
        for i in range(count):
            out = Path(tmp) / f"pass{i}.json"
            log(f"timing pass {i + 2} of {count + 1} in a fresh process")
            cmd = [sys.executable, "-m", "attnlab.bench.passes", str(cfg_path), str(keys_path), str(out)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=PASS_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                notes.append(f"timing pass {i + 2} did not finish within {PASS_TIMEOUT_S:.0f} s: left out")
                continue
            if done.returncode != 0 or not out.exists():
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                notes.append(
                    f"timing pass {i + 2} failed (exit {done.returncode}): left out; " + " | ".join(tail)
                )
                continue
            raw = json.loads(out.read_text())
            results.append(
                {k: v if isinstance(v, str) else PassTiming.from_json(v) for k, v in raw["rows"].items()}
            )
            total.retimed += raw["retimed"]
            total.contended += raw["contended"]
            total.retime_s += raw["retime_s"]
    return results, notes, total


def main(argv: list[str]) -> int:
    """``python -m attnlab.bench.passes CONFIG KEYS OUT``: one timing pass of the rows KEYS (a JSON list of
    :func:`row_key` s) of the benchmark config CONFIG (``BenchConfig.as_json()``), written to OUT as a JSON
    object {"rows": {key: :meth:`PassTiming.as_json` or a failure status}, "retimed": [...], "contended":
    [...], "retime_s": s}."""
    from attnlab.bench.config import BenchConfig
    from attnlab.bench.efficiency import EfficiencyRun

    cfg_path, keys_path, out = (Path(a) for a in argv)
    cfg = BenchConfig.from_json(json.loads(cfg_path.read_text()))
    keys = set(json.loads(keys_path.read_text()))
    run = EfficiencyRun(cfg)
    results = run.pass_timings(keys)
    rows = {k: v if isinstance(v, str) else v.as_json() for k, v in results.items()}
    out.write_text(
        json.dumps(
            {"rows": rows, "retimed": run.retimed, "contended": run.contended, "retime_s": run.retime_s}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
