"""The report's tables, as plain dicts for the template: one row per (method, params, backend, length).

Efficiency rows keep their own density (budgets scale with the length), print the reason of a row that
was not timed, and print "unstable" instead of a ratio whose timed calls spread too wide
(:data:`attnlab.bench.row_columns.UNSTABLE_SPREAD`). Rows of older databases lack the newer columns: their
cells are left empty.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from attnlab.bench.planning import CONTROL
from attnlab.bench.row_columns import BUSY_LOAD_MARGIN


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _role(r: dict[str, Any]) -> str:
    if r.get("baseline_of_run"):
        return "baseline (A/A: vs itself in the same rounds)"
    if r["backend"].startswith("sdpa:"):
        return "peer"
    if (r["method"], r["backend"]) == CONTROL:
        return "control: the baseline's math through attnlab"
    return ""


def _row_order(r: dict[str, Any]) -> tuple[Any, ...]:
    rank = 0 if r["backend"].startswith("sdpa:") else (1 if (r["method"], r["backend"]) == CONTROL else 2)
    return (rank, r["method"] != "softmax", r["method"], r["backend"], r["params"], r["n_k"])


def busy_above(env: dict[str, Any]) -> float | None:
    """The load average above which a row of this run counts as timed on a busy machine (CPU runs only)."""
    if env.get("device_type") != "cpu" or not env.get("threads"):
        return None
    return float(env["threads"]) + BUSY_LOAD_MARGIN


def _busy(r: dict[str, Any], above: float | None) -> str:
    """'busy (load 5.3)' for a CPU row timed while other processes competed for the cores; 'shared (0.8
    cores)' for one that other processes' CPU use measured while it was timed left contended even after
    re-timing (column ``contended``)."""
    if r.get("contended") and r.get("foreign_cpu") is not None:
        return f"shared ({r['foreign_cpu']:.1f} cores)"
    load = r.get("load_avg")
    return f"busy (load {load:.1f})" if above is not None and load is not None and load > above else ""


def _pass_speedups(r: dict[str, Any]) -> str:
    """'1.02, 1.10, 1.05x': each timing pass's speedup as called, for a row merged from several passes
    (its ``speedup`` is their median); '' for a single pass."""
    if (r.get("passes") or 1) <= 1 or not r.get("pass_speedups"):
        return ""
    try:
        values = json.loads(r["pass_speedups"])
    except (TypeError, json.JSONDecodeError):
        return ""
    return ", ".join(f"{v:.2f}" for v in values) + "x" if values else ""


def _cells(r: dict[str, Any], busy: float | None) -> dict[str, Any]:
    """The timed columns of one ok row. With several timing passes the ms columns and q1–q3 pool every
    pass's calls while the speedups are the mean of the passes' (:mod:`attnlab.bench.passes`): the
    spread says "pooled" and each pass's speedup is listed."""
    unstable = bool(r.get("unstable"))
    passes = r.get("passes") or 1
    spread = ""
    if r.get("q1_ms") is not None and r.get("q3_ms") is not None:
        spread = f"{fmt(r['q1_ms'])}–{fmt(r['q3_ms'])}" + (
            f" (pooled, {passes} passes)" if passes > 1 else ""
        )
    return {
        "ms": fmt(r["median_ms"]),
        "spread": spread,
        "min": fmt(r.get("min_ms")),
        "kernel_ms": fmt(r.get("kernel_ms")) if r.get("kernel_ms") is not None else "",
        "baseline_ms": fmt(r.get("baseline_ms")) if r.get("baseline_ms") is not None else "",
        "speedup": "unstable" if unstable else _ratio(r.get("speedup")),
        "kernel_speedup": "unstable" if unstable and r.get("kernel_ms") else _ratio(r.get("kernel_speedup")),
        "unstable": unstable,
        "tflops": fmt(r.get("tflops")),
        "mem": fmt(r.get("peak_mem_mb")),
        "pass_speedups": "" if unstable else _pass_speedups(r),
        "reps": f"{r.get('reps')}"
        + (f" ({passes} passes)" if passes > 1 else "")
        + (" (few: calls > 1 s)" if r.get("few_reps") else ""),
        "busy": _busy(r, busy),
    }


def efficiency_tables(rows: list[dict[str, Any]], busy: float | None = None) -> list[dict[str, Any]]:
    """One table per (pattern, mode); a series that was not timed at any length with the same reason
    collapses into one row listing its lengths. Rows timed at a load average above ``busy`` are marked."""
    tables = []
    for pattern, mode in sorted({(r["pattern"], r["mode"]) for r in rows}):
        sel = sorted((r for r in rows if r["pattern"] == pattern and r["mode"] == mode), key=_row_order)
        series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in sel:
            series[(r["method"], r["backend"])].append(r)
        out = []
        for rs in series.values():
            statuses = {r["status"] for r in rs}
            if len(statuses) == 1 and "ok" not in statuses:
                first = rs[0]
                out.append(_untimed(first, ", ".join(str(r["n_k"]) for r in rs), statuses.pop()))
                continue
            for r in rs:
                if r["status"] != "ok":
                    out.append(_untimed(r, str(r["n_k"]), r["status"]))
                    continue
                out.append({**_label(r), "n": str(r["n_k"]), "ok": True, **_cells(r, busy)})
        tables.append({"pattern": pattern, "mode": mode, "rows": out})
    return tables


def _label(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": r["method"],
        "backend": r["backend"],
        "params": r["params"] if r["params"] != "{}" else "",
        "role": _role(r),
        "density": fmt(r.get("density")),
        "block_density": fmt(r.get("block_density")),
    }


def _untimed(r: dict[str, Any], lengths: str, status: str) -> dict[str, Any]:
    kind, _, reason = status.partition(":")
    return {**_label(r), "n": lengths, "ok": False, "status": kind, "reason": reason.strip() or kind}


def recall_defined(method: str) -> bool:
    """False for registered methods without a plan (older databases stored a fake 1.0 for them)."""
    import attnlab
    from attnlab.bench.fidelity import has_recall

    try:
        return has_recall(attnlab.get(method))
    except attnlab.UnknownMethodError:
        return True


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def fidelity_table(rows: list[dict[str, Any]], eff: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, pattern, method, params, N): means over layers and heads (and the worst head), with
    the as-called forward speedup of the same method, budget, pattern and length in this run, if timed."""
    speed: dict[tuple[str, str, str, int], list[str]] = defaultdict(list)
    for r in eff:
        if r["status"] == "ok" and r["mode"] == "fwd" and r.get("speedup") and r["n_q"] == r["n_k"]:
            value = "unstable" if r.get("unstable") else f"{r['speedup']:.2f}x"
            speed[(r["method"], r["params"], r["pattern"], r["n_k"])].append(f"{value} [{r['backend']}]")
    groups: dict[tuple[str, str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["workload"], r["pattern"], r["method"], r["params"], r["n"])].append(r)
    out = []
    for (workload, pattern, method, params, n), rs in sorted(groups.items(), key=_fid_order):
        rec = (
            [r["mass_recall"] for r in rs if r.get("mass_recall") is not None]
            if recall_defined(method)
            else []
        )
        unif = [r["out_err_vs_uniform"] for r in rs if r.get("out_err_vs_uniform") is not None]
        rel = [r["out_rel_err"] for r in rs]
        label = pattern
        if pattern.startswith("causal") and rs[0].get("model_causal") is False:
            label = f"{pattern} (causal mask on a bidirectional encoder's Q/K)"
        out.append(
            {
                "workload": workload,
                "pattern": label,
                "method": method,
                "params": params if params != "{}" else "",
                "n": n,
                "density": fmt(_mean([r["density"] for r in rs])),
                "block_density": fmt(
                    _mean([r["block_density"] for r in rs if r.get("block_density") is not None])
                ),
                "err_unif_mean": fmt(_mean(unif)),
                "err_unif_max": fmt(max(unif)) if unif else "—",
                "rel_err_mean": fmt(_mean(rel)),
                "recall_mean": fmt(_mean(rec), 4) if rec else "n/a",
                "recall_min": fmt(min(rec), 4) if rec else "n/a",
                "speedup": ", ".join(speed.get((method, params, pattern, n), [])) or "—",
            }
        )
    return out


def _fid_order(item: tuple[tuple[str, str, str, str, int], Any]) -> tuple[Any, ...]:
    workload, pattern, method, params, n = item[0]
    return (workload, pattern, method != "softmax", method, params, n)
