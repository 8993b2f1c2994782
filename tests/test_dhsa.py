"""dhsa: chunk starts on planted key segments, the sqrt-scaled chunk scores and their upsampling checked
against loops, planted query blocks finding their chunk's block, the forced and dense rules, batch with
ragged chunk counts / GQA, bench densities, bad input, and the executor against the reference on the same
plan (registered only inside these tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import attnlab
from attnlab.catalog.dynamic.dhsa import (
    SPEC,
    DhsaParams,
    block_importance,
    chunk_scores,
    chunk_starts,
    estimate,
)
from attnlab.errors import ParamError
from attnlab.registry import registered
from attnlab.testing import Case, check_parity, device_under_test

DEVICE = device_under_test()  # (the GPU where there is one: the executor runs there, not on its CPU)

N, D, BS = 96, 16, 16
BOUNDS = [0, 13, 30, 41, 58, 75, N]  # chunk c holds keys [BOUNDS[c], BOUNDS[c + 1])


@pytest.fixture
def method() -> Iterator[None]:
    with registered(SPEC):
        yield


def segments(bounds: list[int] = BOUNDS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(k (1, 2, N, D): keys constant (plus 1% noise) on each segment, orthonormal directions u_c;
    u (C, D))."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(D, D, generator=g)).Q[: len(bounds) - 1]
    k = torch.zeros(N, D)
    for c in range(len(bounds) - 1):
        k[bounds[c] : bounds[c + 1]] = u[c]
    k = k + 0.01 * torch.randn(N, D, generator=g)
    return torch.stack([k, 2 * k])[None], u


def starts_of(k: torch.Tensor, chunk_beta: int) -> list[int]:
    p = DhsaParams(block=BS, chunk_beta=chunk_beta, boundary_window=4, nms_window=4, dense_last=0)
    return chunk_starts(k, p)[0].nonzero()[:, 0].tolist()


def test_chunks_start_where_the_keys_change() -> None:
    k, _ = segments()
    # (96 // 16) * chunk_beta = 6 starts beside 0: the 5 planted ones and one more (in the long last chunk)
    found = starts_of(k, chunk_beta=1)
    assert set(BOUNDS[:-1]) <= set(found) and len(found) == 7
    # the instruction start N - dense_last is a start; nothing after it or within nms_window of it
    p = DhsaParams(block=BS, chunk_beta=1, boundary_window=4, nms_window=4, dense_last=20)
    with_inst = chunk_starts(k, p)[0].nonzero()[:, 0].tolist()
    assert 76 in with_inst and max(with_inst) == 76 and 75 not in with_inst
    assert set(BOUNDS[:-2]) <= set(with_inst) and len(with_inst) == 7
    # constant keys have no boundary at all
    assert starts_of(torch.ones(1, 1, N, D), chunk_beta=8) == [0]


def test_chunk_scores_are_sqrt_scaled_pooled_dot_products() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 40, 8, generator=g), torch.randn(2, 2, 50, 8, generator=g)
    starts = torch.zeros(2, 50, dtype=torch.bool)
    starts[0, [0, 7, 30]] = True
    starts[1, [0, 12]] = True
    for sqrt_scale in (True, False):
        p = DhsaParams(block=16, sqrt_scale=sqrt_scale)
        s, chunk = chunk_scores(q, k, starts, p)
        assert s.shape == (2, 3, 3)
        for b, bounds in enumerate(([0, 7, 30, 50], [0, 12, 50])):
            for c in range(len(bounds) - 1):
                lo, hi = bounds[c], bounds[c + 1]
                assert (chunk[b, lo:hi] == c).all()
                kc = k[b, :, lo:hi].mean((0, 1)) * ((hi - lo) ** 0.5 if sqrt_scale else 1.0)
                for i in range(3):
                    rows = q[b, :, 16 * i : 16 * (i + 1)]
                    qi = rows.mean((0, 1)) * (rows.shape[1] ** 0.5 if sqrt_scale else 1.0)
                    torch.testing.assert_close(s[b, i, c], qi @ kc)
            assert (s[b, :, len(bounds) - 1 :] == 0).all()  # padding chunks (sequence 1 has 2)


def test_block_importance_is_the_mean_of_the_upsampled_token_scores() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 3, 4, generator=g)
    chunk = torch.tensor([[0] * 5 + [1] * 20 + [2] * 12 + [3] * 3, [0] * 30 + [1] * 10])
    tokens = torch.gather(scores, 2, chunk[:, None, :].expand(-1, 3, -1))  # (B, NQB, N_k)
    want = torch.stack([tokens[..., j * 16 : (j + 1) * 16].mean(-1) for j in range(3)], -1)
    torch.testing.assert_close(block_importance(scores, chunk, 16), want)


def test_query_blocks_find_the_block_of_their_chunk() -> None:
    k, u = segments()
    targets = {1: 0, 2: 1, 3: 0, 4: 2, 5: 3}  # query block -> chunk in its past
    best_block = {0: 0, 1: 1, 2: 2, 3: 3}  # the block holding most of the chunk
    q = torch.zeros(N, D)
    for i, c in targets.items():
        q[i * BS : (i + 1) * BS] = 4 * u[c]
    q = q[None, None].expand(1, 4, N, D)
    p = DhsaParams(block=BS, budget=2 * BS, chunk_beta=1, boundary_window=4, nms_window=4, local=1, sink=0,
                   dense_last=0)  # fmt: skip
    plan = estimate(q, k, p, causal=True, scale=1.0)
    assert plan.full.shape == (1, 1, 6, 6)  # one plan for every head
    tiles = (plan.full | plan.partial)[0, 0]
    for i, c in targets.items():
        assert set(tiles[i].nonzero()[:, 0].tolist()) == {best_block[c], i}, (i, c)


def test_forced_blocks_budget_and_dense_last_queries() -> None:
    q, k = torch.randn(1, 2, 150, 16), torch.randn(1, 2, 150, 16)
    p = DhsaParams(block=16, budget=48, local=20, sink=20, dense_last=12)
    plan = estimate(q, k, p, causal=True, scale=0.25)
    tiles = (plan.full | plan.partial)[0, 0]
    for i in range(10):
        kept = set(tiles[i].nonzero()[:, 0].tolist())
        local = set(range(max(0, min(16 * i + 15, 149) - 19) // 16, i + 1))
        forced = local | ({0, 1} & set(range(i + 1)))
        assert forced <= kept and max(kept) == i
        if min(16 * i + 15, 149) >= 150 - 12:  # blocks 8 and 9 hold some of the last 12 queries: dense
            assert kept == set(range(i + 1))
        else:
            assert len(kept) == max(len(forced), min(3, i + 1)), (i, kept)


def test_chunked_prefill_forces_the_diagonal_span_on_top_of_the_budget() -> None:
    # N_k - N_q = 24: query block i (positions 24 + 16 i .. 39 + 16 i) straddles key blocks i + 1, i + 2;
    # local=1 forced only the block of the last position (its first rows lost their own keys): now both,
    # the budget (2 blocks) counting the second, the first on top, so one block is still chosen by score
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 64, 16, generator=g),
        torch.randn(1, 2, 88, 16, generator=g),
        torch.randn(1, 2, 88, 16, generator=g),
    )
    p = DhsaParams(block=16, budget=32, local=1, sink=0, dense_last=0)
    plan = estimate(q, k, p, causal=True, scale=0.25)
    tiles = (plan.full | plan.partial)[0, 0]
    for i in range(4):
        kept = set(tiles[i].nonzero().flatten().tolist())
        assert {i + 1, i + 2} <= kept and len(kept) == 3, (i, kept)
    assert bool(plan.dense_mask()[..., torch.arange(64), torch.arange(64) + 24].all())
    out = attnlab.attention(q, k, v, method="dhsa", causal=True, block=16, budget=16, local=1, sink=0,
                            dense_last=0, backend="reference")  # fmt: skip
    assert not bool((out.abs().sum(-1) == 0).any())


def test_batch_with_different_chunk_counts_and_gqa() -> None:
    k0, _ = segments()
    k1, _ = segments([0, 40, N], seed=3)
    k = torch.cat([k0, k1])
    q = torch.randn(2, 4, N, D)
    p = DhsaParams(block=BS, budget=2 * BS, chunk_beta=1, boundary_window=4, nms_window=4, local=1, sink=0,
                   dense_last=8)  # fmt: skip
    plan = estimate(q, k, p, causal=True, scale=0.25)
    for b in range(2):
        alone = estimate(q[b : b + 1], k[b : b + 1], p, causal=True, scale=0.25)
        assert torch.equal(plan.full[b], alone.full[0]) and torch.equal(plan.partial[b], alone.partial[0])
    rep = estimate(q, k.repeat_interleave(2, dim=1), p, causal=True, scale=0.25)
    assert torch.equal(plan.full, rep.full) and torch.equal(plan.partial, rep.partial)


def test_bench_budgets_give_block_topk_like_densities() -> None:
    n = 4096
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, n, 32, generator=g), torch.randn(1, 2, n, 32, generator=g)
    sets = SPEC.bench_params(n)
    d = [estimate(q, k, DhsaParams(**kw), causal=True, scale=32**-0.5).block_density for kw in sets[:2]]
    assert 0.08 < d[0] < 0.17 and 0.18 < d[1] < 0.32, d
    for kwargs in SPEC.bench_params(131072):
        DhsaParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": 24}, "tiles of"),
        ({"budget": 0}, "budget"),
        ({"chunk_beta": 0}, "chunk_beta"),
        ({"boundary_window": 0}, "boundary_window"),
        ({"nms_window": -1}, "nms_window"),
        ({"local": 0}, "local"),
        ({"sink": -1}, "sink"),
        ({"dense_last": -1}, "dense_last"),
        ({"sqrt_scale": 1}, "sqrt_scale"),
    ],
)
def test_bad_parameters_get_clear_errors(method: None, kwargs: dict, match: str) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, q, q, method="dhsa", causal=True, **kwargs)


def test_non_causal_is_refused(method: None) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(Exception, match="causal"):
        attnlab.attention(q, q, q, method="dhsa", causal=False)


P0, P1 = SPEC.test_params
CASES = [
    ("block_sparse", Case(2, 2, 1, 100, 100, 16, torch.float32, True, P0)),
    ("block_sparse", Case(1, 2, 2, 30, 90, 16, torch.float32, True, P1)),
    ("block_sparse", Case(1, 2, 2, 64, 64, 16, torch.bfloat16, True, P1)),
    ("sdpa_mask", Case(2, 4, 2, 130, 130, 32, torch.float32, True, P0)),
    ("sdpa_mask", Case(2, 4, 2, 70, 200, 32, torch.bfloat16, True, P1)),
]


@pytest.mark.parametrize(("backend", "case"), CASES, ids=[f"{b}-{c.label()}" for b, c in CASES])
def test_backend_matches_reference_on_the_same_plan(method: None, backend: str, case: Case) -> None:
    q, k, _ = case.inputs(DEVICE)
    plan = estimate(q, k, DhsaParams(**case.params), causal=True, scale=case.head_dim**-0.5)
    assert plan.block_density < 0.95  # the case drops tiles
    check = check_parity(SPEC, backend, case, DEVICE)
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    assert "dq" in check.errors  # the backward ran
