"""How the efficiency benchmark times: every side in the same rounds, warm before timed, spreads kept."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import attnlab
from attnlab.bench import calls, efficiency
from attnlab.bench.config import BenchConfig
from attnlab.bench.memory import peak_memory_mb
from attnlab.bench.row_columns import UNSTABLE_SPREAD, timing_columns
from attnlab.bench.timing import (
    LONG_CALL_REPS,
    MIN_REPS,
    Timing,
    measure_interleaved,
    paired_ratio,
    repetitions,
)
from attnlab.patterns import Pattern


def tiny(out: Path, **kw: Any) -> BenchConfig:
    cfg = BenchConfig(
        device="cpu",
        lengths=(128,),
        modes=("fwd",),
        patterns=(Pattern.CAUSAL_SELF,),
        heads=2,
        head_dim=64,
        fidelity=False,
        target_s=0.01,
        max_reps=3,
        out=out,
    )
    return cfg.with_(**kw)


def test_timing_keeps_min_quartiles_and_median() -> None:
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.min_ms, t.q1_ms, t.median_ms, t.q3_ms, t.reps) == (1.0, 2.0, 3.0, 4.0, 5)
    assert t.iqr_ms == 2.0 and t.spread == pytest.approx(2.0 / 3.0)


def test_at_least_ten_rounds_unless_one_call_takes_over_a_second() -> None:
    assert (
        repetitions({"baseline": 0.5, "called": 0.4}, target_s=0.01, min_reps=MIN_REPS, max_reps=50)
        == MIN_REPS
    )
    assert (
        repetitions({"baseline": 0.001, "called": 0.001}, target_s=0.1, min_reps=MIN_REPS, max_reps=30) == 30
    )
    assert repetitions({"baseline": 0.2, "called": 1.5}, target_s=0.3, min_reps=MIN_REPS, max_reps=50) == (
        LONG_CALL_REPS
    )


def test_row_columns_come_from_the_same_rounds_and_flag_wide_spreads() -> None:
    tight = {
        "baseline": Timing.of([10.0, 10.1, 10.2, 10.3]),
        "called": Timing.of([5.0, 5.1, 5.1, 5.2]),
        "kernel": Timing.of([4.0, 4.0, 4.1, 4.1]),
    }
    row = timing_columns(tight, flops=1e9)
    assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["median_ms"])
    assert row["kernel_speedup"] == pytest.approx(row["baseline_ms"] / row["kernel_ms"])
    assert row["tflops"] == pytest.approx(1e9 / (row["median_ms"] * 1e-3) / 1e12)
    assert not row["unstable"] and row["few_reps"]  # 4 rounds < MIN_REPS
    wide = {**tight, "baseline": Timing.of([10.0, 10.0, 20.0, 30.0])}  # only the baseline spreads
    assert Timing.of([10.0, 10.0, 20.0, 30.0]).spread > UNSTABLE_SPREAD
    assert timing_columns(wide, flops=1e9)["unstable"]


def test_paired_speedups_compare_calls_round_by_round() -> None:
    """A slow stretch that hits both sides of the same rounds cancels in the paired ratio; the ratio of
    medians keeps it when it lands on one side's middle calls more than on the other's."""
    base = Timing.of([10.0, 10.0, 20.0, 20.0, 10.0])
    called = Timing.of([5.0, 5.0, 10.0, 10.0, 5.0])  # every round: exactly half the baseline's call
    assert base.times_ms == (10.0, 10.0, 20.0, 20.0, 10.0) and base.reps == 5  # in the order they ran
    assert paired_ratio(base, called) == pytest.approx(2.0)
    # a slow stretch on rounds 3-5 that hits both sides: every round's ratio is still 2, while the
    # medians land on a slow baseline call and a slow method call in different proportions
    base2, called2 = Timing.of([10.0, 10.0, 10.0, 20.0, 20.0]), Timing.of([5.0, 5.0, 10.0, 10.0, 10.0])
    assert paired_ratio(base2, called2) == pytest.approx(2.0)  # median of 2, 2, 1, 2, 2
    assert base2.median_ms / called2.median_ms == pytest.approx(1.0)
    assert paired_ratio(base, Timing.of([5.0, 5.0])) is None  # not timed in the same rounds
    assert paired_ratio(Timing(1.0, 1.0, 1), Timing(1.0, 1.0, 1)) is None  # built without its calls
    row = timing_columns({"baseline": base, "called": called, "kernel": Timing.of([2.5, 2.5, 5.0, 5.0, 2.5])},
                         flops=1e9)  # fmt: skip
    assert row["paired_speedup"] == pytest.approx(2.0) and row["paired_kernel_speedup"] == pytest.approx(4.0)


def test_measure_interleaved_keeps_each_rounds_call() -> None:
    calls_made: list[str] = []
    fns = {name: (lambda name=name: calls_made.append(name)) for name in ("baseline", "called")}
    t = measure_interleaved(fns, torch.device("cpu"), warmup=0, target_s=0.0, min_reps=6, max_reps=6)
    assert all(len(x.times_ms) == x.reps == 6 for x in t.values())
    assert paired_ratio(t["baseline"], t["called"]) is not None


def test_peak_memory_on_cpu_sees_an_allocation_and_hides_kinetos_chatter(
    capfd: pytest.CaptureFixture[str],
) -> None:
    x = torch.randn(1024, 1024)

    def fn() -> None:
        y = torch.empty(16 * 2**20 // 4)  # 16 MiB, freed at return
        y.fill_(1.0)
        (x @ x).sum()

    print("before", file=sys.stderr)
    mb = peak_memory_mb(fn, torch.device("cpu"))
    assert mb is not None and 16 <= mb < 40
    err = capfd.readouterr().err
    assert "before" in err and "profiler_start" not in err and "Completed Stage" not in err


def test_as_called_goes_through_the_public_call_with_defaults_and_kernel_skips_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, Any]] = []
    real = attnlab.attention

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attnlab, "attention", spy)
    cfg = tiny(Path("unused"))
    x = calls.Inputs.make(cfg, 64, 64, grad=False)
    called = calls.as_called_fn(x, "sliding_window", True, "sdpa_mask", {"window": 16})
    kernel = calls.kernel_fn(x, "sliding_window", True, "sdpa_mask", {"window": 16})
    torch.testing.assert_close(called(), kernel())
    assert len(seen) == 1  # the kernel side never enters attnlab.attention
    assert seen[0] == {"method": "sliding_window", "causal": True, "backend": "sdpa_mask", "window": 16}


def test_every_side_is_warmed_before_any_timing_and_timed_with_the_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    rounds: list[set[str]] = []
    real_warm = efficiency.EfficiencyRun._warm_entry

    def warm(self: efficiency.EfficiencyRun, entry: efficiency.Entry, *args: Any) -> None:
        events.append("warm")
        real_warm(self, entry, *args)

    def fake_interleaved(fns: dict[str, Any], device: torch.device, **kw: Any) -> dict[str, Timing]:
        events.append("time")
        rounds.append(set(fns))
        times = {"baseline": [6.0] * 3, "called": [2.0] * 3, "kernel": [1.5] * 3}
        return {name: Timing.of(times[name]) for name in fns}

    monkeypatch.setattr(efficiency.EfficiencyRun, "_warm_entry", warm)
    monkeypatch.setattr(efficiency, "measure_interleaved", fake_interleaved)
    cfg = tiny(tmp_path, methods=("softmax", "sliding_window"), modes=("fwd", "fwd_bwd"), peers=False)
    rows = [r for r in efficiency.EfficiencyRun(cfg).rows() if r["status"] == "ok"]
    assert "time" in events and "warm" not in events[events.index("time") :]  # all warming came first
    base = [r for r in rows if r["baseline_of_run"]]
    others = [r for r in rows if not r["baseline_of_run"]]
    assert len(base) == 2 and others  # one baseline per (pattern, length, mode) group
    assert rounds.count({"baseline", "called"}) == len(base)  # the baseline against itself (A/A)
    assert rounds.count({"baseline", "called", "kernel"}) == len(others)
    for r in others:
        assert (r["median_ms"], r["kernel_ms"], r["baseline_ms"]) == (2.0, 1.5, 6.0)
        assert r["speedup"] == pytest.approx(3.0) and r["kernel_speedup"] == pytest.approx(4.0)


def test_the_control_row_is_planned_even_when_methods_leave_softmax_out(tmp_path: Path) -> None:
    run = efficiency.EfficiencyRun(tiny(tmp_path, methods=("sliding_window",), modes=("fwd", "fwd_bwd")))
    plan = run.plan()
    control = [r for r in plan if r.method == "softmax"]
    assert len(control) == len(run.groups())  # one per (pattern, length, mode)
    assert all([b.name for b in r.backend_specs()] == ["sdpa"] for r in control)
    assert {r.method for r in plan} == {"softmax", "sliding_window"}
