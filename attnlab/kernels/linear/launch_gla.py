"""Launchers of the gated linear recurrence's chunk kernels (gla; lightning and linear as a gate shared by
the channels): the gate as the op takes it, the chunk states (one sequential pass, or stages 1 and 2:
``chunk_state.py``), the forward (with the intra-chunk scores and the output of ``launch_scores.py``)
and the backward (``chunk_gla_bwd.py``).

Switches, kernels and the helpers that tests replace are read as ``op.NAME`` at each call: op is the
namespace where tests and benchmarks set them (op imports this module; see its docstring).
"""

from __future__ import annotations

import torch
from torch import Tensor
from triton.runtime.errors import OutOfResources

from attnlab.kernels.linear.launch import (
    IMPORTED_INTERPRETED,
    SUB,
    _cfg,
    _check,
    _gate_code,
    _prec,
    _scalar_gate,
    _upcast,
    cdiv,
    chunk_cumsum_scalar,
)
from attnlab.kernels.triton_utils import head_block


def chunk_states(
    x: Tensor, y: Tensor, gc: Tensor, init: Tensor | None, scale: float, chunk: int, backward: bool,
    fwd_states: tuple[Tensor, Tensor] | None = None, seq_chunks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """Stages 1 and 2: (the state at every chunk start (B, H, chunks, K, V), the final state, None) for
    x = k, y = v; with ``backward``, x = q, y = do, init = the final state's gradient: (the state's
    gradient at every chunk end, the initial state's gradient, and with ``fwd_states`` = (the forward's
    states at the chunk starts, its final state) sum_v S_end * dS_end (B, H, chunks, K)). float32. With
    ``seq_chunks`` (varlen, B = 1: the chunk offsets of the packed sequences), the scan restarts at every
    sequence, and init / the final state are per sequence (S, H, K, V)."""
    b, h, n, dk = x.shape
    dv = y.shape[-1]
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    gate = _gate_code(gc)
    buf = torch.empty(b, h, n_chunks, dk, dv, dtype=torch.float32, device=x.device)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    final = torch.empty(n_seq, h, dk, dv, dtype=torch.float32, device=x.device)
    bk, bv = min(head_block(dk), 64), min(head_block(dv), 64)
    nkb = cdiv(dk, bk)
    op.chunk_local_state_kernel[(nkb * cdiv(dv, bv), n_chunks, b * h)](
        x, y, gc, buf, n, np_, dk, dv, nkb, float(scale),
        BACKWARD=backward, GATE=gate, BT=chunk, BK=bk, BV=bv, DOT_PREC=_prec(x), UPCAST=_upcast(x),
        **_cfg("local_state", num_warps=4),
    )  # fmt: skip
    init_c = init.float().contiguous() if init is not None else final
    sk, sv = min(head_block(dk), op.SCAN_BK), min(head_block(dv), op.SCAN_BV)
    nkb, nvb = cdiv(dk, sk), cdiv(dv, sv)
    tail = None
    if fwd_states is not None:
        tail = torch.empty(nvb, b, h, n_chunks, dk, dtype=torch.float32, device=x.device)
    hs_f, ht_f = fwd_states if fwd_states is not None else (buf, final)
    op.chunk_scan_kernel[(nkb * nvb, n_seq * h)](
        buf, gc, init_c, final, hs_f, ht_f, tail if tail is not None else final,
        seq_chunks if seq_chunks is not None else final, n, np_, dk, dv, nkb, b * h,
        REVERSE=backward, HAS_INIT=init is not None, GATE=gate, HAS_TAIL=tail is not None,
        VARLEN=seq_chunks is not None,
        BT=chunk, BK=sk, BV=sv, **_cfg("scan", num_warps=4, num_stages=2),
    )  # fmt: skip
    return buf, final, (tail.sum(0) if tail is not None else None)


def gla_saved_dtype(k: Tensor, gc: Tensor) -> torch.dtype:
    """The dtype of the chunk-start states the forward keeps for the backward: k's 16-bit dtype with
    ``op.GLA_SAVED_LOWP`` under per-channel gates (gc (B, H, N or NP, K)) and the one-pass states and fused
    backward, else float32 (also for bf16 in Triton's CPU interpreter: ``_upcast``)."""
    lowp = (
        op.GLA_SAVED_LOWP
        and gc.dim() == 4
        and op.GLA_H_PASS
        and op.GLA_BWD_FUSED
        and op.GLA_BWD_H_PASS
        and k.dtype in (torch.bfloat16, torch.float16)
        and not _upcast(k)
    )
    return k.dtype if lowp else torch.float32


def gla_h(
    k: Tensor, v: Tensor, gc: Tensor, h0: Tensor | None, chunk: int, save: bool, seq_chunks: Tensor | None
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The forward's chunk states by one sequential pass (``gla_h_kernel``, ``GLA_H_PASS``): (the states
    at the chunk starts (B, H, chunks, K, V), the final state (B, H, K, V) or per sequence with
    ``seq_chunks`` (varlen, as ``chunk_states``) float32). The chunk-start states are in
    ``gla_saved_dtype`` with ``save``, else in k's dtype for 16-bit inputs (``GLA_H_COMPACT``)."""
    b, h, n, dk = k.shape
    dv = v.shape[-1]
    n_chunks = cdiv(n, chunk)
    f32, dev = torch.float32, k.device
    low = k.dtype in (torch.bfloat16, torch.float16)
    sdt = gla_saved_dtype(k, gc) if save else (k.dtype if op.GLA_H_COMPACT and low else f32)
    hs = torch.empty(b, h, n_chunks, dk, dv, dtype=sdt, device=dev)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    ht = torch.empty(n_seq, h, dk, dv, dtype=f32, device=dev)
    bk, bv = min(head_block(dk), op.GLA_H_BK), min(head_block(dv), op.GLA_H_BV)
    nkb = cdiv(dk, bk)
    op.gla_h_kernel[(nkb * cdiv(dv, bv), n_seq * h)](
        k, v, gc, h0.float().contiguous() if h0 is not None else ht, hs, ht,
        seq_chunks if seq_chunks is not None else ht, n, gc.shape[2], dk, dv, nkb, b * h, 1.0,
        GATE=_gate_code(gc), HAS_H0=h0 is not None, VARLEN=seq_chunks is not None, BT=chunk, BK=bk, BV=bv,
        LOWP=low and not IMPORTED_INTERPRETED, DOT_PREC=_prec(k), **_cfg("gla_h", num_warps=4, num_stages=2),
    )  # fmt: skip
    return hs, ht


def gla_dh(
    q: Tensor, do: Tensor, gc: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None,
    dhs_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The backward's state gradient by one reverse sequential pass (``gla_h_kernel`` with ``REVERSE``,
    ``GLA_BWD_H_PASS``): (the gradient at every chunk end (B, H, chunks, K, V), the initial state's
    gradient (B, H, K, V) or per sequence with ``seq_chunks``), float32 (the first in ``dhs_dtype``: the
    kept states' with ``GLA_SAVED_LOWP``); ``chunk_states(..., backward=True)`` without its chunk-end term.
    ``dht``: the final state's gradient (None: zero)."""
    b, h, n, dk = q.shape
    dv = do.shape[-1]
    n_chunks = cdiv(n, chunk)
    f32, dev = torch.float32, q.device
    dhs = torch.empty(b, h, n_chunks, dk, dv, dtype=dhs_dtype, device=dev)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    dh0 = torch.empty(n_seq, h, dk, dv, dtype=f32, device=dev)
    bk, bv = min(head_block(dk), op.GLA_H_BK), min(head_block(dv), op.GLA_H_BV)
    nkb = cdiv(dk, bk)
    low = q.dtype in (torch.bfloat16, torch.float16)
    op.gla_h_kernel[(nkb * cdiv(dv, bv), n_seq * h)](
        q, do, gc, dht.float().contiguous() if dht is not None else dh0, dhs, dh0,
        seq_chunks if seq_chunks is not None else dh0, n, gc.shape[2], dk, dv, nkb, b * h, float(scale),
        GATE=_gate_code(gc), HAS_H0=dht is not None, VARLEN=seq_chunks is not None, BT=chunk, BK=bk, BV=bv,
        LOWP=low and not IMPORTED_INTERPRETED, DOT_PREC=_prec(q), REVERSE=True,
        **_cfg("gla_dh", num_warps=4, num_stages=2),
    )  # fmt: skip
    return dhs, dh0


def gla_fwd_launch(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, h0: Tensor | None, scale: float, chunk: int, save: bool,
    seq_chunks: Tensor | None = None, raw_gate: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(o (B, H, N, V) in q's dtype, final state (B, H, K, V) fp32, and for the backward (empty without
    ``save``): the states at the chunk starts (B, H, chunks, K, V) fp32, the intra-chunk scores of
    per-channel gates (B, H, NP, chunk) fp32 (kept for the backward, which would otherwise recompute them;
    empty under a gate shared by the channels), and with ``raw_gate`` the chunk-local cumsum made here
    (B, H, NP, K) fp32 (empty otherwise)). gc: the chunk-local cumsum of the log-decays, (B, H, NP, K) per
    channel or (B, H, NP) one per token (``chunk_cumsum*``); with ``raw_gate``, the per-channel log-decays
    g (B, H, N, K) themselves, any float dtype (their cumsum made by ``gate_cumsum``: ``GLA_FUSED_GLUE``).
    The forward's stages follow ``GLA_H_PASS``, ``GLA_H_COMPACT`` and ``GLA_INTRA_V2``."""
    _check(q, k, v, chunk)
    q, k, v, gc = (t.contiguous() for t in (q, k, v, gc))
    if raw_gate:
        gc = gate_cumsum(gc, chunk)
    if op.GLA_H_PASS:
        hs, ht = gla_h(k, v, gc, h0, chunk, save, seq_chunks)
    else:
        hs, ht, _ = chunk_states(k, v, gc, h0, 1.0, chunk, backward=False, seq_chunks=seq_chunks)
    a = op.intra_scores(q, k, gc, None, chunk, strict=False, v2=op.GLA_INTRA_V2) if gc.dim() == 4 else None
    o = chunk_output(q, k, v, gc, hs, a, scale, chunk)

    def empty() -> Tensor:  # (a fresh one each: a custom op's outputs must not alias)
        return ht.new_empty(0)

    if not save:
        return o, ht, empty(), empty(), empty()
    return o, ht, hs, (a if a is not None else empty()), (gc if raw_gate else empty())


def gla_bwd_launch(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, hs: Tensor, ht: Tensor, do: Tensor, dht: Tensor | None,
    scale: float, chunk: int, seq_chunks: Tensor | None = None, a: Tensor | None = None,
    g_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv in the inputs' dtypes, dgc (gc's shape, fp32: the gradient of the chunk-local cumsum),
    dh0 fp32); hs, ht: the forward's states at the chunk starts and its final state; ``a``: the forward's
    intra-chunk scores under per-channel gates (None or empty: recomputed here). ``g_dtype`` (per-channel
    gates whose cumsum the forward made from g, ``raw_gate``): the fourth result is instead dg, the
    gradient of g itself (B, H, N, K) in ``g_dtype`` (``gate_cumsum_bwd_kernel``)."""
    q, k, v, gc, do = (t.contiguous() for t in (q, k, v, gc, do))
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    n_chunks = cdiv(n, chunk)
    if op.GLA_BWD_FUSED and gc.dim() == 4:
        try:
            return _gla_bwd_fused(q, k, v, gc, hs, do, dht, scale, chunk, seq_chunks, a, g_dtype)
        except OutOfResources:  # a GPU with less shared memory per block than the fused kernel takes (bf16,
            hs = hs.float()  # K = V = 128: 124 KiB; e.g. sm_89's 99 KiB): the previous kernels below, the
            # same results (they take float32 states: GLA_SAVED_LOWP's 16-bit ones converted)
    dhs, dh0, tail = chunk_states(
        q, do, gc, dht, scale, chunk, backward=True, fwd_states=(hs, ht), seq_chunks=seq_chunks
    )
    assert tail is not None
    dq, dkk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dgc = torch.empty_like(gc)
    if gc.dim() == 3:
        op.chunk_bwd_scalar_kernel[(n_chunks, b * h)](
            q, k, v, gc, do, hs, dhs, dq, dkk, dvv, dgc, n, gc.shape[2], dk, dv, float(scale),
            BT=chunk, BK=head_block(dk), BV=head_block(dv), DOT_PREC=_prec(q), UPCAST=_upcast(q),
            **_cfg("bwd_scalar", num_warps=8),
        )  # fmt: skip
        dgc.view(b, h, n_chunks, chunk)[:, :, :, -1] += tail.sum(-1)  # the chunk-end term
    else:
        if a is None or a.numel() == 0:  # (the forward's scores, recomputed)
            a = op.intra_scores(q, k, gc, None, chunk, strict=False, v2=op.GLA_INTRA_V2)
        np_ = gc.shape[2]
        parts: dict[str, Tensor] = {}
        if op.GLA_BWD_SPLIT:  # the state terms per whole chunk first (S, dH read once per chunk)
            f32 = torch.float32
            parts = {
                "PQ": torch.empty(b, h, np_, dk, dtype=f32, device=q.device),
                "PK": torch.empty(b, h, np_, dk, dtype=f32, device=q.device),
                "PV": torch.empty(b, h, np_, dv, dtype=f32, device=q.device),
            }
            op.gla_bwd_inter_kernel[(n_chunks, b * h)](
                k, v, gc, do, hs, dhs, parts["PQ"], parts["PK"], parts["PV"], n, np_, dk, dv,
                BT=chunk, BK=head_block(dk), BV=head_block(dv), DOT_PREC=_prec(q), UPCAST=_upcast(q),
                **_cfg("gla_bwd_inter", num_warps=8),
            )  # fmt: skip
        op.gla_bwd_sub_kernel[(np_ // SUB, b * h)](
            q, k, v, gc, do, hs, dhs, a, dq, dkk, dvv, dgc, n, np_, dk, dv, float(scale),
            BT=chunk, BS=SUB, BK=head_block(dk), BV=head_block(dv), DOT_PREC=_prec(q), UPCAST=_upcast(q),
            SPLIT=op.GLA_BWD_SPLIT, **parts, **_cfg("gla_bwd_sub", num_warps=4),
        )  # fmt: skip
        if g_dtype is not None:  # dg through the cumsum, the chunk-end term folded in
            dg = torch.empty(b, h, n, dk, dtype=g_dtype, device=q.device)
            bd = min(head_block(dk), 64)
            op.gate_cumsum_bwd_kernel[(n_chunks, b * h, cdiv(dk, bd))](
                dgc, tail, dg, n, np_, dk, BT=chunk, BD=bd, **_cfg("cumsum_bwd", num_warps=4)
            )
            return dq, dkk, dvv, dg, dh0
        dgc.view(b, h, n_chunks, chunk, dk)[:, :, :, -1] += tail
    return dq, dkk, dvv, dgc, dh0


#: (dtype, K, V, chunk, key slice, slices, slices per program, joint levels, launch options) of
#: ``gla_bwd_sliced_kernel`` checked against the fused kernel on the H100 (sm_90, Triton 3.6) at the lengths
#: timed: benchmarks/results/h100-2026-11-25-s24, runs 3 to 6 (K and V exactly: another K changes the
#: slices and the compiled code).
SLICED_VERIFIED: frozenset[tuple[object, ...]] = frozenset(
    (dt, 128, 128, 64, 16, 8, spp, True, (("num_stages", 3), ("num_warps", 4)))
    for dt in (torch.bfloat16, torch.float16)
    for spp in (1, 8)
)
#: Triton's (CUDA's) largest grid size along its second axis: the sliced kernel's chunk axis.
GRID_Y_MAX = 65535


def sliced_cfg() -> dict[str, int]:
    """The launch options of ``gla_bwd_sliced_kernel``: 4 warps, 3 stages (``LAUNCH_OVERRIDES`` aside)."""
    return _cfg("gla_bwd_sliced", num_warps=4, num_stages=3)


def sliced_layout(dk: int) -> tuple[int, int, int]:
    """(channels per key slice, slices, slices per program) of ``gla_bwd_sliced_kernel`` for K = dk at the
    current ``op.GLA_BWD_SLICED_BKS`` / ``_SPP``; the slice width must be a power of two >= 16."""
    width = op.GLA_BWD_SLICED_BKS
    if width < 16 or width & (width - 1):
        raise ValueError(f"op.GLA_BWD_SLICED_BKS must be a power of two >= 16 (a dot's size); got {width}")
    bks = min(head_block(dk), width)
    n_slices = cdiv(dk, bks)
    return bks, n_slices, max(1, min(op.GLA_BWD_SLICED_SPP, n_slices))


def sliced_verified(q: Tensor, v: Tensor, chunk: int) -> bool:
    """Whether ``gla_bwd_sliced_kernel`` at the current settings (``op.GLA_BWD_SLICED_*``, its launch
    options) and these head dims is a schedule checked on this kind of GPU (``SLICED_VERIFIED``, an sm_90
    GPU)."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0) or op.GLA_BWD_SLICED_UNROLL:
        return False
    dk, dv = q.shape[-1], v.shape[-1]
    cfg = tuple(sorted(sliced_cfg().items()))
    key = (q.dtype, dk, dv, chunk, *sliced_layout(dk), bool(op.GLA_BWD_SLICED_JOINT), cfg)
    return key in SLICED_VERIFIED


def _gla_bwd_fused(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, hs: Tensor, do: Tensor, dht: Tensor | None, scale: float,
    chunk: int, seq_chunks: Tensor | None, a: Tensor | None, g_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``gla_bwd_launch`` under per-channel gates with ``GLA_BWD_FUSED``: the state gradient (one reverse
    pass with ``GLA_BWD_H_PASS``, else stages 1 and 2 without the chunk-end term), then one launch of
    ``gla_bwd_sliced_kernel`` (``GLA_BWD_SLICED``: where its schedule was verified, or anywhere without
    ``GLA_BWD_SLICED_VERIFIED_ONLY``; at most ``GRID_Y_MAX`` chunks) or else of ``gla_bwd_chunk_kernel``,
    for dq, dk, dv and dg (of g itself with ``g_dtype``, else of gc)."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    n_chunks = cdiv(n, chunk)
    np_ = gc.shape[2]
    if op.GLA_BWD_H_PASS:
        dhs, dh0 = gla_dh(q, do, gc, dht, scale, chunk, seq_chunks, dhs_dtype=hs.dtype)
    else:
        dhs, dh0, _ = chunk_states(q, do, gc, dht, scale, chunk, backward=True, seq_chunks=seq_chunks)
    if a is None or a.numel() == 0:  # (the forward's scores, recomputed)
        a = op.intra_scores(q, k, gc, None, chunk, strict=False, v2=op.GLA_INTRA_V2)
    dq, dkk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    raw = g_dtype is not None
    dg = torch.empty(b, h, n, dk, dtype=g_dtype, device=q.device) if raw else torch.empty_like(gc)
    sliced = op.GLA_BWD_SLICED and n_chunks <= GRID_Y_MAX
    if sliced and (not op.GLA_BWD_SLICED_VERIFIED_ONLY or sliced_verified(q, v, chunk)):
        bks, n_slices, spp = sliced_layout(dk)
        op.gla_bwd_sliced_kernel[(cdiv(n_slices, spp) + 1, n_chunks, b * h)](
            q, k, v, gc, do, hs, dhs, a, dq, dkk, dvv, dg, n, np_, dk, dv, float(scale),
            RAW_G=raw, BT=chunk, LBT=chunk.bit_length() - 1, BKS=bks, BV=head_block(dv), NKS=n_slices,
            SPP=spp,
            JOINT=op.GLA_BWD_SLICED_JOINT, UNROLL=op.GLA_BWD_SLICED_UNROLL, DOT_PREC=_prec(q),
            UPCAST=_upcast(q), **sliced_cfg(),
        )  # fmt: skip
        return dq, dkk, dvv, dg, dh0
    unroll = op.GLA_BWD_UNROLL and (q.element_size() == 2 or IMPORTED_INTERPRETED)
    op.gla_bwd_chunk_kernel[(n_chunks, b * h)](
        q, k, v, gc, do, hs, dhs, a, dq, dkk, dvv, dg, n, np_, dk, dv, float(scale),
        RAW_G=raw, BT=chunk, LBT=chunk.bit_length() - 1, BKS=min(head_block(dk), op.GLA_BWD_BKS),
        BV=head_block(dv), UNROLL=unroll, DOT_PREC=_prec(q), UPCAST=_upcast(q),
        **_cfg("gla_bwd_chunk", num_warps=8),
    )  # fmt: skip
    return dq, dkk, dvv, dg, dh0


def _gla_gate(
    g: Tensor | None, b: int, h: int, n: int, dk: int, chunk: int, device: torch.device
) -> tuple[Tensor, bool]:
    """What ``gla_chunk_fwd`` takes for gate g: (gc, raw_gate). One gate per token (lightning's per-head
    decays, linear's none; the scalar-gate kernels, 64-row score tiles): its chunk-local cumsum (B, H, NP)
    by PyTorch. Per channel: g (B, H, N, K) as it is, its cumsum made in the op (``GLA_FUSED_GLUE``), or
    the cumsum (B, H, NP, K) by PyTorch."""
    scalar, gx = _scalar_gate(g, b, h, n, dk)
    if scalar:
        return chunk_cumsum_scalar(gx, b, h, n, chunk, device), False
    assert gx is not None
    if op.GLA_FUSED_GLUE:
        return gx, True
    return op.chunk_cumsum(gx, b, h, n, dk, chunk, device), False


# Imported last: op imports this module, and this module reads op (and the launchers op imports) only at
# call time, so that any of them may be imported first.
from attnlab.kernels.linear import op  # noqa: E402
from attnlab.kernels.linear.launch_scores import chunk_output, gate_cumsum  # noqa: E402
