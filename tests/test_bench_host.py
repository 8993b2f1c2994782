"""The benchmark's CPU host controls: the allocator policy of the timed phase and the re-timing of rows that
shared the machine with other processes (attnlab.bench.host, EfficiencyRun._timed_rounds)."""

from __future__ import annotations

import dataclasses
import resource

import pytest
import torch

from attnlab.bench import efficiency, host
from attnlab.bench.config import BenchConfig
from attnlab.bench.efficiency import EfficiencyRun

glibc = pytest.mark.skipif(
    host._glibc() is None, reason="the allocator policy is set through glibc's mallopt"
)

MB64 = 16 * 2**20  # float32 elements


def _faults_of_fresh_block() -> int:
    """Minor page faults of allocating and touching a 64 MiB tensor right after one was freed."""
    torch.ones(MB64)  # allocated, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(MB64)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_kept_freed_memory_reuses_freed_blocks() -> None:
    # (glibc's default: a fresh mmap per 64 MiB block, 4 KiB per fault, unless a freed heap chunk left by
    # earlier code serves it: not asserted, it depends on what ran before in the process)
    with host.kept_freed_memory() as kept:
        assert kept
        # the first blocks under the policy may grow the heap (fault once); then a freed block is reused
        assert min(_faults_of_fresh_block() for _ in range(4)) < 500
    # (after the block a freed heap chunk may still serve the next call until glibc trims: the restore
    # is checked on the calls below, not on page faults)
    with host.kept_freed_memory(enabled=False) as kept:
        assert not kept


def test_kept_freed_memory_sets_and_restores_mallopt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(host, "_glibc", lambda: FakeLibc())
    with pytest.raises(RuntimeError), host.kept_freed_memory() as kept:
        assert kept
        assert calls == [(host.M_MMAP_MAX, 0), (host.M_TRIM_THRESHOLD, -1)]
        raise RuntimeError("restored also when the block raises")
    assert calls[2:] == [
        (host.M_MMAP_MAX, host.DEFAULT_MMAP_MAX),
        (host.M_TRIM_THRESHOLD, host.DEFAULT_TRIM_THRESHOLD),
    ]


def test_malloc_policy_is_validated_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTNLAB_BENCH_MALLOC", raising=False)  # (the suite's conftest sets "default")
    cfg = BenchConfig.preset("cpu")
    assert cfg.malloc == "keep" and cfg.as_json()["malloc"] == "keep"
    monkeypatch.setenv("ATTNLAB_BENCH_MALLOC", "default")
    assert BenchConfig.preset("cpu").malloc == "default"
    assert cfg.with_(malloc="default").malloc == "default"
    with pytest.raises(ValueError, match="malloc"):
        BenchConfig(malloc="jemalloc")


@pytest.mark.parametrize("env", [("LD_PRELOAD", "/usr/lib/libtcmalloc.so"), ("MALLOC_TRIM_THRESHOLD_", "0")])
def test_allocator_left_alone_when_preloaded_or_set_outside(
    env: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(*env)
    assert host._glibc() is None
    with host.kept_freed_memory() as kept:
        assert not kept


def test_foreign_cores() -> None:
    hz = host._HZ
    a = host.CpuSample(10.0, 1000, 500)
    assert host.foreign_cores(a, host.CpuSample(12.0, 1000 + 4 * hz, 500 + 2 * hz)) == pytest.approx(1.0)
    assert host.foreign_cores(a, host.CpuSample(12.0, 1000 + 2 * hz, 500 + 2 * hz)) == 0.0
    assert host.foreign_cores(a, host.CpuSample(12.0, 1000, 500 + hz)) == 0.0  # tick skew: clamped
    assert host.foreign_cores(None, a) is None and host.foreign_cores(a, a) is None
    s = host.cpu_sample()
    if s is not None:  # Linux: this process's own ticks are part of the machine's
        assert s.busy_ticks >= s.own_ticks >= 0


def _run(
    monkeypatch: pytest.MonkeyPatch, foreign: list[float], retimes: int = 2, spent: float = 0.0
) -> tuple[EfficiencyRun, tuple]:
    """_timed_rounds with the machine's foreign CPU per attempt given by ``foreign``, ``retimes`` allowed and
    ``spent`` seconds of the run's re-timing budget already used; each attempt's timings are tagged with its
    index (in ``reps``)."""
    seq = iter(foreign)
    attempt = iter(range(100))
    monkeypatch.setattr(efficiency, "spare_cores", lambda: 0)  # (a 2-core machine with 2 torch threads)
    monkeypatch.setattr(host, "cpu_sample", lambda: host.CpuSample(0.0, 0, 0))
    monkeypatch.setattr(host, "foreign_cores", lambda a, b: next(seq))
    monkeypatch.setattr(host, "wait_quiet", lambda threshold, max_s: 0.0)
    monkeypatch.setattr(
        efficiency,
        "measure_interleaved",
        lambda fns, device, **kw: {name: efficiency.Timing.of([1.0] * (next(attempt) + 1)) for name in fns},
    )
    run = EfficiencyRun(dataclasses.replace(BenchConfig.preset("cpu"), retimes=retimes))
    run.retime_s = spent
    return run, run._timed_rounds({"baseline": lambda: None}, "row")


def test_quiet_row_is_timed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    run, (t, foreign, attempts) = _run(monkeypatch, [0.02])
    assert attempts == 1 and foreign == 0.02 and t["baseline"].reps == 1
    assert run.retimed == [] and run.contended == []


def test_contended_row_is_timed_again_and_the_quietest_attempt_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    run, (t, foreign, attempts) = _run(monkeypatch, [1.0, 0.1])
    assert attempts == 2 and foreign == 0.1 and t["baseline"].reps == 2  # the second attempt
    assert run.retimed == ["row"] and run.contended == []
    run, (t, foreign, attempts) = _run(monkeypatch, [1.0, 0.9, 1.2, 0.0])
    assert attempts == 1 + 2 and foreign == 0.9 and t["baseline"].reps == 2
    assert run.contended == ["row"]  # still shared the machine: flagged, not dropped


def test_retiming_stops_at_the_run_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    run, (_t, foreign, attempts) = _run(monkeypatch, [1.0, 1.0, 1.0], spent=efficiency.RETIME_BUDGET_S)
    assert attempts == 1 and foreign == 1.0 and run.contended == ["row"]


def test_retimes_zero_never_retimes_and_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    run, (_t, _foreign, attempts) = _run(monkeypatch, [1.0], retimes=0)
    assert attempts == 1 and run.retimed == [] and run.contended == ["row"]
    with pytest.raises(ValueError, match="retimes=-1"):
        dataclasses.replace(BenchConfig.preset("cpu"), retimes=-1)


def test_report_marks_a_row_that_stayed_shared() -> None:
    from attnlab.bench.report_tables import _busy

    assert _busy({"contended": True, "foreign_cpu": 0.83, "load_avg": 2.0}, 3.0) == "shared (0.8 cores)"
    assert _busy({"contended": False, "foreign_cpu": 0.1, "load_avg": 2.0}, 3.0) == ""
    assert _busy({"load_avg": 5.3}, 3.0) == "busy (load 5.3)"  # older rows: the load average only
