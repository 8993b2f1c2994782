"""The report's figures (matplotlib's object API: no pyplot state, no global backend change)."""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

from matplotlib.figure import Figure


def _label(r: dict[str, Any]) -> str:
    params = r["params"] if r["params"] not in ("{}", "") else ""
    return f"{r['method']} {params} [{r['backend']}]".replace('"', "")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def latency_vs_length(rows: list[dict[str, Any]], pattern: str, mode: str) -> bytes | None:
    """Median latency against N_k, one line per (method, params, backend)."""
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["pattern"] == pattern and r["mode"] == mode and r["status"] == "ok":
            lines[_label(r)].append((r["n_k"], r["median_ms"]))
    if not lines:
        return None
    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    for label, pts in sorted(lines.items()):
        pts.sort()
        style = "--" if label.startswith("softmax") else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="N_k (tokens)",
        ylabel="median latency (ms)",
        title=f"latency vs length — {pattern}, {mode}",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    return _png(fig)


def speedup_vs_density(rows: list[dict[str, Any]]) -> bytes | None:
    """Speedup over the dense baseline against block density, at each group's largest length."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup") and r["method"] != "softmax"]
    if not ok:
        return None
    longest: dict[tuple[str, str], int] = {}
    for r in ok:
        key = (r["pattern"], r["mode"])
        longest[key] = max(longest.get(key, 0), r["n_k"])
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    for (pattern, mode), n in sorted(longest.items()):
        pts = [r for r in ok if r["pattern"] == pattern and r["mode"] == mode and r["n_k"] == n]
        ax.scatter(
            [r["block_density"] for r in pts],
            [r["speedup"] for r in pts],
            s=18,
            label=f"{pattern} {mode} (N={n})",
        )
    xs = [0.02 + i * 0.01 for i in range(99)]
    ax.plot(xs, [1 / x for x in xs], "k--", lw=1, label="ideal 1/density")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="block density (share of dense 128x128 tiles computed)",
        ylabel="speedup over dense SDPA",
        title="speedup vs density",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def fidelity_vs_density(rows: list[dict[str, Any]]) -> bytes | None:
    """Mean attention-mass recall and output error per (method, params, workload, pattern) vs density."""
    if not rows:
        return None
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["params"], r["workload"], r["pattern"])].append(r)
    fig = Figure(figsize=(12, 5))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    markers = {"minilm": "o", "random": "x"}
    for (method, _params, workload, pattern), rs in sorted(groups.items()):
        dens = sum(r["density"] for r in rs) / len(rs)
        rec = sum(r["mass_recall"] for r in rs) / len(rs)
        err = sum(r["out_rel_err"] for r in rs) / len(rs)
        label = f"{method} {workload} {pattern}"
        ax1.scatter([dens], [rec], marker=markers.get(workload, "s"), label=label)
        ax2.scatter([dens], [max(err, 1e-8)], marker=markers.get(workload, "s"))
    ax1.set(
        xscale="log",
        xlabel="density",
        ylabel="attention-mass recall (mean over heads)",
        title="recall of dense attention mass",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="density",
        ylabel="output relative error (mean)",
        title="output error vs dense softmax",
    )
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=5, ncol=2)
    return _png(fig)
