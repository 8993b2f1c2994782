"""block_topk's estimator on its own (planted structure, budgets, forced blocks) and its bad input; the
executor against the reference runs in test_parity (same plan on both sides: the estimator is fp32)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.catalog.dynamic.block_topk import BlockTopkParams, estimate
from attnlab.errors import ParamError


def planted(n_blocks: int, block: int, d: int, match: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, 1, N, d) where query block i is aligned with key block match[i] only (orthogonal keys)."""
    basis = torch.eye(d)[:n_blocks] * 8.0
    k = basis.repeat_interleave(block, 0)[None, None]
    q = basis[match].repeat_interleave(block, 0)[None, None]
    return q, k


def test_the_estimator_finds_the_planted_block() -> None:
    match = [3, 0, 5, 1, 7, 2, 6, 4]
    q, k = planted(8, 16, 16, match)
    p = BlockTopkParams(block=16, topk=1, sink=False, local=False)
    plan = estimate(q, k, p, causal=False, scale=0.25)
    kept = plan.full[0, 0].nonzero()[:, 1].tolist()
    assert kept == match


def test_causal_keeps_only_past_blocks_and_the_forced_ones() -> None:
    match = [0, 0, 1, 0, 3, 2, 5, 6]  # every match lies at or before its query block
    q, k = planted(8, 16, 16, match)
    plan = estimate(q, k, BlockTopkParams(block=16, topk=3), causal=True, scale=0.25)
    tiles = (plan.full | plan.partial)[0, 0]
    for i, j in enumerate(match):
        row = tiles[i].nonzero()[:, 0].tolist()
        assert all(c <= i for c in row), f"block {i} keeps future blocks {row}"
        assert {0, i, j} <= set(row) and len(row) <= 3
    # the diagonal tiles are the partial ones (causal rule inside), all others full
    assert torch.equal(plan.partial[0, 0], torch.eye(8, dtype=torch.bool))


def test_mass_keeps_the_fewest_blocks_reaching_it() -> None:
    match = [2] * 8
    q, k = planted(8, 16, 16, match)
    few = estimate(q, k, BlockTopkParams(block=16, topk=8, mass=0.5, sink=False, local=False), causal=False,
                   scale=0.25)  # fmt: skip
    assert few.full[0, 0].sum(-1).tolist() == [1] * 8  # one block holds (almost) all the mass
    many = estimate(q, k, BlockTopkParams(block=16, topk=8), causal=False, scale=0.25)
    assert many.full[0, 0].sum(-1).tolist() == [8] * 8


def test_gqa_and_batch_plans_are_per_batch_and_query_head() -> None:
    q = torch.randn(3, 4, 64, 16)
    k = torch.randn(3, 2, 64, 16)
    plan = estimate(q, k, BlockTopkParams(block=16, topk=2), causal=True, scale=0.25)
    assert plan.full.shape == (3, 4, 4, 4)
    # batch 1 estimated alone gives the same tiles as inside the batch (no cross-batch mixing)
    alone = estimate(q[1:2], k[1:2], BlockTopkParams(block=16, topk=2), causal=True, scale=0.25)
    assert torch.equal(alone.full[0], plan.full[1]) and torch.equal(alone.partial[0], plan.partial[1])
    # GQA: query head h scores with kv head h // 2, as with k repeated per query head (MHA)
    for causal in (True, False):
        p = BlockTopkParams(block=16, topk=2, sink=False, local=False)
        gqa = estimate(q, k, p, causal=causal, scale=0.25)
        mha = estimate(q, k.repeat_interleave(2, dim=1), p, causal=causal, scale=0.25)
        assert torch.equal(gqa.full, mha.full) and torch.equal(gqa.partial, mha.partial)
    assert not torch.equal(gqa.full[:, 0], gqa.full[:, 2])  # the kv heads' plans differ


def test_chunked_prefill_forces_the_diagonal_span_on_top_of_the_budget() -> None:
    # 24 cached keys, then 64 queries: query block i holds positions 24 + 16 i .. 39 + 16 i, key blocks
    # i + 1 and i + 2 (N_k - N_q = 24 is not a multiple of 16): both are forced, the budget counts the
    # second (its last position's) with the sink, the first comes on top: topk - 2 = 1 block by score
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 2, 64, 16, generator=g),
        torch.randn(2, 2, 88, 16, generator=g),
        torch.randn(2, 2, 88, 16, generator=g),
    )
    plan = estimate(q, k, BlockTopkParams(block=16, topk=3), causal=True, scale=0.25)
    tiles = plan.full | plan.partial
    for i in range(4):
        row = tiles[..., i, :]
        assert bool(row[..., [0, i + 1, i + 2]].all())  # the sink and the span
        assert torch.equal(row.sum(-1), torch.full((2, 2), min(4, i + 3)))  # (block 0: only 3 allowed)
    # the first rows of each query block see their own position (the old rule gave them zeros with
    # topk=1 and no sink)
    out = attnlab.attention(q, k, v, method="block_topk", causal=True, block=16, topk=1, sink=False,
                            backend="reference")  # fmt: skip
    assert not bool((out.abs().sum(-1) == 0).any())
    mask = estimate(q, k, BlockTopkParams(block=16, topk=1, sink=False), causal=True, scale=0.25).dense_mask()
    assert bool(mask[..., torch.arange(64), torch.arange(64) + 24].all())


def test_full_budget_equals_dense_attention() -> None:
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    for causal in (True, False):
        out = attnlab.attention(q, k, v, method="block_topk", causal=causal, block=16, topk=100,
                                backend="reference")  # fmt: skip
        dense = attnlab.attention(q, k, v, method="softmax", causal=causal, backend="reference")
        torch.testing.assert_close(out, dense)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": 24}, "tiles of"),
        ({"topk": 0}, "topk"),
        ({"mass": 1.5}, "mass"),
        ({"topk": 1}, "at least 2"),  # sink and local both forced: one place for two forced blocks
    ],
)
def test_bad_budgets_get_clear_errors(kwargs: dict, match: str) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, q, q, method="block_topk", **kwargs)
