"""attnlab eval on the committed micro organism at short length: dense through attnlab.hf gives the model's
own greedy answers, a method at full budget gives the dense answers, runs and errors, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnlab.eval.tasks import DENSE, EvalConfig, EvalError, evaluate, method_runs, parse_method, table_rows
from attnlab.organisms.checkpoint import organism_path
from attnlab.organisms.corpus import CorpusConfig

#: a small haystack corpus (fast to build): pydoc topics only
HAYSTACK = CorpusConfig(max_chars=300_000, sources=("pydoc",), pydoc_share=1.0, heldout_share=0.2)
LENGTH = 256


@pytest.fixture(scope="module")
def result():  # type: ignore[no-untyped-def]
    cfg = EvalConfig(
        model=organism_path("micro"),
        # streaming with a window past the length keeps every key: it must give the dense answers
        methods=(f"streaming:window={LENGTH}:sinks=4", "streaming:window=16:sinks=4"),
        tasks=("passkey",),
        lengths=(LENGTH,),
        samples=3,
        corpus=HAYSTACK,
    )
    return evaluate(cfg)


def test_dense_row_is_the_models_own_greedy_answer(result) -> None:  # type: ignore[no-untyped-def]
    from attnlab.organisms.checkpoint import load_organism
    from attnlab.organisms.corpus import build_corpus, prose
    from attnlab.organisms.evaluate import greedy
    from attnlab.organisms.tasks import TaskContext, generate, score
    from attnlab.organisms.tokenizer import decode, encode

    model, tok = load_organism(organism_path("micro"))
    ctx = TaskContext(tok, [d.text for d in prose(build_corpus(HAYSTACK).heldout)])
    dense = next(r for r in result.rows if r["label"] == DENSE)
    stop = sorted({tok.eos_token_id, *encode(tok, "\n")})
    right = 0
    for seed, text in enumerate(dense["outputs"]):
        s = generate("passkey", ctx, LENGTH, seed)
        assert text == decode(tok, greedy(model, encode(tok, s.prompt), s.answer_tokens + 2, stop))
        right += score(s, text)
    assert dense["correct"] == right and dense["samples"] == 3


def test_full_budget_equals_dense_and_rows_are_complete(result) -> None:  # type: ignore[no-untyped-def]
    rows = {r["label"]: r for r in result.rows}
    assert list(rows) == [DENSE, f"streaming(sinks=4, window={LENGTH})", "streaming(sinks=4, window=16)"]
    assert rows[f"streaming(sinks=4, window={LENGTH})"]["outputs"] == rows[DENSE]["outputs"]
    for r in result.rows:
        assert r["task"] == "passkey" and r["length"] == LENGTH and r["samples"] == 3
        assert r["accuracy"] == r["correct"] / 3
    small = rows["streaming(sinks=4, window=16)"]
    assert small["prefill"] == small["decode"] == "streaming" and small["params"] == {
        "sinks": 4,
        "window": 16,
    }
    cols, table = table_rows(result)
    assert cols == [f"passkey@{LENGTH}"] and len(table) == 3
    assert json.loads(result.to_json())["info"]["samples"] == 3


def test_method_runs_phases_and_budgets() -> None:
    runs = method_runs(["block_topk", "streaming"], 2048, budgets="all")
    assert runs[0].method == DENSE
    topk = [r for r in runs if r.method == "block_topk"]
    assert topk and all(r.prefill == "block_topk" and r.decode == DENSE for r in topk)  # prefill-only
    stream = [r for r in runs if r.method == "streaming"]
    assert len(stream) >= 1 and all(r.prefill == r.decode == "streaming" for r in stream)
    assert len(method_runs(["streaming"], 2048, budgets="first")) == 2
    assert parse_method("streaming:window=64:sinks=4") == ("streaming", {"window": 64, "sinks": 4})
    assert parse_method("softmax") == ("softmax", None)


@pytest.mark.parametrize(
    ("methods", "match"),
    [
        (["streeming"], "unknown attention method 'streeming'.*Did you mean 'streaming'"),
        (["streaming:window"], "parameter 'window' is not key=value"),
        (["streaming:windows=4"], "streaming"),
    ],
)
def test_bad_methods(methods: list[str], match: str) -> None:
    with pytest.raises(EvalError, match=match):
        method_runs(methods, 1024)


def test_bad_requests() -> None:
    with pytest.raises(EvalError, match="unknown task 'paskey'.*Did you mean 'passkey'"):
        evaluate(EvalConfig(model=organism_path("micro"), tasks=("paskey",)))
    with pytest.raises(EvalError, match="length 4096: expected 128 <= length <= .*=2048"):
        evaluate(EvalConfig(model=organism_path("micro"), lengths=(4096,), corpus=HAYSTACK))


@pytest.mark.duckdb
def test_cli_eval(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from attnlab.cli import app

    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(organism_path("micro")), "--methods", "streaming:window=32:sinks=4"]
    args += ["--tasks", "passkey", "--lengths", "256", "--samples", "1", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "passkey@256" in result.output and "streaming(sinks=4, window=32)" in result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == [DENSE, "streaming(sinks=4, window=32)"]
    bad = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "no folder at" in bad.output
