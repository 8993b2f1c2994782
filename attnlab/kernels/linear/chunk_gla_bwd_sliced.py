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

from attnlab.kernels.linear.chunk_gla_bwd import (
    _gla_bwd_chunk_setup,
    _gla_bwd_da,
    _gla_bwd_dv_state,
    _gla_bwd_slice,
)


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
    ii, jj, rows, mrow, rv, mtv, q_ptr, k_ptr, g_ptr, s_ptr, dh_ptr, do = _gla_bwd_chunk_setup(
        Q, K, GC, HS, DHS, DO, c, bh, n_chunks, t0, N, NP, DK, DV, BT, BV, dt
    )
    if s_id == tl.cdiv(NKS, SPP):  # dv
        at = tl.load(A + bh * NP * BT + (t0 + jj) * BT + ii)  # A^T: keys j, queries t (loaded transposed)
        dv = tl.dot(tl.where(ii <= jj, at, 0.0).to(dt), do, input_precision=DOT_PREC) * scale
        dv = _gla_bwd_dv_state(dv, k_ptr, g_ptr, dh_ptr, rows, mrow, rv, t0, DK, DV, BT, BKS, dt, DOT_PREC)
        tl.store(DV_ + bh * N * DV + rows * DV + rv, dv.to(DV_.dtype.element_ty), mask=mtv)
    else:
        v = tl.load(V + bh * N * DV + rows * DV + rv, mask=mtv, other=0.0).to(dt)
        da, dat, dd = _gla_bwd_da(do, v, ii, jj, scale, dt, DOT_PREC)
        for j in range(SPP):  # (dA and dA^T made once for the program's slices)
            _gla_bwd_slice(
                (s_id * SPP + j) * BKS, q_ptr, k_ptr, g_ptr, s_ptr, dh_ptr, do, v, da, dat, dd, DQ, DK_, DG, bh,
                N, NP, DK, DV, scale, rows, mrow, rv, ii, jj, t0, RAW_G, BT, LBT, BKS, True, JOINT, UNROLL, dt,
                DOT_PREC,
            )  # fmt: skip
