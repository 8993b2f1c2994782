"""Each mask method's two definitions agree: its FlexAttention-style factory (``spec.mask``, which the
reference, Flex and SDPA paths all use) and its plain index arithmetic (``spec.index_mask``), on every
pattern, odd shapes and parameter edge cases; and the index arithmetic matches grids drawn by hand."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.errors import ParamError
from attnlab.masks import MaskContext, dense_mask
from attnlab.registry import MethodSpec
from attnlab.testing import draw_mask

IndexMask = Callable[[Any, int, int, bool], Tensor]

MASK_METHODS = [name for name, spec in attnlab.methods().items() if spec.mask is not None]

#: (N_q, N_k): self, cross with N_q < N_k and with N_q > N_k; odd sizes, to hit every tail
SHAPES = [
    *((n, n) for n in (1, 7, 63, 130, 257)),
    *[(1, 7), (7, 63), (63, 257), (130, 257), (1, 257)],
    *[(7, 1), (63, 7), (257, 63), (257, 130), (130, 63)],
]
HUGE = 2**40  # beyond int32: the factories must cap it, not overflow

#: Parameter edge cases per method, on top of its ``test_params``. A set a method rejects (ParamError)
#: is left out for that method; each method must keep at least MIN_EDGE_CASES of them.
EDGE_CASES: dict[str, list[dict[str, int]]] = {
    "sliding_window": [
        {"window": 1},
        {"window": 2},
        {"window": 257},  # = N for the largest shape
        {"window": 258},  # > N
        {"window": HUGE},
        {"window": 0},  # rejected
    ],
    "streaming": [
        {"sinks": 0, "window": 1},
        {"sinks": 0, "window": 300},
        {"sinks": 1, "window": 1},
        {"sinks": 300, "window": 1},  # sinks > N
        {"sinks": 7, "window": 7},
        {"sinks": HUGE, "window": HUGE},
        {"sinks": -1, "window": 4},  # rejected
    ],
    "dilated": [
        {"window": 1, "dilation": 1},
        {"window": 3, "dilation": 1},  # dilation 1 = sliding_window
        {"window": 1, "dilation": 5},
        {"window": 2, "dilation": 5},  # dilation > window
        {"window": 4, "dilation": 300},  # dilation > N
        {"window": 300, "dilation": 3},  # span > N
        {"window": HUGE, "dilation": HUGE},
    ],
    "block_local": [
        {"block": 1, "neighbors": 0},
        {"block": 1, "neighbors": 3},
        {"block": 5, "neighbors": 0},
        {"block": 300, "neighbors": 0},  # block > N
        {"block": 300, "neighbors": 1},
        {"block": 3, "neighbors": 100},  # neighbors cover everything
        {"block": 64, "neighbors": 2},
        {"block": HUGE, "neighbors": HUGE},
    ],
}
MIN_EDGE_CASES = 4


def accepted(spec: MethodSpec, sets: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    out = []
    for kwargs in sets:
        try:
            spec.make_params(kwargs)
        except ParamError:
            continue
        out.append(kwargs)
    return out


def factory_mask(spec: MethodSpec, params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    assert spec.mask is not None
    return dense_mask(spec.mask(params, MaskContext(n_q, n_k, causal, "cpu")), n_q, n_k, "cpu")


def first_disagreement(
    spec: MethodSpec, index_mask: IndexMask, param_sets: Iterable[Mapping[str, Any]]
) -> str | None:
    """The first (params, shape, causal) where ``index_mask`` and the factory differ, described; or None."""
    for kwargs in param_sets:
        params = spec.make_params(kwargs)
        for (n_q, n_k), causal in itertools.product(SHAPES, (False, True)):
            want = factory_mask(spec, params, n_q, n_k, causal)
            got = index_mask(params, n_q, n_k, causal)
            assert got.dtype == torch.bool and got.device.type == "cpu" and got.shape == (n_q, n_k)
            if not torch.equal(got, want):
                pairs = (got != want).nonzero().tolist()
                where = f"{kwargs}, N_q={n_q}, N_k={n_k}, causal={causal}"
                text = f"{spec.name} {where}: {len(pairs)} pairs differ, first (i, j): {pairs[:5]}"
                if n_q <= 16 and n_k <= 16:
                    text += (
                        "\nfactory:\n" + "\n".join(draw_mask(want)) + "\nindex:\n" + "\n".join(draw_mask(got))
                    )
                return text
    return None


def test_mask_methods_are_found() -> None:
    assert {"sliding_window", "streaming", "dilated", "block_local"} <= set(MASK_METHODS)


@pytest.mark.parametrize("name", MASK_METHODS)
def test_every_mask_method_has_an_index_mask_and_edge_cases(name: str) -> None:
    spec = attnlab.get(name)
    assert spec.index_mask is not None, f"{name}: a mask method needs index_mask= in its MethodSpec"
    assert len(accepted(spec, EDGE_CASES.get(name, []))) >= MIN_EDGE_CASES, (
        f"{name}: add at least {MIN_EDGE_CASES} valid parameter edge cases to EDGE_CASES"
    )


PARAM_CASES = [
    (name, kwargs)
    for name in MASK_METHODS
    for kwargs in accepted(attnlab.get(name), [*attnlab.get(name).test_params, *EDGE_CASES.get(name, [])])
]


@pytest.mark.parametrize(
    ("name", "kwargs"), PARAM_CASES, ids=[f"{n}-{','.join(map(str, k.values()))}" for n, k in PARAM_CASES]
)
def test_factory_and_index_mask_agree(name: str, kwargs: Mapping[str, Any]) -> None:
    spec = attnlab.get(name)
    assert spec.index_mask is not None
    problem = first_disagreement(spec, spec.index_mask, [kwargs])
    assert problem is None, problem


# -- a wrong definition is caught -------------------------------------------------------------------


def _pos_key(n_q: int, n_k: int) -> tuple[Tensor, Tensor]:
    return torch.arange(n_q)[:, None] + (n_k - n_q), torch.arange(n_k)[None, :]


def window_one_too_small(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    spec = attnlab.get(params.method)
    assert spec.index_mask is not None
    return spec.index_mask(dataclasses.replace(params, window=params.window - 1), n_q, n_k, causal)


def gym_sliding_window(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """attention-gym's convention (``|p - j| <= window``: window + 1 keys), not attnlab's."""
    pos, key = _pos_key(n_q, n_k)
    m = (pos - key).abs() <= params.window
    return m & (key <= pos) if causal else m


def sinks_one_too_many(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    pos, key = _pos_key(n_q, n_k)
    m = (key <= params.sinks) | ((pos - key).abs() < params.window)
    return m & (key <= pos) if causal else m


def dilation_ignored_off_row(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """Dilated grid anchored at key 0 instead of at the query's own position."""
    pos, key = _pos_key(n_q, n_k)
    d = pos - key
    m = (d.abs() < params.window * params.dilation) & (key % params.dilation == 0)
    return m & (d >= 0) if causal else m


def blocks_on_query_index(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """Blocks cut on the query's row index instead of its position: wrong only in cross-attention."""
    pos, key = _pos_key(n_q, n_k)
    row = torch.arange(n_q)[:, None]
    m = (row // params.block - key // params.block).abs() <= params.neighbors
    return m & (key <= pos) if causal else m


WRONG: list[tuple[str, IndexMask]] = [
    ("sliding_window", window_one_too_small),
    ("sliding_window", gym_sliding_window),
    ("streaming", window_one_too_small),
    ("streaming", sinks_one_too_many),
    ("dilated", window_one_too_small),
    ("dilated", dilation_ignored_off_row),
    ("block_local", blocks_on_query_index),
]


@pytest.mark.parametrize(("name", "wrong"), WRONG, ids=[f"{n}-{w.__name__}" for n, w in WRONG])
def test_a_wrong_index_definition_is_caught(name: str, wrong: IndexMask) -> None:
    spec = attnlab.get(name)
    sets = [s for s in accepted(spec, [*spec.test_params, *EDGE_CASES[name]]) if s.get("window") != 1]
    assert first_disagreement(spec, wrong, sets) is not None


def test_block_local_wrong_definition_agrees_on_self_attention() -> None:
    """The query-index slip above only shows in cross-attention: the shapes must include cross."""
    spec = attnlab.get("block_local")
    params = spec.make_params({"block": 3, "neighbors": 0})
    for n in (7, 63):
        assert torch.equal(blocks_on_query_index(params, n, n, True), factory_mask(spec, params, n, n, True))
    assert not torch.equal(blocks_on_query_index(params, 4, 9, True), factory_mask(spec, params, 4, 9, True))


# -- grids drawn by hand (x = attends), against the index arithmetic -------------------------------

HAND_DRAWN: list[tuple[str, dict[str, int], int, int, bool, list[str]]] = [
    # sliding_window: `window` keys counting the query itself; both sides when not causal
    ("sliding_window", {"window": 3}, 5, 5, True, ["x....", "xx...", "xxx..", ".xxx.", "..xxx"]),
    ("sliding_window", {"window": 2}, 5, 5, False, ["xx...", "xxx..", ".xxx.", "..xxx", "...xx"]),
    # causal cross, bottom-right: query i at position i + 3
    ("sliding_window", {"window": 2}, 3, 6, True, ["..xx..", "...xx.", "....xx"]),
    # N_q > N_k: the first queries sit at negative positions and see nothing
    ("sliding_window", {"window": 2}, 4, 2, True, ["..", "..", "x.", "xx"]),
    # streaming: sinks plus a window
    (
        "streaming",
        {"sinks": 1, "window": 2},
        6,
        6,
        True,
        ["x.....", "xx....", "xxx...", "x.xx..", "x..xx.", "x...xx"],
    ),
    (
        "streaming",
        {"sinks": 2, "window": 2},
        6,
        6,
        False,
        ["xx....", "xxx...", "xxxx..", "xxxxx.", "xx.xxx", "xx..xx"],
    ),
    ("streaming", {"sinks": 2, "window": 1}, 3, 7, True, ["xx..x..", "xx...x.", "xx....x"]),
    # causal still hides a sink that lies ahead of the query
    ("streaming", {"sinks": 1, "window": 1}, 4, 3, True, ["...", "x..", "xx.", "x.x"]),
    ("streaming", {"sinks": 10, "window": 1}, 3, 3, True, ["x..", "xx.", "xxx"]),
    # dilated: `window` keys per side, self included, every `dilation`-th position
    (
        "dilated",
        {"window": 3, "dilation": 2},
        7,
        7,
        True,
        ["x......", ".x.....", "x.x....", ".x.x...", "x.x.x..", ".x.x.x.", "..x.x.x"],
    ),
    (
        "dilated",
        {"window": 2, "dilation": 3},
        7,
        7,
        False,
        ["x..x...", ".x..x..", "..x..x.", "x..x..x", ".x..x..", "..x..x.", "...x..x"],
    ),
    ("dilated", {"window": 2, "dilation": 2}, 2, 6, True, ["..x.x.", "...x.x"]),
    (
        "dilated",
        {"window": 2, "dilation": 5},
        7,
        7,
        True,
        ["x......", ".x.....", "..x....", "...x...", "....x..", "x....x.", ".x....x"],
    ),
    # block_local: own block and `neighbors` blocks before (and after, when not causal)
    (
        "block_local",
        {"block": 2, "neighbors": 1},
        6,
        6,
        True,
        ["x.....", "xx....", "xxx...", "xxxx..", "..xxx.", "..xxxx"],
    ),
    (
        "block_local",
        {"block": 2, "neighbors": 0},
        6,
        6,
        True,
        ["x.....", "xx....", "..x...", "..xx..", "....x.", "....xx"],
    ),
    (
        "block_local",
        {"block": 3, "neighbors": 0},
        7,
        7,
        False,
        ["xxx....", "xxx....", "xxx....", "...xxx.", "...xxx.", "...xxx.", "......x"],
    ),
    # blocks are cut on positions (query i at i + 2), so a query shares the key grid's blocks
    ("block_local", {"block": 2, "neighbors": 0}, 3, 5, True, ["..x..", "..xx.", "....x"]),
    # positions -2 and -1 form block -1, which holds no key
    ("block_local", {"block": 2, "neighbors": 0}, 4, 2, False, ["..", "..", "xx", "xx"]),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "n_q", "n_k", "causal", "picture"),
    HAND_DRAWN,
    ids=[f"{c[0]}-{c[2]}x{c[3]}-{'causal' if c[4] else 'full'}-{i}" for i, c in enumerate(HAND_DRAWN)],
)
def test_index_mask_matches_hand_drawn_grid(
    name: str, kwargs: dict[str, int], n_q: int, n_k: int, causal: bool, picture: list[str]
) -> None:
    spec = attnlab.get(name)
    assert spec.index_mask is not None
    assert draw_mask(spec.index_mask(spec.make_params(kwargs), n_q, n_k, causal)) == picture


@pytest.mark.parametrize("name", MASK_METHODS)
def test_every_mask_method_has_hand_drawn_grids(name: str) -> None:
    drawn = [c for c in HAND_DRAWN if c[0] == name]
    assert len(drawn) >= 2, f"{name}: draw at least two grids in HAND_DRAWN"
    assert any(c[2] != c[3] for c in drawn), f"{name}: draw at least one cross-attention grid"
