"""benchmarks/decode_e2e.py's logic on a tiny config-built Llama-3 model on the CPU: rows for every
(context, batch, side), the row-by-row prefill's cache equals a batched prefill's, the full-budget check."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str = "decode_e2e") -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_rows_prefill_builds_the_batched_cache() -> None:
    mod = _module()
    model = mod.build_model(True, None, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    _, batched, tok_b = mod.prefill(model, ids, 1, 10**6, torch.device("cpu"))
    row, rows, tok_r = mod.prefill(model, ids, 1, 20, torch.device("cpu"))
    assert row["prefill_mode"] == "rows" and row["reps"] == 2
    assert row["median_ms"] == pytest.approx(2 * row["row_median_ms"])
    assert torch.equal(tok_b, tok_r)
    for a, b in zip(batched.layers, rows.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_one_command_writes_every_row(tmp_path: Path) -> None:
    mod = _module()
    out = tmp_path / "e2e.json"
    methods = ["page_topk:budget=16", "h2o:budget=16,per_step=true,recent=8",
               "h2o:budget=16,per_step=true,recent=8,free_kv=true"]  # fmt: skip
    mod.main(["--tiny", "--device", "cpu", "--contexts", "40", "--batches", "1", "2", "--steps", "1", "--warmup", "1",
              "--check-steps", "2", "--max-prefill-tokens", "64", "--out", str(out), "--methods", *methods])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    for b in (1, 2):
        got = [(r["phase"], r["side"]) for r in rows if r["batch"] == b]
        assert got == [("prefill", "sdpa"), ("decode", "sdpa"), *[("decode", m) for m in methods],
                       ("decode", "sdpa_after"), *[("check", m) for m in methods]]  # fmt: skip
        for r in rows:
            if r["batch"] == b and r["phase"] == "decode":
                assert r["median_ms"] > 0 and r["tokens_per_s"] == pytest.approx(b * 1e3 / r["median_ms"])
                # the prompt + 2 steps; freed by per-step h2o: its budget
                assert r["cache_tokens_after"] == (16 if "free_kv" in r["side"] else 42), r["side"]
            if r["batch"] == b and r["phase"] == "check":
                assert r["tokens_equal"] and r["params"]["budget"] == 40 + 1 + 1 + 1
                assert r["first_divergence_step"] is None and "dense_margin_at_divergence" not in r
                assert r["logit_diff_before_divergence"] == pytest.approx(r["max_abs_logit_diff"])
    assert [r["prefill_mode"] for r in rows if r["phase"] == "prefill"] == ["batched", "rows"]


def test_divergence_finds_the_first_differing_step_and_judges_each_row_against_the_noise() -> None:
    mod = _module()
    want = [torch.tensor([[1], [2], [3]]), torch.tensor([[3], [4], [1]]), torch.tensor([[0], [1], [2]])]
    toks = [torch.tensor([[1], [2], [3]]), torch.tensor([[0], [0], [1]]), torch.tensor([[4], [4], [4]])]
    dense = [torch.zeros(3, 5) for _ in range(3)]
    dense[1][0] = torch.tensor([0.6, 0.0, 0.0, 0.65, 0.0])  # row 0: sdpa prefers 3 over 0 by 0.05
    dense[1][1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0])  # row 1: sdpa prefers 4 over 0 by 3.0
    logits = [d.clone() for d in dense]
    logits[0][2, 1] += 0.1  # row 2 never diverges: the noise between the two sides is 0.1
    logits[1][0, 0] += 0.1  # row 0 flips: the side prefers 0 by 0.05
    logits[1][1, 0] += 3.5  # row 1 flips by a large difference
    logits[2] += 9.0  # after the divergence: different text, not counted
    got = mod.divergence(toks, logits, want, dense)
    assert got["first_divergence_step"] == 1 and got["noise"] == pytest.approx(0.1)
    assert got["logit_diff_before_divergence"] == pytest.approx(3.5)
    r0, r1 = got["divergence"]
    assert (r0["row"], r0["dense_token"], r0["side_token"]) == (0, 3, 0)
    assert r0["dense_gap"] == pytest.approx(0.05, abs=1e-6)
    assert r0["side_gap"] == pytest.approx(0.05, abs=1e-6)
    assert r0["row_diff"] == pytest.approx(0.1) and r0["near_tie"]  # 0.05 <= the noise
    assert r1["dense_gap"] == pytest.approx(3.0) and r1["row_diff"] == pytest.approx(3.5)
    assert not r1["near_tie"] and not got["all_near_ties"]  # sdpa was sure: a wrong attention
    # every row diverging: no noise to judge against
    everyone = mod.divergence(
        [torch.tensor([[0]])], [torch.zeros(1, 2)], [torch.tensor([[1]])], [torch.zeros(1, 2)]
    )
    assert everyone["noise"] is None and everyone["divergence"][0]["near_tie"] is None
    assert mod.divergence(want, dense, want, dense) == {"first_divergence_step": None,
                                                        "logit_diff_before_divergence": 0.0}  # fmt: skip


def test_static_cache_sides_decode_what_the_dynamic_cache_decodes() -> None:
    """--cache static: the prefilled tokens moved into a StaticCache; every side decodes the same tokens (and
    logits) as from the DynamicCache, and the cache reports its filled slots, not its capacity."""
    mod = _module()
    from attnlab.catalog.decode import register_methods

    register_methods()
    model = mod.build_model(True, None, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    _, dynamic, token = mod.prefill(model, ids, 1, 10**6, torch.device("cpu"))
    static = mod.to_static(dynamic, model, 40 + 8)
    assert type(static).__name__ == "StaticCache" and mod.cache_tokens(static) == 40
    for label in ("sdpa", "page_topk:budget=16"):
        name, params = mod.parse_method(label)
        outs = [mod.decode_side(model, base, token, label, name, params, 3, 1, torch.device("cpu"))
                for base in (dynamic, static)]  # fmt: skip
        (row_d, tok_d, log_d), (row_s, tok_s, log_s) = outs
        assert all(torch.equal(a, b) for a, b in zip(tok_d, tok_s, strict=True)), label
        for a, b in zip(log_d, log_s, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert row_d["cache_tokens_after"] == row_s["cache_tokens_after"] == 40 + 4
    assert mod.cache_tokens(static) == 40  # each side decoded from a copy


def test_rows_check_compares_each_side_batched_and_alone(tmp_path: Path) -> None:
    """benchmarks/decode_rows_check.py on a tiny model on the CPU: every side's batched step equals its rows
    run alone, against attnlab's side as the named reference."""
    mod = _module("decode_rows_check")
    out = tmp_path / "rc.json"
    got = mod.main(["--tiny", "--device", "cpu", "--context", "24", "--batch", "2", "--out", str(out)])
    assert (
        got["reference"] == "attnlab:page_topk"
        and json.loads(out.read_text())["reference"] == got["reference"]
    )
    assert set(got["sides"]) == {"sdpa", "sdpa[math]", "attnlab:page_topk"}
    for side in got["sides"].values():
        assert side["tokens_equal_alone"] and side["tokens_equal_reference"]
        assert max(side["diff"]) < 1e-4 and max(side["cross"]) < 1e-4 and len(side["reference_top2_gap"]) == 2


def test_full_budget_check_raises_a_default_budget_too() -> None:
    """The full-budget check sets ``budget`` whenever the method has one: a method named without
    parameters (``--methods page_topk``) ran the check at its default budget before (an H100 run at
    b335583 compared a 4096-token budget against dense and reported it as the full-budget check)."""
    mod = _module()
    from attnlab.catalog.decode import register_methods

    register_methods()
    assert mod.full_budget("page_topk", {}, 1000) == {"budget": 1000}
    assert mod.full_budget("h2o", {"budget": 8, "recent": 4}, 1000) == {"budget": 1000, "recent": 4}
    assert mod.full_budget("sliding_window", {"window": 8}, 1000) == {"window": 8}  # (no budget field)
