"""Two runs of the same configuration compared row by row: how far apart are their speedups? (A first run
on an empty compile cache against a warm rerun; the same headline points measured twice.)"""

from __future__ import annotations

import statistics
from pathlib import Path

from attnlab.bench.planning import CONTROL
from attnlab.bench.sources import ROW_KEY, Row
from attnlab.bench.store import ResultsDB

#: the agreement reported: the share of rows whose two speedups are within this fraction of each other
WITHIN = 0.10


def timed_rows(db_path: Path) -> dict[tuple, Row]:
    """The latest run's timed rows (the baseline's own excluded), by row key."""
    with ResultsDB(db_path, read_only=True) as db:
        run_id = db.latest_run()
        rows = db.rows("efficiency", run_id) if run_id else []
    return {
        tuple(r.get(c) for c in ROW_KEY): r
        for r in rows
        if r["status"] == "ok" and not r.get("baseline_of_run")
    }


def agreement_table(a_db: Path, b_db: Path) -> list[str]:
    """Markdown rows: how far run A's speedups are from run B's, row by row (ratio A / B), as called and
    kernel, over all rows timed in both and over the rows stable in both."""
    a, b = timed_rows(a_db), timed_rows(b_db)
    pairs = [(a[k], b[k]) for k in a if k in b and a[k].get("speedup") and b[k].get("speedup")]
    if not pairs:
        return []
    stable = [(x, y) for x, y in pairs if not x.get("unstable") and not y.get("unstable")]
    control = [(x, y) for x, y in pairs if (x["method"], x["backend"]) == CONTROL]
    lines = [
        "| rows | as called | kernel |",
        "|---|---|---|",
        f"| all timed rows | {agreement(pairs, 'speedup')} | {agreement(pairs, 'kernel_speedup')} |",
        f"| rows stable in both runs | {agreement(stable, 'speedup')} | {agreement(stable, 'kernel_speedup')} |",
        f"| the control rows (softmax / sdpa) | {agreement(control, 'speedup')} | "
        f"{agreement(control, 'kernel_speedup')} |",
    ]
    if any(x.get("paired_speedup") and y.get("paired_speedup") for x, y in pairs):  # (newer databases)
        lines.append(
            f"| all timed rows, paired (round-by-round) speedups | {agreement(pairs, 'paired_speedup')} | "
            f"{agreement(pairs, 'paired_kernel_speedup')} |"
        )
    return lines


def agreement(pairs: list[tuple[Row, Row]], col: str) -> str:
    """'median R, k/n within 10%, range lo-hi' of the ratios ``a[col] / b[col]``."""
    ratios = sorted(x[col] / y[col] for x, y in pairs if x.get(col) and y.get(col))
    if not ratios:
        return "—"
    within = sum(abs(r - 1) <= WITHIN for r in ratios)
    return (
        f"median {statistics.median(ratios):.3f}, {within}/{len(ratios)} within {WITHIN:.0%}, "
        f"range {ratios[0]:.2f}-{ratios[-1]:.2f}"
    )


def load_text(db_path: Path) -> str:
    """'median L (max M)' of the 1-minute load average the run's rows were timed at ('unknown' if not kept)."""
    loads = sorted(r["load_avg"] for r in timed_rows(db_path).values() if r.get("load_avg") is not None)
    return f"median {statistics.median(loads):.1f} (max {loads[-1]:.1f})" if loads else "unknown"


def foreign_text(db_path: Path) -> str:
    """'median F (max G) cores; R re-timed, C contended': other processes' CPU use while the run's rows were
    timed (column foreign_cpu; 'unknown' for runs that did not measure it)."""
    rows = list(timed_rows(db_path).values())
    cores = sorted(r["foreign_cpu"] for r in rows if r.get("foreign_cpu") is not None)
    if not cores:
        return "unknown"
    retimed = sum((r.get("attempts") or 1) > (r.get("passes") or 1) for r in rows)  # (one attempt per pass)
    contended = sum(bool(r.get("contended")) for r in rows)
    return (
        f"median {statistics.median(cores):.2f} (max {cores[-1]:.2f}) cores; "
        f"{retimed} rows re-timed, {contended} still contended"
    )
