"""indexer_topk: the index score against its formula, the selection on planted structure (learned indexer
tensors that make a window or the sinks, planted targets through the derived scorer), HISA against DSA,
batch / GQA, the plan forms, bad input, and the executor against the reference on the same plan
(registered only inside these tests)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

import attnlab
from attnlab.catalog.dynamic.indexer_topk import (
    SPEC,
    IndexerTopkParams,
    _membership,
    estimate,
    index_scores,
    select,
    selection_iou,
)
from attnlab.errors import InputError, ParamError
from attnlab.plans import blocks, executor
from attnlab.registry import registered
from attnlab.testing import Case, check_parity, device_under_test

DEVICE = device_under_test()  # (the GPU where there is one: the executor runs there, not on its CPU)


@pytest.fixture
def method() -> Iterator[None]:
    with registered(SPEC):
        yield


def test_index_score_is_the_weighted_relu_sum() -> None:
    qi, ki, w = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 4, 7)
    got = index_scores(qi, ki, w)
    want = torch.zeros(2, 2, 7, 9)
    for b in range(2):
        for h in range(4):
            c = h // 2  # index heads 0, 1 read key head 0; 2, 3 key head 1
            want[b, c] += w[b, h, :, None] * torch.relu(qi[b, h] @ ki[b, c].T)
    torch.testing.assert_close(got, want)


def ramp_indexer(n: int, sign: float) -> dict[str, torch.Tensor]:
    """A learned indexer whose score of key s is sign * s for every query: top-k = the latest keys
    (sign > 0, a sliding window) or the earliest (sign < 0, the sinks)."""
    index_k = torch.zeros(1, 1, n, 4)
    index_k[..., 0] = torch.arange(n, dtype=torch.float32) + 1
    index_q = torch.zeros(1, 2, n, 4)
    index_q[..., 0] = 1.0
    return {"index_q": index_q, "index_k": index_k, "index_w": torch.full((1, 2, n), sign)}


def test_learned_indexer_tensors_drive_the_selection() -> None:
    n, kk = 40, 5
    q, k = torch.randn(1, 2, n, 16), torch.randn(1, 1, n, 16)
    p = IndexerTopkParams(topk=kk, block=16)
    pos = torch.arange(n)
    window = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - kk)
    sinks = (pos[None, :] <= pos[:, None]) & (pos[None, :] < kk)
    for sign, want in ((1.0, window), (-1.0, sinks)):
        plan = estimate(q, k, p, causal=True, scale=0.25, **ramp_indexer(n, sign))
        mask = plan.dense_mask()
        assert mask.shape == (1, 2, n, n)
        assert torch.equal(mask[0, 0], want) and torch.equal(mask[0, 1], want), sign


def planted(n: int, d: int, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, 1, n, d): random unit keys; query t is 8 x key targets[t]."""
    g = torch.Generator().manual_seed(1)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return (8 * k[targets])[None, None], k[None, None]


def test_the_derived_scorer_finds_planted_targets() -> None:
    n = 64
    targets = [int(t) for t in torch.randint(0, 10**6, (n,)) % (torch.arange(n) + 1)]  # targets[t] <= t
    q, k = planted(n, 64, targets)
    exact = select(q, k, IndexerTopkParams(topk=1, index_dim=0), causal=True)
    assert exact[0, 0, :, 0].tolist() == targets
    sketch = select(q, k, IndexerTopkParams(topk=1, index_dim=32), causal=True)  # JL sketch of q . k
    assert (sketch[0, 0, :, 0] == torch.tensor(targets)).float().mean() >= 0.9


def test_hisa_equals_dsa_when_its_blocks_cover_the_keys_and_can_miss_a_hidden_spike() -> None:
    q, k = torch.randn(2, 4, 48, 16), torch.randn(2, 2, 48, 16)
    wide = IndexerTopkParams(topk=6, hisa_block=8, hisa_blocks=6, index_dim=0)
    assert torch.equal(select(q, k, wide, causal=True, search="hisa"), select(q, k, wide, causal=True))
    assert torch.equal(selection_iou(q, k, wide), torch.ones(2, 2))
    # key 20's block mean is 0 (its neighbours cancel it): stage 1 keeps only the forced first and last
    # blocks, so HISA misses the key every query points at; DSA finds it
    n = 48
    kk = torch.zeros(1, 1, n, 8)
    kk[..., 16:24, 0] = -1.0 / 7
    kk[..., 20, 0] = 1.0
    qq = torch.zeros(1, 1, n, 8)
    qq[..., 0] = 1.0
    narrow = IndexerTopkParams(topk=1, hisa_block=8, hisa_blocks=2, index_dim=0)
    dsa = select(qq, kk, narrow, causal=True)[0, 0, 40:, 0]
    hisa = select(qq, kk, narrow, causal=True, search="hisa")[0, 0, 40:, 0]
    assert (dsa == 20).all() and not (hisa == 20).any()
    assert selection_iou(qq, kk, narrow)[0, 0] < 1.0


def test_batch_and_gqa_share_one_selection_per_kv_head() -> None:
    q, k = torch.randn(3, 4, 40, 16), torch.randn(3, 2, 40, 16)
    p = IndexerTopkParams(topk=4, block=16, index_dim=8)
    plan = estimate(q, k, p, causal=True, scale=0.25)
    mask = plan.dense_mask()
    assert mask.shape == (3, 4, 40, 40)
    assert torch.equal(mask[:, 0], mask[:, 1]) and torch.equal(mask[:, 2], mask[:, 3])
    alone = estimate(q[1:2], k[1:2], p, causal=True, scale=0.25).dense_mask()
    assert torch.equal(alone[0], mask[1])
    pos = torch.arange(40)
    assert torch.equal(mask.sum(-1)[0, 0], torch.clamp(pos + 1, max=4))  # min(topk, visible) keys per row


def test_non_causal_full_budget_is_dense_and_empty_rows_give_zeros(method: None) -> None:
    q, k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    out = attnlab.attention(q, k, v, method="indexer_topk", causal=False, topk=30, block=16,
                            backend="reference")  # fmt: skip
    torch.testing.assert_close(out, attnlab.attention(q, k, v, method="softmax", backend="reference"))
    # causal cross with N_q > N_k: the first N_q - N_k queries see no key
    q2 = torch.randn(1, 2, 40, 16)
    out2 = attnlab.attention(q2, k, v, method="indexer_topk", causal=True, topk=3, block=16,
                             backend="reference")  # fmt: skip
    assert torch.equal(out2[:, :, :10], torch.zeros_like(out2[:, :, :10]))
    assert out2[:, :, 10:].abs().sum(-1).gt(0).all()


def test_block_granularity_keeps_the_token_budget_in_tiles() -> None:
    q, k = torch.randn(2, 2, 128, 16), torch.randn(2, 2, 128, 16)
    p = IndexerTopkParams(topk=20, block=16, granularity="block")
    plan = estimate(q, k, p, causal=True, scale=0.25)
    tiles = plan.full | plan.partial
    assert tiles.sum(-1).max() <= 2  # ceil(20 / 16) tiles per query block
    assert plan.columns is None and plan.rule == "causal"


def test_bench_budgets_run_and_give_sparse_plans() -> None:
    n = 2048
    q, k = torch.randn(1, 1, n, 32), torch.randn(1, 1, n, 32)
    densities = [estimate(q, k, IndexerTopkParams(**kw), causal=True, scale=32**-0.5).block_density
                 for kw in SPEC.bench_params(n)[:2]]  # fmt: skip
    assert 0.05 < densities[0] < densities[1] < 0.5, densities
    for kwargs in SPEC.bench_params(131072):
        IndexerTopkParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topk": 0}, "topk"),
        ({"search": "tree"}, "search"),
        ({"granularity": "row"}, "granularity"),
        ({"block": 24}, "tiles of"),
        ({"index_dim": -1}, "index_dim"),
        ({"hisa_blocks": 0}, "hisa_blocks"),
    ],
)
def test_bad_parameters_get_clear_errors(method: None, kwargs: dict, match: str) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, q, q, method="indexer_topk", **kwargs)


def test_hisa_blocks_that_cannot_hold_topk_keys_are_refused(method: None) -> None:
    # m B < k: stage 2 would return fewer than topk keys (HISA's constraint m·B >= k)
    msg = r"hisa_blocks=2 x hisa_block=8 = 16 candidate keys < topk=17.*m·B >= k"
    with pytest.raises(ParamError, match=msg):
        IndexerTopkParams(topk=17, search="hisa", hisa_block=8, hisa_blocks=2)
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ParamError, match=msg):
        attnlab.attention(q, q, q, method="indexer_topk", topk=17, search="hisa", hisa_block=8, hisa_blocks=2)
    # the search override of select / selection_iou checks it too (the params' own search is "token")
    token = IndexerTopkParams(topk=17, hisa_block=8, hisa_blocks=2, index_dim=0)
    with pytest.raises(ParamError, match=msg):
        select(q, q, token, causal=True, search="hisa")
    with pytest.raises(ParamError, match=msg):
        selection_iou(q, q, token)
    # m B = k is taken: every query with topk visible keys gets topk of them
    exact = IndexerTopkParams(topk=16, search="hisa", hisa_block=8, hisa_blocks=2, index_dim=0)
    sel = select(q, q, exact, causal=False)
    assert bool((sel < 64).all())


def test_bad_indexer_tensors_get_clear_errors() -> None:
    q, k = torch.randn(1, 2, 20, 16), torch.randn(1, 1, 20, 16)
    p = IndexerTopkParams(topk=3)
    good = ramp_indexer(20, 1.0)
    with pytest.raises(InputError, match="together"):
        select(q, k, p, causal=True, index_q=good["index_q"])
    with pytest.raises(InputError, match="disagree"):
        estimate(q, k, p, causal=True, scale=0.25, **{**good, "index_w": torch.ones(1, 2, 19)})
    with pytest.raises(InputError, match="H_kv"):
        estimate(q, k, p, causal=True, scale=0.25, **{**good, "index_k": torch.ones(1, 3, 20, 4)})
    with pytest.raises(InputError, match="unknown indexer"):
        estimate(q, k, p, causal=True, scale=0.25, index_x=good["index_q"])


def random_selection(b: int, hk: int, n_q: int, n_k: int, kk: int, seed: int) -> torch.Tensor:
    """A selection as :func:`select` gives it: long (B, H_k, N_q, K), each row ascending distinct keys
    then ``N_k`` padding; rows of every count from 0 (all padding) to K."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.argsort(torch.rand(b, hk, n_q, n_k, generator=g), dim=-1)[..., :kk]
    count = torch.randint(0, kk + 1, (b, hk, n_q, 1), generator=g)
    count.view(-1)[:2] = torch.tensor([0, kk])
    keys = torch.where(torch.arange(kk) < count, keys, n_k)
    return torch.sort(keys, dim=-1).values


def brute_membership(sel: torch.Tensor, group: int, b, h, q_idx, kv_idx) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The token rule's definition: kv_idx is one of the row's stored keys (padding ``N_k`` included),
    query heads reading their kv head's row, query indices past the last row reading the last row."""
    rows = sel[b.long(), h.long() // group, q_idx.long().clamp(max=sel.shape[2] - 1)]
    return (rows == kv_idx.long()[..., None]).any(-1)


SHAPES = [  # (B, H, H_k, N_q, N_k, K)
    (2, 6, 3, 37, 53, 7),
    (1, 4, 1, 45, 20, 20),  # K = N_k: full rows
    (3, 2, 2, 19, 19, 1),
    (1, 5, 1, 70, 33, 5),  # cross, N_q > N_k
    (2, 3, 1, 9, 130, 64),  # cross, N_q < N_k
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_membership_matches_the_rows_it_was_given(shape: tuple[int, ...]) -> None:
    """The token rule (one 1-D search over all rows) equals the brute-force membership on the shapes its
    callers use: the executor's tiles ((T, 1, 1) heads, (T, bq, 1) x (T, 1, bk) positions, tiles past the
    matrix's edges), the plan's dense mask (int32 broadcast grids) and FlexAttention's vmapped scalars."""
    b, h, hk, n_q, n_k, kk = shape
    sel = random_selection(b, hk, n_q, n_k, kk, seed=sum(shape))
    group = h // hk
    mod = _membership(sel, n_k, group)
    # executor tiles, every (b, h, tile) including the ragged ones, plus out-of-range kv (n_k, beyond)
    bq, bk = 16, 8
    nqb, nkb = -(-n_q // bq), -(-(n_k + 9) // bk)
    tiles = torch.cartesian_prod(torch.arange(b), torch.arange(h), torch.arange(nqb), torch.arange(nkb))
    tc = tiles.to(torch.int32)
    args = (tc[:, 0, None, None], tc[:, 1, None, None],
            (tc[:, 2, None] * bq + torch.arange(bq, dtype=torch.int32))[:, :, None],
            (tc[:, 3, None] * bk + torch.arange(bk, dtype=torch.int32))[:, None, :])  # fmt: skip
    got = mod(*args)
    assert got.shape == (tiles.shape[0], bq, bk)
    assert torch.equal(got, brute_membership(sel, group, *args))
    # the plan's dense-mask grids
    grids = (torch.arange(b, dtype=torch.int32)[:, None, None, None],
             torch.arange(h, dtype=torch.int32)[None, :, None, None],
             torch.arange(n_q, dtype=torch.int32)[None, None, :, None],
             torch.arange(n_k, dtype=torch.int32)[None, None, None, :])  # fmt: skip
    dense = brute_membership(sel, group, *grids)
    assert torch.equal(mod(*grids), dense)
    assert dense.any() and not dense.all()
    # FlexAttention: mask_mod called on 0-d tensors under vmap
    assert torch.equal(create_mask(mod, b, h, n_q, n_k, device="cpu"), dense)


@pytest.mark.parametrize(("causal", "n_q", "n_k"), [(True, 45, 60), (False, 45, 60), (True, 70, 33)])
def test_query_heads_of_a_kv_head_share_their_tiles_patterns(causal: bool, n_q: int, n_k: int) -> None:
    """The plan's ids give the query heads of one kv head the same tile ids; the executor's tables from
    them (masks evaluated in several chunks) equal the generic path's, and the dense mask is each query's
    own selection."""
    q, k = torch.randn(2, 6, n_q, 16), torch.randn(2, 2, n_k, 16)
    p = IndexerTopkParams(topk=5, block=16, index_dim=8)
    plan = estimate(q, k, p, causal=causal, scale=0.25)
    ids = plan.pattern_ids
    assert ids is not None and torch.equal(ids >= 0, plan.partial)
    assert torch.equal(ids[:, 0], ids[:, 2]) and torch.equal(ids[:, 3], ids[:, 5])
    assert not (ids[:, 0, None] == ids[:, 3][:, None]).logical_and(ids[:, 0, None] >= 0).any()
    sel = select(q, k, p, causal=causal)
    pos = (torch.arange(2)[:, None, None, None], torch.arange(6)[None, :, None, None],
           torch.arange(n_q)[None, None, :, None], torch.arange(n_k)[None, None, None, :])  # fmt: skip
    want = brute_membership(sel, 3, *pos) & (pos[3] < n_k)
    assert torch.equal(plan.dense_mask(), want)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blocks, "EVAL_CHUNK_ELEMENTS", 3 * 16 * 16)  # 3 tiles a chunk
        by_ids = executor.executor_tables(plan)
    generic = executor.executor_tables(replace(plan, pattern_ids=None, _memo={}))
    assert by_ids.patterns.shape[0] < int(plan.partial.sum())
    for name in ("p_num", "p_idx", "p_pat", "tp_num", "tp_idx", "tp_pat", "patterns"):
        assert torch.equal(getattr(by_ids, name), getattr(generic, name)), name


P0, P1, P2 = SPEC.test_params
CASES = [
    ("block_sparse", Case(2, 4, 2, 45, 45, 16, torch.float32, True, P0)),
    ("block_sparse", Case(1, 2, 1, 40, 40, 16, torch.float32, True, P1)),
    ("block_sparse", Case(1, 2, 2, 20, 45, 16, torch.float32, False, P2)),
    ("block_sparse", Case(1, 2, 2, 45, 20, 16, torch.bfloat16, True, P0)),
    ("sdpa_mask", Case(2, 4, 2, 130, 130, 32, torch.float32, True, P1)),
    ("sdpa_mask", Case(2, 4, 2, 70, 200, 32, torch.bfloat16, False, P0)),
]


@pytest.mark.parametrize(("backend", "case"), CASES, ids=[f"{b}-{c.label()}" for b, c in CASES])
def test_backend_matches_reference_on_the_same_plan(method: None, backend: str, case: Case) -> None:
    check = check_parity(SPEC, backend, case, DEVICE)
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    assert "dq" in check.errors  # the backward ran
