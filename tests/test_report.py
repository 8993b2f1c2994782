"""The HTML report as a reader meets it: every cell its own row, reasons printed, notes shown, plots legible."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from attnlab.bench import plots
from attnlab.bench.report import write_report
from attnlab.bench.report_tables import efficiency_tables, fidelity_table
from attnlab.bench.store import ResultsDB

ROOT = Path(__file__).resolve().parents[1]
OLD_CPU_DB = ROOT / "benchmarks/results/cpu-2026-11-22/results.duckdb"


def row(method: str, n: int, ms: float, status: str = "ok", **kw: Any) -> dict[str, Any]:
    base = {"pattern": "causal_self", "mode": "fwd", "method": method, "params": "{}", "backend": "x",
            "n_q": n, "n_k": n, "density": 1.0, "block_density": 1.0, "status": status, "median_ms": ms,
            "speedup": 2.0 / ms, "tflops": 1.0, "baseline_ms": 2.0}  # fmt: skip
    return {**base, **kw}


def test_report_cells_show_their_own_rows_and_density_per_length() -> None:
    rows = [
        row("softmax", 64, 2.0),
        row("softmax", 128, 8.0),
        row("sliding_window", 64, 1.0, density=0.5, params='{"window": 32}'),
        row("sliding_window", 128, 1.0, "oom", density=0.25, params='{"window": 32}'),
    ]
    (table,) = efficiency_tables(rows)
    cells = [(r["method"], r["n"], r.get("ms", r.get("status")), r["density"]) for r in table["rows"]]
    assert cells == [
        ("softmax", "64", "2", "1"),
        ("softmax", "128", "8", "1"),
        ("sliding_window", "64", "1", "0.5"),
        ("sliding_window", "128", "oom", "0.25"),
    ]


def test_unstable_rows_print_unstable_instead_of_a_ratio_and_refusals_collapse_with_their_reason() -> None:
    why = "refused: FlexAttention has no backward on CPU (PyTorch raises NotImplementedError); use CUDA"
    rows = [
        row("softmax", 64, 2.0, backend="sdpa", unstable=True, kernel_ms=1.9, kernel_speedup=1.05),
        row("softmax", 64, 2.0, backend="flex", status=why),
        row("softmax", 128, 2.0, backend="flex", status=why),
    ]
    (table,) = efficiency_tables(rows)
    control, refused = table["rows"]
    assert control["speedup"] == control["kernel_speedup"] == "unstable"
    assert control["role"].startswith("control")
    assert refused["n"] == "64, 128" and refused["status"] == "refused"
    assert refused["reason"].startswith("FlexAttention has no backward on CPU")


def test_rows_timed_on_a_busy_cpu_are_marked() -> None:
    from attnlab.bench.report_tables import busy_above

    above = busy_above({"device_type": "cpu", "threads": 2})
    assert above == 3.0 and busy_above({"device_type": "cuda", "threads": 16}) is None
    rows = [row("softmax", 64, 2.0, load_avg=5.3), row("softmax", 128, 2.0, load_avg=1.9)]
    (table,) = efficiency_tables(rows, above)
    assert [r["busy"] for r in table["rows"]] == ["busy (load 5.3)", ""]


def test_fidelity_table_says_na_and_labels_causal_rows_of_an_encoder() -> None:
    def fid(method: str, recall: float | None, pattern: str = "causal_self") -> dict[str, Any]:
        return {"workload": "minilm", "pattern": pattern, "method": method, "params": "{}", "n": 512,
                "layer": "layer0", "head": 0, "density": 1.0, "block_density": 1.0, "out_rel_err": 0.5,
                "out_err_vs_uniform": 0.4, "mass_recall": recall, "model_causal": False}  # fmt: skip

    old_sigmoid = fid("sigmoid", 1.0)  # older databases stored a fake 1.0 for sigmoid
    table = fidelity_table([fid("softmax", 1.0), old_sigmoid, fid("softmax", 1.0, "noncausal_self")], [])
    by = {(t["method"], t["pattern"].split(" ")[0]): t for t in table}
    assert by[("sigmoid", "causal_self")]["recall_mean"] == "n/a"
    assert by[("softmax", "causal_self")]["recall_mean"] == "1"
    assert "bidirectional encoder" in by[("softmax", "causal_self")]["pattern"]
    assert "bidirectional" not in by[("softmax", "noncausal_self")]["pattern"]


def test_latency_plot_gives_every_line_its_own_colour_and_marker_and_ticks_the_lengths() -> None:
    methods = ["softmax", "sigmoid", "sliding_window", "streaming", "dilated", "block_local"]
    rows = []
    for m in methods:
        for backend in ("flex", "sdpa_mask", "eager"):
            for n in (512, 1024, 2048):
                rows.append(row(m, n, n / 100, backend=backend))
    fig = plots.latency_figure(rows, "causal_self", "fwd")
    assert fig is not None
    (ax,) = fig.axes
    styles = [(line.get_color(), line.get_marker()) for line in ax.get_lines()]
    assert len(styles) == 18 and len(set(styles)) == 18
    assert len({c for c, _ in styles}) == len(methods)  # colour by method, marker by backend
    assert list(ax.get_xticks()) == [512, 1024, 2048]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["512", "1024", "2048"]
    fig.canvas.draw()  # the legend sits right of the axes, not over the lines
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1


@pytest.mark.duckdb
def test_notes_reach_the_html(tmp_path: Path) -> None:
    with ResultsDB(tmp_path / "r.duckdb") as db:
        run_id = db.new_run({"device": "cpu", "commit": "abc", "dirty": True}, {"fidelity": True})
        db.insert("notes", [{"note": "workload minilm skipped: pip install 'attnlab[minilm]'"}], run_id)
    html = write_report(tmp_path / "r.duckdb", tmp_path).read_text()
    assert "workload minilm skipped: pip install &#39;attnlab[minilm]&#39;" in html
    assert "fidelity was requested but produced no rows" in html
    assert "uncommitted changes" in html


@pytest.mark.duckdb
def test_the_report_reads_a_database_of_an_older_version_without_changing_it(tmp_path: Path) -> None:
    db = tmp_path / "old.duckdb"
    shutil.copy(OLD_CPU_DB, db)
    before = db.read_bytes()
    html = write_report(db, tmp_path).read_text()
    assert db.read_bytes() == before
    assert 'data-method="block_local"' in html and "n/a" in html  # sigmoid's stored 1.0 shows as n/a


def test_speedup_plot_draws_unstable_rows_hollow_instead_of_dropping_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run on a busy machine (every row flagged unstable) still gets its speedup plot; unstable points
    are hollow and say so in the legend, stable ones filled."""
    import matplotlib.figure

    lone = [row("sliding_window", 64, 1.0, block_density=0.5, unstable=True)]
    assert plots.speedup_vs_density(lone) is not None
    captured: list[matplotlib.figure.Figure] = []
    real_png = plots._png

    def keep(fig: matplotlib.figure.Figure) -> bytes:
        captured.append(fig)
        return real_png(fig)

    monkeypatch.setattr(plots, "_png", keep)
    rows = [row("sliding_window", 64, 1.0, block_density=0.5),
            row("dilated", 64, 0.8, block_density=0.4, unstable=True)]  # fmt: skip
    assert plots.speedup_vs_density(rows) is not None
    (ax,) = captured[0].axes
    filled, hollow = ax.collections[:2]
    assert len(filled.get_facecolor()) == 1 and filled.get_facecolor()[0][3] == 1.0
    assert len(hollow.get_facecolor()) == 0 and len(hollow.get_edgecolor()) == 1
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["causal_self fwd (N=64)", "causal_self fwd (N=64), unstable (hollow)"]
