"""token_sparse: the kept tokens on planted structure, the budget rules (coverage, min_tokens, the skip
rule), compress-attend-scatter semantics checked independently, batch / GQA, bad input, and the executor
against the reference on the same plan (registered only inside these tests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnlab
from attnlab.catalog.dynamic.token_sparse import SPEC, TokenSparseParams, estimate, kept_tokens
from attnlab.errors import ParamError
from attnlab.registry import registered
from attnlab.testing import Case, check_parity, device_under_test

DEVICE = device_under_test()  # (the GPU where there is one: the executor runs there, not on its CPU)

N, W, PLANTED = 64, 8, (3, 17, 30)


@pytest.fixture
def method() -> Iterator[None]:
    with registered(SPEC):
        yield


def planted() -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, 2, N, N): orthonormal keys; the last W queries put (almost) all their mass, evenly, on the
    PLANTED prefix keys."""
    g = torch.Generator().manual_seed(0)
    k = torch.linalg.qr(torch.randn(2, N, N, generator=g)).Q
    q = torch.randn(2, N, N, generator=g) * 0.1
    q[:, -W:] = 12 * k[:, list(PLANTED)].sum(1, keepdim=True)
    return q[None], k[None]


def test_the_planted_tokens_and_the_window_are_kept() -> None:
    q, k = planted()
    kept = kept_tokens(q, k, TokenSparseParams(coverage=0.2, min_tokens=3, window=W, kernel=1), scale=1.0)
    want = set(PLANTED) | set(range(N - W, N))
    for h in range(2):
        assert set(kept[0, h].nonzero()[:, 0].tolist()) == want
    # the drop count is the tokens below the coverage plus one (the official rule): with each planted key
    # holding ~1/3 of the mass, coverage 0.2 drops every other key and one planted key
    fewer = kept_tokens(q, k, TokenSparseParams(coverage=0.2, min_tokens=1, window=W, kernel=1), scale=1.0)
    assert int(fewer[0, 0, : N - W].sum()) == 2 and set(fewer[0, 0].nonzero()[:, 0].tolist()) < want
    # min_tokens keeps more than the mass needs; coverage 0 or a short input keeps everything
    more = kept_tokens(q, k, TokenSparseParams(coverage=0.2, min_tokens=10, window=W, kernel=1), scale=1.0)
    assert int(more[0, 0].sum()) == 10 + W and set(PLANTED) <= set(more[0, 0].nonzero()[:, 0].tolist())
    for p in (TokenSparseParams(coverage=0.0, min_tokens=2, window=W), TokenSparseParams(min_tokens=N)):
        assert kept_tokens(q, k, p, scale=1.0).all()


def test_attention_is_the_compressed_sequence_scattered_back(method: None) -> None:
    q, k = planted()
    v = torch.randn(1, 2, N, N)
    p: dict[str, Any] = {"coverage": 0.2, "min_tokens": 3, "window": W, "kernel": 1, "block": 16}
    out = attnlab.attention(q, k, v, method="token_sparse", causal=True, scale=1.0, backend="reference", **p)
    kept = kept_tokens(q, k, TokenSparseParams(**p), scale=1.0)
    for h in range(2):
        idx = kept[0, h].nonzero()[:, 0]
        qc, kc, vc = (t[0, h, idx][None, None] for t in (q, k, v))
        dense = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=1.0)
        torch.testing.assert_close(out[0, h, idx], dense[0, 0])
        assert torch.equal(out[0, h, ~kept[0, h]], torch.zeros_like(out[0, h, ~kept[0, h]]))


def test_the_plan_skips_wholly_dropped_blocks_and_marks_kept_blocks_full() -> None:
    q, k = planted()
    plan = estimate(q, k, TokenSparseParams(coverage=0.2, min_tokens=3, window=W, kernel=1, block=16),
                    causal=True, scale=1.0)  # fmt: skip
    tiles = (plan.full | plan.partial)[0, 0]
    # kept: blocks 0 (3), 1 (17), 3 (30 is in block 1; the window 56-63 in block 3): block 2 holds none
    assert not tiles[2].any() and not tiles[:, 2].any()
    assert plan.full[0, 0, 3].sum() == 0  # block 3 is partly dropped: partial tiles only
    assert plan.density < 0.1


def test_batch_and_gqa_keep_per_batch_and_query_head() -> None:
    q, k = torch.randn(3, 4, 48, 16) * 2, torch.randn(3, 2, 48, 16) * 2
    p = TokenSparseParams(coverage=0.3, min_tokens=4, window=4, kernel=3, block=16)
    kept = kept_tokens(q, k, p, scale=0.25)
    assert kept.shape == (3, 4, 48) and not kept.all()
    alone = kept_tokens(q[1:2], k[1:2], p, scale=0.25)
    assert torch.equal(alone[0], kept[1])
    # GQA: query head h estimates with kv head h // 2, as with k repeated per query head (MHA)
    assert torch.equal(kept, kept_tokens(q, k.repeat_interleave(2, dim=1), p, scale=0.25))
    assert not torch.equal(kept[:, :2], kept[:, 2:])  # the kv heads' selections differ
    # one drop count per batch element: every head of an element keeps the same number of tokens
    counts = kept.sum(-1)
    assert (counts == counts[:, :1]).all()


def test_bench_budgets() -> None:
    n = 1024
    q, k = torch.randn(1, 1, n, 32), torch.randn(1, 1, n, 32)
    densities = [estimate(q, k, TokenSparseParams(**kw), causal=True, scale=32**-0.5).density
                 for kw in SPEC.bench_params(n)[:2]]  # fmt: skip
    assert 0.08 < densities[0] < densities[1] < 0.4, densities
    for kwargs in SPEC.bench_params(131072):
        TokenSparseParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"coverage": 1.5}, "coverage"),
        ({"kernel": 4}, "odd"),
        ({"window": 0}, "window"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"block": 24}, "tiles of"),
    ],
)
def test_bad_parameters_get_clear_errors(method: None, kwargs: dict, match: str) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, q, q, method="token_sparse", causal=True, **kwargs)


def test_non_causal_and_cross_are_refused(method: None) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(Exception, match="causal"):
        attnlab.attention(q, q, q, method="token_sparse", causal=False)
    with pytest.raises(Exception, match="N_q"):
        estimate(q[:, :, :20], q, TokenSparseParams(), causal=True, scale=0.25)


P0, P1 = SPEC.test_params
CASES = [
    ("block_sparse", Case(2, 4, 2, 45, 45, 16, torch.float32, True, P0)),
    ("block_sparse", Case(1, 2, 1, 40, 40, 16, torch.float32, True, P1)),
    ("block_sparse", Case(1, 2, 2, 40, 40, 16, torch.bfloat16, True, P0)),
    ("sdpa_mask", Case(2, 4, 2, 130, 130, 32, torch.float32, True, P0)),
    ("sdpa_mask", Case(2, 4, 2, 100, 100, 32, torch.bfloat16, True, P1)),
]


@pytest.mark.parametrize(("backend", "case"), CASES, ids=[f"{b}-{c.label()}" for b, c in CASES])
def test_backend_matches_reference_on_the_same_plan(method: None, backend: str, case: Case) -> None:
    q, k, _ = case.inputs(DEVICE)
    assert not kept_tokens(q, k, TokenSparseParams(**case.params), scale=case.head_dim**-0.5).all()
    check = check_parity(SPEC, backend, case, DEVICE)
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    assert "dq" in check.errors  # the backward ran
