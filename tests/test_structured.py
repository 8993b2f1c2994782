"""The structured static patterns (attnlab/catalog/structured): each mask against its independent index
arithmetic, against grids drawn by hand (NATTEN's border and corner rules included), against the fp32
reference on its backends, and every bad input with its error.

The methods are not in the global registry yet (see ``attnlab/catalog/structured/__init__.py``): each test
registers the one it runs for its own duration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.catalog.structured import (
    SPECS,
    doc_blocks,
    multi_axis,
    neighborhood,
    power,
    radial,
    strided_heads,
)
from attnlab.core import MethodSpec
from attnlab.errors import InputError, ParamError, UnsupportedPatternError
from attnlab.masks import MaskContext, dense_mask
from attnlab.registry import registered
from attnlab.testing import Case, check_parity, draw_mask

BY_NAME = {spec.name: spec for spec in SPECS}


@pytest.fixture
def use() -> Iterator[Any]:
    """``use(name)`` registers a structured method until the test ends."""
    stack: list[Any] = []

    def enter(name: str) -> MethodSpec:
        ctx = registered(BY_NAME[name])
        stack.append(ctx)
        return ctx.__enter__()

    yield enter
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def factory(spec: MethodSpec, kwargs: dict[str, Any], n_q: int, n_k: int, causal: bool) -> Tensor:
    assert spec.mask is not None
    params = spec.make_params(kwargs)
    return dense_mask(spec.mask(params, MaskContext(n_q, n_k, causal, "cpu")), n_q, n_k, "cpu")


def index(spec: MethodSpec, kwargs: dict[str, Any], n_q: int, n_k: int, causal: bool) -> Tensor:
    assert spec.index_mask is not None
    return spec.index_mask(spec.make_params(kwargs), n_q, n_k, causal)


def test_every_method_is_complete() -> None:
    assert [s.name for s in SPECS] == [
        "neighborhood",
        "strided_heads",
        "power",
        "radial",
        "multi_axis",
        "doc_blocks",
    ]
    for spec in SPECS:
        assert spec.family == "static" and spec.test_params and spec.param_class.__doc__
        assert len(spec.reference.__doc__ or "") > 40
        for n in (128, 4096, 131072):
            for kwargs in spec.bench_params(n):
                spec.make_params(kwargs)
        for kwargs in spec.test_params:
            spec.make_params(kwargs)
        assert spec.mask is None or spec.index_mask is not None
        assert spec.params == spec.param_class()
        assert spec.name not in attnlab.methods()  # registered only inside tests, for now


# -- the factory and the index arithmetic agree ---------------------------------------------------------

SELF = (1, 7, 63, 130)
CROSS = ((7, 30), (30, 7), (1, 20))
AGREE: list[tuple[str, dict[str, Any], tuple[tuple[int, int], ...]]] = [
    ("neighborhood", {"window": 5, "dilation": 2}, tuple((n, n) for n in SELF)),
    ("neighborhood", {"window": 4, "stride": 3, "axis_causal": True}, tuple((n, n) for n in SELF)),
    ("neighborhood", {"window": 1}, ((7, 7),)),
    # beyond int32: the factory caps what acts alike (window cut to the group, dilation, stride)
    ("neighborhood", {"window": 2**40, "dilation": 2**40, "stride": 2**40}, ((7, 7), (63, 63))),
    ("neighborhood", {"window": 12, "stride": 12}, ((7, 7), (63, 63))),
    (
        "neighborhood",
        {"shape": (10, 13), "window": (3, 4), "stride": (1, 2), "axis_causal": (True, False)},
        ((130, 130),),
    ),
    ("neighborhood", {"shape": (2, 5, 13), "window": (2, 3, 5), "dilation": (1, 1, 2)}, ((130, 130),)),
    ("neighborhood", {"shape": (5, 6), "window": (2, 3), "dilation": (2, 2), "stride": 2}, ((30, 30),)),
    ("power", {"block": 1, "window": 1, "sinks": 0}, ((63, 63), *CROSS)),
    ("power", {"block": 4, "window": 1, "sinks": 1}, ((130, 130), *CROSS)),
    ("power", {"block": 3, "window": 3, "sinks": 2}, ((63, 63), *CROSS)),
    ("doc_blocks", {"boundaries": (5, 30, 31, 60)}, ((63, 63), (130, 130), *CROSS)),
    (
        "doc_blocks",
        {"boundaries": (4, 9), "prefix_global": False, "last_sees_all": False},
        ((63, 63), *CROSS),
    ),
    ("doc_blocks", {}, ((7, 7), (7, 30))),
    ("multi_axis", {"block": 4, "grid": 3}, tuple((n, n) for n in SELF)),
    ("multi_axis", {"shape": (10, 13), "block": (2, 5), "grid": (3, 4)}, ((130, 130),)),
    ("radial", {"frame": 9, "window": 7}, tuple((n, n) for n in SELF)),
    ("radial", {"frame": 1}, ((63, 63),)),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "shapes"), AGREE, ids=[f"{a[0]}-{i}" for i, a in enumerate(AGREE)]
)
def test_factory_and_index_mask_agree(name: str, kwargs: dict[str, Any], shapes: Any) -> None:
    spec = BY_NAME[name]
    for (n_q, n_k), causal in ((s, c) for s in shapes for c in (False, True)):
        want, got = factory(spec, kwargs, n_q, n_k, causal), index(spec, kwargs, n_q, n_k, causal)
        assert torch.equal(got, want), f"{name} {kwargs} {n_q}x{n_k} causal={causal}"


def test_strided_heads_factory_and_index_mask_agree() -> None:
    for kwargs in ({"block": 1, "local": 2, "vert_stride": 3}, {"block": 3, "local": 1, "vert_stride": 5}):
        params = strided_heads.StridedHeadsParams(**kwargs)
        for (n_q, n_k), causal in ((s, c) for s in ((40, 40), (7, 30), (30, 7)) for c in (False, True)):
            for heads, kv_heads in ((4, 4), (6, 3), (2, 1)):
                got = strided_heads.index_mask(params, n_q, n_k, causal, kv_heads)
                got = got[torch.arange(heads) // (heads // kv_heads)]
                want = strided_heads.head_mask(params, n_q, n_k, causal, heads, kv_heads, "cpu")
                assert torch.equal(got, want), f"{kwargs} {n_q}x{n_k} causal={causal} H={heads}/{kv_heads}"


# -- grids drawn by hand ------------------------------------------------------------------------------


def keys_of(name: str, kwargs: dict[str, Any], query: tuple[int, ...], causal: bool = False) -> list[str]:
    """The keys one query of a grid method attends, drawn on the grid (2-D shapes)."""
    shape = kwargs["shape"]
    n = math.prod(shape)
    row = index(BY_NAME[name], kwargs, n, n, causal)[int(torch.tensor(query) @ torch.tensor([shape[1], 1]))]
    assert torch.equal(row, factory(BY_NAME[name], kwargs, n, n, causal)[int(query[0] * shape[1] + query[1])])
    return draw_mask(row.view(shape))


def test_neighborhood_1d_matches_natten_reference_values() -> None:
    # NATTEN's reference rule, L=10, k=4: [0,4) three times, then [1,5) ... [6,10) twice (the window shifts)
    assert draw_mask(index(BY_NAME["neighborhood"], {"window": 4}, 10, 10, False)) == [
        "xxxx......",
        "xxxx......",
        "xxxx......",
        ".xxxx.....",
        "..xxxx....",
        "...xxxx...",
        "....xxxx..",
        ".....xxxx.",
        "......xxxx",
        "......xxxx",
    ]
    # causal k=3: [0,1), [0,2), [0,3), [1,4), ... (the window shrinks at the start instead)
    assert draw_mask(index(BY_NAME["neighborhood"], {"window": 3, "axis_causal": True}, 6, 6, False)) == [
        "x.....",
        "xx....",
        "xxx...",
        ".xxx..",
        "..xxx.",
        "...xxx",
    ]


def test_neighborhood_dilation_and_stride() -> None:
    nb = BY_NAME["neighborhood"]
    # dilation 2: two interleaved groups {0,2,4,6} and {1,3,5,7}, a 2-key window shifted inside each
    assert draw_mask(index(nb, {"window": 2, "dilation": 2}, 8, 8, False)) == [
        "x.x.....",
        ".x.x....",
        "x.x.....",
        ".x.x....",
        "..x.x...",
        "...x.x..",
        "....x.x.",
        ".....x.x",
    ]
    # stride 2: queries {0,1}, {2,3}, ... share their leader's window (leaders 1, 3, 5, 7)
    assert draw_mask(index(nb, {"window": 4, "stride": 2}, 8, 8, False)) == [
        "xxxx....",
        "xxxx....",
        ".xxxx...",
        ".xxxx...",
        "...xxxx.",
        "...xxxx.",
        "....xxxx",
        "....xxxx",
    ]
    # stride = window: blocked attention
    assert draw_mask(index(nb, {"window": 3, "stride": 3}, 6, 6, False)) == [
        "xxx...",
        "xxx...",
        "xxx...",
        "...xxx",
        "...xxx",
        "...xxx",
    ]


def test_neighborhood_2d_corners_borders_and_causal_axes() -> None:
    two_d = {"shape": (4, 5), "window": 3}
    assert keys_of("neighborhood", two_d, (0, 0)) == ["xxx..", "xxx..", "xxx..", "....."]  # corner: shifted
    assert keys_of("neighborhood", two_d, (3, 4)) == [".....", "..xxx", "..xxx", "..xxx"]  # far corner
    assert keys_of("neighborhood", two_d, (2, 2)) == [".....", ".xxx.", ".xxx.", ".xxx."]  # border row
    assert keys_of("neighborhood", two_d, (1, 2)) == [".xxx.", ".xxx.", ".xxx.", "....."]  # centred
    # causal along the rows only: the window ends at the query's row (and shrinks at the top)
    rows = {"shape": (4, 5), "window": 3, "axis_causal": (True, False)}
    assert keys_of("neighborhood", rows, (2, 0)) == ["xxx..", "xxx..", "xxx..", "....."]
    assert keys_of("neighborhood", rows, (0, 4)) == ["..xxx", ".....", ".....", "....."]
    # even window 2 x 4: k/2 back, k/2 - 1 ahead
    assert keys_of("neighborhood", {"shape": (4, 6), "window": (2, 4)}, (2, 3)) == [
        "......",
        ".xxxx.",
        ".xxxx.",
        "......",
    ]


def test_neighborhood_3d_is_the_product_of_the_axes() -> None:
    kwargs = {"shape": (3, 4, 6), "window": (2, 3, 3), "dilation": (1, 1, 2)}
    m = index(BY_NAME["neighborhood"], kwargs, 72, 72, False)
    params = neighborhood.NeighborhoodParams(**kwargs)
    window, dilation, stride, causal = params.axes()
    for t in (0, 17, 71):
        coords = (t // 24, t // 6 % 4, t % 6)
        sets = [
            neighborhood.axis_keys(c, n, window[a], dilation[a], stride[a], causal[a])
            for a, (c, n) in enumerate(zip(coords, (3, 4, 6), strict=True))
        ]
        want = {a * 24 + b * 6 + c for a in sets[0] for b in sets[1] for c in sets[2]}
        assert set(m[t].nonzero().flatten().tolist()) == want
        assert len(want) == 2 * 3 * 3  # every query sees exactly prod(window) keys


def test_power_hand_drawn() -> None:
    assert draw_mask(index(BY_NAME["power"], {"block": 1, "window": 1, "sinks": 0}, 7, 7, True)) == [
        "x......",
        "xx.....",
        "xxx....",
        ".xxx...",
        "x.xxx..",
        ".x.xxx.",
        "..x.xxx",
    ]
    # blocks of 2, one sink block; cross-attention: query i at position i + 6
    assert draw_mask(index(BY_NAME["power"], {"block": 2, "window": 1, "sinks": 1}, 2, 14, True)) == [
        "xx..xx..xxxxx.",
        "xx..xx..xxxxxx",
    ]


def test_doc_blocks_hand_drawn() -> None:
    assert draw_mask(index(BY_NAME["doc_blocks"], {"boundaries": (2, 4, 6)}, 8, 8, False)) == [
        "xx......",
        "xx......",
        "xxxx....",
        "xxxx....",
        "xx..xx..",
        "xx..xx..",
        "xxxxxxxx",
        "xxxxxxxx",
    ]
    plain = {"boundaries": (2, 4), "prefix_global": False, "last_sees_all": False}
    # causal cross: queries at positions 3, 4, 5
    assert draw_mask(index(BY_NAME["doc_blocks"], plain, 3, 6, True)) == ["..xx..", "....x.", "....xx"]


def test_multi_axis_hand_drawn() -> None:
    kwargs = {"shape": (4, 4), "block": 2, "grid": 2}
    assert keys_of("multi_axis", kwargs, (0, 0)) == ["xxx.", "xx..", "x.x.", "...."]
    assert keys_of("multi_axis", kwargs, (2, 3)) == [".x.x", "....", ".xxx", "..xx"]
    # grid 3 on an axis of 4: step ceil(4/3) = 2; block 3 leaves a 1-wide window at the edge
    assert keys_of("multi_axis", {"shape": (4, 4), "block": 3, "grid": 3}, (3, 3)) == [
        "....",
        ".x.x",
        "....",
        ".x.x",
    ]


def test_radial_hand_drawn() -> None:
    m = draw_mask(index(BY_NAME["radial"], {"frame": 4, "window": 4}, 20, 20, False))
    assert m[0] == "xxxx" + "xxxx" + "xx.." + "xx.." + "x..."
    assert m[5] == "xxxx" + "xxxx" + "xxxx" + "xxx." + "xxx."
    m = draw_mask(index(BY_NAME["radial"], {"frame": 3, "window": 2}, 9, 9, True))
    assert m[8] == "..x" + ".xx" + ".xx"


def test_strided_heads_hand_drawn_and_union_covers_the_context() -> None:
    params = strided_heads.StridedHeadsParams(block=1, local=2, vert_stride=3)
    m = strided_heads.index_mask(params, 6, 6, True, 3)
    assert [draw_mask(m[g])[5] for g in range(3)] == ["x..xxx", "..x.xx", ".x..xx"]
    assert [draw_mask(m[g])[3] for g in range(3)] == ["x.xx..", "..xx..", ".xxx.."]
    # H_kv >= vert_stride: every causal pair is some head's
    params = strided_heads.StridedHeadsParams(block=4, local=1, vert_stride=4)
    for kv_heads in (4, 8):
        union = strided_heads.index_mask(params, 64, 64, True, kv_heads).any(dim=0)
        assert torch.equal(union, torch.ones(64, 64, dtype=torch.bool).tril())
    assert not strided_heads.index_mask(params, 64, 64, True, 2).any(dim=0).tril().all()  # 2 heads do not


# -- against the reference on the backends ----------------------------------------------------------------

PARITY = [
    ("neighborhood", "sdpa_mask", 63, 63, {"window": 5, "dilation": 2}),
    (
        "neighborhood",
        "sdpa_mask",
        130,
        130,
        {"shape": (10, 13), "window": (3, 4), "stride": (1, 2), "axis_causal": (True, False)},
    ),
    ("strided_heads", "sdpa_mask", 70, 200, {"block": 4, "local": 2, "vert_stride": 4}),
    ("strided_heads", "flex", 130, 130, {"block": 4, "local": 2, "vert_stride": 4}),
    ("power", "sdpa_mask", 63, 257, {"block": 4, "window": 1, "sinks": 1}),
    ("radial", "sdpa_mask", 130, 130, {"frame": 9, "window": 7}),
    ("multi_axis", "sdpa_mask", 130, 130, {"shape": (10, 13), "block": (2, 5), "grid": (3, 4)}),
    ("doc_blocks", "sdpa_mask", 70, 200, {"boundaries": (5, 30, 31, 60)}),
]


@pytest.mark.parametrize(
    ("name", "backend", "n_q", "n_k", "kwargs"),
    PARITY,
    ids=[f"{p[0]}-{p[1]}-{i}" for i, p in enumerate(PARITY)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_reference(
    use: Any, name: str, backend: str, n_q: int, n_k: int, kwargs: Any, causal: bool
) -> None:
    spec = use(name)
    case = Case(2, 4, 2, n_q, n_k, 32, torch.float32, causal, kwargs)
    check = check_parity(spec, backend, case, "cpu")
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    if backend == "sdpa_mask":
        assert "dq" in check.errors  # gradients checked too


def test_plan_density_is_the_mask_density(use: Any) -> None:
    use("neighborhood")
    q, k, v = (torch.randn(1, 2, 30, 16) for _ in range(3))
    kwargs = {"shape": (5, 6), "window": (3, 3)}
    res = attnlab.attention(q, k, v, method="neighborhood", backend="sdpa_mask", return_plan=True, **kwargs)
    assert isinstance(res, attnlab.Result) and res.plan is not None
    assert res.plan.density == pytest.approx(9 / 30)  # every token sees exactly 3 x 3 keys
    use("strided_heads")
    res = attnlab.attention(
        q,
        k,
        v,
        method="strided_heads",
        causal=True,
        return_plan=True,
        backend="sdpa_mask",
        block=1,
        local=1,
        vert_stride=2,
    )
    assert isinstance(res, attnlab.Result) and res.plan.shape[1] == 2  # one plan row per head
    params = strided_heads.StridedHeadsParams(block=1, local=1, vert_stride=2)
    mask = strided_heads.head_mask(params, 30, 30, True, 2, 2, "cpu")
    assert torch.equal(res.plan.dense_mask()[0], mask)


# -- bad input ------------------------------------------------------------------------------------------


def test_grid_shape_must_hold_the_sequence(use: Any) -> None:
    use("neighborhood")
    use("multi_axis")
    q = torch.randn(1, 2, 63, 16)
    with pytest.raises(InputError, match=r"shape=\(8, 8\) holds 64 tokens but the sequence has N=63"):
        attnlab.attention(q, q, q, method="neighborhood", shape=(8, 8), window=3)
    with pytest.raises(
        InputError, match=r"shape=\(2, 4, 8\) holds 64 tokens.*expected a shape whose product is 63"
    ):
        attnlab.attention(q, q, q, method="neighborhood", backend="reference", shape=(2, 4, 8), window=2)
    with pytest.raises(InputError, match="holds 64 tokens"):
        attnlab.attention(q, q, q, method="multi_axis", shape=(8, 8), block=2, grid=2)


def test_windows_larger_than_an_axis_are_refused() -> None:
    with pytest.raises(ParamError, match=r"window \* dilation spans 5 positions on axis 1.*length 4"):
        neighborhood.NeighborhoodParams(shape=(8, 4), window=5)
    with pytest.raises(ParamError, match="spans 6 positions on axis 0"):
        neighborhood.NeighborhoodParams(shape=(5, 9), window=3, dilation=2)
    with pytest.raises(ParamError, match=r"stride=\(1, 4\) is invalid; expected at most the window"):
        neighborhood.NeighborhoodParams(shape=(8, 8), window=3, stride=(1, 4))
    with pytest.raises(
        ParamError, match=r"window=\(3, 3\) is invalid; expected an integer >= 1 or a tuple of 3"
    ):
        neighborhood.NeighborhoodParams(shape=(4, 4, 4), window=(3, 3))
    with pytest.raises(ParamError, match="shape=.* is invalid"):
        neighborhood.NeighborhoodParams(shape=(2, 2, 2, 2))
    with pytest.raises(ParamError, match="block spans 5 positions on axis 0"):
        multi_axis.MultiAxisParams(shape=(4, 8), block=5)
    with pytest.raises(ParamError, match="grid spans 9 positions on axis 1"):
        multi_axis.MultiAxisParams(shape=(8, 8), grid=(2, 9))
    with pytest.raises(ParamError, match="window=20 is invalid; expected at most frame=16"):
        radial.RadialParams(frame=16, window=20)
    with pytest.raises(ParamError, match="strictly increasing"):
        doc_blocks.DocBlocksParams(boundaries=(5, 5))
    with pytest.raises(ParamError, match="sinks=-1"):
        power.PowerParams(sinks=-1)
    # a sequence shorter than the window is fine without a shape (the window is cut to the sequence)
    assert draw_mask(index(BY_NAME["neighborhood"], {"window": 9}, 3, 3, False)) == ["xxx"] * 3


def test_grid_methods_are_self_attention_only(use: Any) -> None:
    use("neighborhood")
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(UnsupportedPatternError, match="does not define the noncausal_cross pattern"):
        attnlab.attention(q, k, k, method="neighborhood", window=3)
    with pytest.raises(InputError, match="expected N_q == N_k, got N_q=6, N_k=9"):
        neighborhood.index_mask(neighborhood.NeighborhoodParams(window=3), 6, 9, False)
