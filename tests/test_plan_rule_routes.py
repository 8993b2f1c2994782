"""The block-rule plan builder's two routes (``attnlab.plans.blocks``): the diagonal route (rules keyed by
``diagonal_keys``, square tiles) and the grid route give the same plan, every field, as each other and as
a dense oracle: ``full``, ``partial``, ``allowed_count`` from the generic builder, ``pattern_ids`` from
the rule applied to every tile of the grid; and the diagonal route builds a plan with no host
synchronisation and a few dozen device operations at any length."""

from __future__ import annotations

import importlib.util
import itertools
import random
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import attnlab
from attnlab.masks import MaskContext, MaskMod, causal_mask
from attnlab.plans import Plan, blocks, causal_plan, plan_from_mask, static, static_plan
from attnlab.plans.blocks import BlockRule, TileGrid, block_rule, plan_from_rule
from attnlab.plans.static import CAUSAL_RULE

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
DIAGONAL = ("sliding_window", "dilated", "causal")
OTHERS = ("streaming", "block_local")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Many small tensor ops: one intra-op thread is faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(
    method: str, raw: dict[str, int], n_q: int, n_k: int, causal: bool
) -> tuple[MaskMod, BlockRule, Any]:
    if method == "causal":
        return causal_mask(None, MaskContext(n_q, n_k, causal, CPU)), CAUSAL_RULE, None
    spec = attnlab.get(method)
    assert spec.mask is not None
    rule, params = block_rule(spec.mask), spec.make_params(raw)
    assert rule is not None
    return spec.mask(params, MaskContext(n_q, n_k, causal, CPU)), rule, params


def _grid_route(rule: BlockRule) -> BlockRule:
    """The same rule, its keys wrapped (never ``diagonal_keys`` itself, the same values): the grid route."""
    return BlockRule(rule.classify, lambda params, grid: rule.keys(params, grid))


def _oracle_ids(
    mask_mod: MaskMod, rule: BlockRule, params: Any, n_q: int, n_k: int, causal: bool, bq: int, bk: int
) -> torch.Tensor:
    """The plan's pattern ids by their definition, tile by tile: uncertain tiles (the rule's ``maybe`` and
    not ``full`` on the whole grid) found partial get 3 + the rank of their key (the rule's keys, then
    "in the short last row / column") among the uncertain tiles' distinct keys; certainly full tiles on a
    short last row / column / both get 0 / 1 / 2; every other tile -1."""
    want = plan_from_mask(mask_mod, n_q, n_k, causal, CPU, bq, bk)
    nqb, nkb = want.shape[2:]
    short_q, short_k = n_q % bq != 0, n_k % bk != 0
    grid = TileGrid.of(n_q, n_k, causal, bq, bk, CPU)
    maybe, sure = (m.expand(nqb, nkb) for m in rule.classify(params, grid))
    ids = torch.full((nqb, nkb), -1, dtype=torch.int32)
    for i, j in itertools.product(range(nqb), range(nkb)):
        past_q, past_k = i == nqb - 1 and short_q, j == nkb - 1 and short_k
        if bool(sure[i, j]) and (past_q or past_k):
            ids[i, j] = 2 if past_q and past_k else int(past_k)
    where = (maybe & ~sure).nonzero()
    if where.shape[0]:
        ti, tj = where[:, 0], where[:, 1]
        parts = [k.expand(ti.shape).tolist() for k in rule.keys(params, grid.at(ti, tj))]
        if short_q:
            parts.append((ti == nqb - 1).tolist())
        if short_k:
            parts.append((tj == nkb - 1).tolist())
        keys = list(zip(*parts, strict=True)) if parts else [()] * len(ti)
        rank = {key: r for r, key in enumerate(sorted(set(keys)))}
        for (i, j), key in zip(where.tolist(), keys, strict=True):
            if bool(want.partial[0, 0, i, j]):
                ids[i, j] = 3 + rank[key]
    return ids


def _assert_same(got: Plan, want: Plan) -> None:
    for name in ("n_q", "n_k", "causal", "block_q", "block_k", "kind", "rule", "columns", "mask_mod"):
        assert getattr(got, name) is getattr(want, name) or getattr(got, name) == getattr(want, name), name
    for name in ("full", "partial", "allowed_count", "pattern_ids"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous() and b.is_contiguous(), name
        assert torch.equal(a, b), name


def _check(method: str, raw: dict[str, int], n_q: int, n_k: int, causal: bool, bq: int, bk: int) -> None:
    mask_mod, rule, params = _setup(method, raw, n_q, n_k, causal)
    got = plan_from_rule(mask_mod, rule, params, n_q, n_k, causal, CPU, bq, bk)
    grid = plan_from_rule(mask_mod, _grid_route(rule), params, n_q, n_k, causal, CPU, bq, bk)
    _assert_same(got, grid)
    want = plan_from_mask(mask_mod, n_q, n_k, causal, CPU, bq, bk)
    case = (method, raw, n_q, n_k, causal, bq, bk)
    assert torch.equal(got.full, want.full) and torch.equal(got.partial, want.partial), case
    assert got.allowed_count is not None and want.allowed_count is not None
    assert torch.equal(got.allowed_count, want.allowed_count), case
    assert got.pattern_ids is not None
    assert torch.equal(
        got.pattern_ids[0, 0], _oracle_ids(mask_mod, rule, params, n_q, n_k, causal, bq, bk)
    ), case


SHAPES = [  # (n_q, n_k, block): odd lengths, cross-attention both ways, one tile, one row / column of tiles
    (1, 1, 16),
    (1, 77, 16),
    (77, 1, 16),
    (16, 16, 16),
    (17, 15, 16),
    (300, 300, 64),
    (301, 299, 32),
    (70, 200, 32),
    (200, 70, 16),
    (250, 256, 32),
    (256, 250, 32),
]
PARAMS: dict[str, list[dict[str, int]]] = {
    "sliding_window": [{"window": 1}, {"window": 2}, {"window": 33}, {"window": 64}, {"window": 10**6}],
    "dilated": [
        {"window": 1, "dilation": 1},
        {"window": 4, "dilation": 3},
        {"window": 9, "dilation": 16},
        {"window": 500, "dilation": 2},
    ],
    "causal": [{}],
    "streaming": [{"sinks": 3, "window": 20}, {"sinks": 40, "window": 1}],
    "block_local": [{"block": 16, "neighbors": 1}, {"block": 7, "neighbors": 0}],
}


@pytest.mark.parametrize("method", [*DIAGONAL, *OTHERS])
def test_routes_equal_the_oracle_on_fixed_shapes(method: str) -> None:
    for (n_q, n_k, block), raw, causal in itertools.product(SHAPES, PARAMS[method], (False, True)):
        _check(method, raw, n_q, n_k, causal, block, block)


def test_routes_equal_the_oracle_on_random_draws() -> None:
    """Random shapes (square tiles of any size, not dividing the lengths), parameters and causality."""
    gen = random.Random("plan-routes")
    for _ in range(120):
        method = gen.choice(DIAGONAL)
        n_q, n_k = gen.randint(1, 300), gen.randint(1, 300)
        block = gen.choice([1, 3, 8, 16, 24, 64])
        n = max(n_q, n_k)
        sizes = [gen.choice([1, 2, 3, gen.randint(1, n), gen.randint(n, 900)]) for _ in range(2)]
        raw = {"window": sizes[0], "dilation": sizes[1]} if method == "dilated" else {"window": sizes[0]}
        if method == "causal":
            raw = {}
        if n_q * n_k // (block * block) > 2000:  # (the tile-by-tile oracle stays quick)
            block = 64
        _check(method, raw, n_q, n_k, gen.random() < 0.5, block, block)


def test_rectangular_tiles_take_the_grid_route() -> None:
    """Tiles of unequal sides: a diagonal rule takes the grid route, still exact."""
    for method, (n_q, n_k, bq, bk) in itertools.product(DIAGONAL, [(129, 257, 32, 16), (257, 129, 16, 32)]):
        for raw, causal in itertools.product(PARAMS[method][:3], (False, True)):
            _check(method, raw, n_q, n_k, causal, bq, bk)


def test_long_lengths_equal_the_grid_route() -> None:
    """At the benchmark's lengths (block 128, the default window), the two routes agree on every field."""
    for method, n in itertools.product(DIAGONAL, (8192, 20008)):
        raw = {} if method != "dilated" else {"window": 300, "dilation": 2}
        for causal, n_k in ((False, n - 3), (True, n)):
            mask_mod, rule, params = _setup(method, raw, n, n_k, causal)
            got = plan_from_rule(mask_mod, rule, params, n, n_k, causal, CPU, 128, 128)
            _assert_same(
                got, plan_from_rule(mask_mod, _grid_route(rule), params, n, n_k, causal, CPU, 128, 128)
            )


def _ops_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plan_build_ops", ROOT / "benchmarks" / "plan_build_ops.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_new_length_costs_a_few_dozen_device_ops_and_no_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a first call at a new length pays for its plan: the diagonal route makes no data-dependent
    device op and a constant number of device ops (the mask factory's included), whatever the length;
    the grid route one ``nonzero`` (on a GPU also its result's copy to the host). The diagonal route's
    host side works in numpy: its only torch ops are the rule's ``classify`` (a dozen for a window)."""
    bench = _ops_bench()
    monkeypatch.setattr(static, "_cache", OrderedDict())  # (the process's plan cache left as it was)
    cases = [*itertools.product(DIAGONAL, (8192, 20008, 65536)), ("streaming", 20008)]
    for method, n in cases:
        static._cache.clear()
        with bench.counting(CPU) as c:
            bench.build(method, n, True, CPU, 128)
        device_ops, syncs = sum(c.device_ops.values()), sum(c.syncs.values())
        if method in DIAGONAL:
            assert syncs == 0 and device_ops <= 36, (method, n, dict(c.device_ops), dict(c.syncs))
            if method != "dilated":  # (dilated's classify lists its candidate tiles: a few dozen ops)
                assert sum(c.host_ops.values()) <= 20, (method, n, dict(c.host_ops))
        else:
            assert syncs <= 1 and device_ops <= 90, (method, n, dict(c.device_ops), dict(c.syncs))


def test_static_and_causal_plans_take_the_diagonal_route() -> None:
    """``static_plan`` / ``causal_plan`` at a new length: equal to the grid route's plan."""
    sw = attnlab.get("sliding_window")
    params = sw.make_params({"window": 100})
    got = static_plan(sw, params, 1000, 1003, True, CPU, 128)
    assert sw.mask is not None
    mask_mod, rule = got.mask_mod, block_rule(sw.mask)
    assert mask_mod is not None and rule is not None
    _assert_same(got, plan_from_rule(mask_mod, _grid_route(rule), params, 1000, 1003, True, CPU, 128, 128))
    cp = causal_plan(999, 1001, CPU, 128)
    assert cp.mask_mod is not None
    _assert_same(
        cp, plan_from_rule(cp.mask_mod, _grid_route(CAUSAL_RULE), None, 999, 1001, True, CPU, 128, 128)
    )


def test_plan_build_ops_benchmark_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _ops_bench()
    monkeypatch.setattr(static, "_cache", OrderedDict())
    out = bench.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "plan_build_ops.json").exists()
    assert {row["method"] for row in out["rows"]} == set(bench.METHODS)
    for row in out["rows"]:
        assert row["equal_to_generic"] is True and 0 < row["min_ms"] <= row["median_ms"]
        if row["method"] in DIAGONAL:
            assert row["syncs"] == 0


def test_stats_count_uncertain_and_evaluated_tiles() -> None:
    """The counters keep their meaning on the diagonal route: uncertain tiles met, tiles evaluated."""
    mask_mod, rule, params = _setup("sliding_window", {"window": 64}, 1024, 1024, True)
    before = dict(blocks.stats)
    plan_from_rule(mask_mod, rule, params, 1024, 1024, True, CPU, 64, 64)
    # window 64 on 64-wide tiles: the main diagonal (partial) and the one below (partial): 16 + 15 tiles
    assert blocks.stats["uncertain_tiles"] - before["uncertain_tiles"] == 31
    assert blocks.stats["evaluated_tiles"] - before["evaluated_tiles"] == 2
    assert blocks.stats["builds"] == before["builds"] + 1
