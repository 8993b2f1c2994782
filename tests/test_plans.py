"""The sparsity plan: one value from which the dense mask, density, recall, tables and BlockMask derive."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
import torch

import attnlab
from attnlab.masks import MaskContext, causal_mask, dense_mask, dense_pairs
from attnlab.patterns import pattern_of
from attnlab.plans import Plan, blocks, causal_plan, dense_block_count, plan_from_mask, static_plan
from attnlab.plans.blocks import block_rule, plan_from_rule
from attnlab.plans.static import CAUSAL_RULE


@pytest.fixture
def one_thread() -> Iterator[None]:
    """These tests run many small tensor ops: one intra-op thread is faster (much faster on a busy
    2-core machine, where a second thread spins waiting for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    patterns = [c for c in (False, True) if pattern_of(c, n_q, n_k) in spec.patterns]
    if not patterns:
        pytest.skip(f"{method} does not define cross-attention")
    for causal, params in itertools.product(patterns, spec.test_params):
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


# --- the block-rule builder (attnlab.plans.blocks) gives the generic builder's plan, field by field ---

#: edge parameters per method with a block rule: window 1, window > N, dilation > window, sinks > N, ...
RULE_PARAMS: dict[str, list[dict[str, int]]] = {
    "sliding_window": [{"window": 1}, {"window": 3}, {"window": 40}, {"window": 64}, {"window": 10**6}],
    "streaming": [
        {"sinks": 0, "window": 1},
        {"sinks": 1, "window": 5},
        {"sinks": 33, "window": 64},
        {"sinks": 1000, "window": 3},
        {"sinks": 20, "window": 10**6},
    ],
    "dilated": [
        {"window": 1, "dilation": 3},
        {"window": 4, "dilation": 2},
        {"window": 9, "dilation": 7},
        {"window": 3, "dilation": 50},
        {"window": 2, "dilation": 10**6},
        {"window": 70, "dilation": 1},
    ],
    "block_local": [
        {"block": 1, "neighbors": 0},
        {"block": 7, "neighbors": 1},
        {"block": 32, "neighbors": 0},
        {"block": 40, "neighbors": 2},
        {"block": 10**6, "neighbors": 0},
    ],
}
#: (n_q, n_k, block_q, block_k): odd lengths, one tile, one row / key, cross both ways, unequal tiles
RULE_SHAPES = [
    (300, 300, 64, 64),
    (70, 200, 32, 32),
    (200, 70, 16, 16),
    (1, 1, 16, 16),
    (1, 77, 16, 16),
    (77, 1, 16, 16),
    (129, 257, 32, 16),
    (257, 129, 16, 32),
    (256, 256, 32, 32),
]


def _assert_same_plan(got: Plan, want: Plan) -> None:
    """Every field and derived value of two plans agree (the executor's tables included)."""
    from attnlab.plans.executor import executor_tables

    for name in ("n_q", "n_k", "causal", "block_q", "block_k", "kind", "rule", "columns", "mask_mod"):
        assert getattr(got, name) is getattr(want, name) or getattr(got, name) == getattr(want, name), name
    assert got.full.dtype == want.full.dtype and got.partial.dtype == want.partial.dtype
    assert torch.equal(got.full, want.full) and torch.equal(got.partial, want.partial)
    assert got.allowed_count is not None and want.allowed_count is not None
    assert got.allowed_count.dtype == want.allowed_count.dtype
    assert torch.equal(got.allowed_count, want.allowed_count)
    assert got.density == want.density and got.block_density == want.block_density
    assert got.computed_blocks == want.computed_blocks
    for a, b in zip(got.tables(), want.tables(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got.dense_mask(), want.dense_mask())
    ta, tb = executor_tables(got), executor_tables(want)
    assert (ta.block_q, ta.block_k, ta.n_q, ta.n_k) == (tb.block_q, tb.block_k, tb.n_q, tb.n_k)
    for a, b in zip(ta.as_args(), tb.as_args(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _assert_same_patterns(got: Plan, want: Plan, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block plan's keyed tile patterns are the executor's generic ones (ids and order), with the
    executor's chunk and with a 3-tile chunk (the ids number patterns by first tile, whatever the chunk)."""
    from attnlab.plans import executor

    assert got.pattern_ids is not None
    keyed = blocks.tile_patterns(got, got.partial)
    assert keyed is not None
    for chunk in (executor.TILE_CHUNK, 3):
        monkeypatch.setattr(executor, "TILE_CHUNK", chunk)
        grid, patterns = executor._tile_patterns(want, want.partial)
        assert torch.equal(keyed[0], grid) and torch.equal(keyed[1], patterns)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", sorted(RULE_PARAMS))
@pytest.mark.parametrize(("n_q", "n_k", "block_q", "block_k"), RULE_SHAPES)
def test_block_rule_plan_equals_the_generic_plan(
    method: str, n_q: int, n_k: int, block_q: int, block_k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = attnlab.get(method)
    rule = block_rule(spec.mask)
    assert rule is not None, f"{method} has no block rule"
    for causal, raw in itertools.product((False, True), RULE_PARAMS[method]):
        params = spec.make_params(raw)
        assert spec.mask is not None
        mask_mod = spec.mask(params, MaskContext(n_q, n_k, causal, "cpu"))
        want = plan_from_mask(mask_mod, n_q, n_k, causal, "cpu", block_q, block_k)
        got = plan_from_rule(mask_mod, rule, params, n_q, n_k, causal, "cpu", block_q, block_k)
        _assert_same_plan(got, want)
        _assert_same_patterns(got, want, monkeypatch)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("n_q", "n_k", "block"), [(1, 1, 16), (300, 300, 64), (70, 200, 32), (200, 70, 16)])
def test_causal_plan_equals_the_generic_plan(n_q: int, n_k: int, block: int) -> None:
    mask_mod = causal_mask(None, MaskContext(n_q, n_k, True, "cpu"))
    want = plan_from_mask(mask_mod, n_q, n_k, True, "cpu", block, block)
    _assert_same_plan(plan_from_rule(mask_mod, CAUSAL_RULE, None, n_q, n_k, True, "cpu", block, block), want)
    got = causal_plan(n_q, n_k, CPU, block)
    assert torch.equal(got.full, want.full) and torch.equal(got.partial, want.partial)
    assert got.allowed_count is not None and want.allowed_count is not None
    assert torch.equal(got.allowed_count, want.allowed_count)


@pytest.mark.usefixtures("one_thread")
def test_static_plan_takes_the_block_path_only_with_a_rule() -> None:
    sw = attnlab.get("sliding_window")
    before = dict(blocks.stats)
    static_plan(sw, sw.make_params({"window": 37}), 333, 333, True, CPU, 32)  # a new cache key
    assert blocks.stats["builds"] == before["builds"] + 1
    without = [name for name in MASK_METHODS if block_rule(attnlab.get(name).mask) is None]
    for name in without[:1]:  # a mask method without a rule keeps the generic builder
        spec = attnlab.get(name)
        before = dict(blocks.stats)
        static_plan(spec, spec.make_params(spec.test_params[0]), 91, 91, True, CPU, 16)
        assert blocks.stats["builds"] == before["builds"]


@pytest.mark.usefixtures("one_thread")
def test_rule_path_evaluates_few_tiles_at_long_lengths() -> None:
    """The point of the block path: at 32K with the benchmark's parameters the token mask is evaluated on
    fewer tiles than there are query blocks (one per distinct edge pattern: a window's few diagonal
    offsets; every offset of a dilated band), where the generic path evaluates all 32K x 32K pairs."""
    n, block = 32768, 128
    for method in RULE_PARAMS:
        spec = attnlab.get(method)
        rule = block_rule(spec.mask)
        assert rule is not None and spec.mask is not None
        for raw, causal in itertools.product(spec.bench_params(n), (False, True)):
            params = spec.make_params(raw)
            before = dict(blocks.stats)
            mask_mod = spec.mask(params, MaskContext(n, n, causal, "cpu"))
            plan = plan_from_rule(mask_mod, rule, params, n, n, causal, "cpu", block, block)
            evaluated = blocks.stats["evaluated_tiles"] - before["evaluated_tiles"]
            assert evaluated <= n // block // 2, (method, raw, causal, evaluated)
            assert plan.allowed_count is not None
            assert 0 < int(plan.allowed_count) <= dense_pairs(n, n, causal)


def _random_params(method: str, gen: random.Random, n: int) -> dict[str, int]:
    size = lambda: gen.choice([1, 2, 3, gen.randint(1, n), gen.randint(n, 3 * n)])
    if method == "sliding_window":
        return {"window": size()}
    if method == "streaming":
        return {"sinks": gen.choice([0, size()]), "window": size()}
    if method == "dilated":
        return {"window": size(), "dilation": size()}
    return {"block": size(), "neighbors": gen.choice([0, 1, 2, size()])}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", sorted(RULE_PARAMS))
def test_block_rule_plan_equals_the_generic_plan_on_random_draws(method: str) -> None:
    """Random shapes (tiles of any size, not dividing the lengths), parameters and causality."""
    spec = attnlab.get(method)
    rule = block_rule(spec.mask)
    assert rule is not None and spec.mask is not None
    gen = random.Random(f"plans-{method}")
    for _ in range(40):  # (2,400 draws passed once, 600 per method)
        n_q, n_k = gen.randint(1, 260), gen.randint(1, 260)
        block_q, block_k = gen.choice([1, 3, 8, 16, 24, 64]), gen.choice([1, 5, 8, 16, 32, 64])
        causal = gen.random() < 0.5
        params = spec.make_params(_random_params(method, gen, max(n_q, n_k)))
        mask_mod = spec.mask(params, MaskContext(n_q, n_k, causal, "cpu"))
        want = plan_from_mask(mask_mod, n_q, n_k, causal, "cpu", block_q, block_k)
        got = plan_from_rule(mask_mod, rule, params, n_q, n_k, causal, "cpu", block_q, block_k)
        assert torch.equal(got.full, want.full), (n_q, n_k, block_q, block_k, causal, params)
        assert torch.equal(got.partial, want.partial), (n_q, n_k, block_q, block_k, causal, params)
        assert got.allowed_count is not None and want.allowed_count is not None
        assert torch.equal(got.allowed_count, want.allowed_count), (
            n_q,
            n_k,
            block_q,
            block_k,
            causal,
            params,
        )
