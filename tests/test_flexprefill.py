"""flexprefill: the estimator on planted structure (a column and a diagonal; a head whose pooled estimate
is exact against one whose block means hide its mass; query-aware blocks), batch / GQA, the dense rules,
bad input, and the executor against the reference on the same plan (registered only inside these tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import attnlab
from attnlab.catalog.dynamic.flexprefill import SPEC, FlexPrefillParams, estimate, head_choice, js_distance
from attnlab.errors import ParamError
from attnlab.registry import registered
from attnlab.testing import Case, check_parity, device_under_test

DEVICE = device_under_test()  # (the GPU where there is one: the executor runs there, not on its CPU)

N, COLUMN, DISTANCE = 96, 40, 20


@pytest.fixture
def method() -> Iterator[None]:
    with registered(SPEC):
        yield


def tiles_of(plan: attnlab.plans.Plan, b: int = 0, h: int = 0) -> torch.Tensor:
    return (plan.full | plan.partial)[b, h]


def planted_vertical_slash() -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, 1, N, 64): query i splits its mass between key COLUMN and key i - DISTANCE."""
    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(N, 64, generator=g), dim=-1)
    q = unit[COLUMN].expand(N, 64).clone()
    q[DISTANCE:] += unit[: N - DISTANCE]
    return (q * 5.5)[None, None], (unit * 5.5)[None, None]


def test_vertical_and_slash_blocks_are_found() -> None:
    q, k = planted_vertical_slash()
    p = FlexPrefillParams(block=16, gamma=0.9, tau=0.0, min_budget=32)  # 2 blocks each, never query-aware
    plan = estimate(q, k, p, causal=True, scale=1.0)
    tiles = tiles_of(plan)
    col_blk, dist_blk = COLUMN // 16, DISTANCE // 16
    for i in range(N // 16):
        want = {0, i, i - dist_blk} | ({col_blk} if col_blk <= i else set())
        assert set(tiles[i].nonzero()[:, 0].tolist()) == {j for j in want if j >= 0}, i


def planted_heads(match: list[int], block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, 2, 8 * block, 32). Head 0: every key of block j is the direction e_j (block means are
    exact), query block i points at e_match[i]. Head 1: keys of block j alternate +e_j / -e_j (block means
    0) and the last queries point at e_2: the pooled estimate is uniform, the true mass on block 2."""
    nb, d = len(match), 32
    basis = torch.eye(d)[:nb] * 6.0
    k0 = basis.repeat_interleave(block, 0)
    q0 = basis[match].repeat_interleave(block, 0)
    sign = torch.tensor([1.0, -1.0]).repeat(block // 2)
    k1 = (basis[:, None, :] * sign[None, :, None]).reshape(nb * block, d)
    q1 = basis[2].expand(nb * block, d).clone()
    return torch.stack([q0, q1])[None], torch.stack([k0, k1])[None]


MATCH = [0, 0, 1, 0, 3, 2, 5, 3]


def test_the_js_test_tells_an_exact_pooled_estimate_from_a_misleading_one() -> None:
    q, k = planted_heads(MATCH)
    d, query_aware = head_choice(q, k, FlexPrefillParams(block=16, tau=0.1), scale=0.5)
    assert d[0, 0] < 0.05 and d[0, 1] > 0.5, d
    assert query_aware.tolist() == [[True, False]]


def test_query_aware_heads_keep_the_pooled_best_blocks() -> None:
    q, k = planted_heads(MATCH)
    aware = estimate(q, k, FlexPrefillParams(block=16, gamma=0.95, tau=0.1, min_budget=16), causal=True,
                     scale=0.5)  # fmt: skip
    hits = sum(bool(tiles_of(aware)[i, j]) for i, j in enumerate(MATCH))
    assert hits >= 7  # 0.95 x 8 rows of (nearly) one-hot pooled rows: all but the smallest
    # the same head without the query-aware branch keeps only its vertical-slash blocks: fewer matches
    plain = estimate(q, k, FlexPrefillParams(block=16, gamma=0.95, tau=0.0, min_budget=16), causal=True,
                     scale=0.5)  # fmt: skip
    assert sum(bool(tiles_of(plain)[i, j]) for i, j in enumerate(MATCH)) < hits
    # head 1 fails the test: the same plan with or without the query-aware branch
    assert torch.equal(tiles_of(aware, h=1), tiles_of(plain, h=1))


def test_js_distance_bounds() -> None:
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    d = js_distance(p, q)
    torch.testing.assert_close(d, torch.tensor([torch.log(torch.tensor(2.0)).sqrt(), 0.0]))


def test_batch_and_gqa_estimate_each_sequence_alone() -> None:
    q, k = torch.randn(3, 4, 80, 16) * 2, torch.randn(3, 2, 80, 16) * 2
    p = FlexPrefillParams(block=16, gamma=0.5, tau=0.3, min_budget=16)
    plan = estimate(q, k, p, causal=True, scale=0.25)
    assert plan.full.shape == (3, 4, 5, 5)
    alone = estimate(q[2:], k[2:], p, causal=True, scale=0.25)
    assert torch.equal(plan.full[2], alone.full[0]) and torch.equal(plan.partial[2], alone.partial[0])
    # GQA: query head h estimates with kv head h // 2, as with k repeated per query head (MHA)
    mha = estimate(q, k.repeat_interleave(2, dim=1), p, causal=True, scale=0.25)
    assert torch.equal(plan.full, mha.full) and torch.equal(plan.partial, mha.partial)
    assert not torch.equal(plan.full[:, :2], plan.full[:, 2:])  # the kv heads' plans differ
    # the diagonal tiles are always kept (partial, causal rule inside)
    assert plan.partial[:, :, torch.arange(5), torch.arange(5)].all()


def test_chunked_prefill_distance_block_zero_is_the_diagonal_span() -> None:
    # N_k - N_q = 24: query block i (positions 24 + 16 i .. 39 + 16 i) straddles key blocks i + 1, i + 2;
    # distance block 0 (always kept) stands for both, so every row keeps its own position
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 64, 16, generator=g),
        torch.randn(1, 2, 88, 16, generator=g),
        torch.randn(1, 2, 88, 16, generator=g),
    )
    p = FlexPrefillParams(block=16, gamma=0.05, tau=0.0, min_budget=16, max_budget=16)
    plan = estimate(q, k, p, causal=True, scale=0.25)
    tiles = plan.full | plan.partial
    assert bool(tiles[..., torch.arange(4), torch.arange(4) + 1].all())
    assert bool(tiles[..., torch.arange(4), torch.arange(4) + 2].all())
    assert bool(plan.dense_mask()[..., torch.arange(64), torch.arange(64) + 24].all())
    with registered(SPEC):
        out = attnlab.attention(q, k, v, method="flexprefill", causal=True, backend="reference", block=16,
                                gamma=0.05, tau=0.0, min_budget=16, max_budget=16)  # fmt: skip
    assert not bool((out.abs().sum(-1) == 0).any())


def test_short_inputs_and_full_budgets_are_dense() -> None:
    q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))
    dense = attnlab.attention(q, k, v, method="softmax", causal=True, backend="reference")
    with registered(SPEC):
        # N_k <= max(2 block, min_budget rounded to blocks): FlexPrefill runs dense attention
        short = attnlab.attention(q, k, v, method="flexprefill", causal=True, block=16, min_budget=64,
                                  backend="reference")  # fmt: skip
        torch.testing.assert_close(short, dense)
        full = attnlab.attention(q, k, v, method="flexprefill", causal=True, block=16, min_budget=16,
                                 gamma=1.0, tau=0.0, backend="reference")  # fmt: skip
        # gamma = 1 covers every key the last queries see: all vertical and slash blocks are kept
        torch.testing.assert_close(full, dense)


def test_max_budget_bounds_the_density() -> None:
    q, k = torch.randn(1, 2, 1024, 32), torch.randn(1, 2, 1024, 32)
    loose = estimate(q, k, FlexPrefillParams(block=32, min_budget=32, tau=0.0), causal=True, scale=0.2)
    tight = estimate(q, k, FlexPrefillParams(block=32, min_budget=32, max_budget=64, tau=0.0), causal=True,
                     scale=0.2)  # fmt: skip
    # 2 vertical + 2 slash blocks at most per row (plus the forced ones inside them)
    assert tiles_of(tight).sum(-1).max() <= 4 < tiles_of(loose).sum(-1).max()


def test_bench_budgets_give_block_topk_like_densities() -> None:
    n = 4096
    q, k = torch.randn(1, 1, n, 32), torch.randn(1, 1, n, 32)
    capped = [kw for kw in SPEC.bench_params(n) if kw.get("max_budget")]
    assert len(capped) == 2
    densities = [estimate(q, k, FlexPrefillParams(**kw), causal=True, scale=32**-0.5).block_density
                 for kw in capped]  # fmt: skip
    assert 0.05 < densities[0] < densities[1] < 0.3, densities
    for kwargs in SPEC.bench_params(131072):
        FlexPrefillParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": 24}, "tiles of"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"tau": -0.1}, "tau"),
        ({"min_budget": 0}, "min_budget"),
        ({"min_budget": 256, "max_budget": 128}, "max_budget"),
    ],
)
def test_bad_parameters_get_clear_errors(method: None, kwargs: dict, match: str) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, q, q, method="flexprefill", causal=True, **kwargs)


def test_non_causal_is_refused(method: None) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(Exception, match="causal"):
        attnlab.attention(q, q, q, method="flexprefill", causal=False)


P0, P1 = SPEC.test_params
CASES = [
    ("block_sparse", Case(2, 4, 2, 45, 45, 16, torch.float32, True, P0)),
    ("block_sparse", Case(1, 2, 1, 40, 40, 16, torch.float32, True, P1)),
    ("block_sparse", Case(1, 2, 2, 20, 45, 16, torch.float32, True, P0)),
    ("block_sparse", Case(1, 2, 2, 40, 40, 16, torch.bfloat16, True, P1)),
    ("sdpa_mask", Case(2, 4, 2, 130, 130, 32, torch.float32, True, P0)),
    ("sdpa_mask", Case(2, 4, 2, 70, 200, 32, torch.bfloat16, True, P1)),
]


@pytest.mark.parametrize(("backend", "case"), CASES, ids=[f"{b}-{c.label()}" for b, c in CASES])
def test_backend_matches_reference_on_the_same_plan(method: None, backend: str, case: Case) -> None:
    q, k, _ = case.inputs(DEVICE)
    plan = estimate(q, k, FlexPrefillParams(**case.params), causal=True, scale=case.head_dim**-0.5)
    assert plan.block_density < 0.95  # the case drops tiles (not the dense short-input rule)
    check = check_parity(SPEC, backend, case, DEVICE)
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    assert "dq" in check.errors  # the backward ran
