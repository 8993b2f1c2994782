"""Each mask method's two definitions agree: its FlexAttention-style factory (``spec.mask``, which the
reference, Flex and SDPA paths all use) and its plain index arithmetic (``spec.index_mask``), on every
pattern it defines, odd shapes and parameter edge cases; and the index arithmetic matches grids drawn by
hand (from the papers' and NATTEN's definitions, not from our code's output).

Two kinds of mask method need more than the (N_q, N_k) grid:

- **grid methods** (a ``shape`` parameter laying the sequence out in 2-D/3-D, e.g. ``neighborhood``): a
  parameter set with an explicit ``shape`` is checked on ``N = prod(shape)`` only, and every other length
  of SHAPES must be refused with an InputError naming the shape (:func:`shapes_for`); self-attention-only
  methods are checked on the self shapes, and must refuse the cross ones. Their neighbourhoods are also
  drawn per query on the grid (GRID_DRAWN).
- **head-dependent methods** (``strided_heads``): the mask depends on the KV head, so the method has no
  ``spec.mask``; its module defines ``head_mask(params, n_q, n_k, causal, heads, kv_heads, device)``
  (the factory's dense (H, N_q, N_k) mask) and ``index_mask(params, n_q, n_k, causal, kv_heads)`` (plain
  arithmetic, one (N_q, N_k) slice per KV head). They are checked the same way over HEAD_COUNTS, with
  grids drawn per KV head (HEAD_DRAWN).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.errors import InputError, ParamError
from attnlab.masks import MaskContext, dense_mask
from attnlab.patterns import pattern_of
from attnlab.registry import MethodSpec
from attnlab.testing import draw_mask

IndexMask = Callable[[Any, int, int, bool], Tensor]
#: (params, n_q, n_k, causal, heads, kv_heads) -> (H, N_q, N_k)
HeadIndexMask = Callable[[Any, int, int, bool, int, int], Tensor]

METHODS = attnlab.methods()


def spec_of(name: str) -> MethodSpec:
    return attnlab.get(name)


def head_module(spec: MethodSpec) -> ModuleType | None:
    """The module of a head-dependent mask method (no ``spec.mask``; ``head_mask`` and ``index_mask`` in
    the module of its reference), else None."""
    mod = sys.modules[spec.reference.__module__]
    ok = (
        spec.mask is None
        and callable(getattr(mod, "head_mask", None))
        and callable(getattr(mod, "index_mask", None))
    )
    return mod if ok else None


MASK_METHODS = [name for name, spec in METHODS.items() if spec.mask is not None]
HEAD_METHODS = [name for name, spec in METHODS.items() if head_module(spec) is not None]

#: (N_q, N_k): self, cross with N_q < N_k and with N_q > N_k; odd sizes, to hit every tail
SHAPES = [
    *((n, n) for n in (1, 7, 63, 130, 257)),
    *[(1, 7), (7, 63), (63, 257), (130, 257), (1, 257)],
    *[(7, 1), (63, 7), (257, 63), (257, 130), (130, 63)],
]
#: (H, H_kv) of head-dependent methods: fewer and more KV heads than a vert_stride, GQA and not; their
#: masks cost H times more, so they take the shapes up to 130
HEAD_COUNTS = [(4, 2), (6, 6)]
HEAD_SHAPES = [s for s in SHAPES if max(s) <= 130]
HUGE = 2**40  # beyond int32: the factories must cap it, not overflow

#: Parameter edge cases per method, on top of its ``test_params``. A set a method rejects (ParamError)
#: is left out for that method; each method must keep at least MIN_EDGE_CASES of them.
EDGE_CASES: dict[str, list[dict[str, Any]]] = {
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
    "neighborhood": [
        {"window": 1},  # the query alone (NATTEN itself takes windows >= 2)
        {"window": 2},  # even: one key back, none ahead; shifted at both ends
        {"window": 4, "stride": 4},  # stride = window: blocked attention
        {"window": 5, "stride": 2},  # even stride: the right-hand centre query leads
        {"window": 3, "stride": 3, "axis_causal": True},  # causal: the group's last query leads
        {"window": 4, "dilation": 2, "stride": 3, "axis_causal": True},
        {"window": 2, "dilation": 5},  # dilation > window; 7 = 5 + 2: groups of 2 and of 1 token
        {"window": 3, "dilation": 300},  # dilation > N: groups of one token
        {"window": 257},  # = N (no shape: the window is cut to the sequence)
        {"window": 258},  # > N
        {"window": HUGE, "dilation": HUGE, "stride": HUGE},
        # grids (checked on N = prod(shape) only)
        {
            "shape": (7, 9),
            "window": (3, 4),
            "dilation": (2, 1),
            "stride": (1, 2),
            "axis_causal": (True, False),
        },
        {"shape": (10, 13), "window": (3, 4), "stride": (1, 2), "axis_causal": (True, False)},
        {"shape": (5, 6), "window": (2, 3), "dilation": (2, 2), "stride": 2},
        {"shape": (7, 9), "window": (7, 9)},  # the window is the whole grid
        {"shape": (2, 5, 13), "window": (2, 3, 5), "dilation": (1, 1, 2)},
        {
            "shape": (3, 5, 7),
            "window": (1, 5, 2),
            "dilation": (3, 1, 3),
            "stride": (1, 4, 2),
            "axis_causal": (False, True, True),
        },
        {"shape": (4, 8), "window": 5},  # rejected: window larger than axis 0
        {"shape": (5, 9), "window": 3, "dilation": 2},  # rejected: 3 x 2 spans more than axis 0
        {"window": 3, "stride": 4},  # rejected: stride > window
    ],
    "power": [
        {"block": 1, "window": 1, "sinks": 0},  # token level: distances 0, 1, 2, 4, ...
        {"block": 3, "window": 3, "sinks": 2},
        {"block": 5, "window": 1, "sinks": 300},  # sinks > N: dense
        {"block": 1, "window": 300, "sinks": 0},  # window > N: dense
        {"block": 300, "window": 1, "sinks": 0},  # block > N: one block
        {"block": HUGE, "window": HUGE, "sinks": HUGE},
        {"block": 0},  # rejected
        {"sinks": -1},  # rejected
    ],
    "radial": [
        {"frame": 1},  # one token per frame: the reach is 1 for frame distances 0 and 1, then 0
        {"frame": 2, "window": 2},
        {"frame": 5, "window": 3},
        {"frame": 16, "window": 1},
        {"frame": 300},  # frame > N: one partial frame, dense
        {"frame": HUGE, "window": HUGE},
        {"frame": 4, "window": 5},  # rejected: window > frame
    ],
    "multi_axis": [
        {"block": 1, "grid": 1},  # each token alone
        {"block": 7, "grid": 1},
        {"block": 300, "grid": 2},  # block > N: one window
        {"block": 1, "grid": 300},  # grid > N: grid step 1, every token
        {"block": HUGE, "grid": HUGE},
        {"shape": (7, 9), "block": (2, 4), "grid": (3, 2)},
        {"shape": (10, 13), "block": (2, 5), "grid": (3, 4)},
        {"shape": (9, 7), "block": (9, 1), "grid": (1, 7)},
        {"shape": (4, 8), "block": 5},  # rejected: block larger than axis 0
    ],
    "doc_blocks": [
        {},  # one segment: dense
        {"boundaries": (1,)},
        {"boundaries": (1, 2, 3, 4, 5, 6)},  # one-token documents
        {"boundaries": (4, 9), "prefix_global": False, "last_sees_all": False},
        {"boundaries": (3, 100), "last_sees_all": False},
        {"boundaries": (60, 300)},  # past N: empty segments
        {"boundaries": (HUGE,)},
        {"boundaries": (0,)},  # rejected
        {"boundaries": (5, 5)},  # rejected
    ],
    "strided_heads": [
        {"block": 1, "local": 1, "vert_stride": 1},  # every block owned: dense
        {"block": 1, "local": 2, "vert_stride": 3},
        {"block": 3, "local": 1, "vert_stride": 5},
        {"block": 2, "local": 1, "vert_stride": 300},  # stride > blocks: one owned block per head, at most
        {"block": 300, "local": 1, "vert_stride": 4},  # block > N
        {"block": 1, "local": 300, "vert_stride": 5},  # local covers everything
        {"block": HUGE, "local": HUGE, "vert_stride": 2**20},
        {"vert_stride": 2**20 + 1},  # rejected
        {"local": 0},  # rejected
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


def shapes_for(spec: MethodSpec, params: Any) -> list[tuple[int, int, bool]]:
    """(N_q, N_k, causal) a parameter set is checked on: SHAPES (HEAD_SHAPES for head methods) x (False,
    True) in the patterns the method defines; a grid given as ``shape`` holds one length, prod(shape)."""
    grid = getattr(params, "shape", None)
    shapes = SHAPES if head_module(spec) is None else HEAD_SHAPES
    if grid is not None:
        shapes = [(math.prod(grid), math.prod(grid))]
    return [
        (n_q, n_k, causal)
        for (n_q, n_k), causal in itertools.product(shapes, (False, True))
        if pattern_of(causal, n_q, n_k) in spec.patterns
    ]


def factory_mask(spec: MethodSpec, params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    assert spec.mask is not None
    return dense_mask(spec.mask(params, MaskContext(n_q, n_k, causal, "cpu")), n_q, n_k, "cpu")


def _describe(name: str, where: str, got: Tensor, want: Tensor) -> str:
    pairs = (got != want).nonzero().tolist()
    text = f"{name} {where}: {len(pairs)} entries differ, first: {pairs[:5]}"
    if got.shape[-2] <= 16 and got.shape[-1] <= 16 and got.dim() == 2:
        text += "\nfactory:\n" + "\n".join(draw_mask(want)) + "\nindex:\n" + "\n".join(draw_mask(got))
    return text


def first_disagreement(
    spec: MethodSpec, index_mask: IndexMask, param_sets: Iterable[Mapping[str, Any]]
) -> str | None:
    """The first (params, shape, causal) where ``index_mask`` and the factory differ, described; or None."""
    for kwargs in param_sets:
        params = spec.make_params(kwargs)
        for n_q, n_k, causal in shapes_for(spec, params):
            want = factory_mask(spec, params, n_q, n_k, causal)
            got = index_mask(params, n_q, n_k, causal)
            assert got.dtype == torch.bool and got.device.type == "cpu" and got.shape == (n_q, n_k)
            if not torch.equal(got, want):
                return _describe(spec.name, f"{kwargs}, N_q={n_q}, N_k={n_k}, causal={causal}", got, want)
    return None


def head_index(spec: MethodSpec) -> HeadIndexMask:
    """A head method's index arithmetic, per query head (KV head ``h // (H / H_kv)``)."""
    mod = head_module(spec)
    assert mod is not None

    def per_query_head(params: Any, n_q: int, n_k: int, causal: bool, heads: int, kv_heads: int) -> Tensor:
        per_kv = mod.index_mask(params, n_q, n_k, causal, kv_heads)
        assert per_kv.dtype == torch.bool and per_kv.shape == (kv_heads, n_q, n_k)
        return per_kv[torch.arange(heads) // (heads // kv_heads)]

    return per_query_head


def first_head_disagreement(
    spec: MethodSpec, index_mask: HeadIndexMask, param_sets: Iterable[Mapping[str, Any]]
) -> str | None:
    """As :func:`first_disagreement`, for a head-dependent method over HEAD_COUNTS."""
    mod = head_module(spec)
    assert mod is not None
    for kwargs in param_sets:
        params = spec.make_params(kwargs)
        for (n_q, n_k, causal), (heads, kv_heads) in itertools.product(shapes_for(spec, params), HEAD_COUNTS):
            want = mod.head_mask(params, n_q, n_k, causal, heads, kv_heads, "cpu")
            got = index_mask(params, n_q, n_k, causal, heads, kv_heads)
            if not torch.equal(got, want):
                where = f"{kwargs}, N_q={n_q}, N_k={n_k}, causal={causal}, H={heads}, H_kv={kv_heads}"
                return _describe(spec.name, where, got, want)
    return None


def test_mask_methods_are_found() -> None:
    assert {"sliding_window", "streaming", "dilated", "block_local"} <= set(MASK_METHODS)
    assert {"neighborhood", "power", "radial", "multi_axis", "doc_blocks"} <= set(MASK_METHODS)
    assert HEAD_METHODS == ["strided_heads"]


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.family == "static"])
def test_every_static_method_defines_its_mask(name: str) -> None:
    """A static method is a mask method or a head-dependent one: nothing static escapes these tests."""
    spec = spec_of(name)
    assert spec.mask is not None or head_module(spec) is not None, (
        f"{name}: a static method needs mask= in its MethodSpec, or head_mask and index_mask in its module"
    )


@pytest.mark.parametrize("name", MASK_METHODS + HEAD_METHODS)
def test_every_mask_method_has_an_index_mask_and_edge_cases(name: str) -> None:
    spec = spec_of(name)
    assert spec.index_mask is not None or name in HEAD_METHODS, (
        f"{name}: a mask method needs index_mask= in its MethodSpec"
    )
    assert len(accepted(spec, EDGE_CASES.get(name, []))) >= MIN_EDGE_CASES, (
        f"{name}: add at least {MIN_EDGE_CASES} valid parameter edge cases to EDGE_CASES"
    )


def _cases(names: list[str]) -> list[tuple[str, Mapping[str, Any]]]:
    return [
        (name, kwargs)
        for name in names
        for kwargs in accepted(spec_of(name), [*spec_of(name).test_params, *EDGE_CASES.get(name, [])])
    ]


def _id(name: str, kwargs: Mapping[str, Any]) -> str:
    return f"{name}-" + ",".join(f"{k}={v}".replace(" ", "") for k, v in kwargs.items())


PARAM_CASES = _cases(MASK_METHODS)
HEAD_CASES = _cases(HEAD_METHODS)


@pytest.mark.parametrize(("name", "kwargs"), PARAM_CASES, ids=[_id(*c) for c in PARAM_CASES])
def test_factory_and_index_mask_agree(name: str, kwargs: Mapping[str, Any]) -> None:
    spec = spec_of(name)
    assert spec.index_mask is not None
    problem = first_disagreement(spec, spec.index_mask, [kwargs])
    assert problem is None, problem


@pytest.mark.parametrize(("name", "kwargs"), HEAD_CASES, ids=[_id(*c) for c in HEAD_CASES])
def test_head_factory_and_index_mask_agree(name: str, kwargs: Mapping[str, Any]) -> None:
    spec = spec_of(name)
    problem = first_head_disagreement(spec, head_index(spec), [kwargs])
    assert problem is None, problem


GRID_CASES = [(n, k) for n, k in PARAM_CASES if k.get("shape") is not None]


@pytest.mark.parametrize(("name", "kwargs"), GRID_CASES, ids=[_id(*c) for c in GRID_CASES])
def test_a_grid_holds_exactly_its_sequence(name: str, kwargs: Mapping[str, Any]) -> None:
    """Lengths other than prod(shape) are refused by both definitions, naming the shape and N."""
    spec = spec_of(name)
    assert spec.index_mask is not None
    params = spec.make_params(kwargs)
    for n in sorted({n for n, _ in SHAPES if n != math.prod(kwargs["shape"])})[:3]:
        for definition in (spec.index_mask, lambda p, a, b, c: factory_mask(spec, p, a, b, c)):
            with pytest.raises(
                InputError, match=rf"shape=.* holds {math.prod(kwargs['shape'])} tokens.*N={n}"
            ):
                definition(params, n, n, False)


SELF_ONLY = [n for n in MASK_METHODS if not any(p.cross for p in spec_of(n).patterns)]


@pytest.mark.parametrize("name", SELF_ONLY)
def test_self_only_methods_refuse_cross_shapes(name: str) -> None:
    spec = spec_of(name)
    assert spec.index_mask is not None
    params = spec.make_params(spec.test_params[0])
    for n_q, n_k in ((7, 9), (9, 7)):
        for definition in (spec.index_mask, lambda p, a, b, c: factory_mask(spec, p, a, b, c)):
            with pytest.raises(InputError, match=rf"expected N_q == N_k, got.*{n_q}.*{n_k}"):
                definition(params, n_q, n_k, False)


# -- a wrong definition is caught -------------------------------------------------------------------


def _pos_key(n_q: int, n_k: int) -> tuple[Tensor, Tensor]:
    return torch.arange(n_q)[:, None] + (n_k - n_q), torch.arange(n_k)[None, :]


def window_one_too_small(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    spec = spec_of(params.method)
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


# neighborhood: NATTEN's per-axis rule with one thing changed each time. ``rule(i, L, k, d, s, causal)``
# gives the key coordinates query coordinate ``i`` sees along an axis of length ``L``.
AxisRule = Callable[[int, int, int, int, int, bool], list[int]]


def _natten_axis(
    i: int, length: int, k: int, d: int, s: int, causal: bool, *, variant: str = ""
) -> list[int]:
    """NATTEN's one-axis rule (csrc/include/natten/cuda/reference/mask.hpp), with ``variant`` breaking it."""
    group = list(range(i % d, length, d))
    ip = i // d
    lg = -(-length // d) if variant == "ceil_group_length" else len(group)
    k = min(k, lg)
    if causal:
        leader = min(ip // s * s + (s // 2 if variant == "causal_centre_leader" else s - 1), lg - 1)
        first = max(leader - k + 1, 0)
        last = first + k - 1 if variant == "causal_window_shifts" else ip
    else:
        leader = min(ip // s * s + (0 if variant == "first_query_leads" else s // 2), lg - 1)
        left = (k - 1) // 2 if variant == "even_window_leans_ahead" else k // 2
        first = max(leader - left, 0)
        if variant != "cut_at_border":
            first = min(first, lg - k)
        last = min(leader - left + k - 1, lg - 1) if variant == "cut_at_border" else first + k - 1
    return group[first : last + 1]


def _grid_mask(params: Any, n: int, causal: bool, rule: AxisRule) -> Tensor:
    shape = params.shape if params.shape is not None else (n,)
    assert math.prod(shape) == n
    window, dilation, stride, axis_causal = params.axes()
    coords = torch.tensor(list(itertools.product(*(range(x) for x in shape)))).reshape(n, len(shape))
    out = torch.ones(n, n, dtype=torch.bool)
    for a, length in enumerate(shape):
        table = torch.zeros(length, length, dtype=torch.bool)
        for i in range(length):
            table[i, rule(i, length, window[a], dilation[a], stride[a], axis_causal[a])] = True
        out &= table[coords[:, a][:, None], coords[:, a][None, :]]
    return out & torch.ones(n, n, dtype=torch.bool).tril() if causal else out


def _natten_variant(variant: str, doc: str) -> IndexMask:
    def wrong(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
        return _grid_mask(params, n_q, causal, lambda *a: _natten_axis(*a, variant=variant))

    wrong.__name__ = variant
    wrong.__doc__ = doc
    return wrong


def causal_in_raster_order(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """Causal axes read as ``j <= i`` in raster order over the non-causal windows (not per axis)."""
    axis_causal = params.axes()[3]
    base = _grid_mask(params, n_q, False, lambda i, n, k, d, s, c: _natten_axis(i, n, k, d, s, False))
    return base & torch.ones(n_q, n_q, dtype=torch.bool).tril() if causal or any(axis_causal) else base


def _multi_axis_mask(
    params: Any, n: int, causal: bool, *, flat_windows: bool, grid_step_is_g: bool
) -> Tensor:
    (_, width), (bh, bw), (sh, sw) = params.resolved(n)
    if grid_step_is_g:
        sh, sw = (params.grid, params.grid) if isinstance(params.grid, int) else params.grid
    t = torch.arange(n)
    y, x = t // width, t % width
    if flat_windows:
        window = (t[:, None] // (bh * bw)) == (t[None, :] // (bh * bw))
    else:
        window = ((y[:, None] // bh) == (y[None, :] // bh)) & ((x[:, None] // bw) == (x[None, :] // bw))
    grid_m = ((y[:, None] % sh) == (y[None, :] % sh)) & ((x[:, None] % sw) == (x[None, :] % sw))
    m = window | grid_m
    return m & torch.ones(n, n, dtype=torch.bool).tril() if causal else m


def grid_step_is_g(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """MaxViT's grid read as 'every G-th token' (step G) instead of a G x G grid (step ceil(L / G))."""
    return _multi_axis_mask(params, n_q, causal, flat_windows=False, grid_step_is_g=True)


def windows_on_flat_index(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """Block windows cut on the raster index (runs of P_h * P_w tokens) instead of 2-D tiles."""
    return _multi_axis_mask(params, n_q, causal, flat_windows=True, grid_step_is_g=False)


def _power_mask(
    params: Any, n_q: int, n_k: int, causal: bool, *, token_powers: bool, one_sided: bool
) -> Tensor:
    pos, key = _pos_key(n_q, n_k)
    qb, kb = pos // params.block, key // params.block
    d = qb - kb
    far = pos - key if token_powers else d
    if one_sided:
        far = far.clamp(min=0)
    power = (far > 0) & ((far & (far - 1)) == 0)
    m = (d.abs() < params.window) | power | (kb < params.sinks)
    return m & (key <= pos) if causal else m


def powers_of_token_distance(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """Power-of-two distances counted in tokens instead of blocks."""
    return _power_mask(params, n_q, n_k, causal, token_powers=True, one_sided=False)


def powers_only_behind(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """Non-causal calls see the power-of-two blocks behind the query only."""
    return _power_mask(params, n_q, n_k, causal, token_powers=False, one_sided=True)


def _radial_mask(params: Any, n: int, causal: bool, reach_at: Callable[[int, int], int]) -> Tensor:
    f = params.frame
    t = torch.arange(n)
    r = (t[:, None] // f - t[None, :] // f).abs()
    reach = torch.tensor([reach_at(params.reach, int(x)) for x in range(n // f + 2)])[r]
    m = (t[:, None] % f - t[None, :] % f).abs() < reach
    return m & torch.ones(n, n, dtype=torch.bool).tril() if causal else m


def reach_divided_by_distance(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """``window // r`` (a 1/r decay) instead of halving at each power of two."""
    return _radial_mask(params, n_q, causal, lambda w, r: w // max(r, 1))


def reach_halved_every_frame(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """``window >> (r - 1)`` (halved at every frame) instead of at each doubling of the distance."""
    return _radial_mask(params, n_q, causal, lambda w, r: w >> max(r - 1, 0))


def _segments(boundaries: tuple[int, ...], x: Tensor) -> Tensor:
    return sum(((x >= b).long() for b in boundaries), torch.zeros_like(x))


def segments_on_query_row(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The query's segment read from its row index instead of its position: wrong in cross-attention."""
    pos, key = _pos_key(n_q, n_k)
    sq, sk = _segments(params.boundaries, torch.arange(n_q)[:, None]), _segments(params.boundaries, key)
    last = len(params.boundaries)
    m = (sq == sk) | ((sk == 0) & params.prefix_global) | ((sq == last) & params.last_sees_all)
    return m & (key <= pos) if causal else m


def prefix_not_global(params: Any, n_q: int, n_k: int, causal: bool) -> Tensor:
    """``prefix_global`` ignored: the prefix is just one more document."""
    spec = spec_of("doc_blocks")
    assert spec.index_mask is not None
    return spec.index_mask(dataclasses.replace(params, prefix_global=False), n_q, n_k, causal)


NA = "neighborhood"
WRONG: list[tuple[str, IndexMask]] = [
    ("sliding_window", window_one_too_small),
    ("sliding_window", gym_sliding_window),
    ("streaming", window_one_too_small),
    ("streaming", sinks_one_too_many),
    ("dilated", window_one_too_small),
    ("dilated", dilation_ignored_off_row),
    ("block_local", blocks_on_query_index),
    (NA, _natten_variant("cut_at_border", "The window cut at the border instead of shifted inside.")),
    (
        NA,
        _natten_variant(
            "ceil_group_length", "Every dilation group ceil(L / d) long (NATTEN's fix-up skipped)."
        ),
    ),
    (
        NA,
        _natten_variant(
            "causal_window_shifts", "A causal axis shifting its window at the start, not shrinking it."
        ),
    ),
    (
        NA,
        _natten_variant("causal_centre_leader", "A causal axis led by the centre query of its stride group."),
    ),
    (NA, _natten_variant("first_query_leads", "A stride group led by its first query, not its centre.")),
    (NA, _natten_variant("even_window_leans_ahead", "Even windows reaching k/2 ahead, k/2 - 1 back.")),
    (NA, causal_in_raster_order),
    ("multi_axis", grid_step_is_g),
    ("multi_axis", windows_on_flat_index),
    ("power", powers_of_token_distance),
    ("power", powers_only_behind),
    ("radial", reach_divided_by_distance),
    ("radial", reach_halved_every_frame),
    ("doc_blocks", segments_on_query_row),
    ("doc_blocks", prefix_not_global),
]


@pytest.mark.parametrize(("name", "wrong"), WRONG, ids=[f"{n}-{w.__name__}" for n, w in WRONG])
def test_a_wrong_index_definition_is_caught(name: str, wrong: IndexMask) -> None:
    spec = spec_of(name)
    sets = [s for s in accepted(spec, [*spec.test_params, *EDGE_CASES[name]]) if s.get("window") != 1]
    assert first_disagreement(spec, wrong, sets) is not None


def test_block_local_wrong_definition_agrees_on_self_attention() -> None:
    """The query-index slip above only shows in cross-attention: the shapes must include cross."""
    spec = spec_of("block_local")
    params = spec.make_params({"block": 3, "neighbors": 0})
    for n in (7, 63):
        assert torch.equal(blocks_on_query_index(params, n, n, True), factory_mask(spec, params, n, n, True))
    assert not torch.equal(blocks_on_query_index(params, 4, 9, True), factory_mask(spec, params, 4, 9, True))


# head-dependent (strided_heads): ``(params, n_q, n_k, causal, heads, kv_heads) -> (H, N_q, N_k)``


def _strided(params: Any, n_q: int, n_k: int, causal: bool, offsets: list[int], local: int) -> Tensor:
    pos, key = _pos_key(n_q, n_k)
    qb, kb = pos // params.block, key // params.block
    d = qb - kb
    near = (d >= 0) & (d < local) if causal else d.abs() < local
    out = torch.stack([near | ((kb + o) % params.vert_stride == 0) for o in offsets])
    return out & (key <= pos) if causal else out


def dkernel_step_from_query_heads(
    params: Any, n_q: int, n_k: int, causal: bool, heads: int, kv_heads: int
) -> Tensor:
    """dkernel's ``head_sliding_step = max(1, vert_stride // num_heads)`` from the query heads H (attnlab
    takes it from H_kv, so that GQA's KV heads spread over the residues)."""
    step = max(1, params.vert_stride // heads)
    return _strided(
        params, n_q, n_k, causal, [h // (heads // kv_heads) * step for h in range(heads)], params.local
    )


def offset_per_query_head(params: Any, n_q: int, n_k: int, causal: bool, heads: int, kv_heads: int) -> Tensor:
    """Each query head its own residue: the heads of one KV head no longer share their keys."""
    step = max(1, params.vert_stride // kv_heads)
    return _strided(params, n_q, n_k, causal, [h * step for h in range(heads)], params.local)


def local_one_block_short(params: Any, n_q: int, n_k: int, causal: bool, heads: int, kv_heads: int) -> Tensor:
    """``local`` read as the blocks before the query's own (its own block left to the shards)."""
    step = max(1, params.vert_stride // kv_heads)
    offsets = [h // (heads // kv_heads) * step for h in range(heads)]
    return _strided(params, n_q, n_k, causal, offsets, params.local - 1)


HEAD_WRONG: list[tuple[str, HeadIndexMask]] = [
    ("strided_heads", dkernel_step_from_query_heads),
    ("strided_heads", offset_per_query_head),
    ("strided_heads", local_one_block_short),
]


@pytest.mark.parametrize(("name", "wrong"), HEAD_WRONG, ids=[f"{n}-{w.__name__}" for n, w in HEAD_WRONG])
def test_a_wrong_head_definition_is_caught(name: str, wrong: HeadIndexMask) -> None:
    spec = spec_of(name)
    sets = accepted(spec, [*spec.test_params, *EDGE_CASES[name]])
    assert first_head_disagreement(spec, wrong, sets) is not None


# -- grids drawn by hand (x = attends), against the index arithmetic -------------------------------

# fmt: off
HAND_DRAWN: list[tuple[str, dict[str, Any], int, int, bool, list[str]]] = [
    # sliding_window: `window` keys counting the query itself; both sides when not causal
    ("sliding_window", {"window": 3}, 5, 5, True, ["x....", "xx...", "xxx..", ".xxx.", "..xxx"]),
    ("sliding_window", {"window": 2}, 5, 5, False, ["xx...", "xxx..", ".xxx.", "..xxx", "...xx"]),
    # causal cross, bottom-right: query i at position i + 3
    ("sliding_window", {"window": 2}, 3, 6, True, ["..xx..", "...xx.", "....xx"]),
    # N_q > N_k: the first queries sit at negative positions and see nothing
    ("sliding_window", {"window": 2}, 4, 2, True, ["..", "..", "x.", "xx"]),
    # streaming: sinks plus a window
    ("streaming", {"sinks": 1, "window": 2}, 6, 6, True,
     ["x.....", "xx....", "xxx...", "x.xx..", "x..xx.", "x...xx"]),
    ("streaming", {"sinks": 2, "window": 2}, 6, 6, False,
     ["xx....", "xxx...", "xxxx..", "xxxxx.", "xx.xxx", "xx..xx"]),
    ("streaming", {"sinks": 2, "window": 1}, 3, 7, True, ["xx..x..", "xx...x.", "xx....x"]),
    # causal still hides a sink that lies ahead of the query
    ("streaming", {"sinks": 1, "window": 1}, 4, 3, True, ["...", "x..", "xx.", "x.x"]),
    ("streaming", {"sinks": 10, "window": 1}, 3, 3, True, ["x..", "xx.", "xxx"]),
    # dilated: `window` keys per side, self included, every `dilation`-th position
    ("dilated", {"window": 3, "dilation": 2}, 7, 7, True,
     ["x......", ".x.....", "x.x....", ".x.x...", "x.x.x..", ".x.x.x.", "..x.x.x"]),
    ("dilated", {"window": 2, "dilation": 3}, 7, 7, False,
     ["x..x...", ".x..x..", "..x..x.", "x..x..x", ".x..x..", "..x..x.", "...x..x"]),
    ("dilated", {"window": 2, "dilation": 2}, 2, 6, True, ["..x.x.", "...x.x"]),
    ("dilated", {"window": 2, "dilation": 5}, 7, 7, True,
     ["x......", ".x.....", "..x....", "...x...", "....x..", "x....x.", ".x....x"]),
    # block_local: own block and `neighbors` blocks before (and after, when not causal)
    ("block_local", {"block": 2, "neighbors": 1}, 6, 6, True,
     ["x.....", "xx....", "xxx...", "xxxx..", "..xxx.", "..xxxx"]),
    ("block_local", {"block": 2, "neighbors": 0}, 6, 6, True,
     ["x.....", "xx....", "..x...", "..xx..", "....x.", "....xx"]),
    ("block_local", {"block": 3, "neighbors": 0}, 7, 7, False,
     ["xxx....", "xxx....", "xxx....", "...xxx.", "...xxx.", "...xxx.", "......x"]),
    # blocks are cut on positions (query i at i + 2), so a query shares the key grid's blocks
    ("block_local", {"block": 2, "neighbors": 0}, 3, 5, True, ["..x..", "..xx.", "....x"]),
    # positions -2 and -1 form block -1, which holds no key
    ("block_local", {"block": 2, "neighbors": 0}, 4, 2, False, ["..", "..", "xx", "xx"]),
    # neighborhood (NATTEN, 1-D; left = k // 2 keys back, right = k - left - 1 ahead, in the dilation
    # group): L=10, k=4: [0,4) three times, then [1,5) ... [6,10) twice -- the window shifts, never shrinks
    (NA, {"window": 4}, 10, 10, False,
     ["xxxx......", "xxxx......", "xxxx......", ".xxxx.....", "..xxxx....",
      "...xxxx...", "....xxxx..", ".....xxxx.", "......xxxx", "......xxxx"]),
    # causal axis, k=3: [max(i - 2, 0), i] -- the window shrinks at the start instead
    (NA, {"window": 3, "axis_causal": True}, 6, 6, False,
     ["x.....", "xx....", "xxx...", ".xxx..", "..xxx.", "...xxx"]),
    # the call's causal=True over a non-causal axis: the shifted window [2, 5) of the last query keeps 3
    (NA, {"window": 3}, 5, 5, True, ["x....", "xx...", ".xx..", "..xx.", "..xxx"]),
    # dilation 2 on L=7: groups {0,2,4,6} (4 long) and {1,3,5} (3 long), each with its own shift
    (NA, {"window": 3, "dilation": 2}, 7, 7, False,
     ["x.x.x..", ".x.x.x.", "x.x.x..", ".x.x.x.", "..x.x.x", ".x.x.x.", "..x.x.x"]),
    (NA, {"window": 2, "dilation": 2}, 8, 8, False,
     ["x.x.....", ".x.x....", "x.x.....", ".x.x....", "..x.x...", "...x.x..", "....x.x.", ".....x.x"]),
    # stride 2: queries {0,1}, {2,3}, ... share the window of their leader (1, 3, 5, 7: the centre)
    (NA, {"window": 4, "stride": 2}, 8, 8, False,
     ["xxxx....", "xxxx....", ".xxxx...", ".xxxx...", "...xxxx.", "...xxxx.", "....xxxx", "....xxxx"]),
    # stride = window: blocked attention; a short last group's leader is its last query, shifted back
    (NA, {"window": 3, "stride": 3}, 6, 6, False,
     ["xxx...", "xxx...", "xxx...", "...xxx", "...xxx", "...xxx"]),
    (NA, {"window": 3, "stride": 3}, 7, 7, False,
     ["xxx....", "xxx....", "xxx....", "...xxx.", "...xxx.", "...xxx.", "....xxx"]),
    # causal axis with stride 2: leader = the group's last query, keys [max(leader - 2, 0), i]
    (NA, {"window": 3, "stride": 2, "axis_causal": True}, 6, 6, False,
     ["x.....", "xx....", ".xx...", ".xxx..", "...xx.", "...xxx"]),
    # power (block distances 0 .. window - 1, 1, 2, 4, ...; sink blocks)
    ("power", {"block": 1, "window": 1, "sinks": 0}, 7, 7, True,
     ["x......", "xx.....", "xxx....", ".xxx...", "x.xxx..", ".x.xxx.", "..x.xxx"]),
    # blocks of 2, one sink block; causal cross: query i at position i + 12 (block 6: blocks 5, 4, 2, 0)
    ("power", {"block": 2, "window": 1, "sinks": 1}, 2, 14, True, ["xx..xx..xxxxx.", "xx..xx..xxxxxx"]),
    # non-causal: the same distances ahead; distance 3 is neither local nor a power of two
    ("power", {"block": 1, "window": 2, "sinks": 0}, 6, 6, False,
     ["xxx.x.", "xxxx.x", "xxxxx.", ".xxxxx", "x.xxxx", ".x.xxx"]),
    # N_q > N_k: positions -3 .. 1; position -3 reaches key 1 at distance 4
    ("power", {"block": 1, "window": 1, "sinks": 0}, 5, 2, False, [".x", "x.", "xx", "xx", "xx"]),
    # radial: frames of 2, window 2: reach 2 at frame distance 0-1, 1 at 2-3, 0 from 4 on
    ("radial", {"frame": 2, "window": 2}, 8, 8, False,
     ["xxxxx.x.", "xxxx.x.x", "xxxxxxx.", "xxxxxx.x", "x.xxxxxx", ".xxxxxxx", "x.x.xxxx", ".x.xxxxx"]),
    # frames of 3 (the last one partial), window 2, causal
    ("radial", {"frame": 3, "window": 2}, 7, 7, True,
     ["x......", "xx.....", ".xx....", "xx.x...", "xxxxx..", ".xx.xx.", "x..xx.x"]),
    # multi_axis on 1 x 6: windows {0,1} {2,3} {4,5}; grid 2: step 3, groups {0,3} {1,4} {2,5}
    ("multi_axis", {"block": 2, "grid": 2}, 6, 6, False,
     ["xx.x..", "xx..x.", "..xx.x", "x.xx..", ".x..xx", "..x.xx"]),
    ("multi_axis", {"block": 2, "grid": 2}, 6, 6, True,
     ["x.....", "xx....", "..x...", "x.xx..", ".x..x.", "..x.xx"]),
    # 2 x 4 grid (token 4y + x), 1 x 2 windows, grid (2, 2): steps (1, 2), i.e. columns of one parity
    ("multi_axis", {"shape": (2, 4), "block": (1, 2), "grid": (2, 2)}, 8, 8, False,
     ["xxx.x.x.", "xx.x.x.x", "x.xxx.x.", ".xxx.x.x", "x.x.xxx.", ".x.xxx.x", "x.x.x.xx", ".x.x.xxx"]),
    # doc_blocks: P P D1 D1 D2 D2 Q Q; the prefix is seen by all, the query segment sees all
    ("doc_blocks", {"boundaries": (2, 4, 6)}, 8, 8, False,
     ["xx......", "xx......", "xxxx....", "xxxx....", "xx..xx..", "xx..xx..", "xxxxxxxx", "xxxxxxxx"]),
    # plain documents, causal cross: queries at positions 3, 4, 5
    ("doc_blocks", {"boundaries": (2, 4), "prefix_global": False, "last_sees_all": False}, 3, 6, True,
     ["..xx..", "....x.", "....xx"]),
    # N_q > N_k: the query at position -1 joins segment 0
    ("doc_blocks", {"boundaries": (1, 2), "prefix_global": False, "last_sees_all": False}, 4, 3, False,
     ["x..", "x..", ".x.", "..x"]),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "kwargs", "n_q", "n_k", "causal", "picture"),
    HAND_DRAWN,
    ids=[f"{c[0]}-{c[2]}x{c[3]}-{'causal' if c[4] else 'full'}-{i}" for i, c in enumerate(HAND_DRAWN)],
)
def test_index_mask_matches_hand_drawn_grid(
    name: str, kwargs: dict[str, Any], n_q: int, n_k: int, causal: bool, picture: list[str]
) -> None:
    spec = spec_of(name)
    assert spec.index_mask is not None
    assert draw_mask(spec.index_mask(spec.make_params(kwargs), n_q, n_k, causal)) == picture


# fmt: off
#: grid methods: the keys one query (given by its grid coordinates) sees, drawn on the grid (3-D grids
#: as their 2-D slices one under the other)
GRID_DRAWN: list[tuple[str, dict[str, Any], tuple[int, ...], bool, list[str]]] = [
    # NATTEN 2-D, 3 x 3 window on 4 x 5: a corner's window is shifted inside, not cut
    (NA, {"shape": (4, 5), "window": 3}, (0, 0), False, ["xxx..", "xxx..", "xxx..", "....."]),
    (NA, {"shape": (4, 5), "window": 3}, (3, 4), False, [".....", "..xxx", "..xxx", "..xxx"]),
    (NA, {"shape": (4, 5), "window": 3}, (2, 2), False, [".....", ".xxx.", ".xxx.", ".xxx."]),
    (NA, {"shape": (4, 5), "window": 3}, (1, 2), False, [".xxx.", ".xxx.", ".xxx.", "....."]),
    # causal along the rows only: the window ends at the query's row (and shrinks at the top)
    (NA, {"shape": (4, 5), "window": 3, "axis_causal": (True, False)}, (2, 0), False,
     ["xxx..", "xxx..", "xxx..", "....."]),
    (NA, {"shape": (4, 5), "window": 3, "axis_causal": (True, False)}, (0, 4), False,
     ["..xxx", ".....", ".....", "....."]),
    # even window 2 x 4: k/2 back, k/2 - 1 ahead
    (NA, {"shape": (4, 6), "window": (2, 4)}, (2, 3), False, ["......", ".xxxx.", ".xxxx.", "......"]),
    # dilation (2, 3) on 5 x 6: rows {0,2,4} / {1,3}, columns {0,3} / {1,4} / {2,5}; 2 x 2 keys each
    (NA, {"shape": (5, 6), "window": 2, "dilation": (2, 3)}, (4, 5), False,
     ["......", "......", "..x..x", "......", "..x..x"]),
    (NA, {"shape": (5, 6), "window": 2, "dilation": (2, 3)}, (0, 0), False,
     ["x..x..", "......", "x..x..", "......", "......"]),
    # stride 2 on 5 x 5, window 3: query (2, 2)'s group {2,3} is led by 3, so its window is rows/cols 2-4
    (NA, {"shape": (5, 5), "window": 3, "stride": 2}, (2, 2), False,
     [".....", ".....", "..xxx", "..xxx", "..xxx"]),
    # 3-D (2, 3, 4), window (2, 3, 3), causal along axis 0; with the call's causal=True, raster order too
    (NA, {"shape": (2, 3, 4), "window": (2, 3, 3), "axis_causal": (True, False, False)}, (0, 1, 0), False,
     ["xxx.", "xxx.", "xxx.", "....", "....", "...."]),
    (NA, {"shape": (2, 3, 4), "window": (2, 3, 3), "axis_causal": (True, False, False)}, (1, 0, 1), True,
     ["xxx.", "xxx.", "xxx.", "xx..", "....", "...."]),
    # MaxViT on 4 x 4, block 2, grid 2 (step 2): the query's 2 x 2 window and its grid group
    ("multi_axis", {"shape": (4, 4), "block": 2, "grid": 2}, (0, 0), False, ["xxx.", "xx..", "x.x.", "...."]),
    ("multi_axis", {"shape": (4, 4), "block": 2, "grid": 2}, (2, 3), False, [".x.x", "....", ".xxx", "..xx"]),
    # grid 3 on an axis of 4: step ceil(4/3) = 2; block 3 leaves a 1-wide window at the edge
    ("multi_axis", {"shape": (4, 4), "block": 3, "grid": 3}, (3, 3), False, ["....", ".x.x", "....", ".x.x"]),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "kwargs", "query", "causal", "picture"),
    GRID_DRAWN,
    ids=[
        f"{c[0]}-{'x'.join(map(str, c[1]['shape']))}-at{','.join(map(str, c[2]))}-{i}"
        for i, c in enumerate(GRID_DRAWN)
    ],
)
def test_index_mask_matches_hand_drawn_neighbourhood(
    name: str, kwargs: dict[str, Any], query: tuple[int, ...], causal: bool, picture: list[str]
) -> None:
    spec = spec_of(name)
    assert spec.index_mask is not None
    shape = kwargs["shape"]
    n = math.prod(shape)
    token = sum(c * math.prod(shape[a + 1 :]) for a, c in enumerate(query))  # raster order
    row = spec.index_mask(spec.make_params(kwargs), n, n, causal)[token]
    assert draw_mask(row.view(-1, shape[-1])) == picture


# fmt: off
#: head-dependent methods: one grid per KV head
HEAD_DRAWN: list[tuple[str, dict[str, int], int, int, int, bool, list[list[str]]]] = [
    # S2 (dkernel's absolute vertical stride): block 1, 2 local blocks, stride 3, H_kv = 3 -> step 1:
    # KV head g owns the key blocks with (kb + g) % 3 == 0: {0, 3}, {2, 5}, {1, 4}
    ("strided_heads", {"block": 1, "local": 2, "vert_stride": 3}, 3, 6, 6, True,
     [["x.....", "xx....", "xxx...", "x.xx..", "x..xx.", "x..xxx"],
      ["x.....", "xx....", ".xx...", "..xx..", "..xxx.", "..x.xx"],
      ["x.....", "xx....", ".xx...", ".xxx..", ".x.xx.", ".x..xx"]]),
    # stride 4 over 2 KV heads: step 2, heads own {0, 4} and {2, 6}
    ("strided_heads", {"block": 1, "local": 1, "vert_stride": 4}, 2, 8, 8, True,
     [["x.......", "xx......", "x.x.....", "x..x....", "x...x...", "x...xx..", "x...x.x.", "x...x..x"],
      ["x.......", ".x......", "..x.....", "..xx....", "..x.x...", "..x..x..", "..x...x.", "..x...xx"]]),
    # non-causal cross, blocks of 2 (queries at positions 5, 6, 7: blocks 2, 3, 3), stride 2 over 2 heads
    ("strided_heads", {"block": 2, "local": 1, "vert_stride": 2}, 2, 3, 8, False,
     [["xx..xx..", "xx..xxxx", "xx..xxxx"],
      ["..xxxxxx", "..xx..xx", "..xx..xx"]]),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "kwargs", "kv_heads", "n_q", "n_k", "causal", "pictures"),
    HEAD_DRAWN,
    ids=[f"{c[0]}-{c[3]}x{c[4]}-Hkv{c[2]}-{i}" for i, c in enumerate(HEAD_DRAWN)],
)
def test_head_index_mask_matches_hand_drawn_grids(
    name: str,
    kwargs: dict[str, int],
    kv_heads: int,
    n_q: int,
    n_k: int,
    causal: bool,
    pictures: list[list[str]],
) -> None:
    spec = spec_of(name)
    got = head_index(spec)(spec.make_params(kwargs), n_q, n_k, causal, kv_heads, kv_heads)
    assert [draw_mask(m) for m in got] == pictures


@pytest.mark.parametrize("name", MASK_METHODS + HEAD_METHODS)
def test_every_mask_method_has_hand_drawn_grids(name: str) -> None:
    drawn = [(c[0], c[2], c[3]) for c in HAND_DRAWN] + [(c[0], c[3], c[4]) for c in HEAD_DRAWN]
    mine = [c for c in drawn if c[0] == name]
    assert len(mine) >= 2, f"{name}: draw at least two grids in HAND_DRAWN (HEAD_DRAWN for head methods)"
    if any(p.cross for p in spec_of(name).patterns):
        assert any(c[1] != c[2] for c in mine), f"{name}: draw at least one cross-attention grid"
    if "shape" in {f.name for f in dataclasses.fields(spec_of(name).param_class)}:
        assert any(c[0] == name for c in GRID_DRAWN), f"{name}: draw neighbourhoods on its grid in GRID_DRAWN"
