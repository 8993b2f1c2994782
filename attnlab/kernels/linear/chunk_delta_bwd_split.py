# mypy: ignore-errors
"""The scalar-gate per-chunk backward of the delta rule with its value-dim products in two loops
(``op.DELTA_BWD_SPLIT``): :func:`delta_bwd_chunk_split_kernel`.

``delta_bwd_chunk_kernel`` (``chunk_delta_bwd.py``) accumulates every product that sums over V in one loop
over value slices: do S^T, do U^T, U dH^T, dU S^T and dU X_u^T, five accumulators (128 of a thread's 255
registers at K = 128, chunk 64, 8 warps) live together, and then the q, k and UT-transform work on top of
them. Here the first loop makes the output's and the state update's products (:func:`_state_slices`),
which finish dq (stored at once) and start dk; the second makes the UT transform's (:func:`_ut_slices`,
reading S again) with dq, q and the first loop's accumulators no longer live (dk, the decays and k's
exp(G) still are; k is loaded again after it). Same math, same dot
operands and order of accumulation per product as the one-loop kernel with ``TRANS``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.linear.chunk_delta_bwd import _scalar_tail, _ut_transform_bwd_w
from attnlab.kernels.linear.fwd import _row, _tile


@triton.jit
def _state_slices(
    DO, U, HS, DHS, bh, c, t0, n_chunks, N, NP, DK, DV,
    dt: tl.constexpr, DOT_PREC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BVB: tl.constexpr,
):  # fmt: skip
    """(do S^T (BT, BK), do U^T (BT, BT), U dH^T (BT, BK), sum_v S * dH per row of S (BK,)), float32,
    from slices of BVB value columns of do, U (BT, BVB) and S, dH (BK, BVB)."""
    state = (bh * n_chunks + c) * DK * DV
    dos = tl.zeros((BT, BK), dtype=tl.float32)
    dou = tl.zeros((BT, BT), dtype=tl.float32)
    dkbar = tl.zeros((BT, BK), dtype=tl.float32)
    sdh = tl.zeros((BK,), dtype=tl.float32)
    for v0 in tl.range(0, DV, BVB, num_stages=2):
        do = _tile(DO + bh * N * DV, t0, N, v0, DV, DV, BT, BVB)
        u = _tile(U + bh * NP * DV, t0, NP, v0, DV, DV, BT, BVB)
        s = _tile(HS + state, 0, DK, v0, DV, DV, BK, BVB)
        dh = _tile(DHS + state, 0, DK, v0, DV, DV, BK, BVB)
        dos = tl.dot((do).to(dt), (tl.trans(s)).to(dt), dos, input_precision=DOT_PREC)
        dou = tl.dot((do).to(dt), (tl.trans(u)).to(dt), dou, input_precision=DOT_PREC)
        dkbar = tl.dot((u).to(dt), (tl.trans(dh)).to(dt), dkbar, input_precision=DOT_PREC)
        sdh += tl.sum(s * dh, axis=1)
    return dos, dou, dkbar, sdh


@triton.jit
def _ut_slices(
    V, DU, HS, DV_, tm, beta, bh, c, t0, n_chunks, N, NP, DK, DV,
    dt: tl.constexpr, DOT_PREC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BVB: tl.constexpr,
):  # fmt: skip
    """(dW = -dU S^T (BT, BK), dU X_u^T (BT, BT), rowsum(dX_u * v) (BT,)), float32, X_u = beta v, from
    slices of BVB value columns of v, dU (BT, BVB) and S (BK, BVB); dX_u = T^T dU per slice, and
    dv = beta dX_u stored (DV_'s dtype, rows < N)."""
    rr = (t0 + tl.arange(0, BT))[:, None]
    state = (bh * n_chunks + c) * DK * DV
    tm_t = (tl.trans(tm)).to(dt)
    dus = tl.zeros((BT, BK), dtype=tl.float32)
    duxu = tl.zeros((BT, BT), dtype=tl.float32)
    dxu_v = tl.zeros((BT,), dtype=tl.float32)
    for v0 in tl.range(0, DV, BVB, num_stages=2):
        v = _tile(V + bh * N * DV, t0, N, v0, DV, DV, BT, BVB)
        du = _tile(DU + bh * NP * DV, t0, NP, v0, DV, DV, BT, BVB)
        s = _tile(HS + state, 0, DK, v0, DV, DV, BK, BVB)
        xu = v * beta[:, None]
        dus = tl.dot((du).to(dt), (tl.trans(s)).to(dt), dus, input_precision=DOT_PREC)
        duxu = tl.dot((du).to(dt), (tl.trans(xu)).to(dt), duxu, input_precision=DOT_PREC)
        dxu = tl.dot(tm_t, (du).to(dt), input_precision=DOT_PREC)
        dxu_v += tl.sum(dxu * v, axis=1)
        rv = v0 + tl.arange(0, BVB)[None, :]
        dv = dxu * beta[:, None]
        tl.store(DV_ + bh * N * DV + rr * DV + rv, dv.to(DV_.dtype.element_ty), mask=(rr < N) & (rv < DV))
    return -dus, duxu, dxu_v


@triton.jit
def delta_bwd_chunk_split_kernel(
    Q, K, V, BETA, GC, DO, HS, DHS, U, DU, T, DQ, DK_, DV_, DB, DG, RQ, RK,
    N, NP, DK, DV, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    L2NORM: tl.constexpr = False, BVB: tl.constexpr = 32,
):  # fmt: skip
    """``delta_bwd_chunk_kernel``'s gradients (its docstring has the math; the same arguments, ``BVB`` > 0
    and ``TRANS``), one chunk per program (chunk, batch * head), its products over V in two loops (the
    module docstring)."""
    tl.static_assert(BVB <= BV)
    c = tl.program_id(0)
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = Q.dtype.element_ty  # the dots take the input dtype (fp32 accumulation)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    t0 = c * BT
    ii = tl.arange(0, BT)[:, None]
    jj = tl.arange(0, BT)[None, :]
    rows = t0 + tl.arange(0, BT)
    rr = rows[:, None]
    rk = tl.arange(0, BK)[None, :]
    dos, dou, dkbar, sdh = _state_slices(
        DO, U, HS, DHS, bh, c, t0, n_chunks, N, NP, DK, DV, dt, DOT_PREC, BT, BK, BVB
    )
    q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    g = tl.load(GC + bh * NP + rows)
    g_last = tl.load(GC + bh * NP + t0 + BT - 1)
    eg = tl.exp(g)
    tail = tl.exp(g_last - g)
    d = tl.exp(tl.where(ii >= jj, g[:, None] - g[None, :], float("-inf")))
    # the output's intra-chunk scores and the state part: dq final, stored
    dq = scale * dos * eg[:, None]
    dgc = tl.sum(q * dq, axis=1)
    da_qk = scale * dou * d
    dq += tl.dot((da_qk).to(dt), (k).to(dt), input_precision=DOT_PREC)
    p = da_qk * tl.dot((q).to(dt), (tl.trans(k)).to(dt), input_precision=DOT_PREC)
    dgc += tl.sum(p, axis=1) - tl.sum(p, axis=0)
    dk = tl.dot((tl.trans(da_qk)).to(dt), (q).to(dt), input_precision=DOT_PREC)  # (U do^T = (do U^T)^T)
    if L2NORM:  # the norm's Jacobian (q is the normalised rows; padded rows are zero)
        rq = tl.load(RQ + bh * N + rows, mask=rows < N, other=0.0)
        dq = (dq - q * tl.sum(q * dq, axis=1)[:, None]) * rq[:, None]
    tl.store(DQ + bh * N * DK + rr * DK + rk, dq.to(DQ.dtype.element_ty), mask=(rr < N) & (rk < DK))
    # the state update's k exp(G_C - G)
    dk += dkbar * tail[:, None]
    kbar_term = tl.sum(dkbar * k, axis=1) * tail
    dgc -= kbar_term
    g_end = tl.sum(kbar_term, axis=0) + tl.exp(g_last) * tl.sum(sdh, axis=0)
    # the UT transform's products over V, then the transform's backward
    beta = tl.load(BETA + bh * N + rows, mask=rows < N, other=0.0).to(tl.float32)
    tm = _tile(T + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
    dw, duxu, dxu_v = _ut_slices(
        V, DU, HS, DV_, tm, beta, bh, c, t0, n_chunks, N, NP, DK, DV, dt, DOT_PREC, BT, BK, BVB
    )
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)  # (again: not live through the second loop)
    xw = (k * (beta * eg)[:, None]).to(dt)  # (only as a dot operand; its float32 uses go through k)
    dt_ = tl.dot((dw).to(dt), tl.trans(xw), duxu, input_precision=DOT_PREC)
    dxw, da = _ut_transform_bwd_w(tm, dw, dt_, dt, DOT_PREC)
    da = tl.where(ii > jj, da, 0.0)
    ds = tl.where(ii > jj, d, 0.0)
    kk = tl.dot((k).to(dt), (tl.trans(k)).to(dt), input_precision=DOT_PREC)
    dab = da * ds * beta[:, None]
    dk += tl.dot((dab + tl.trans(dab)).to(dt), (k).to(dt), input_precision=DOT_PREC)  # (dA^T's: dab^T)
    _scalar_tail(
        DK_, DB, DG, RK, k, dk, dgc, dxw, da, kk, ds, beta, eg, g_end, dxu_v, rows, bh, N, NP, DK,
        BT, BK, L2NORM,
    )  # fmt: skip


@triton.jit
def delta_bwd_chunk_channel_split_kernel(
    Q, K, V, BETA, GC, DO, HS, DHS, U, DU, T, BKK, DQ, DK_, DV_, DB, DG, DAQK, DBKK,
    N, NP, DK, DV, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BVB: tl.constexpr = 32,
):  # fmt: skip
    """``delta_bwd_chunk_channel_kernel``'s outputs (per-channel gates; its docstring has them; ``BVB`` > 0),
    one chunk per program (chunk, batch * head), its products over V in two loops (the module docstring).
    Between the loops the float32 partial dk and dG rows (BT, BK) go to DK_ and DG and come back after
    the second (the program's own rows: no other program touches them), so that they are not live
    through it."""
    tl.static_assert(BVB <= BV)
    c = tl.program_id(0)
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = Q.dtype.element_ty  # the dots take the input dtype (fp32 accumulation)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    t0 = c * BT
    ii = tl.arange(0, BT)[:, None]
    jj = tl.arange(0, BT)[None, :]
    rows = t0 + tl.arange(0, BT)
    rr = rows[:, None]
    rk = tl.arange(0, BK)[None, :]
    out = bh * NP * DK + rr * DK + rk
    dos, dou, dkbar, sdh = _state_slices(
        DO, U, HS, DHS, bh, c, t0, n_chunks, N, NP, DK, DV, dt, DOT_PREC, BT, BK, BVB
    )
    q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    g = _tile(GC + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
    g_last = _row(GC + bh * NP * DK, t0 + BT - 1, 0, DK, DK, BK)
    # the state part of the output: dq final, stored
    dq = scale * dos * tl.exp(g)
    tl.store(DQ + out, dq, mask=rk < DK)
    dgc = q * dq
    tl.store(DAQK + bh * NP * BT + rr * BT + jj, tl.where(ii >= jj, scale * dou, 0.0))
    # the state update's k exp(G_C - G)
    tail = tl.exp(g_last[None, :] - g)
    dk = dkbar * tail
    kbar_term = dkbar * k * tail
    dgc -= kbar_term
    g_end = tl.sum(kbar_term, axis=0) + tl.exp(g_last) * sdh
    tl.store(DK_ + out, dk, mask=rk < DK)  # (partial: back after the second loop)
    tl.store(DG + out, tl.where(ii == BT - 1, dgc + g_end[None, :], dgc), mask=rk < DK)
    # the UT transform's products over V, then the transform's backward
    beta = tl.load(BETA + bh * N + rows, mask=rows < N, other=0.0).to(tl.float32)
    tm = _tile(T + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
    dw, duxu, dxu_v = _ut_slices(
        V, DU, HS, DV_, tm, beta, bh, c, t0, n_chunks, N, NP, DK, DV, dt, DOT_PREC, BT, BK, BVB
    )
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)  # (again: not live through the second loop)
    # (the partial rows were stored by other threads of this program than may read them back: Triton
    # orders shared memory only, so a barrier orders the global stores before the loads below)
    tl.debug_barrier()
    eg = tl.exp(_tile(GC + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK))
    xw = k * eg * beta[:, None]
    dt_ = tl.dot((dw).to(dt), (tl.trans(xw)).to(dt), duxu, input_precision=DOT_PREC)
    dxw, da = _ut_transform_bwd_w(tm, dw, dt_, dt, DOT_PREC)
    da = tl.where(ii > jj, da, 0.0)
    tl.store(DBKK + bh * NP * BT + rr * BT + jj, da * beta[:, None])
    bkk = _tile(BKK + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
    db = tl.sum(da * tl.where(ii > jj, bkk, 0.0), axis=1)
    db += tl.sum(dxw * k * eg, axis=1) + dxu_v
    tl.store(DB + bh * N + rows, db, mask=rows < N)
    dk = tl.load(DK_ + out, mask=rk < DK, other=0.0) + dxw * eg * beta[:, None]
    tl.store(DK_ + out, dk, mask=rk < DK)
    dgc = tl.load(DG + out, mask=rk < DK, other=0.0) + dxw * xw
    tl.store(DG + out, dgc, mask=rk < DK)
