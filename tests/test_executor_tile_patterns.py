"""``plans.executor._tile_patterns``, generic path (a token-level ``mask_mod``, no ``pattern_ids``): every
partial tile's pattern is the mask evaluated over that tile, the distinct masks are numbered by first
occurrence whatever the chunking or the dedupe route, and the host is asked a bounded number of times
(not once per pattern: on a GPU each is a sync)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

from attnlab.catalog.dynamic import indexer_topk, token_sparse
from attnlab.plans import Plan, executor


def _token_sparse_plan(n: int) -> Plan:
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(1, 5, n, 16, generator=g), torch.randn(1, 1, n, 16, generator=g)
    params = token_sparse.TokenSparseParams(coverage=0.3, min_tokens=4, window=4, kernel=3, block=16)
    return token_sparse.estimate(q, k, params, causal=True, scale=0.25)


def _indexer_plan(n: int) -> Plan:
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(1, 5, n, 16, generator=g), torch.randn(1, 1, n, 16, generator=g)
    params = indexer_topk.IndexerTopkParams(topk=5, block=16, index_dim=8)
    plan = indexer_topk.estimate(q, k, params, causal=True, scale=0.25)
    # its ids only share a kv head's tiles among its query heads: without them, the generic path
    return replace(plan, pattern_ids=None, _memo={})


PLANS: dict[str, Callable[[int], Plan]] = {"token_sparse": _token_sparse_plan, "indexer_topk": _indexer_plan}


def _tile_masks(plan: Plan) -> torch.Tensor:
    """bool (Bp, Hp, NQB, NKB, block_q, block_k): the plan's dense token mask cut into tiles (zeros past
    the matrix); inside a partial tile it is ``mask_mod`` over the tile."""
    dense = plan.dense_mask().bool()
    bp, hp, nqb, nkb = plan.partial.shape
    bq, bk = plan.block_q, plan.block_k
    padded = torch.nn.functional.pad(dense, (0, nkb * bk - plan.n_k, 0, nqb * bq - plan.n_q))
    return padded.view(bp, hp, nqb, bq, nkb, bk).transpose(3, 4)


@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("hashed", [False, True])
def test_every_partial_tile_gets_its_own_mask(
    name: str, hashed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over many chunks of 7 tiles and on both dedupe routes: patterns[id] of each partial tile is its
    mask, the patterns are distinct, numbered by first occurrence in row-major order, and the grid and
    patterns equal those of one chunk holding every tile."""
    plan = PLANS[name](200)
    assert plan.pattern_ids is None and plan.rule is None  # the generic path
    real = executor.distinct_words
    monkeypatch.setattr(executor, "distinct_words", lambda w, h=None: real(w, hashed))
    monkeypatch.setattr(executor, "TILE_CHUNK", 7)
    grid, patterns = executor._tile_patterns(plan, plan.partial)
    n_tiles, u = int(plan.partial.sum()), patterns.shape[0]
    assert n_tiles > 10 * 7 and u > 7  # several chunks, patterns first seen in different chunks
    assert patterns.dtype == torch.uint8 and patterns.shape[1:] == (plan.block_q, plan.block_k)
    assert torch.equal((grid >= 0), plan.partial)
    ids = grid[plan.partial]  # row-major (b, h, i, j)
    assert torch.equal(patterns[ids].bool(), _tile_masks(plan)[plan.partial])
    assert torch.unique(patterns.view(u, -1), dim=0).shape[0] == u
    firsts = [ids.tolist().index(p) for p in range(u)]
    assert firsts == sorted(firsts)
    monkeypatch.setattr(executor, "TILE_CHUNK", 1 << 20)
    whole_grid, whole_patterns = executor._tile_patterns(plan, plan.partial)
    assert torch.equal(whole_grid, grid) and torch.equal(whole_patterns, patterns)


def test_tables_list_each_tile_with_its_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The executor's tables (forward and transposed lists) point each listed partial tile at its mask."""
    monkeypatch.setattr(executor, "TILE_CHUNK", 5)
    plan = _token_sparse_plan(150)
    t = executor.executor_tables(plan)
    masks = _tile_masks(plan)
    for num, idx, pat, tiles in (
        (t.p_num, t.p_idx, t.p_pat, masks),
        (t.tp_num, t.tp_idx, t.tp_pat, masks.transpose(2, 3)),
    ):
        listed = torch.arange(idx.shape[-1]) < num[..., None]
        b, h, row, slot = listed.nonzero().unbind(1)
        want = tiles[b, h, row, idx[b, h, row, slot].long()]
        assert torch.equal(t.patterns[pat[listed].long()].bool(), want)


@pytest.fixture
def host_calls() -> Iterator[dict[str, int]]:
    """Counts of the Tensor methods that read a value back to the host (on a GPU: a sync each)."""
    counts: dict[str, int] = {}
    names = ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__index__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name: str) -> Callable[..., Any]:
        def call(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return saved[name](self, *args, **kwargs)

        return call

    for n in names:
        setattr(torch.Tensor, n, counting(n))
    try:
        yield counts
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_host_reads_do_not_grow_with_tiles_or_patterns(
    name: str, host_calls: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tables of a small and a large plan, with 3-tile chunks, read the host equally often (the old
    generic path copied each chunk's every distinct pattern to the host)."""
    plans = [PLANS[name](n) for n in (64, 300)]
    monkeypatch.setattr(executor, "TILE_CHUNK", 3)
    seen = []
    for plan in plans:
        host_calls.clear()
        tables = executor.executor_tables(plan)
        seen.append((sum(host_calls.values()), tables.patterns.shape[0], int(plan.partial.sum())))
    (small, u_small, t_small), (large, u_large, t_large) = seen
    assert u_large > 4 * u_small and t_large > 4 * t_small
    assert small == large <= 12, seen


def test_packed_rows_round_trip() -> None:
    g = torch.Generator().manual_seed(3)
    for n in (1, 63, 64, 65, 300):
        m = torch.rand(9, n, generator=g) < 0.5
        words = executor.packed_rows(m)
        assert words.dtype == torch.int64 and words.shape == (9, -(-n // 64))
        assert torch.equal(executor.unpacked_rows(words, n), m.to(torch.uint8))


@pytest.mark.parametrize("hashed", [False, True])
def test_distinct_words_number_by_first_occurrence(hashed: bool) -> None:
    words = torch.tensor([[5, 1], [2, 2], [5, 1], [-1, 0], [2, 2], [0, 0]])
    first, inverse = executor.distinct_words(words, hashed)
    assert first.tolist() == [0, 1, 3, 5] and inverse.tolist() == [0, 1, 0, 2, 1, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the H100)")
def test_packing_and_hashing_make_no_blocking_copy_on_cuda() -> None:
    """packed_rows builds its bit weights on the device and the row-hash multipliers are copied to the
    device once per width: in sync debug mode "error" neither raises (a pageable host copy would)."""
    from attnlab.plans.executor import _row_hash_multipliers, packed_rows

    m = torch.rand(5, 200, device="cuda") > 0.5
    _row_hash_multipliers(4, m.device)  # (the one copy, made before the check)
    torch.cuda.set_sync_debug_mode("error")
    try:
        words = packed_rows(m)
        mult = _row_hash_multipliers(4, m.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert words.shape == (5, 4) and mult.shape == (4,) and mult.is_cuda
