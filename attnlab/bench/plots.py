"""The report's figures (matplotlib's object API: no pyplot state, no global backend change).

Every line or point set has its own colour and marker (colour by method, marker by backend or workload),
legends sit outside the axes, and the x axis of latency plots is ticked at the measured lengths.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

#: 20 colours that stay apart (tab10, then tab20's light variants); methods take them in order
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
    "#dbdb8d", "#9edae5",
)  # fmt: skip
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h")
BASELINE_COLOUR = "#000000"


class Styles:
    """A stable (colour, marker) per key: colour from the first part, marker from the second."""

    def __init__(self) -> None:
        self.colours: dict[str, str] = {}
        self.markers: dict[str, str] = {}

    def colour(self, name: str) -> str:
        if name not in self.colours:
            self.colours[name] = PALETTE[len(self.colours) % len(PALETTE)]
        return self.colours[name]

    def marker(self, name: str) -> str:
        if name not in self.markers:
            self.markers[name] = MARKERS[len(self.markers) % len(MARKERS)]
        return self.markers[name]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _legend_outside(ax: Axes, fontsize: int = 8) -> None:
    ax.legend(
        fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False
    )


def _nice_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 steps within [lo, hi] (log axes), at least two."""
    ticks = [k * 10.0**e for e in range(-4, 7) for k in (1, 2, 5) if lo <= k * 10.0**e <= hi]
    return ticks if len(ticks) >= 2 else [lo, hi]


def _plain_ticks(ax: Axes, axis: str, values: list[float] | None = None) -> None:
    """Numbers as numbers ("4096", "0.5"), not "4x10^3": at ``values``, or at 1-2-5 steps of a log axis."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    if values is None and a.get_scale() == "log":
        values = _nice_ticks(lo, hi)
    if values:
        a.set_major_locator(FixedLocator(values))
        a.set_minor_locator(NullLocator())
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    a.set_major_formatter(fmt)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo, hi)


def latency_vs_length(rows: list[dict[str, Any]], pattern: str, mode: str) -> bytes | None:
    """PNG of :func:`latency_figure`, or None when no row of this pattern and mode was timed."""
    fig = latency_figure(rows, pattern, mode)
    return _png(fig) if fig else None


def latency_figure(rows: list[dict[str, Any]], pattern: str, mode: str) -> Figure | None:
    """As-called median latency against N_k, one line per (method, backend, budget rank by density)."""
    ok = [r for r in rows if r["pattern"] == pattern and r["mode"] == mode and r["status"] == "ok"]
    if not ok:
        return None
    by_n: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        by_n[(r["method"], r["backend"], r["n_k"])].append(r)
    lines: dict[tuple[str, str, int], list[tuple[int, float]]] = defaultdict(list)
    for (method, backend, n), rs in by_n.items():
        for rank, r in enumerate(sorted(rs, key=lambda r: r["density"])):
            lines[(method, backend, rank)].append((n, r["median_ms"]))
    ranks = max(k[2] for k in lines) + 1
    styles = Styles()
    fig = Figure(figsize=(10, 5.5))
    ax = fig.add_subplot()
    order = sorted(lines, key=lambda k: (not k[1].startswith("sdpa:"), k[0] != "softmax", k))
    for method, backend, rank in order:
        pts = sorted(lines[(method, backend, rank)])
        peer = backend.startswith("sdpa:")
        label = f"{method} [{backend}]" + (f" budget {rank + 1}" if ranks > 1 else "")
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            ":" if peer else ("-" if rank == 0 else "--"),
            color=BASELINE_COLOUR
            if backend == "sdpa:default"
            else styles.colour("peer:" + backend if peer else method),
            marker=styles.marker(backend),
            ms=6,
            lw=1.4,
            label=label,
        )
    lengths = sorted({r["n_k"] for r in ok})
    ax.set(xscale="log", yscale="log", xlabel="N_k (tokens)", ylabel="median latency as called (ms)")
    ax.set_title(f"latency vs length — {pattern}, {mode}")
    _plain_ticks(ax, "x", lengths)
    _plain_ticks(ax, "y")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    return fig


def speedup_vs_density(rows: list[dict[str, Any]]) -> bytes | None:
    """As-called speedup over the dense baseline against block density, at each group's largest length.
    Rows flagged unstable are drawn hollow (their timed calls spread too wide to trust the ratio; the
    report's tables print "unstable" for them), so a run on a busy machine still gets its plot."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup") and r["method"] != "softmax"]
    if not ok:
        return None
    longest: dict[tuple[str, str], int] = {}
    for r in ok:
        key = (r["pattern"], r["mode"])
        longest[key] = max(longest.get(key, 0), r["n_k"])
    styles = Styles()
    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    for (pattern, mode), n in sorted(longest.items()):
        pts = [r for r in ok if r["pattern"] == pattern and r["mode"] == mode and r["n_k"] == n]
        colour, marker = styles.colour(f"{pattern} {mode}"), styles.marker(f"{pattern} {mode}")
        for unstable in (False, True):
            part = [r for r in pts if bool(r.get("unstable")) == unstable]
            if part:
                ax.scatter(
                    [r["block_density"] for r in part],
                    [r["speedup"] for r in part],
                    s=36,
                    marker=marker,
                    facecolors="none" if unstable else colour,
                    edgecolors=colour,
                    label=f"{pattern} {mode} (N={n})" + (", unstable (hollow)" if unstable else ""),
                )
    lo = min(min(r["block_density"] for r in ok), 0.5)
    xs = [lo * (1.0 / lo) ** (i / 50) for i in range(51)]
    ax.plot(xs, [1 / x for x in xs], "k--", lw=1, label="ideal 1/density")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="block density (share of the plan's tiles computed; tile size per method)",
        ylabel="speedup over dense SDPA (as called)",
        title="speedup vs density",
    )
    _plain_ticks(ax, "x")
    _plain_ticks(ax, "y")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    return _png(fig)


def fidelity_vs_density(rows: list[dict[str, Any]]) -> bytes | None:
    """Mean attention-mass recall (methods with a plan) and mean output error relative to uniform
    attention, per (method, params, workload, pattern), against density."""
    if not rows:
        return None
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["params"], r["workload"], r["pattern"])].append(r)
    styles = Styles()
    fig = Figure(figsize=(13, 5))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for (method, _params, workload, pattern), rs in sorted(groups.items()):
        dens = sum(r["density"] for r in rs) / len(rs)
        colour, marker = styles.colour(method), styles.marker(f"{workload} {pattern}")
        rec = [r["mass_recall"] for r in rs if r.get("mass_recall") is not None]
        if rec:
            ax1.scatter([dens], [sum(rec) / len(rec)], s=36, color=colour, marker=marker)
        errs = [float(r["out_err_vs_uniform"]) for r in rs if r.get("out_err_vs_uniform") is not None]
        if errs:
            label = f"{method} {workload} {pattern}"
            ax2.scatter([dens], [sum(errs) / len(errs)], s=36, color=colour, marker=marker, label=label)
    ax1.set(xscale="log", xlabel="density", ylabel="attention-mass recall (mean over heads)")
    ax1.set_title("recall of dense attention mass (methods with a plan)")
    ax2.axhline(1.0, color="k", ls="--", lw=1, label="uniform attention (error 1)")
    ax2.set(xscale="log", xlabel="density", ylabel="||O - O_dense|| / ||O_uniform - O_dense||")
    ax2.set_ylim(bottom=0)
    ax2.set_title("output error relative to uniform attention (mean; 0 = exact)")
    for ax in (ax1, ax2):
        _plain_ticks(ax, "x")
        ax.grid(True, which="both", alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        _legend_outside(ax2, fontsize=7)
    return _png(fig)
