"""The structured static patterns (attnlab/catalog/structured): what the shared suites do not cover --
3-D neighbourhoods as products of axes, the union of strided_heads' shards, 2-D/3-D grids against the
fp32 reference on their backends, plans, and every bad input with its error. (Each mask against its
independent index arithmetic, parameter edge cases, grids drawn by hand with NATTEN's border and corner
rules, and wrong definitions that must be caught: tests/test_index_masks.py.)

The 1-D parameter sets of every method run on every backend in the registry's parity suite
(tests/test_parity.py); the grids here are 2-D and 3-D, whose lengths that suite's shapes do not hold.
"""

from __future__ import annotations

import math
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
from attnlab.testing import Case, check_parity, device_under_test, draw_mask

DEVICE = device_under_test()  # (the GPU where there is one: the executor runs there, not on its CPU)

BY_NAME = {spec.name: spec for spec in SPECS}


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
        for test_kwargs in spec.test_params:
            spec.make_params(test_kwargs)
        assert spec.mask is None or spec.index_mask is not None
        assert spec.params == spec.param_class()
        assert attnlab.get(spec.name) is spec  # registered


# -- beyond the shared mask tests -----------------------------------------------------------------------
# (factory vs index arithmetic, edge cases, hand-drawn grids and wrong definitions of these methods are in
# tests/test_index_masks.py, with every other mask method's)


def test_neighborhood_3d_is_the_product_of_the_axes() -> None:
    kwargs: dict[str, Any] = {"shape": (3, 4, 6), "window": (2, 3, 3), "dilation": (1, 1, 2)}
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


def test_strided_heads_union_covers_the_context() -> None:
    # H_kv >= vert_stride: every causal pair is some head's
    params = strided_heads.StridedHeadsParams(block=4, local=1, vert_stride=4)
    for kv_heads in (4, 8):
        union = strided_heads.index_mask(params, 64, 64, True, kv_heads).any(dim=0)
        assert torch.equal(union, torch.ones(64, 64, dtype=torch.bool).tril())
    assert not strided_heads.index_mask(params, 64, 64, True, 2).any(dim=0).tril().all()  # 2 heads do not


# -- against the reference on the backends ----------------------------------------------------------------

#: (method, backend, N_q, N_k, params): 2-D/3-D grids, whose lengths the registry suite's shapes do not
#: hold, and strided_heads' own per-head FlexAttention backend (the registry suite runs no compiled Flex
#: on a CPU; one causal cross case here, forward only)
PARITY: list[tuple[str, str, int, int, dict[str, Any]]] = [
    (
        "neighborhood",
        "sdpa_mask",
        130,
        130,
        {"shape": (10, 13), "window": (3, 4), "stride": (1, 2), "axis_causal": (True, False)},
    ),
    (
        "neighborhood",
        "sdpa_mask",
        130,
        130,
        {"shape": (2, 5, 13), "window": (2, 3, 5), "dilation": (1, 1, 2)},
    ),
    ("multi_axis", "sdpa_mask", 130, 130, {"shape": (10, 13), "block": (2, 5), "grid": (3, 4)}),
    ("strided_heads", "flex", 70, 200, {"block": 4, "local": 2, "vert_stride": 4}),
]


#: the cases, causal and not (compiled Flex on a CPU: the causal one only, for CI time)
PARITY_CASES = [(*p, c) for p in PARITY for c in (False, True) if c or p[1] != "flex"]


@pytest.mark.parametrize(
    ("name", "backend", "n_q", "n_k", "kwargs", "causal"),
    PARITY_CASES,
    ids=[f"{p[0]}-{p[1]}-{'causal' if p[5] else 'full'}-{i}" for i, p in enumerate(PARITY_CASES)],
)
def test_backend_matches_reference(
    name: str, backend: str, n_q: int, n_k: int, kwargs: dict[str, Any], causal: bool
) -> None:
    spec = attnlab.get(name)
    case = Case(2, 4, 2, n_q, n_k, 32, torch.float32, causal, kwargs)
    check = check_parity(spec, backend, case, DEVICE)
    assert not check.skipped, check.skipped
    assert check.passed, check.summary()
    if backend == "sdpa_mask":
        assert "dq" in check.errors  # gradients checked too


GRIDS = [(p[0], p[4]) for p in PARITY if "shape" in p[4]]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flex", "block_sparse"])
@pytest.mark.parametrize(("name", "kwargs"), GRIDS, ids=[g[0] for g in GRIDS])
def test_grid_fast_backends_match_reference_on_cuda(name: str, kwargs: Any, backend: str) -> None:
    """The 2-D/3-D grids on FlexAttention and the block-sparse executor, forward and backward (on CPU,
    compiled Flex has no backward and the executor runs interpreted: the registry suite covers 1-D)."""
    spec = attnlab.get(name)
    n = math.prod(kwargs["shape"])
    for causal in (False, True):
        case = Case(2, 4, 2, n, n, 64, torch.bfloat16, causal, kwargs)
        check = check_parity(spec, backend, case, "cuda")
        assert check.passed and "dq" in check.errors, f"{backend} {case.label()}: {check.summary()}"


@pytest.mark.parametrize(
    ("kwargs", "causal"),
    [
        ({"shape": (6, 11), "window": (3, 4), "stride": (1, 2), "axis_causal": (True, False)}, False),
        ({"shape": (2, 3, 11), "window": (2, 3, 5), "dilation": (1, 1, 2)}, True),
    ],
    ids=["2d", "3d"],
)
def test_grid_neighborhoods_on_the_block_sparse_executor(kwargs: dict[str, Any], causal: bool) -> None:
    """2-D and 3-D neighborhoods on the executor's static plan (built from the method's mask; 32 x 32
    tiles in the interpreter, partial everywhere the window crosses a tile) against the fp32 reference:
    the registry's accuracy rule, bf16, GQA 2:1, forward and dq/dk/dv."""
    spec = attnlab.get("neighborhood")
    case = Case(1, 2, 1, 66, 66, 16, torch.bfloat16, causal, kwargs)
    check = check_parity(spec, "block_sparse", case, DEVICE)
    assert not check.skipped and check.passed and "dq" in check.errors, check.summary()


def test_plan_density_is_the_mask_density() -> None:
    q, k, v = (torch.randn(1, 2, 30, 16) for _ in range(3))
    kwargs: dict[str, Any] = {"shape": (5, 6), "window": (3, 3)}
    res = attnlab.attention(q, k, v, method="neighborhood", backend="sdpa_mask", return_plan=True, **kwargs)
    assert isinstance(res, attnlab.Result) and res.plan is not None
    assert res.plan.density == pytest.approx(9 / 30)  # every token sees exactly 3 x 3 keys
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


@pytest.mark.parametrize(
    ("n_q", "n_k", "causal", "params"),
    [
        (70, 70, True, {"block": 4, "local": 2, "vert_stride": 4}),
        (40, 75, True, {"block": 16, "local": 1, "vert_stride": 3}),
        (75, 40, True, {"block": 16, "local": 1, "vert_stride": 3}),
        (70, 70, False, {"block": 8, "local": 2, "vert_stride": 4}),
    ],
)
def test_strided_heads_on_the_block_sparse_executor(
    n_q: int, n_k: int, causal: bool, params: dict[str, Any]
) -> None:
    """The executor with the per-head plan (each query head its own tables, Hp = H, GQA 4:2) against the
    reference: the registry's accuracy rule, bf16, forward and dq/dk/dv, in the interpreter (32 x 32 tiles,
    partial tiles from the strided shards); its tables hold one plan row per query head."""
    from attnlab.testing import Case, check_parity

    spec = attnlab.get("strided_heads")
    check = check_parity(
        spec, "block_sparse", Case(1, 4, 2, n_q, n_k, 16, torch.bfloat16, causal, params), DEVICE
    )
    assert not check.skipped and check.passed and "dk" in check.errors, check.summary()
    q, k = torch.randn(1, 4, n_q, 16, device=DEVICE), torch.randn(1, 2, n_k, 16, device=DEVICE)
    res = attnlab.attention(q, k, k, method="strided_heads", causal=causal,
                            backend="block_sparse", return_plan=True, **params)  # fmt: skip
    assert isinstance(res, attnlab.Result) and res.plan is not None and res.plan.shape[1] == 4
    mask = strided_heads.head_mask(strided_heads.StridedHeadsParams(**params), n_q, n_k, causal, 4, 2, DEVICE)
    assert torch.equal(res.plan.dense_mask()[0], mask)


# -- bad input ------------------------------------------------------------------------------------------


def test_grid_shape_must_hold_the_sequence() -> None:
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


def test_grid_methods_are_self_attention_only() -> None:
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(UnsupportedPatternError, match="does not define the noncausal_cross pattern"):
        attnlab.attention(q, k, k, method="neighborhood", window=3)
    with pytest.raises(InputError, match="expected N_q == N_k, got N_q=6, N_k=9"):
        neighborhood.index_mask(neighborhood.NeighborhoodParams(window=3), 6, 9, False)
