# mypy: ignore-errors
"""The delta rule's backward sequential pass in two launches (``op.DELTA_BWD_DH_V2``):

1. :func:`delta_bwd_du_local_kernel`, every chunk in parallel: the intra-chunk part of dU,
   scale ((k q^T) * D^T) do, which does not depend on the state gradient;
2. :func:`delta_bwd_dh_v2_kernel`, the chunks in reverse, one program per (value block, batch * head):
   dU = dU_local + (k exp(G_C - G)) dH and dH <- exp(G_C) dH + scale (q exp(G))^T do - W^T dU.

The single-launch form, :func:`~attnlab.kernels.linear.chunk_state.delta_bwd_dh_kernel`, made the
intra-chunk scores and their product inside the sequential loop (in tf32); here the loop carries only
the two dependent products per chunk, its loads do not depend on the loop's state (pipelined), and the
operands that would be transposed (q^T, W^T and per-channel G^T) are loaded transposed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.linear.chunk_state import _chunk_range


@triton.jit
def _t_tile(ptr, row0, n_rows, n_cols, stride, BR: tl.constexpr, BC: tl.constexpr):
    """The transpose (BC, BR) of rows row0.. (BR of them) and columns 0.. (BC) of a row-major matrix, loaded
    transposed, in the matrix's dtype; 0 outside."""
    r = row0 + tl.arange(0, BR)
    c = tl.arange(0, BC)
    m = (c[:, None] < n_cols) & (r[None, :] < n_rows)
    return tl.load(ptr + r[None, :] * stride + c[:, None], mask=m, other=0.0)


@triton.jit
def _mm(a, b, acc, dt: tl.constexpr, LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a b: operands cast to ``dt`` (16-bit with LOWP), else float32 operands in ``DOT_PREC``."""
    if LOWP:
        return tl.dot(a.to(dt), b.to(dt), acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PREC)


@triton.jit
def delta_bwd_du_local_kernel(
    Q, K, DO, GC, AQK, DU, KG, QG,
    N, NP, DK, DV, scale,
    GATE: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """DU (B*H, NP, DV) float32 = scale A^T do for one chunk and value block per program (chunk, value
    block, batch * head), with A^T_ij = k_i . q_j exp(G_j - G_i) for j >= i (0 above). Under a gate shared
    by the channels (GATE 1) A^T is made here by one dot (q^T loaded transposed); per channel (GATE 2) it is
    AQK's rows (the forward's intra-chunk q k^T scores with their decays, (B*H, NP, BT)) loaded transposed,
    and the value block 0 programs also write the sequential pass's decayed operands, KG = k exp(G_C - G)
    and QG = scale q exp(G) (B*H, NP, DK, in KG's dtype), so that the pass reads neither G nor G^T. LOWP:
    A^T and do as the inputs' 16-bit dtype in the product (float32 accumulation); else float32 operands
    (``DOT_PREC``)."""
    c = tl.program_id(0)
    vb = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    t0 = c * BT
    ii = tl.arange(0, BT)[:, None]
    jj = tl.arange(0, BT)[None, :]
    rt = t0 + tl.arange(0, BT)
    rk = tl.arange(0, BK)[None, :]
    mk = (rt[:, None] < N) & (rk < DK)
    rv = vb * BV + tl.arange(0, BV)
    mo = (rt[:, None] < N) & (rv[None, :] < DV)
    do = tl.load(DO + bh * N * DV + rt[:, None] * DV + rv[None, :], mask=mo, other=0.0)
    if GATE == 2:  # a_t[i, j] = AQK[t0 + j, i], j >= i
        a_t = tl.load(AQK + bh * NP * BT + (t0 + jj) * BT + ii, mask=jj >= ii, other=0.0)
        if vb == 0:
            g = tl.load(GC + bh * NP * DK + rt[:, None] * DK + rk, mask=rk < DK, other=0.0)
            g_last = tl.load(GC + bh * NP * DK + (t0 + BT - 1) * DK + rk, mask=rk < DK, other=0.0)
            k = tl.load(K + bh * N * DK + rt[:, None] * DK + rk, mask=mk, other=0.0).to(tl.float32)
            q = tl.load(Q + bh * N * DK + rt[:, None] * DK + rk, mask=mk, other=0.0).to(tl.float32)
            out = bh * NP * DK + rt[:, None] * DK + rk
            tl.store(KG + out, (k * tl.exp(g_last - g)).to(KG.dtype.element_ty), mask=rk < DK)
            tl.store(QG + out, (q * tl.exp(g) * scale).to(QG.dtype.element_ty), mask=rk < DK)
    else:
        k = tl.load(K + bh * N * DK + rt[:, None] * DK + rk, mask=mk, other=0.0)
        q_t = _t_tile(Q + bh * N * DK, t0, N, DK, DK, BT, BK)
        g = tl.load(GC + bh * NP + rt)
        d_t = tl.exp(tl.where(ii <= jj, g[None, :] - g[:, None], float("-inf")))
        if LOWP:
            a_t = tl.dot(k, q_t) * d_t
        else:
            a_t = tl.dot(k.to(tl.float32), q_t.to(tl.float32), input_precision=DOT_PREC) * d_t
    if LOWP:
        du = tl.dot(a_t.to(DO.dtype.element_ty), do)
    else:
        du = tl.dot(a_t, do.to(tl.float32), input_precision=DOT_PREC)
    tl.store(DU + bh * NP * DV + rt[:, None] * DV + rv[None, :], scale * du, mask=rv[None, :] < DV)


@triton.jit
def delta_bwd_dh_v2_kernel(
    Q, K, DO, GC, W, KG, QG, DHT, DHS, DU, DH0, SEQ,
    N, NP, DK, DV, BHM, scale,
    HAS_DHT: tl.constexpr, VARLEN: tl.constexpr, GATE: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The delta rule's reverse sequential pass given DU = the intra-chunk part of dU
    (:func:`delta_bwd_du_local_kernel`), one program per (value block, batch * head), chunks in reverse.
    With dH the gradient of the state at the chunk's end::

        DHS[c] = dH;  DU_c += (k exp(G_C - G)) dH   (in place)
        dH <- exp(G_C) dH + scale (q exp(G))^T do - W^T DU_c

    DH0 the initial state's gradient. GATE 1: one decay per token (G (B*H, NP)); GATE 2: per channel
    (G (B*H, NP, DK)), with k exp(G_C - G) and scale q exp(G) read from KG and QG (made by
    :func:`delta_bwd_du_local_kernel`). LOWP: dot operands in the inputs' 16-bit dtype (dH, DU_c, the
    decayed k and q and W rounded to it, as fla-core's kernel does), float32 accumulation and float32 dH
    between chunks; else float32 operands (``DOT_PREC``). BK covers the key dim. VARLEN: as
    ``chunk_state.delta_bwd_dh_kernel``."""
    vb = tl.program_id(0)
    sh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    bh, c_lo, c_hi = _chunk_range(SEQ, sh, BHM, n_chunks, VARLEN)
    rk = tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    off = rk[:, None] * DV + rv[None, :]
    mask = mk[:, None] & mv[None, :]
    if HAS_DHT:
        dh = tl.load(DHT + sh * DK * DV + off, mask=mask, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros((BK, BV), dtype=tl.float32)
    if LOWP:  # noqa: SIM108
        dt = K.dtype.element_ty
    else:
        dt = tl.float32
    for cc in range(c_lo, c_hi):
        c = c_lo + c_hi - 1 - cc
        t0 = c * BT
        rt = t0 + tl.arange(0, BT)
        mt = rt < N
        tl.store(DHS + (bh * n_chunks + c) * DK * DV + off, dh, mask=mask)
        w_t = _t_tile(W + bh * NP * DK, t0, NP, DK, DK, BT, BK)
        if not LOWP:  # (negated below: in float32, as its product takes it; W may be 16-bit)
            w_t = w_t.to(tl.float32)
        do = tl.load(
            DO + bh * N * DV + rt[:, None] * DV + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0
        )
        du_off = DU + bh * NP * DV + rt[:, None] * DV + rv[None, :]
        du = tl.load(du_off, mask=mv[None, :], other=0.0).to(tl.float32)  # (DU may be 16-bit)
        if GATE == 2:
            kbar = tl.load(KG + bh * NP * DK + rt[:, None] * DK + rk[None, :], mask=mk[None, :], other=0.0)
            q_t = _t_tile(QG + bh * NP * DK, t0, NP, DK, DK, BT, BK)
            g_last = tl.load(GC + bh * NP * DK + (t0 + BT - 1) * DK + rk, mask=mk, other=0.0)
            decay = tl.exp(g_last)[:, None]
        else:
            k = tl.load(
                K + bh * N * DK + rt[:, None] * DK + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0
            )
            q_t = _t_tile(Q + bh * N * DK, t0, N, DK, DK, BT, BK)
            g = tl.load(GC + bh * NP + rt)
            g_last = tl.load(GC + bh * NP + t0 + BT - 1)
            kbar = k.to(tl.float32) * tl.exp(g_last - g)[:, None]
            q_t = q_t.to(tl.float32) * (tl.exp(g) * scale)[None, :]
            decay = tl.exp(g_last)
        du = _mm(kbar, dh, du, dt, LOWP, DOT_PREC)
        tl.store(du_off, du, mask=mv[None, :])
        dh = _mm(q_t, do, dh * decay, dt, LOWP, DOT_PREC)
        dh = _mm(-w_t, du, dh, dt, LOWP, DOT_PREC)
    tl.store(DH0 + sh * DK * DV + off, dh, mask=mask)
