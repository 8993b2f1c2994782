"""Test setup: CPU machines run Triton kernels in the interpreter; CUDA tests are marked and skipped on CPU.

Fixtures and environment only: shared values and builders live in :mod:`attnlab.testing`, so that no
test module imports another.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Must happen before any attnlab kernel module is imported (they are imported lazily on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite's workers share the machine: a CPU bench row is never re-timed for other processes' load here
# (attnlab.bench.efficiency; tests that exercise the re-timing set BenchConfig.retimes themselves).
os.environ.setdefault("ATTNLAB_BENCH_RETIMES", "0")
# ... and leaves the C allocator's policy alone (attnlab.bench.host: its mallopt would outlast the run in
# the worker process; test_bench_host sets it where it tests it)
os.environ.setdefault("ATTNLAB_BENCH_MALLOC", "default")
# ... and times in one process (attnlab.bench.passes: test_bench_passes runs the fresh-process passes)
os.environ.setdefault("ATTNLAB_BENCH_PROCESSES", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from attnlab.testing import on_cuda  # (imported here, after TRITON_INTERPRET is set)

    if importlib.util.find_spec("duckdb") is None:  # (a dependency; the GPU machine's torch image lacks it)
        no_db = pytest.mark.skip(reason="needs duckdb (the results database), which is not installed here")
        for item in items:
            if "duckdb" in item.keywords:
                item.add_marker(no_db)
    if on_cuda():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU (these run on the H100; see benchmarks/results/SUMMARY.md)"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _no_autotune() -> None:
    """Tests use each Triton kernel's first config (autotuning is for speed, not for results)."""
    import attnlab

    attnlab.settings.autotune = False


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill torch.empty/empty_like buffers with NaN, so a kernel that leaves an element unwritten fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):  # type: ignore[no-untyped-def]
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):  # type: ignore[no-untyped-def]
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
