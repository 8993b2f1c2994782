"""The sparsity plan: one value from which the dense mask, density, recall, tables and BlockMask derive."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnlab
from attnlab.masks import MaskContext, dense_mask, dense_pairs
from attnlab.plans import Plan, causal_plan, dense_block_count, plan_from_mask, static_plan

MASK_METHODS = [name for name, spec in attnlab.methods().items() if spec.mask is not None]
CPU = torch.device("cpu")


def _factory_mask(spec: attnlab.MethodSpec, params: dict, n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    assert spec.mask is not None
    mask_mod = spec.mask(spec.make_params(params), MaskContext(n_q, n_k, causal, "cpu"))
    return dense_mask(mask_mod, n_q, n_k, "cpu")


@pytest.mark.parametrize("method", MASK_METHODS)
@pytest.mark.parametrize(("n_q", "n_k", "block"), [(300, 300, 64), (70, 200, 32), (200, 70, 16)])
def test_static_plan_tiles_are_exact(method: str, n_q: int, n_k: int, block: int) -> None:
    spec = attnlab.get(method)
    for causal, params in itertools.product((False, True), spec.test_params):
        plan = static_plan(spec, spec.make_params(params), n_q, n_k, causal, CPU, block)
        m = _factory_mask(spec, params, n_q, n_k, causal)
        assert plan.allowed_count is not None and int(plan.allowed_count.sum()) == int(m.sum())
        nqb, nkb = plan.shape[2:]
        padded = torch.zeros(nqb * block, nkb * block, dtype=torch.bool)
        padded[:n_q, :n_k] = m
        tiles = padded.view(nqb, block, nkb, block)
        any_, all_ = tiles.any(3).any(1), tiles.all(3).all(1)
        assert torch.equal(plan.full[0, 0], all_)
        assert torch.equal(plan.partial[0, 0], any_ & ~all_)
        # everything derived from the plan agrees with the mask
        assert torch.equal(plan.dense_mask()[0, 0], m)
        assert plan.density == pytest.approx(int(m.sum()) / dense_pairs(n_q, n_k, causal))


def test_plan_building_in_chunks_gives_the_same_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = attnlab.get("dilated")
    assert spec.mask is not None
    mask_mod = spec.mask(spec.make_params({"window": 9, "dilation": 3}), MaskContext(500, 500, True, "cpu"))
    whole = plan_from_mask(mask_mod, 500, 500, True, "cpu", 32, 32)
    monkeypatch.setattr(attnlab.settings, "mask_chunk_elements", 600)  # one query block per chunk
    chunked = plan_from_mask(mask_mod, 500, 500, True, "cpu", 32, 32)
    assert torch.equal(whole.partial, chunked.partial) and torch.equal(whole.full, chunked.full)
    assert whole.allowed_count is not None and chunked.allowed_count is not None
    assert int(whole.allowed_count) == int(chunked.allowed_count)


def test_density_values() -> None:
    sw = attnlab.get("sliding_window")
    # causal self, N=8, window 2: 1 + 2*7 = 15 of 36 pairs
    assert static_plan(sw, sw.make_params({"window": 2}), 8, 8, True, CPU).density == pytest.approx(15 / 36)
    assert static_plan(sw, sw.make_params({"window": 100}), 8, 8, False, CPU).density == 1.0
    # block density: 1024 causal, window 128, tiles of 128: the diagonal and the one before it
    plan = static_plan(sw, sw.make_params({"window": 128}), 1024, 1024, True, CPU)
    assert plan.computed_blocks == 8 + 7
    assert plan.block_density == pytest.approx(15 / 36)


@pytest.mark.parametrize(("n_q", "n_k"), [(1, 1), (5, 300), (300, 5), (257, 257), (128, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_block_count_matches_the_causal_plan(n_q: int, n_k: int, causal: bool) -> None:
    plan = causal_plan(n_q, n_k, CPU, 64) if causal else None
    want = plan.computed_blocks if plan is not None else -(-n_q // 64) * -(-n_k // 64)
    assert dense_block_count(n_q, n_k, causal, 64, 64) == want


def test_recall_is_the_mass_on_the_plan() -> None:
    sw = attnlab.get("sliding_window")
    plan = static_plan(sw, sw.make_params({"window": 2}), 4, 4, True, CPU)
    probs = torch.zeros(1, 1, 4, 4)
    probs[0, 0, 0, 0] = 1.0  # row 0: all mass on self (kept)
    probs[0, 0, 1] = torch.tensor([0.5, 0.5, 0, 0])  # both kept
    probs[0, 0, 2] = torch.tensor([0.5, 0.25, 0.25, 0])  # key 0 is outside the window: 0.5 kept
    probs[0, 0, 3] = torch.tensor([0.25, 0.25, 0.25, 0.25])  # keys 2, 3 kept: 0.5
    assert plan.recall(probs).item() == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)


def test_block_mask_and_tables_follow_the_plan() -> None:
    spec = attnlab.get("streaming")
    plan = static_plan(spec, spec.make_params({"sinks": 4, "window": 200}), 1000, 1000, True, CPU)
    pn, pi, fn, _ = plan.tables()
    assert torch.equal(pn, plan.partial.sum(-1, dtype=torch.int32))
    assert torch.equal(fn, plan.full.sum(-1, dtype=torch.int32))
    for row in range(plan.shape[2]):  # the listed blocks are exactly the True ones
        listed = set(pi[0, 0, row, : pn[0, 0, row]].tolist())
        assert listed == set(plan.partial[0, 0, row].nonzero().flatten().tolist())
    bm = plan.block_mask()
    assert bm is plan.block_mask()  # built once
    assert torch.equal(bm.to_dense()[0, 0].bool(), (plan.partial | plan.full)[0, 0])


def test_plans_are_cached_and_a_returned_plan_is_the_one_run() -> None:
    spec = attnlab.get("sliding_window")
    params = spec.make_params({"window": 16})
    assert static_plan(spec, params, 64, 64, True, CPU) is static_plan(spec, params, 64, 64, True, CPU)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    res = attnlab.attention(q, k, v, method="sliding_window", causal=True, window=16, return_plan=True)
    assert isinstance(res, attnlab.Result) and isinstance(res.plan, Plan)
    assert res.plan is static_plan(spec, params, 64, 64, True, CPU)
    dense = attnlab.attention(q, k, v, causal=True, return_plan=True)
    assert isinstance(dense, attnlab.Result) and dense.plan is None  # dense methods have no plan


def test_token_columns_add_pairs_and_respect_causality() -> None:
    full = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    partial = torch.zeros_like(full)
    columns = torch.tensor([[[[1, -1], [0, 5]]]], dtype=torch.int32)  # block 0 sees key 1; block 1 keys 0, 5
    plan = Plan(8, 8, True, 4, 4, full, partial, None, kind="dynamic", columns=columns)
    m = plan.dense_mask()[0, 0]
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[1:4, 1] = True  # causal: query 0 cannot see key 1
    want[4:8, 0] = True
    want[5:8, 5] = True
    assert torch.equal(m, want)
    with pytest.raises(ValueError, match="columns"):
        plan.block_mask()
