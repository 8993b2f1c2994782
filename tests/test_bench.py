"""The benchmark end to end on a tiny CPU workload: results database, report, and the page in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.bench.config import BenchConfig, shapes
from attnlab.bench.fidelity import has_recall
from attnlab.bench.planning import planned_rows
from attnlab.bench.runner import run
from attnlab.bench.store import ResultsDB
from attnlab.bench.timing import attention_flops, measure_interleaved
from attnlab.patterns import Pattern

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def tiny(out: Path, **kw: object) -> BenchConfig:
    cfg = BenchConfig(
        device="cpu",
        lengths=(128,),
        modes=("fwd", "fwd_bwd"),
        heads=2,
        head_dim=64,
        workloads=("random",),
        fidelity_length=128,
        fidelity_heads=2,
        target_s=0.01,
        max_reps=3,
        out=out,
    )
    return cfg.with_(**kw)


#: one method of each kind the benchmark must handle: dense softmax, sigmoid (no recall), a static plan, a
#: dynamic plan, a stateful linear method with required tensor inputs (every method is timed by
#: `attnlab bench` itself; on a CPU here each one costs compiles)
BENCH_METHODS = ("softmax", "sigmoid", "sliding_window", "block_topk", "gla")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("bench")
    result = run(tiny(out, methods=BENCH_METHODS))
    return out, result


@pytest.mark.duckdb
def test_run_writes_every_method_with_environment(bench_run: tuple[Path, object]) -> None:
    out, _result = bench_run
    with ResultsDB(out / "results.duckdb") as db:
        runs = db.runs()
        assert len(runs) == 1
        env = json.loads(runs[0]["env"])
        for key in ("device", "torch", "attnlab", "commit", "python"):
            assert env.get(key), key
        eff = db.rows("efficiency", runs[0]["run_id"])
        fid = db.rows("fidelity", runs[0]["run_id"])
        checks = db.rows("checks", runs[0]["run_id"])
        assert runs[0]["commit"] == env["commit"] and runs[0]["dirty"] == env["dirty"]
    assert isinstance(env["dirty"], bool) and env["commit_source"] in ("git", "file")  # never unknown here
    assert {r["method"] for r in eff} == set(BENCH_METHODS)
    ok = [r for r in eff if r["status"] == "ok"]
    assert ok and all(r["median_ms"] > 0 and r["tflops"] > 0 and r["speedup"] > 0 for r in ok)
    assert {r["mode"] for r in ok} == {"fwd", "fwd_bwd"}
    for r in ok:  # every timed side keeps its spread; the baseline's own time in the same rounds too
        assert r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["baseline_min_ms"] <= r["baseline_q1_ms"] <= r["baseline_ms"] <= r["baseline_q3_ms"]
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["median_ms"])
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] > 0  # measured on CPU too
        assert r["timed_compiles"] == 0, r  # everything compiled in the warm phase, before any timing
        assert r["load_avg"] is not None and r["load_avg"] >= 0
        assert isinstance(r["unstable"], bool) and r["reps"] == 3 and r["few_reps"]  # tiny() asks for 3
        attnlab_row = not r["backend"].startswith("sdpa:")
        assert (r["kernel_ms"] is not None) == attnlab_row, r  # SDPA peers have no separate kernel time
        if attnlab_row:
            assert r["kernel_min_ms"] <= r["kernel_q1_ms"] <= r["kernel_ms"] <= r["kernel_q3_ms"]
            assert r["kernel_speedup"] == pytest.approx(r["baseline_ms"] / r["kernel_ms"])
    for pattern in ("causal_self", "noncausal_self"):  # a baseline and the control row in every group
        for mode in ("fwd", "fwd_bwd"):
            group = [r for r in ok if r["pattern"] == pattern and r["mode"] == mode]
            assert [r["backend"] for r in group if r["baseline_of_run"]] == ["sdpa:default"]
            assert any((r["method"], r["backend"]) == ("softmax", "sdpa") for r in group)
    for r in eff:  # every row that was not timed says why
        assert r["status"] == "ok" or r["status"].startswith(("refused:", "incorrect:", "error:", "oom"))
    assert all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    assert {r["method"] for r in fid} == set(BENCH_METHODS)
    for r in fid:
        assert r["out_rel_err"] >= 0 and r["out_err_vs_uniform"] >= 0 and 0 < r["density"] <= 1
        if not has_recall(attnlab.get(r["method"])):  # no plan (sigmoid, variants, linear): n/a, never 1.0
            assert r["mass_recall"] is None
        else:
            assert 0.0 <= r["mass_recall"] <= 1.0 + 1e-6
        if r["method"] == "softmax":
            assert r["out_rel_err"] < 1e-5 and r["out_err_vs_uniform"] < 1e-4
            assert r["mass_recall"] == pytest.approx(1.0)


@pytest.mark.duckdb
def test_runs_accumulate_in_one_database(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, methods=("softmax",), modes=("fwd",), fidelity=False)
    run(cfg, report=False)
    run(cfg, report=False)
    with ResultsDB(tmp_path / "results.duckdb") as db:
        assert len(db.runs()) == 2


@pytest.mark.duckdb
def test_rows_reach_the_database_file_before_it_is_closed(tmp_path: Path) -> None:
    """A run killed mid-way (e.g. by a GPU time limit) must leave its rows in the .duckdb file itself."""
    import shutil

    db = ResultsDB(tmp_path / "live.duckdb")
    run_id = db.new_run({"device": "cpu", "commit": "x"}, {})
    db.insert("checks", [{"method": "softmax", "backend": "sdpa", "passed": True}], run_id=run_id)
    shutil.copy(tmp_path / "live.duckdb", tmp_path / "copy.duckdb")  # the file alone, no .wal beside it
    with ResultsDB(tmp_path / "copy.duckdb") as copy:
        assert [r["method"] for r in copy.rows("checks", run_id)] == ["softmax"]
    db.close()


@pytest.mark.duckdb
def test_report_has_tables_and_plots(bench_run: tuple[Path, object]) -> None:
    out, _ = bench_run
    html = (out / "report.html").read_text()
    for name in BENCH_METHODS:
        assert f'data-method="{name}"' in html
    assert "data:image/png;base64," in html
    for png in ("latency_causal_self_fwd.png", "speedup_vs_density.png", "fidelity_vs_density.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(bench_run: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = bench_run
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    page = (out / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for name in BENCH_METHODS:
        assert f'data-method="{name}"' in dom.stdout, f"{name} has no row in the rendered page"
    assert dom.stdout.count("<img") >= 3
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,2000", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000


def test_planned_rows_cover_the_registry_and_scale_budgets() -> None:
    rows = planned_rows((4096, 65536), None, (Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_CROSS), ("fwd",), "all")
    assert {r.method for r in rows} == set(attnlab.methods())
    windows = {r.n: r.params["window"] for r in rows if r.method == "sliding_window"}
    assert windows[65536] > windows[4096]


def test_cpu_preset_times_a_registered_subset_and_all_means_every_method() -> None:
    from attnlab.bench.config import CPU_METHODS

    cpu, cuda = BenchConfig.preset("cpu"), BenchConfig.preset("cuda")
    assert cpu.methods == CPU_METHODS and set(CPU_METHODS) <= set(attnlab.methods())
    assert "softmax" in CPU_METHODS and len(CPU_METHODS) < len(attnlab.methods())
    assert cuda.methods is None  # the H100 protocol times every method
    assert cpu.with_(methods=("all",)).methods is None
    assert cpu.with_(methods=None).methods == CPU_METHODS
    assert cpu.with_(methods=("gla",)).methods == ("gla",)


def test_interleaved_timing_calls_each_function_in_balanced_orders(monkeypatch: pytest.MonkeyPatch) -> None:
    # the order is under test, not the long-call rule (a loaded CI machine can take > 1 s for the sizing call)
    monkeypatch.setattr("attnlab.bench.timing.LONG_CALL_S", float("inf"))
    calls: list[str] = []
    x = torch.randn(64, 64)

    def fn(name: str, work: int):  # type: ignore[no-untyped-def]
        def run() -> None:
            calls.append(name)
            for _ in range(work):
                x @ x

        return run

    fns = {"a": fn("a", 1), "b": fn("b", 60), "c": fn("c", 12)}
    t = measure_interleaved(fns, torch.device("cpu"), warmup=1, min_reps=4, max_reps=4)
    # 4 rounds asked, rounded up to the 6 orders of three sides
    assert set(t) == {"a", "b", "c"} and t["a"].reps == t["b"].reps == t["c"].reps == 6
    assert t["b"].median_ms > t["c"].median_ms > t["a"].median_ms > 0
    timed = calls[6:]  # after warm-up and sizing
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    pairs = Counter((r[i], r[i + 1]) for r in rounds for i in range(2))
    assert len(pairs) == 6 and set(pairs.values()) == {2}  # every ordered pair adjacent equally often


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_balanced_orders_give_every_side_every_predecessor_equally_often(n: int) -> None:
    from attnlab.bench.timing import balanced_orders

    rows = balanced_orders(n)
    assert all(sorted(r) == list(range(n)) for r in rows)
    pairs = Counter((r[i], r[i + 1]) for r in rows for i in range(n - 1))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1


def test_flops_and_shapes() -> None:
    assert attention_flops(1, 1, 4, 4, 8, 8, None, "fwd") == 2 * 16 * 16
    assert attention_flops(1, 1, 4, 4, 8, 8, 10, "fwd_bwd") == 2 * 10 * 16 * 3.5
    assert shapes(Pattern.CAUSAL_CROSS, 1024) == (256, 1024)
    assert shapes(Pattern.CAUSAL_SELF, 1024) == (1024, 1024)


@pytest.mark.duckdb
def test_without_duckdb_a_run_writes_json_lines_that_report_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU machine without duckdb: the run writes results.jsonl row by row (no report); `attnlab report
    --db results.jsonl` loads it into results.duckdb beside it with every row, then reports; a second report
    loads nothing again."""
    import sys

    from typer.testing import CliRunner

    from attnlab.cli import app

    cfg = tiny(tmp_path, methods=("softmax", "sliding_window"), modes=("fwd",), fidelity=False)
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb -> ImportError
    result = run(cfg)
    monkeypatch.undo()
    assert result.db_path == tmp_path / "results.jsonl" and result.report is None
    assert not (tmp_path / "results.duckdb").exists()
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert Counter(x["table"] for x in lines)["efficiency"] == result.efficiency_rows > 0
    cli = CliRunner().invoke(app, ["report", "--db", str(tmp_path / "results.jsonl")])
    assert cli.exit_code == 0, cli.output
    assert (tmp_path / "report.html").exists()
    with ResultsDB(tmp_path / "results.duckdb", read_only=True) as db:
        (only,) = db.runs()
        assert only["run_id"] == result.run_id and only["started"] is not None
        rows = db.rows("efficiency", result.run_id)
    assert len(rows) == result.efficiency_rows
    timed = [x["row"] for x in lines if x["table"] == "efficiency"]
    assert sorted((r["method"], r["backend"], r["median_ms"]) for r in rows) == sorted(
        (r["method"], r["backend"], r["median_ms"]) for r in timed
    )
    again = CliRunner().invoke(app, ["report", "--db", str(tmp_path / "results.jsonl")])
    assert again.exit_code == 0 and "not loaded again" in again.output and result.run_id in again.output
    with ResultsDB(tmp_path / "results.duckdb", read_only=True) as db:
        assert len(db.runs()) == 1 and len(db.rows("efficiency", result.run_id)) == len(rows)
    # a row written after the load (a run still going): the next report adds it and says so
    extra = next(x for x in (tmp_path / "results.jsonl").read_text().splitlines() if '"efficiency"' in x)
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write(extra + "\n")
    grown = CliRunner().invoke(app, ["report", "--db", str(tmp_path / "results.jsonl")])
    assert grown.exit_code == 0, grown.output
    assert "added the rows written since" in grown.output and f"loaded 1 rows of run(s) {result.run_id}" in (
        " ".join(grown.output.split())
    )
    with ResultsDB(tmp_path / "results.duckdb", read_only=True) as db:
        assert len(db.rows("efficiency", result.run_id)) == len(rows) + 1
