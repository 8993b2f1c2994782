# mypy: ignore-errors
"""The per-channel-gate (gla) per-chunk backward with the key channels spread over programs
(``op.GLA_BWD_SLICED``): :func:`gla_bwd_sliced_kernel`.

``gla_bwd_chunk_kernel`` (``chunk_gla_bwd.py``) walks a chunk's key channels in 16-wide slices inside one
program and then needs every register of an SM (255 per thread at 8 warps, compiled for sm_90): one
program per SM, each a long chain of small dependent dots, nothing to hide their latency. Here the slices
are programs of their own (grid: slice, chunk, batch * head; one more program per chunk makes dv), so a
program's chain is SPP slices long and several programs share an SM. dA and dA^T are made once per
program (two dots of chunk x chunk x V): again by each of a chunk's cdiv(NKS, SPP) slice programs. The
chunk axis is the grid's second (at most 65535 chunks: the launcher runs the fused kernel beyond)."""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.linear.chunk_gla_bwd import _gla_bwd_level


@triton.jit
def _gla_bwd_level_one(g_ptr, x, g, da, acc, ii, jj, t0, ck, mk, b, DK, dt: tl.constexpr,
                       DOT_PREC: tl.constexpr, LATER: tl.constexpr):  # fmt: skip
    """Level b of one side of the intra-chunk sums (``_gla_bwd_level`` for dq alone with LATER, the rows
    with bit b set receiving; for dk alone without, the rows with it clear receiving; da is dA for dq and
    dA^T for dk, x is k for dq and q for dk)."""
    up = ((ii >> b) & 1) == 1
    ref = t0 + (((ii >> b) | 1) << b)
    gr = tl.load(g_ptr + ref * DK + ck[None, :], mask=mk[None, :], other=0.0)
    e = tl.exp(tl.where(up, g - gr, gr - g))
    pair = (ii >> (b + 1)) == (jj >> (b + 1))
    xb = tl.where(up, 0.0, x * e).to(dt) if LATER else tl.where(up, x * e, 0.0).to(dt)
    p = tl.dot(tl.where(pair, da, 0.0), xb, input_precision=DOT_PREC)
    if LATER:
        acc += tl.where(up, e * p, 0.0)
    else:
        acc += tl.where(up, 0.0, e * p)
    return acc


@triton.jit
def gla_bwd_sliced_kernel(
    Q, K, V, GC, DO, HS, DHS, A, DQ, DK_, DV_, DG,
    N, NP, DK, DV, scale,
    RAW_G: tl.constexpr, BT: tl.constexpr, LBT: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
    NKS: tl.constexpr, SPP: tl.constexpr, JOINT: tl.constexpr, UNROLL: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """``gla_bwd_chunk_kernel``'s gradients (same formulas, inputs, outputs and dtypes) with program
    (s, chunk, batch * head): s < cdiv(NKS, SPP) makes dq, dk and dg of the SPP key slices s * SPP ..
    (s + 1) * SPP - 1 of BKS channels each (of NKS; dA and dA^T made once for them), s = cdiv(NKS, SPP)
    makes dv (scale A^T do plus (k exp(G_C - G)) dH over every key channel). JOINT: dq's and dk's level
    sums in one pass sharing each level's exp tile (else one pass each, fewer tiles live at once)."""
    s_id = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    t0 = c * BT
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = Q.dtype.element_ty
    rt = tl.arange(0, BT)
    ii = rt[:, None]
    jj = rt[None, :]
    rows = t0 + ii
    mrow = rows < N
    rv = tl.arange(0, BV)[None, :]
    mtv = mrow & (rv < DV)
    q_ptr = Q + bh * N * DK
    k_ptr = K + bh * N * DK
    g_ptr = GC + bh * NP * DK
    s_ptr = HS + (bh * n_chunks + c) * DK * DV
    dh_ptr = DHS + (bh * n_chunks + c) * DK * DV
    do = tl.load(DO + bh * N * DV + rows * DV + rv, mask=mtv, other=0.0).to(dt)
    if s_id == tl.cdiv(NKS, SPP):  # dv
        at = tl.load(A + bh * NP * BT + (t0 + jj) * BT + ii)  # A^T: keys j, queries t (loaded transposed)
        dv = tl.dot(tl.where(ii <= jj, at, 0.0).to(dt), do, input_precision=DOT_PREC) * scale
        for kc in range(0, DK, BKS):
            ck = kc + tl.arange(0, BKS)
            mk = ck < DK
            k = tl.load(k_ptr + rows * DK + ck[None, :], mask=mrow & mk[None, :], other=0.0).to(tl.float32)
            g = tl.load(g_ptr + rows * DK + ck[None, :], mask=mk[None, :], other=0.0)
            gl = tl.load(g_ptr + (t0 + BT - 1) * DK + ck, mask=mk, other=0.0)
            dh = tl.load(dh_ptr + ck[:, None] * DV + rv, mask=mk[:, None] & (rv < DV), other=0.0)
            dv = tl.dot((k * tl.exp(gl[None, :] - g)).to(dt), dh.to(dt), dv, input_precision=DOT_PREC)
        tl.store(DV_ + bh * N * DV + rows * DV + rv, dv.to(DV_.dtype.element_ty), mask=mtv)
    else:
        v = tl.load(V + bh * N * DV + rows * DV + rv, mask=mtv, other=0.0).to(dt)
        da = tl.dot(do, tl.trans(v), input_precision=DOT_PREC) * scale  # dA: queries t, keys j
        da = tl.where(ii >= jj, da, 0.0)
        dd = tl.sum(tl.where(ii == jj, da, 0.0), axis=1)[:, None]  # dA_tt (float32)
        da = da.to(dt)
        dat = tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * scale  # dA^T: keys j, queries t
        dat = tl.where(ii <= jj, dat, 0.0).to(dt)
        for j in range(SPP):  # (dA and dA^T made once for the program's slices)
            ck = (s_id * SPP + j) * BKS + tl.arange(0, BKS)
            mk = ck < DK
            mtk = mrow & mk[None, :]
            q = tl.load(q_ptr + rows * DK + ck[None, :], mask=mtk, other=0.0).to(dt)  # (kept narrow)
            k = tl.load(k_ptr + rows * DK + ck[None, :], mask=mtk, other=0.0).to(dt)
            g = tl.load(g_ptr + rows * DK + ck[None, :], mask=mk[None, :], other=0.0)
            gl = tl.load(g_ptr + (t0 + BT - 1) * DK + ck, mask=mk, other=0.0)
            msv = mk[:, None] & (rv < DV)
            s = tl.load(s_ptr + ck[:, None] * DV + rv, mask=msv, other=0.0)  # (BKS, BV) of S
            dh = tl.load(dh_ptr + ck[:, None] * DV + rv, mask=msv, other=0.0)  # (BKS, BV) of dH
            dq = tl.dot(do, tl.trans(s.to(dt)), input_precision=DOT_PREC) * (tl.exp(g) * scale)
            dk = tl.dot(v, tl.trans(dh.to(dt)), input_precision=DOT_PREC) * tl.exp(gl[None, :] - g)
            tail = tl.exp(gl) * tl.sum(s.to(tl.float32) * dh.to(tl.float32), axis=1) + tl.sum(k * dk, axis=0)
            if JOINT:
                if UNROLL:
                    for b in tl.static_range(LBT):
                        dq, dk = _gla_bwd_level(
                            g_ptr, q, k, g, da, dat, dq, dk, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC
                        )
                else:
                    for b in range(LBT):
                        dq, dk = _gla_bwd_level(
                            g_ptr, q, k, g, da, dat, dq, dk, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC
                        )
            else:
                if UNROLL:
                    for b in tl.static_range(LBT):
                        dq = _gla_bwd_level_one(
                            g_ptr, k, g, da, dq, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC, True
                        )
                    for b in tl.static_range(LBT):
                        dk = _gla_bwd_level_one(
                            g_ptr, q, g, dat, dk, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC, False
                        )
                else:
                    for b in range(LBT):
                        dq = _gla_bwd_level_one(
                            g_ptr, k, g, da, dq, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC, True
                        )
                    for b in range(LBT):
                        dk = _gla_bwd_level_one(
                            g_ptr, q, g, dat, dk, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC, False
                        )
            dq += dd * k
            dk += dd * q
            tl.store(DQ + bh * N * DK + rows * DK + ck[None, :], dq.to(DQ.dtype.element_ty), mask=mtk)
            tl.store(DK_ + bh * N * DK + rows * DK + ck[None, :], dk.to(DK_.dtype.element_ty), mask=mtk)
            dg = q * dq - k * dk
            if RAW_G:
                dg = tl.cumsum(dg, axis=0, reverse=True) + tail[None, :]
                tl.store(DG + bh * N * DK + rows * DK + ck[None, :], dg.to(DG.dtype.element_ty), mask=mtk)
            else:
                dg += tl.where(ii == BT - 1, tail[None, :], 0.0)
                tl.store(DG + bh * NP * DK + rows * DK + ck[None, :], dg, mask=mk[None, :])
