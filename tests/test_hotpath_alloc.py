"""benchmarks/hotpath.py's first-call allocation diagnostic: right with and without expandable segments
(fake ``torch.cuda.memory_stats`` dicts), and its column in the hot-path table."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hotpath() -> Any:
    return _load("hotpath")


def _stats(segments: int, allocs: int | None, reserved_mib: int) -> dict[str, int]:
    s = {"segment.all.allocated": segments, "reserved_bytes.all.current": reserved_mib * MIB}
    if allocs is not None:
        s["num_device_alloc"] = allocs
    s["allocated_bytes.all.current"] = 123  # other keys are ignored
    return s


def _growth(
    hotpath: Any, monkeypatch: pytest.MonkeyPatch, before: dict, after: dict, expandable: bool
) -> dict:
    """allocator_growth over allocator_counts read from two fake memory_stats() dicts (a CUDA run)."""
    monkeypatch.setattr(hotpath, "DEV", torch.device("cuda"), raising=False)
    seq = iter([before, after])
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a, **k: next(seq))
    b = hotpath.allocator_counts()
    a = hotpath.allocator_counts()
    return hotpath.allocator_growth(b, a, expandable)  # type: ignore[no-any-return]


def test_default_allocator_counts_segments_allocs_and_reserved(
    hotpath: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = _growth(hotpath, monkeypatch, _stats(3, 5, 100), _stats(5, 7, 164), expandable=False)
    assert got == {"segments": 2, "device_allocs": 2, "reserved_mb": 64.0}
    none = _growth(hotpath, monkeypatch, _stats(3, 5, 100), _stats(3, 5, 100), expandable=False)
    assert none == {"segments": 0, "device_allocs": 0, "reserved_mb": 0.0}


def test_expandable_segments_make_the_segment_count_unknown(
    hotpath: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under expandable segments the one segment grows in place: the count stays 0 while memory is mapped;
    the diagnostic says "unknown" there and reports the driver allocations and the reserved growth."""
    got = _growth(hotpath, monkeypatch, _stats(1, 4, 20), _stats(1, 6, 52), expandable=True)
    assert got == {"segments": "unknown", "device_allocs": 2, "reserved_mb": 32.0}


def test_a_torch_without_num_device_alloc_gives_none(hotpath: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    got = _growth(hotpath, monkeypatch, _stats(1, None, 20), _stats(2, None, 40), expandable=False)
    assert got == {"segments": 1, "device_allocs": None, "reserved_mb": 20.0}


def test_cpu_runs_count_nothing(hotpath: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hotpath, "DEV", torch.device("cpu"), raising=False)
    c = hotpath.allocator_counts()
    assert hotpath.allocator_growth(c, c, False) == {"segments": 0, "device_allocs": 0, "reserved_mb": 0.0}


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ("expandable_segments:True", True),
        ("max_split_size_mb:128, expandable_segments:True", True),
        ("expandable_segments:False", False),
        ("max_split_size_mb:128", False),
        ("", False),
    ],
)
def test_expandable_segments_from_the_allocator_conf(hotpath: Any, conf: str, expected: bool) -> None:
    assert hotpath.expandable_segments(conf) is expected


def test_allocator_conf_reads_either_variable(hotpath: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    assert hotpath.allocator_conf() == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert hotpath.allocator_conf() == "max_split_size_mb:64"


def test_table_shows_the_three_counts_and_says_when_segments_are_unknown() -> None:
    table = _load("hotpath_table")
    row = {"method": "sliding_window", "n": 8448, "first_s": 0.01, "second_s": 0.002, "bucket": "IS_DIVISIBLE",
           "new_length": True, "seen_bucket": True, "meets_5ms": False, "autotuner_grew": False,
           "jit_cache_grew": False, "dynamo": {}, "gc_in_first_call": 0}  # fmt: skip
    expandable = {**row, "cuda_segments_in_first_call": "unknown", "cuda_device_allocs_in_first_call": 3,
                  "cuda_reserved_mb_in_first_call": 40.0}  # fmt: skip
    first = {"bucket_rules": {}, "rows": [expandable], "expandable_segments": True,
             "allocator_conf": "expandable_segments:True"}  # fmt: skip
    text = "\n".join(table._first(first))
    assert "| unknown / 3 / 40 |" in text and "expandable segments (`expandable_segments:True`)" in text
    plain = {**row, "cuda_segments_in_first_call": 2, "cuda_device_allocs_in_first_call": 2,
             "cuda_reserved_mb_in_first_call": 64.0}  # fmt: skip
    text = "\n".join(table._first({**first, "rows": [plain], "expandable_segments": False}))
    assert "| 2 / 2 / 64 |" in text and "expandable segments (" not in text
    old = "\n".join(table._first({"bucket_rules": {}, "rows": [{**row, "cuda_segments_in_first_call": 1}]}))
    assert "new CUDA memory segments in it |" in old and "| 1 |" in old  # runs before these columns
