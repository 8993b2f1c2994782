"""attnlab eval on the dense score variants: the CPU backend each runs on, what each computes with no tensor
input (recorded per run, stored, reported), on the committed micro organism."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("duckdb", reason="the evaluation database needs duckdb, which is not installed here")

from attnlab.eval.report import variant_notes, write_report
from attnlab.eval.store import EvalDB, store_result
from attnlab.eval.tasks import (
    CPU_BACKENDS,
    DENSE,
    EvalConfig,
    EvalResult,
    MethodRun,
    evaluate,
    function_check,
)
from attnlab.organisms.checkpoint import organism_path
from attnlab.organisms.corpus import CorpusConfig
from attnlab.registry import get

HAYSTACK = CorpusConfig(max_chars=300_000, sources=("pydoc",), pydoc_share=1.0, heldout_share=0.2)
LENGTH = 256


@pytest.mark.parametrize(
    ("method", "backend"),
    [("gated", "sdpa"), ("affine_scaled", "sdpa"), ("sink", "sdpa"), ("softplus", "eager"),
     ("selective", "sdpa"), ("sliding_window", "sdpa_mask"), (DENSE, "sdpa")],
)  # fmt: skip
def test_cpu_backend_is_the_first_of_the_preference_order(method: str, backend: str) -> None:
    names = [b.name for b in get(method).backends]
    assert backend == next(c for c in CPU_BACKENDS if c in names)
    kw = MethodRun(method, method, method).use_kwargs("cpu")
    assert kw["plan"]["backends"] == {method: backend}
    assert MethodRun(method, method, method).use_kwargs("cuda")["plan"] is None  # default order on a GPU


def test_function_check_says_which_variants_are_softmax_without_inputs() -> None:
    same = {m: function_check(m) for m in ("gated", "selective", "affine_scaled")}
    assert {m: f["absent"] for m, f in same.items() if f} == {
        "gated": ["gate"],
        "selective": ["temperature"],
        "affine_scaled": ["alpha", "beta"],
    }
    assert all(f and f["same_as_softmax"] and f["softmax_max_diff"] <= 1e-5 for f in same.values())
    for m in ("sink", "softplus"):
        f = function_check(m)
        assert f is not None and not f["same_as_softmax"] and f["softmax_max_diff"] > 1e-2
    assert function_check(DENSE) is None and function_check("sliding_window") is None
    # a sink logit far below every score leaves softmax unchanged: the check follows the params
    low = function_check("sink", {"logit": -1e4})
    assert low is not None and low["same_as_softmax"]


@pytest.fixture(scope="module")
def result() -> EvalResult:
    cfg = EvalConfig(
        model=organism_path("micro"),
        methods=("gated", "sink"),
        tasks=("passkey",),
        lengths=(LENGTH,),
        samples=2,
        device="cpu",
        corpus=HAYSTACK,
        budgets="default",
    )
    return evaluate(cfg)


def test_variant_rows_record_backend_and_function(result: EvalResult, tmp_path: Path) -> None:
    rows = {r["label"]: r for r in result.rows}
    assert not any(r["error"] for r in result.rows)
    # gated without a gate is softmax: the same greedy answers through its SDPA path
    assert rows["gated"]["outputs"] == rows[DENSE]["outputs"]
    methods = {m["label"]: m for m in result.methods}
    assert methods["gated"]["backends"] == {"gated": "sdpa"}
    assert methods["sink"]["backends"] == {"sink": "sdpa"}
    assert methods["gated"]["function"]["same_as_softmax"]
    assert not methods["sink"]["function"]["same_as_softmax"]
    assert methods[DENSE]["function"] is None
    with EvalDB(tmp_path / "eval.duckdb") as db:
        back = db.result(store_result(db, result))
    assert {m["label"]: (m["backends"], m["function"]) for m in back.methods} == {
        k: (m["backends"], m["function"]) for k, m in methods.items()
    }
    text = write_report(back, tmp_path / "report").read_text()
    assert "## What the dense variants computed" in text
    assert "- gated on `sdpa`; not given: gate: the same function as softmax" in text
    assert "- sink on `sdpa`; not given: sinks: a different function than softmax" in text


def test_variant_notes_without_variants_or_with_a_failed_check() -> None:
    assert variant_notes([{"label": DENSE, "method": DENSE, "function": None}]) == []
    lines = variant_notes([{"label": "gated", "method": "gated", "function": {"error": "X: y"}}])
    assert lines[-1] == "- gated: check failed: `X: y`."
