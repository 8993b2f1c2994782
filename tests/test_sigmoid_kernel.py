"""The FlashSigmoid Triton kernels: formulas, every output written, GQA, tails, and torch.compile.

On CPU these run in Triton's interpreter (tiny shapes); on CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.kernels.sigmoid.naive import sigmoid_bwd_naive, sigmoid_fwd_naive
from attnlab.testing import device_under_test, random_qkv

DEVICE = device_under_test()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("nq", "nk"), [(19, 19), (9, 30), (30, 9)])
def test_naive_backward_formulas_equal_autograd_of_the_reference(causal: bool, nq: int, nk: int) -> None:
    q, k, v = random_qkv(
        2, 4, 2, nq, nk, 16, torch.float64 if DEVICE.type == "cpu" else torch.float32, grad=True
    )
    scale, bias = 0.3, -1.2
    spec = attnlab.get("sigmoid")
    params = spec.make_params({"bias": bias})
    out = spec.reference(q.float(), k.float(), v.float(), params, causal=causal, scale=scale)
    do = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), do)
    got = sigmoid_bwd_naive(do, q.float(), k.float(), v.float(), scale, bias, causal)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sigmoid_fwd_naive(q.float(), k.float(), v.float(), scale, bias, causal), out)


@pytest.fixture(params=["tma", "pointers"])
def tile_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the forward's tensor-descriptor (TMA) tile path and with masked pointer loads."""
    from attnlab.kernels.sigmoid import op

    monkeypatch.setattr(op, "USE_TMA", request.param == "tma")
    return str(request.param)


def test_tma_path_is_taken_only_for_aligned_strides(tile_path: str) -> None:
    from attnlab.kernels.sigmoid import op

    aligned = torch.randn(1, 2, 8, 16, device=DEVICE, dtype=torch.bfloat16)
    odd = torch.randn(1, 2, 8, 12, device=DEVICE, dtype=torch.bfloat16)  # row stride 24 bytes
    offset = torch.randn(1 * 2 * 8 * 16 + 1, device=DEVICE, dtype=torch.bfloat16)[1:].view(1, 2, 8, 16)
    capable = DEVICE.type == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    assert op._tma_ready(aligned, aligned) == (tile_path == "tma" and capable)
    assert not op._tma_ready(aligned, odd)
    assert not op._tma_ready(offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("nq", "nk", "d"), [(33, 33, 16), (17, 40, 24), (40, 17, 32), (1, 1, 16)])
def test_kernel_matches_naive_twin_and_writes_every_element(
    poison_empty: None, tile_path: str, dtype: torch.dtype, causal: bool, nq: int, nk: int, d: int
) -> None:
    from attnlab.kernels.sigmoid.op import sigmoid_attention

    q, k, v = random_qkv(2, 4, 2, nq, nk, d, dtype, grad=True)
    scale, bias = 1 / math.sqrt(d), -math.log(nk)
    out = sigmoid_attention(q, k, v, scale, bias, causal)
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output elements"
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all(), "unwritten (NaN-poisoned) gradient elements"
    ref = sigmoid_fwd_naive(q, k, v, scale, bias, causal)
    rdq, rdk, rdv = sigmoid_bwd_naive(do, q, k, v, scale, bias, causal)
    tol = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 5e-3}[dtype]
    for a, b in ((out, ref), (dq, rdq), (dk, rdk), (dv, rdv)):
        torch.testing.assert_close(
            a.float(), b.float(), rtol=tol, atol=tol * (1 + b.float().abs().max().item())
        )


def test_kernel_takes_non_contiguous_heads_first_views(tile_path: str) -> None:
    """(B, N, H, D) storage viewed as (B, H, N, D): strides other than the last are arbitrary."""
    from attnlab.kernels.sigmoid.op import sigmoid_attention

    base = torch.randn(2, 21, 4, 16, device=DEVICE)
    q = base.transpose(1, 2)
    k = torch.randn(2, 21, 2, 16, device=DEVICE).transpose(1, 2)
    v = torch.randn(2, 21, 2, 16, device=DEVICE).transpose(1, 2)
    out = sigmoid_attention(q, k, v, 0.25, -3.0, True)
    torch.testing.assert_close(out, sigmoid_fwd_naive(q, k, v, 0.25, -3.0, True), rtol=1e-4, atol=1e-4)


def test_fully_masked_rows_are_zero_in_the_kernel() -> None:
    from attnlab.kernels.sigmoid.op import sigmoid_attention

    q, k, v = random_qkv(1, 2, 2, 20, 6, 16, torch.float32)
    out = sigmoid_attention(q, k, v, 0.25, 0.0, True)
    assert (out[:, :, :14] == 0).all() and out[:, :, 14:].abs().sum() > 0


def test_dispatch_picks_the_triton_kernel_for_sigmoid_on_gpus_only() -> None:
    """On a CPU the kernel runs only interpreted: the automatic choice takes it last (forcing works)."""
    q, k, v = random_qkv(1, 2, 2, 8, 8, 16, torch.float32)
    chosen = attnlab.explain(q, k, v, method="sigmoid").backend
    assert chosen is not None and (chosen.name == "triton") == (q.device.type == "cuda")
    if q.device.type == "cpu" and not torch.cuda.is_available():  # interpreted here: forcing still works
        forced = attnlab.explain(q, k, v, method="sigmoid", backend="triton").backend
        assert forced is not None and forced.name == "triton"


def test_fp32_takes_only_the_small_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 on a GPU (``ieee`` products on FMA units): only triton_utils.FP32_SHAPE in every kernel
    family's prune (larger tiles spill GBs of local memory, see FP32_SHAPE), the smallest tile where it is
    not a candidate; other precisions keep their candidates. The fixed launchers (autotuning off) take the
    same. No TMA for float32 on a GPU (checked where a GPU is)."""
    import triton

    from attnlab.kernels.block_sparse import op as bs
    from attnlab.kernels.score_transform import op as st
    from attnlab.kernels.sigmoid import op as sig
    from attnlab.kernels.triton_utils import FP32_SHAPE, fp32_tiles, tma_copyable

    cfg = lambda m, n, w: triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SPLIT": 1, "WS": False}, num_warps=w)
    configs = [cfg(128, 128, 8), cfg(128, 64, 4), cfg(32, 32, 4), cfg(32, 32, 8)]
    shape = lambda cs: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in cs]
    want = [FP32_SHAPE[:3]]
    assert shape(sig._prune(configs, {}, DOT_PREC="ieee")) == want
    assert shape(sig._prune_bwd(configs, {}, DOT_PREC="ieee")) == want
    assert shape(sig._prune(configs, {}, DOT_PREC="tf32")) == shape(configs)
    assert shape(sig._prune(configs[:2], {}, DOT_PREC="ieee")) == [(128, 64, 4)]  # never empty: the smallest
    assert shape(st._prune_fwd(configs, {"DOT_PREC": "ieee"})) == want
    assert shape(st._prune_bwd(0)(configs, {"DOT_PREC": "ieee"})) == want
    assert shape(bs._prune(configs, {"DOT_PREC": "ieee", "BLOCK_Q": 128, "BLOCK_K": 128})) == want
    # every family offers the shape (the backward lists too), so the prune never falls back on a GPU
    m, n, w, s = FP32_SHAPE
    for shapes in (sig.FWD_SHAPES, st.FWD_SHAPES):
        assert (m, n, w, s, 1, False) in shapes
    for shapes in (st.DKDV_SHAPES, st.DQ_SHAPES, bs.FWD_SHAPES, bs.DQ_SHAPES, bs.DKDV_SHAPES):
        assert (m, n, w, s) in shapes
    assert fp32_tiles(configs) == [configs[3]]
    monkeypatch.setattr(sig, "IMPORTED_INTERPRETED", False)  # the GPU's candidate lists
    for kind in ("fwd", "dkdv", "dq"):
        assert shape(fp32_tiles(sig._configs(kind))) == want, kind
    # the fixed float32 launchers hold that one config (GPU lists) or the interpreter's one config
    for variants in (sig._FWD, sig._DKDV, sig._DQ):
        (only,) = variants[2].configs
        assert (only.kwargs["BLOCK_M"], only.kwargs["BLOCK_N"], only.num_warps) in (want[0], (16, 16, 1))
    if torch.cuda.is_available():
        x = torch.zeros(1, 1, 64, 64, device="cuda")
        assert not tma_copyable(x, interpreted=False)


def _forward_schedules(q: torch.Tensor, tma: bool, causal: bool) -> list:  # type: ignore[type-arg]
    """Every forward config the autotuner may run here (on CPU: the split and warp-specialized code paths
    on interpreter-sized tiles, launched directly)."""
    import triton

    from attnlab.kernels.sigmoid import op

    if DEVICE.type == "cpu":
        shapes = [(32, 16, 1, 1, 2, False), (32, 16, 1, 1, 1, True), (16, 16, 1, 1, 1, False)]
    else:
        shapes = op.FWD_SHAPES
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SPLIT": sp, "WS": ws}, num_warps=w, num_stages=s)
        for m, n, w, s, sp, ws in shapes
    ]
    if DEVICE.type == "cpu":
        return configs
    return op._prune(configs, {"Q": q, "TMA": tma, "DOT_PREC": "tf32", "CAUSAL": causal})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("nq", "nk", "d"), [(70, 70, 32), (33, 97, 24), (97, 33, 64), (128, 128, 32)])
def test_every_forward_schedule_matches_the_naive_twin(
    poison_empty: None, tile_path: str, dtype: torch.dtype, causal: bool, nq: int, nk: int, d: int
) -> None:
    from attnlab.kernels.sigmoid import op

    q, k, v = random_qkv(2, 4, 2, nq, nk, d, dtype)
    scale, bias = 1 / math.sqrt(d), -math.log(nk)
    ref = sigmoid_fwd_naive(q.float(), k.float(), v.float(), scale, bias, causal)
    schedules = _forward_schedules(q, op._tma_ready(q, k, v), causal)
    assert len(schedules) >= 3
    for config in schedules:
        out = op.sigmoid_fwd_launch(q, k, v, scale, bias, causal, config=config)
        assert torch.isfinite(out).all(), f"unwritten output elements with {config}"
        torch.testing.assert_close(
            out.float(), ref, rtol=2e-2, atol=2e-2, msg=lambda m, c=config: f"{c}: {m}"
        )


def test_warp_specialization_is_pruned_off_hopper_causal_or_without_descriptors() -> None:
    import triton

    from attnlab.kernels.sigmoid import op

    configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "SPLIT": 1, "WS": ws}) for ws in (True, False)]
    q = torch.randn(1, 1, 8, 16, device=DEVICE, dtype=torch.bfloat16)
    hopper = DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] == 9
    kept = lambda **kw: [c.kwargs["WS"] for c in op._prune(configs, {"Q": q}, **kw)]
    assert kept(TMA=False, DOT_PREC="tf32", CAUSAL=False) == [False]
    assert kept(TMA=True, DOT_PREC="ieee", CAUSAL=False) == [False]
    assert kept(TMA=True, DOT_PREC="tf32", CAUSAL=True) == [False]
    assert kept(TMA=True, DOT_PREC="tf32", CAUSAL=False) == ([True, False] if hopper else [False])


@pytest.mark.parametrize("causal", [False, True])
def test_the_measured_schedule_is_the_only_candidate_where_it_was_measured(causal: bool) -> None:
    import triton

    from attnlab.kernels.sigmoid import op

    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SPLIT": sp, "WS": ws}, num_warps=w, num_stages=s)
        for m, n, w, s, sp, ws in op.FWD_SHAPES
    ]
    q = torch.randn(1, 1, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    hopper = DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] == 9
    args = {"TMA": True, "DOT_PREC": "tf32", "CAUSAL": causal}
    kept = [
        op._shape_of(c) for c in op._prune(configs, {"Q": q}, BLOCK_D=128, N_BUCKET=op.LONG_BUCKET, **args)
    ]
    if hopper:
        assert kept == [op.MEASURED_FWD[causal]]
    else:
        assert len(kept) == len(op.FWD_SHAPES) - 1 and not any(ws for *_, ws in kept)
    for other in ({"BLOCK_D": 64, "N_BUCKET": op.LONG_BUCKET}, {"BLOCK_D": 128, "N_BUCKET": 8192}):
        shapes = [op._shape_of(c) for c in op._prune(configs, {"Q": q}, **other, **args)]
        assert len(shapes) > 1 and op.MEASURED_FWD[True] in shapes  # other head dims, shorter: autotuned


@pytest.mark.parametrize("causal", [False, True])
def test_the_pin_applies_only_to_long_self_lengths_on_the_measured_setup(
    causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import triton

    from attnlab.kernels.sigmoid import op

    monkeypatch.setattr(op, "_on_hopper", lambda args: True)  # as on the H100 with Triton 3.6
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SPLIT": sp, "WS": ws}, num_warps=w, num_stages=s)
        for m, n, w, s, sp, ws in op.FWD_SHAPES
    ]
    args = {"TMA": True, "DOT_PREC": "tf32", "CAUSAL": causal, "BLOCK_D": 128}
    shapes = lambda n_q, n_k: [
        op._shape_of(c) for c in op._prune(configs, {}, N_BUCKET=op._bucket(n_q, n_k), **args)
    ]
    assert shapes(8192, 8192) == shapes(65536, 65536) == [op.MEASURED_FWD[causal]]
    for n_q, n_k in ((6000, 6000), (2048, 8192), (1, 32768), (4096, 4096)):
        assert len(shapes(n_q, n_k)) > 1, (n_q, n_k)  # autotuned
    assert len(shapes(8192, 8192)) == 1 and op._bucket(8192, 8192) == op.LONG_BUCKET
    assert [op._bucket(*s) for s in ((1, 1), (100, 300), (6000, 6000), (2048, 8192))] == [1, 512, 8192, 8192]


def test_heads_too_large_for_32_bit_row_offsets_are_refused() -> None:
    from attnlab.kernels.sigmoid import op

    ok = torch.empty_strided((2, 3, 1024, 128), (3 * 1024 * 128, 1024 * 128, 128, 1), device="meta")
    huge = torch.empty_strided((1, 1, 2**22, 128), (0, 0, 1024, 1), device="meta")  # (B, N, H, D) view, H=8
    assert op._last_contiguous(ok)[0] is ok
    with pytest.raises(ValueError, match=r"4194304, 128\) matrix with row stride 1024 spans"):
        op._last_contiguous(ok, huge)
