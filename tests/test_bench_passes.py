"""Timing passes in fresh processes (attnlab.bench.passes): a CPU row's speedups are the mean of its passes',
its times pool theirs, and the other passes run in fresh processes of the same Python."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from attnlab.bench import efficiency, passes
from attnlab.bench.config import BenchConfig
from attnlab.bench.passes import PassTiming, merged_columns, pass_min_reps, row_key
from attnlab.bench.planning import PlannedRow
from attnlab.bench.row_columns import timing_columns
from attnlab.bench.timing import MIN_REPS, Timing
from attnlab.patterns import Pattern


def one_pass(base: list[float], called: list[float], foreign: float | None = 0.0) -> PassTiming:
    return PassTiming({"baseline": Timing.of(base), "called": Timing.of(called)}, foreign, 1)


def test_one_pass_gives_that_pass_columns() -> None:
    p = one_pass([4.0, 4.2, 3.9, 4.1], [2.0, 2.1, 1.9, 2.0])
    row = merged_columns([p], 1e9)
    assert row == {**timing_columns(p.timings, 1e9), "passes": 1, "pass_speedups": None}


def test_speedups_are_the_mean_of_the_passes_and_times_pool_their_calls() -> None:
    """Three passes at speedups 2, 2 and 1 (the third process ran the method at half speed): the row says
    5/3, the mean of the passes' (not the median, which flips between two levels with their majority; not
    the ratio of pooled medians); its times pool all twelve calls; each pass is tight, so the row is stable
    although the pooled calls spread widely."""
    fast = [one_pass([10.0, 10.1, 9.9, 10.0], [5.0, 5.05, 4.95, 5.0]) for _ in range(2)]
    slow = one_pass([10.0, 10.1, 9.9, 10.0], [10.0, 10.1, 9.9, 10.0], foreign=0.6)
    row = merged_columns([*fast, slow], 1e9)
    assert row["speedup"] == pytest.approx(5 / 3) and row["paired_speedup"] == pytest.approx(5 / 3)
    assert json.loads(row["pass_speedups"]) == pytest.approx([2.0, 2.0, 1.0]) and row["passes"] == 3
    assert row["reps"] == 12 and row["min_ms"] == 4.95 and row["baseline_ms"] == pytest.approx(10.0)
    assert Timing.of([*[5.0, 5.05, 4.95, 5.0] * 2, 10.0, 10.1, 9.9, 10.0]).spread > 0.25  # pooled: wide
    assert row["unstable"] is False
    wobbly = one_pass([10.0, 20.0, 5.0, 10.0], [5.0, 9.0, 2.0, 5.0])
    assert merged_columns([wobbly, wobbly, fast[0]], 1e9)["unstable"] is True  # most passes spread wide


def test_a_pass_takes_its_share_of_the_rounds() -> None:
    assert pass_min_reps(1.0) == MIN_REPS and pass_min_reps(1 / 3) == 4 and pass_min_reps(1 / 2) == 6


def test_the_process_count_resolves_per_device_and_the_config_round_trips() -> None:
    assert BenchConfig(device="cpu", processes=0).timing_processes == 7
    assert BenchConfig(device="cuda", processes=0).timing_processes == 1
    assert BenchConfig(device="cpu", processes=2).timing_processes == 2
    with pytest.raises(ValueError, match="processes=-1: expected an int >= 0"):
        BenchConfig(processes=-1)
    cfg = BenchConfig(lengths=(64, 128), methods=("softmax",), patterns=(Pattern.CAUSAL_SELF,), out=Path("x"))
    assert BenchConfig.from_json(json.loads(json.dumps(cfg.as_json()))) == cfg


def _tiny(tmp_path: Path, **kw: Any) -> BenchConfig:
    return BenchConfig(
        device="cpu", lengths=(64,), methods=("softmax",), patterns=(Pattern.CAUSAL_SELF,), modes=("fwd",),
        heads=2, head_dim=16, fidelity=False, target_s=0.01, max_reps=12, retimes=0, out=tmp_path, **kw,
    )  # fmt: skip


def _only_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent plans only the control row (softmax on attnlab's sdpa backend): the fresh processes time
    the rows the first pass timed, so they skip the compiled backends too."""
    real = PlannedRow.backend_specs
    monkeypatch.setattr(PlannedRow, "backend_specs", lambda self: [b for b in real(self) if b.name == "sdpa"])


def test_rows_are_timed_again_in_a_fresh_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _only_sdpa(monkeypatch)
    run = efficiency.EfficiencyRun(_tiny(tmp_path, processes=2))
    rows = [r for r in run.rows() if r["status"] == "ok"]
    assert {(r["method"], r["backend"]) for r in rows} == {("softmax", "sdpa:default"), ("softmax", "sdpa")}
    for r in rows:
        each = json.loads(r["pass_speedups"])
        assert r["passes"] == 2 and len(each) == 2 and r["reps"] >= 2 * pass_min_reps(0.5)
        assert r["speedup"] == pytest.approx(sum(each) / 2, rel=1e-3)  # the mean of the two passes
    assert any("timing in 2 passes" in n for n in run.notes)


def test_a_pass_that_fails_is_left_out_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _only_sdpa(monkeypatch)
    monkeypatch.setattr(passes.sys, "executable", "/bin/false")
    run = efficiency.EfficiencyRun(_tiny(tmp_path, processes=2))
    rows = [r for r in run.rows() if r["status"] == "ok"]
    assert rows and all(r["passes"] == 1 and r["pass_speedups"] is None for r in rows)
    assert any("timing pass 2 failed (exit 1): left out" in n for n in run.notes)
    assert any("timed in this process only" in n for n in run.notes)


def test_a_pass_times_only_the_rows_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _only_sdpa(monkeypatch)
    cfg = _tiny(tmp_path, processes=2)
    key = row_key("causal_self", 64, "fwd", "softmax", "sdpa:default", {})
    got = efficiency.EfficiencyRun(cfg).pass_timings({key})
    assert list(got) == [key] and isinstance(got[key], PassTiming)
    assert set(got[key].timings) == {"baseline", "called"}
    assert got[key].timings["called"].reps >= pass_min_reps(0.5)


def test_a_fresh_pass_without_the_first_pass_baseline_fails_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a fresh process the baseline is the group's first peer, as in the first pass: if it does not warm
    there, the group's rows fail in that pass instead of pairing with another side."""
    _only_sdpa(monkeypatch)
    real_warm = efficiency.EfficiencyRun._warm_entry

    def warm(self: efficiency.EfficiencyRun, entry: efficiency.Entry, *args: Any, **kw: Any) -> None:
        real_warm(self, entry, *args, **kw)
        if entry.peer:
            entry.status = "error: RuntimeError: no baseline here"

    monkeypatch.setattr(efficiency.EfficiencyRun, "_warm_entry", warm)
    keys = {row_key("causal_self", 64, "fwd", "softmax", b, {}) for b in ("sdpa:default", "sdpa")}
    got = efficiency.EfficiencyRun(_tiny(tmp_path, processes=2)).pass_timings(keys)
    assert got == {row_key("causal_self", 64, "fwd", "softmax", "sdpa", {}): (
        "error: the baseline did not run in this timing pass"
    )}  # fmt: skip


def test_passes_that_timed_other_sides_are_not_merged_and_load_and_compiles_are_kept() -> None:
    full = PassTiming({"baseline": Timing.of([4.0] * 4), "called": Timing.of([2.0] * 4)}, 0.1, 1, 1.5, 1)
    alone = PassTiming({"called": Timing.of([1.0] * 4)}, 0.0, 1, 0.5, 0)
    row = merged_columns([full, alone, full], 1e9)
    assert row["passes"] == 2 and row["speedup"] == pytest.approx(2.0) and row["reps"] == 8
    assert PassTiming.from_json(json.loads(json.dumps(full.as_json()))) == full
