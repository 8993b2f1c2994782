"""bilevel_routing: region layout on 1-D / 2-D grids, routing on planted region affinities (the token mask
checked against the region rule by loops), causal routing, full tiles for tile-aligned regions, batch /
GQA, bench densities, bad input (grids that do not hold N tokens, cross-attention, too many regions), and
the executor against the reference on the same plan (registered only inside these tests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnlab
from attnlab.catalog.dynamic.bilevel_routing import (
    SPEC,
    BilevelRoutingParams,
    estimate,
    region_of,
    routing,
)
from attnlab.errors import InputError, ParamError, UnsupportedPatternError
from attnlab.registry import registered
from attnlab.testing import Case, check_parity, device_under_test

DEVICE = device_under_test()  # (the GPU where there is one: the executor runs there, not on its CPU)

CPU = torch.device("cpu")


@pytest.fixture
def method() -> Iterator[None]:
    with registered(SPEC):
        yield


def test_regions_in_raster_order() -> None:
    rid, nr = region_of(BilevelRoutingParams(shape=(4, 6), regions=2), 24, CPU)
    want = [[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2  # the docstring's picture
    assert nr == 4 and rid.view(4, 6).tolist() == want
    rid, nr = region_of(BilevelRoutingParams(regions=3), 10, CPU)  # uneven: sizes 4, 3, 3
    assert nr == 3 and rid.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    rid, nr = region_of(BilevelRoutingParams(shape=(6, 10), regions=(3, 4)), 60, CPU)
    assert nr == 12
    for t in range(60):
        y, x = divmod(t, 10)
        assert rid[t] == (y * 3 // 6) * 4 + x * 4 // 10


GRID, S = (8, 8), 4  # 16 regions of 2 x 2 tokens


def region(t: int) -> int:
    y, x = divmod(t, GRID[1])
    return (y // 2) * S + x // 2


def planted(targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (1, 2, 64, 16): keys of region r along u_r (orthonormal), queries of region r along
    u_targets[r]: region r's affinity is highest for region targets[r]."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q
    rid = [region(t) for t in range(64)]
    k = u[rid] + 0.05 * torch.randn(64, 16, generator=g)
    q = 5 * u[[targets[r] for r in rid]] + 0.05 * torch.randn(64, 16, generator=g)
    return torch.stack([q, -q])[None], torch.stack([k, -k])[None]


def test_regions_route_to_their_planted_region_and_tokens_follow() -> None:
    g = torch.Generator().manual_seed(1)
    targets = [(r + int(torch.randint(1, 16, (1,), generator=g))) % 16 for r in range(16)]  # never r
    q, k = planted(targets)
    for local in (False, True):
        p = BilevelRoutingParams(shape=GRID, regions=S, topk=2 if local else 1, local=local, block=16)
        routed, _ = routing(q, k, p, causal=False)
        for r in range(16):
            want = {targets[r], r} if local else {targets[r]}
            assert set(routed[0, r].nonzero()[:, 0].tolist()) == want, (r, local)
        plan = estimate(q, k, p, causal=False, scale=1.0)
        assert plan.full.shape == (1, 1, 4, 4)
        mask = plan.dense_mask()[0, 0]
        for i in range(64):
            for j in range(64):
                want_ij = region(j) == targets[region(i)] or (local and region(j) == region(i))
                assert bool(mask[i, j]) == want_ij, (i, j)


def test_causal_routing_picks_only_regions_with_a_visible_key() -> None:
    q, k = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    p = BilevelRoutingParams(shape=GRID, regions=S, topk=3, block=16)
    routed, rid = routing(q, k, p, causal=True)
    first = [min(t for t in range(64) if region(t) == r) for r in range(16)]
    last = [max(t for t in range(64) if region(t) == r) for r in range(16)]
    for b in range(2):
        for r in range(16):
            kept = routed[b, r].nonzero()[:, 0].tolist()
            visible = [c for c in range(16) if first[c] <= last[r]]
            assert set(kept) <= set(visible) and len(kept) == min(3, len(visible)), (r, kept)
    mask = estimate(q, k, p, causal=True, scale=0.25).dense_mask()[:, 0]
    want = routed[:, rid][:, :, rid] & torch.ones(64, 64, dtype=torch.bool).tril()
    assert torch.equal(mask, want)


def test_rows_without_a_routed_past_key_give_zeros_unless_local(method: None) -> None:
    # grid (2, 4), regions (1, 2): region 0 = tokens {0, 1, 4, 5}, region 1 = {2, 3, 6, 7}; region 0's
    # queries point at region 1's keys, which tokens 0 and 1 cannot see (causal)
    u = torch.eye(8)[:2] * 6
    rid = [0, 0, 1, 1, 0, 0, 1, 1]
    k = u[rid][None, None]
    q = u[[1 - r for r in rid]][None, None]
    v = torch.randn(1, 1, 8, 8)
    kw: dict[str, Any] = {"shape": (2, 4), "regions": (1, 2), "block": 16, "backend": "reference"}
    out = attnlab.attention(q, k, v, method="bilevel_routing", causal=True, topk=1, **kw)
    assert (out[0, 0, :2] == 0).all() and (out[0, 0, 2:].abs().sum(-1) > 0).all()
    local = attnlab.attention(q, k, v, method="bilevel_routing", causal=True, local=True, topk=2, **kw)
    assert (local[0, 0].abs().sum(-1) > 0).all()


def test_tile_aligned_regions_give_full_tiles_only() -> None:
    q, k = torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    for causal in (False, True):
        plan = estimate(q, k, BilevelRoutingParams(regions=4, topk=2, block=16), causal=causal, scale=0.25)
        routed, _ = routing(q, k, BilevelRoutingParams(regions=4, topk=2, block=16), causal=causal)
        # region r = tiles 2r, 2r + 1: every visited tile is full, except causal diagonal tiles (partial)
        off_diagonal = plan.partial[0, 0] & ~torch.eye(8, dtype=torch.bool)
        assert not off_diagonal.any() and (causal or not plan.partial.any())
        want = routed[0].repeat_interleave(2, 0).repeat_interleave(2, 1)
        if causal:
            want &= torch.ones(8, 8, dtype=torch.bool).tril()
        assert torch.equal((plan.full | plan.partial)[0, 0], want)


def test_batch_and_gqa_route_each_sequence_alone() -> None:
    q, k = torch.randn(3, 4, 72, 16), torch.randn(3, 2, 72, 16)
    p = BilevelRoutingParams(shape=(6, 12), regions=(3, 2), topk=2, block=16)
    for causal in (False, True):
        plan = estimate(q, k, p, causal=causal, scale=0.25)
        alone = estimate(q[1:2], k[1:2], p, causal=causal, scale=0.25)
        assert torch.equal(plan.full[1], alone.full[0]) and torch.equal(plan.partial[1], alone.partial[0])
        assert torch.equal(plan.dense_mask()[1], alone.dense_mask()[0])
        rep = estimate(q, k.repeat_interleave(2, dim=1), p, causal=causal, scale=0.25)
        assert torch.equal(plan.dense_mask(), rep.dense_mask())


def test_full_budget_is_dense_attention() -> None:
    q, k, v = (torch.randn(1, 2, 72, 16) for _ in range(3))
    with registered(SPEC):
        for causal in (False, True):
            dense = attnlab.attention(q, k, v, method="softmax", causal=causal, backend="reference")
            got = attnlab.attention(q, k, v, method="bilevel_routing", causal=causal, shape=(6, 12), regions=3,
                                    topk=9, block=16, backend="reference")  # fmt: skip
            torch.testing.assert_close(got, dense)


def test_bench_budgets_give_block_topk_like_densities() -> None:
    n = 4096
    q, k = torch.randn(1, 2, n, 32), torch.randn(1, 2, n, 32)
    sets = SPEC.bench_params(n)
    d = [estimate(q, k, BilevelRoutingParams(**kw), causal=True, scale=32**-0.5).block_density
         for kw in sets[:2]]  # fmt: skip
    assert 0.08 < d[0] < 0.17 and 0.18 < d[1] < 0.32, d
    for kwargs in SPEC.bench_params(131072):
        BilevelRoutingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": 24}, "tiles of"),
        ({"topk": 0}, "topk"),
        ({"local": 1}, "local"),
        ({"shape": (2, 2, 8)}, "shape"),
        ({"shape": (4, 8), "regions": (2, 2, 2)}, "regions"),
        ({"shape": (4, 8), "regions": (5, 2)}, "regions"),
        ({"regions": 0}, "regions"),
    ],
)
def test_bad_parameters_get_clear_errors(method: None, kwargs: dict, match: str) -> None:
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ParamError, match=match):
        attnlab.attention(q, q, q, method="bilevel_routing", **kwargs)


def test_bad_grids_and_cross_attention_are_refused(method: None) -> None:
    q = torch.randn(1, 1, 30, 16)
    with pytest.raises(InputError, match="holds 32 tokens"):
        attnlab.attention(q, q, q, method="bilevel_routing", shape=(4, 8), regions=2)
    with pytest.raises(ParamError, match="at most 4"):  # a given grid's axis shorter than its regions
        attnlab.attention(q[:, :, :24], q[:, :, :24], q[:, :, :24], method="bilevel_routing", shape=(4, 6),
                          regions=(5, 2))  # fmt: skip
    # a 1-D sequence shorter than its region count: one region per token (every key routed: dense)
    few = attnlab.attention(q, q, q, method="bilevel_routing", regions=31, topk=31)
    torch.testing.assert_close(few, attnlab.attention(q, q, q, method="softmax"))
    k = torch.randn(1, 1, 40, 16)
    with pytest.raises(UnsupportedPatternError, match="noncausal_cross"):
        attnlab.attention(q, k, k, method="bilevel_routing", regions=2)
    with pytest.raises(InputError, match="N_q == N_k"):  # the estimator alone says so too
        estimate(q, k, BilevelRoutingParams(regions=2), causal=False, scale=0.25)


P0, P1 = SPEC.test_params
CASES = [
    ("block_sparse", Case(2, 2, 1, 72, 72, 16, torch.float32, False, P0)),
    ("block_sparse", Case(1, 2, 2, 72, 72, 16, torch.float32, True, P0)),
    ("block_sparse", Case(1, 2, 1, 80, 80, 16, torch.bfloat16, True, P1)),
    ("sdpa_mask", Case(2, 4, 2, 72, 72, 32, torch.float32, True, P0)),
    ("sdpa_mask", Case(2, 4, 2, 90, 90, 32, torch.bfloat16, False, P1)),
]


@pytest.mark.parametrize(("backend", "case"), CASES, ids=[f"{b}-{c.label()}" for b, c in CASES])
def test_backend_matches_reference_on_the_same_plan(method: None, backend: str, case: Case) -> None:
    q, k, _ = case.inputs(DEVICE)
    params = BilevelRoutingParams(**case.params)
    plan = estimate(q, k, params, causal=case.causal, scale=case.head_dim**-0.5)
    assert plan.density < 0.95 and bool(plan.partial.any())  # drops pairs; partial tiles run the rule
    check = check_parity(SPEC, backend, case, DEVICE)
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    assert "dq" in check.errors  # the backward ran
