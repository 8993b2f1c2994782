"""hip: the tree search on planted structure (causal and not), its O(log) rounds of 2K scored blocks, the
forced sink / window blocks, batch / GQA, the full budget, bench densities, bad input, and the executor
against the reference on the same plan (registered only inside these tests)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

import attnlab
from attnlab.catalog.dynamic import hip
from attnlab.catalog.dynamic.hip import SPEC, HipParams, estimate, search
from attnlab.errors import ParamError
from attnlab.registry import registered
from attnlab.testing import Case, check_parity, device_under_test

DEVICE = device_under_test()  # (the GPU where there is one: the executor runs there, not on its CPU)

BS, NB = 16, 16
N = BS * NB


@pytest.fixture
def method() -> Iterator[None]:
    with registered(SPEC):
        yield


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """q, k (1, 1, N, 16) whose score q_r . k_t = 50 cos(w (t - target_i)), w = pi / 2N, falls with the
    distance from one target token per query block i (in its causal past): the best key block is the
    target's, and a half's centre is better the closer the half is to the target."""
    w = math.pi / (2 * N)
    t = torch.arange(N, dtype=torch.float32)
    k = torch.nn.functional.pad(torch.stack([torch.cos(w * t), torch.sin(w * t)], -1), (0, 14))
    g = torch.Generator().manual_seed(seed)
    targets = [int(torch.randint(0, max(1, i * BS - 1), (1,), generator=g)) for i in range(NB)]
    q = torch.zeros(N, 16)
    for i, tt in enumerate(targets):
        q[i * BS : (i + 1) * BS, 0] = 50 * math.cos(w * tt)
        q[i * BS : (i + 1) * BS, 1] = 50 * math.sin(w * tt)
    return q[None, None], k[None, None], targets


@pytest.mark.parametrize("causal", [True, False])
def test_the_search_finds_each_query_blocks_best_key_block(causal: bool) -> None:
    q, k, targets = planted()
    p = HipParams(block=BS, mask_k=2 * BS, window=1, sink=0)  # K = 2 blocks; only the diagonal forced
    kept = search(q, k, p, causal=causal)[0, 0]
    plan = estimate(q, k, p, causal=causal, scale=1.0)
    tiles = (plan.full | plan.partial)[0, 0]
    for i, target in enumerate(targets):
        found = set(kept[i].nonzero()[:, 0].tolist())
        assert target // BS in found | {i}, (i, target, found)
        assert len(found) <= 2 and (not causal or max(found, default=-1) < i)
        assert set(tiles[i].nonzero()[:, 0].tolist()) == found | {i}


def test_the_search_runs_log_rounds_of_2k_scored_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, _ = planted()
    calls: list[int] = []
    scores = hip._block_scores

    def counting(q_rows, k, blocks, block, sample):  # type: ignore[no-untyped-def]
        calls.append(blocks.shape[-1])
        return scores(q_rows, k, blocks, block, sample)

    monkeypatch.setattr(hip, "_block_scores", counting)
    search(q, k, HipParams(block=BS, mask_k=2 * BS, window=1, sink=0), causal=True)
    # the last query block has 15 candidate blocks: 2 nodes of 7 and 8, halved 3 times
    assert calls == [4] * math.ceil(math.log2(math.ceil(15 / 2)))


@pytest.mark.parametrize("sample", [1, 2, 5, 16])
def test_a_block_scores_by_its_middle_keys(monkeypatch: pytest.MonkeyPatch, sample: int) -> None:
    monkeypatch.setattr(hip, "CHUNK_ELEMENTS", 500)  # several query-block chunks
    g = torch.Generator().manual_seed(3)
    n_k, bs = 70, 16  # the last block holds 6 keys
    q_rows = torch.randn(2, 1, 2, 3, 4, 8, generator=g)  # (B, Hkv, G, NQB, R, D)
    k = torch.randn(2, 1, n_k, 8, generator=g)
    blocks = torch.randint(0, 5, (2, 1, 2, 3, 6), generator=g)
    got = hip._block_scores(q_rows, k, blocks, bs, sample)
    for idx in blocks.flatten().unique().tolist():
        real = min(bs, n_k - idx * bs)
        lo = idx * bs + max(0, (real - sample) // 2)
        keys = k[:, :, lo : min(lo + sample, idx * bs + real)]  # (B, Hkv, S', D)
        want = torch.einsum("bhgqrd,bhsd->bhgqrs", q_rows, keys).amax((-1, -2))  # (B, Hkv, G, NQB)
        where = blocks == idx
        torch.testing.assert_close(got[where], want[..., None].expand_as(blocks)[where])


def test_sink_and_window_blocks_are_always_kept() -> None:
    q, k = torch.randn(1, 1, N, 16), torch.randn(1, 1, N, 16)
    plan = estimate(q, k, HipParams(block=BS, mask_k=BS, window=40, sink=20), causal=True, scale=0.25)
    tiles = (plan.full | plan.partial)[0, 0]
    for i in range(NB):
        kept = set(tiles[i].nonzero()[:, 0].tolist())
        win = max(0, i * BS - 39) // BS
        window = set(range(win, i + 1))  # positions [first - 39, last]
        sink = {0, 1} & set(range(i + 1))  # 20 tokens: two blocks
        searched = kept - window - sink
        assert window | sink <= kept and len(searched) <= 1, (i, kept)
        # a query block with candidates (blocks 2 .. win - 1) always gets its searched block
        assert len(searched) == (1 if win > 2 else 0), (i, kept)
    assert plan.partial[0, 0, torch.arange(NB), torch.arange(NB)].all()  # the diagonal, causal inside


def test_full_budget_is_dense_attention() -> None:
    q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))
    with registered(SPEC):
        for causal in (True, False):
            dense = attnlab.attention(q, k, v, method="softmax", causal=causal, backend="reference")
            got = attnlab.attention(q, k, v, method="hip", causal=causal, block=16, mask_k=80, window=1,
                                    sink=0, backend="reference")  # fmt: skip
            torch.testing.assert_close(got, dense)


def test_batch_and_gqa_estimate_each_sequence_and_head_alone() -> None:
    q, k = torch.randn(3, 4, 150, 16), torch.randn(3, 2, 150, 16)
    p = HipParams(block=16, mask_k=32, window=8, sink=0)
    for causal in (True, False):
        plan = estimate(q, k, p, causal=causal, scale=0.25)
        assert plan.full.shape == (3, 4, 10, 10)
        alone = estimate(q[1:2], k[1:2], p, causal=causal, scale=0.25)
        assert torch.equal(plan.full[1], alone.full[0]) and torch.equal(plan.partial[1], alone.partial[0])
        # GQA: query head h searches with kv head h // 2, as with k repeated per query head
        rep = estimate(q, k.repeat_interleave(2, dim=1), p, causal=causal, scale=0.25)
        assert torch.equal(plan.full, rep.full) and torch.equal(plan.partial, rep.partial)
    # the search differs between the query heads of a group (per-head plans)
    assert not torch.equal(plan.full[:, 0], plan.full[:, 1])


def test_cross_attention_keeps_the_bottom_right_window() -> None:
    q, k = torch.randn(1, 1, 40, 16), torch.randn(1, 1, 200, 16)
    plan = estimate(q, k, HipParams(block=16, mask_k=16, window=1, sink=0), causal=True, scale=0.25)
    tiles = (plan.full | plan.partial)[0, 0]
    # query block i's last position is min(16 (i + 1), 40) - 1 + 160: key blocks 10, 11, 12
    for i, local in enumerate((10, 11, 12)):
        assert tiles[i, local] and int(tiles[i].sum()) == 2 and not tiles[i, local + 1 :].any()


def test_bench_budgets_give_block_topk_like_densities() -> None:
    n = 4096
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, n, 32, generator=g), torch.randn(1, 1, n, 32, generator=g)
    sets = SPEC.bench_params(n)
    d = [estimate(q, k, HipParams(**kw), causal=True, scale=32**-0.5).block_density for kw in sets[:2]]
    assert 0.08 < d[0] < 0.17 and 0.18 < d[1] < 0.32, d
    for kwargs in SPEC.bench_params(131072):
        HipParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": 24}, "tiles of"),
        ({"mask_k": 0}, "mask_k"),
        ({"stride_q": 0}, "stride_q"),
        ({"block": 16, "stride_q": 17}, "stride_q"),
        ({"sample_k": 0}, "sample_k"),
        ({"block": 16, "sample_k": 17}, "sample_k"),
        ({"window": 0}, "window"),
        ({"sink": -1}, "sink"),
    ],
)
def test_bad_parameters_get_clear_errors(method: None, kwargs: dict, match: str) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, q, q, method="hip", causal=True, **kwargs)


P0, P1 = SPEC.test_params
CASES = [
    ("block_sparse", Case(2, 2, 1, 100, 100, 16, torch.float32, True, P0)),
    ("block_sparse", Case(1, 2, 1, 80, 80, 16, torch.float32, False, P1)),
    ("block_sparse", Case(1, 2, 2, 20, 75, 16, torch.float32, True, P1)),
    ("block_sparse", Case(1, 2, 2, 64, 64, 16, torch.bfloat16, True, P1)),
    ("sdpa_mask", Case(2, 4, 2, 130, 130, 32, torch.float32, True, P0)),
    ("sdpa_mask", Case(2, 4, 2, 70, 200, 32, torch.bfloat16, False, P1)),
]


@pytest.mark.parametrize(("backend", "case"), CASES, ids=[f"{b}-{c.label()}" for b, c in CASES])
def test_backend_matches_reference_on_the_same_plan(method: None, backend: str, case: Case) -> None:
    q, k, _ = case.inputs(DEVICE)
    plan = estimate(q, k, HipParams(**case.params), causal=case.causal, scale=case.head_dim**-0.5)
    assert plan.block_density < 0.95  # the case drops tiles
    check = check_parity(SPEC, backend, case, DEVICE)
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    assert "dq" in check.errors  # the backward ran
