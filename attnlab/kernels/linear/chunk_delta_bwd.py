# mypy: ignore-errors
"""The per-chunk backward kernels of the gated delta rule: every chunk's gradients in parallel from the
forward's saved S (the states at the chunk starts), U and T and the reverse pass's dH and dU
(``delta_bwd_dh_kernel`` in ``chunk_state.py``).

- A gate shared by the channels (Gated DeltaNet's per-head gate, plain DeltaNet):
  :func:`delta_bwd_chunk_kernel` (the fused q/k L2 norm's Jacobian folded in).
- Per-channel gates (KDA-style): :func:`delta_bwd_chunk_channel_kernel`, then the intra-chunk scores' own
  gradients by ``score_bwd_kernel`` (``chunk_scores.py``).

Both read a chunk's tiles (:func:`_chunk_tiles`) and go back through the UT transform
(:func:`_ut_transform_bwd`) alike, or, with ``BVB`` > 0 (``op.DELTA_BWD_BVB``), loop over the value dim in
slices of BVB columns (:func:`_value_slices`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.linear.fwd import _row, _tile


@triton.jit
def _chunk_tiles(
    Q, K, V, DO, U, DU, HS, DHS, T, bh, c, t0, n_chunks,
    N, NP, DK, DV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Chunk c's tiles (float32) that both backward kernels read: q, k (BT, BK) and v, do (BT, BV) of its
    rows; the forward's U and the reverse pass's dU (BT, BV; NP rows per head); S, the state at the chunk's
    start, and dH, its gradient at the chunk's end (BK, BV); T (BT, BT)."""
    q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    v = _tile(V + bh * N * DV, t0, N, 0, DV, DV, BT, BV)
    do = _tile(DO + bh * N * DV, t0, N, 0, DV, DV, BT, BV)
    u = _tile(U + bh * NP * DV, t0, NP, 0, DV, DV, BT, BV)
    du = _tile(DU + bh * NP * DV, t0, NP, 0, DV, DV, BT, BV)
    s = _tile(HS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV)
    dh = _tile(DHS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV)
    tm = _tile(T + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
    return q, k, v, do, u, du, s, dh, tm


@triton.jit
def _ut_transform_bwd(tm, dw, du, dtm, dt: tl.constexpr, DOT_PREC: tl.constexpr):
    """Back through the UT transform (W = T X_w, U = T X_u - W S) from dW, dU and dT (``dtm``):
    (dX_w = T^T dW, dX_u = T^T dU, dA = -T^T dT T^T), dA not yet masked to A_kk's strict lower part. Dot
    operands in ``dt``, accumulation in float32."""
    dxw = tl.dot((tl.trans(tm)).to(dt), (dw).to(dt), input_precision=DOT_PREC)
    dxu = tl.dot((tl.trans(tm)).to(dt), (du).to(dt), input_precision=DOT_PREC)
    da = -tl.dot(
        (tl.dot((tl.trans(tm)).to(dt), (dtm).to(dt), input_precision=DOT_PREC)).to(dt),
        (tl.trans(tm)).to(dt),
        input_precision=DOT_PREC,
    )
    return dxw, dxu, da


@triton.jit
def _ut_transform_bwd_w(tm, dw, dtm, dt: tl.constexpr, DOT_PREC: tl.constexpr):
    """:func:`_ut_transform_bwd` without dX_u (made per value slice by :func:`_value_slices`):
    (dX_w = T^T dW, dA = -T^T dT T^T), dA not yet masked."""
    dxw = tl.dot((tl.trans(tm)).to(dt), (dw).to(dt), input_precision=DOT_PREC)
    da = -tl.dot(
        (tl.dot((tl.trans(tm)).to(dt), (dtm).to(dt), input_precision=DOT_PREC)).to(dt),
        (tl.trans(tm)).to(dt),
        input_precision=DOT_PREC,
    )
    return dxw, da


@triton.jit
def _value_slices(
    V, DO, U, DU, HS, DHS, DV_, tm, beta, bh, c, t0, n_chunks,
    N, NP, DK, DV,
    dt: tl.constexpr, DOT_PREC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BVB: tl.constexpr,
    TWINS: tl.constexpr,
):  # fmt: skip
    """Chunk c's products that sum over the value dim, from slices of BVB value columns (v, do, u, du
    (BT, BVB) of its rows, S and dH (BK, BVB)), accumulated in float32 over the slices:
    (do S^T, do U^T, U do^T, U dH^T, dW = -dU S^T, dW^T = -S dU^T, dU X_u^T, X_u dU^T, sum_v S * dH per
    row of S (BK,), rowsum(dX_u * v) (BT,)), X_u = beta v. The transposed twins (U do^T, dW^T, X_u dU^T)
    only with ``TWINS`` (else zeros), built transposed. dX_u = T^T dU is per slice: dv = beta dX_u is
    stored here (DV_'s dtype, rows < N). Dot operands in ``dt``."""
    rr = (t0 + tl.arange(0, BT))[:, None]
    state = (bh * n_chunks + c) * DK * DV
    tm_t = (tl.trans(tm)).to(dt)
    dos = tl.zeros((BT, BK), dtype=tl.float32)
    dou = tl.zeros((BT, BT), dtype=tl.float32)
    udo = tl.zeros((BT, BT), dtype=tl.float32)
    dkbar = tl.zeros((BT, BK), dtype=tl.float32)
    dus = tl.zeros((BT, BK), dtype=tl.float32)
    sdu = tl.zeros((BK, BT), dtype=tl.float32)
    duxu = tl.zeros((BT, BT), dtype=tl.float32)
    xudu = tl.zeros((BT, BT), dtype=tl.float32)
    sdh = tl.zeros((BK,), dtype=tl.float32)
    dxu_v = tl.zeros((BT,), dtype=tl.float32)
    # (loads one slice ahead: the kernel's num_stages=3 would buffer three slices of u, du, S, dH, 278-303 KiB
    # of shared memory on sm_90 at K = V = 128, BVB = 64)
    for v0 in tl.range(0, DV, BVB, num_stages=2):
        v = _tile(V + bh * N * DV, t0, N, v0, DV, DV, BT, BVB)
        do = _tile(DO + bh * N * DV, t0, N, v0, DV, DV, BT, BVB)
        u = _tile(U + bh * NP * DV, t0, NP, v0, DV, DV, BT, BVB)
        du = _tile(DU + bh * NP * DV, t0, NP, v0, DV, DV, BT, BVB)
        s = _tile(HS + state, 0, DK, v0, DV, DV, BK, BVB)
        dh = _tile(DHS + state, 0, DK, v0, DV, DV, BK, BVB)
        xu = v * beta[:, None]
        dos = tl.dot((do).to(dt), (tl.trans(s)).to(dt), dos, input_precision=DOT_PREC)
        dou = tl.dot((do).to(dt), (tl.trans(u)).to(dt), dou, input_precision=DOT_PREC)
        dkbar = tl.dot((u).to(dt), (tl.trans(dh)).to(dt), dkbar, input_precision=DOT_PREC)
        dus = tl.dot((du).to(dt), (tl.trans(s)).to(dt), dus, input_precision=DOT_PREC)
        duxu = tl.dot((du).to(dt), (tl.trans(xu)).to(dt), duxu, input_precision=DOT_PREC)
        if TWINS:
            udo = tl.dot((u).to(dt), (tl.trans(do)).to(dt), udo, input_precision=DOT_PREC)
            sdu = tl.dot((s).to(dt), (tl.trans(du)).to(dt), sdu, input_precision=DOT_PREC)
            xudu = tl.dot((xu).to(dt), (tl.trans(du)).to(dt), xudu, input_precision=DOT_PREC)
        sdh += tl.sum(s * dh, axis=1)
        dxu = tl.dot(tm_t, (du).to(dt), input_precision=DOT_PREC)
        dxu_v += tl.sum(dxu * v, axis=1)
        rv = v0 + tl.arange(0, BVB)[None, :]
        dv = dxu * beta[:, None]
        tl.store(DV_ + bh * N * DV + rr * DV + rv, dv.to(DV_.dtype.element_ty), mask=(rr < N) & (rv < DV))
    return dos, dou, udo, dkbar, -dus, -sdu, duxu, xudu, sdh, dxu_v


@triton.jit
def _scalar_tail(
    DK_, DB, DG, RK, k, dk, dgc, dxw, da, kk, ds, beta, eg, g_end, dxu_v, rows, bh, N, NP, DK,
    BT: tl.constexpr, BK: tl.constexpr, L2NORM: tl.constexpr,
):  # fmt: skip
    """The scalar-gate per-chunk backward's last terms and stores (:func:`delta_bwd_chunk_kernel` with value
    slices, and ``chunk_delta_bwd_split``'s kernel): given k (BT, BK), dk so far, the gate-cumsum gradient
    dgc (BT,) so far, dX_w (BT, BK), the masked dA and k k^T (BT, BT), the strict decays Ds, beta and
    exp(G) (BT,), the chunk-end term g_end and rowsum(dX_u * v): adds dbeta = rowsum(dA * k k^T * Ds) +
    rowsum(dX_w * k exp(G)) + rowsum(dX_u * v), dk += beta exp(G) dX_w, dgc += rowsum(P) - colsum(P)
    (P = beta_i dA * k k^T * Ds) + rowsum(dX_w * X_w) and g_end on the last row; with ``L2NORM`` the norm's
    Jacobian on dk (k the normalised rows, RK the reciprocal norms); stores dk, dbeta, dgc."""
    rr = rows[:, None]
    rk = tl.arange(0, BK)[None, :]
    p2 = da * kk * ds
    db = tl.sum(p2, axis=1)
    p2 = p2 * beta[:, None]
    dgc += tl.sum(p2, axis=1) - tl.sum(p2, axis=0)
    dk += dxw * (beta * eg)[:, None]
    dxw_k = tl.sum(dxw * k * eg[:, None], axis=1)
    db += dxw_k + dxu_v
    dgc += beta * dxw_k  # (rowsum(dX_w * X_w))
    dgc += tl.where(tl.arange(0, BT) == BT - 1, g_end, 0.0)
    if L2NORM:  # the norm's Jacobian (k is the normalised rows; padded rows are zero)
        rkn = tl.load(RK + bh * N + rows, mask=rows < N, other=0.0)
        dk = (dk - k * tl.sum(k * dk, axis=1)[:, None]) * rkn[:, None]
    tl.store(DK_ + bh * N * DK + rr * DK + rk, dk.to(DK_.dtype.element_ty), mask=(rr < N) & (rk < DK))
    tl.store(DB + bh * N + rows, db, mask=rows < N)
    tl.store(DG + bh * NP + rows, dgc)


@triton.jit
def delta_bwd_chunk_kernel(
    Q, K, V, BETA, GC, DO, HS, DHS, U, DU, T, DQ, DK_, DV_, DB, DG, RQ, RK,
    N, NP, DK, DV, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    L2NORM: tl.constexpr = False, BVB: tl.constexpr = 0, TRANS: tl.constexpr = False,
):  # fmt: skip
    """The delta rule's gradients of one chunk per program (chunk, batch * head), scalar gate, from the
    forward's S (state at the chunk start), U (the chunk's u), T = (I + A_kk)^-1, and the backward pass's
    dH (state gradient at the chunk end) and dU. With D_ij = exp(G_i - G_j) (i >= j), Ds its strict part,
    X_w = beta k exp(G), X_u = beta v (W = T X_w, U = T X_u - W S)::

        dq = scale [exp(G) (do S^T) + ((do U^T) * D) k]
        dk = scale ((U do^T) * D^T) q + exp(G_C - G) (U dH^T) + (dA * Ds beta_i) k + ((dA * Ds beta_i)^T) k
             + beta exp(G) dX_w
        dW = -dU S^T;  dT = dW X_w^T + dU X_u^T;  dX_w = T^T dW;  dX_u = T^T dU;  dA = -T^T dT T^T (strict)
        dv = beta dX_u;  dbeta = rowsum(dA * (k k^T * Ds)) + rowsum(dX_w * k exp(G)) + rowsum(dX_u * v)

    and the gradient of the chunk-local cumsum G per token (DG: rows of the chunk, the chunk-end terms
    exp(G_C) sum(S * dH) + sum(U dH^T * k exp(G_C - G)) on its last row). dq, dk, dv in DQ's, DK_'s,
    DV_'s dtypes. Transposed products are built
    transposed, never by transposing a dot's result. Dot operands in the input dtype (float32 in the CPU
    interpreter), accumulation in float32; BK, BV cover the head dims.

    ``BVB`` (``op.DELTA_BWD_BVB``): 0 holds v, do, U, dU (BT, BV) and S, dH (BK, BV) whole; a power of two
    <= BV loops over V in slices of BVB columns (:func:`_value_slices`, masked on DV), accumulating in
    float32 what sums over V (do S^T, do U^T and U do^T, U dH^T, dW and dW^T, dU X_u^T and X_u dU^T,
    sum(S * dH), rowsum(dX_u * v)) and storing dv = beta T^T dU per slice; dT, dX_w and dA follow from the
    full dW after the loop. Fewer live registers (K = V = 128, chunk 64: the whole tiles spill).

    ``L2NORM`` (the fused q/k L2 normalisation): Q and K hold the normalised rows q^ = q rstd_q, RQ and RK
    (B*H, N) float32 the reciprocal norms; the stored dq, dk are then the gradients of the raw q, k,
    through the norm's Jacobian applied here: dq = rstd_q (dq^ - q^ sum(q^ dq^)) (and dk alike)."""
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
    if BVB == 0:  # the whole V tile at once
        q, k, v, do, u, du, s, dh, tm = _chunk_tiles(
            Q, K, V, DO, U, DU, HS, DHS, T, bh, c, t0, n_chunks, N, NP, DK, DV, BT, BK, BV
        )
        beta = tl.load(BETA + bh * N + rows, mask=rows < N, other=0.0).to(tl.float32)
        g = tl.load(GC + bh * NP + rows)
        g_last = tl.load(GC + bh * NP + t0 + BT - 1)
        eg = tl.exp(g)
        tail = tl.exp(g_last - g)
        d = tl.exp(tl.where(ii >= jj, g[:, None] - g[None, :], float("-inf")))
        d_t = tl.exp(tl.where(ii <= jj, g[None, :] - g[:, None], float("-inf")))
        ds = tl.where(ii > jj, d, 0.0)
        ds_t = tl.where(ii < jj, d_t, 0.0)
        # the output's intra-chunk scores and the state part
        dq = scale * tl.dot((do).to(dt), (tl.trans(s)).to(dt), input_precision=DOT_PREC) * eg[:, None]
        dgc = tl.sum(q * dq, axis=1)
        da_qk = scale * tl.dot((do).to(dt), (tl.trans(u)).to(dt), input_precision=DOT_PREC) * d
        dq += tl.dot((da_qk).to(dt), (k).to(dt), input_precision=DOT_PREC)
        p = da_qk * tl.dot(
            (q).to(dt), (tl.trans(k)).to(dt), input_precision=DOT_PREC
        )  # dAqk * Aqk (da_qk holds D once)
        dgc += tl.sum(p, axis=1) - tl.sum(p, axis=0)
        da_qk_t = scale * tl.dot((u).to(dt), (tl.trans(do)).to(dt), input_precision=DOT_PREC) * d_t
        dk = tl.dot((da_qk_t).to(dt), (q).to(dt), input_precision=DOT_PREC)
        # the state update's k exp(G_C - G)
        dkbar = tl.dot((u).to(dt), (tl.trans(dh)).to(dt), input_precision=DOT_PREC)
        dk += dkbar * tail[:, None]
        kbar_term = tl.sum(dkbar * k, axis=1) * tail
        dgc -= kbar_term
        g_end = tl.sum(kbar_term, axis=0) + tl.exp(g_last) * tl.sum(tl.sum(s * dh, axis=1), axis=0)
        # the UT transform
        xw = k * (beta * eg)[:, None]
        xu = v * beta[:, None]
        dw = -tl.dot((du).to(dt), (tl.trans(s)).to(dt), input_precision=DOT_PREC)
        dw_t = -tl.dot((s).to(dt), (tl.trans(du)).to(dt), input_precision=DOT_PREC)
        dt_ = tl.dot((dw).to(dt), (tl.trans(xw)).to(dt), input_precision=DOT_PREC) + tl.dot(
            (du).to(dt), (tl.trans(xu)).to(dt), input_precision=DOT_PREC
        )
        dt_t = tl.dot((xw).to(dt), (dw_t).to(dt), input_precision=DOT_PREC) + tl.dot(
            (xu).to(dt), (tl.trans(du)).to(dt), input_precision=DOT_PREC
        )
        dxw, dxu, da = _ut_transform_bwd(tm, dw, du, dt_, dt, DOT_PREC)
        da_t = -tl.dot(
            (tl.dot((tm).to(dt), (dt_t).to(dt), input_precision=DOT_PREC)).to(dt),
            (tm).to(dt),
            input_precision=DOT_PREC,
        )
        da = tl.where(ii > jj, da, 0.0)
        da_t = tl.where(ii < jj, da_t, 0.0)
        kk = tl.dot((k).to(dt), (tl.trans(k)).to(dt), input_precision=DOT_PREC)
        dab = da * ds * beta[:, None]
        dab_t = da_t * ds_t * beta[None, :]
        dk += tl.dot((dab).to(dt), (k).to(dt), input_precision=DOT_PREC) + tl.dot(
            (dab_t).to(dt), (k).to(dt), input_precision=DOT_PREC
        )
        p2 = da * kk * ds
        db = tl.sum(p2, axis=1)
        p2 = p2 * beta[:, None]
        dgc += tl.sum(p2, axis=1) - tl.sum(p2, axis=0)
        dk += dxw * (beta * eg)[:, None]
        db += tl.sum(dxw * k * eg[:, None], axis=1) + tl.sum(dxu * v, axis=1)
        dgc += tl.sum(dxw * xw, axis=1)
        dgc += tl.where(tl.arange(0, BT) == BT - 1, g_end, 0.0)
        rr = rows[:, None]
        rk = tl.arange(0, BK)[None, :]
        rv = tl.arange(0, BV)[None, :]
        if L2NORM:  # the norm's Jacobian (q, k are the normalised rows; padded rows are zero)
            rq = tl.load(RQ + bh * N + rows, mask=rows < N, other=0.0)
            rkn = tl.load(RK + bh * N + rows, mask=rows < N, other=0.0)
            dq = (dq - q * tl.sum(q * dq, axis=1)[:, None]) * rq[:, None]
            dk = (dk - k * tl.sum(k * dk, axis=1)[:, None]) * rkn[:, None]
        tl.store(DQ + bh * N * DK + rr * DK + rk, dq.to(DQ.dtype.element_ty), mask=(rr < N) & (rk < DK))
        tl.store(DK_ + bh * N * DK + rr * DK + rk, dk.to(DK_.dtype.element_ty), mask=(rr < N) & (rk < DK))
        dv = dxu * beta[:, None]
        tl.store(DV_ + bh * N * DV + rr * DV + rv, dv.to(DV_.dtype.element_ty), mask=(rr < N) & (rv < DV))
        tl.store(DB + bh * N + rows, db, mask=rows < N)
        tl.store(DG + bh * NP + rows, dgc)
    else:  # slices of BVB value columns, the products over V accumulated (_value_slices)
        tl.static_assert(BVB <= BV)
        tm = _tile(T + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
        beta = tl.load(BETA + bh * N + rows, mask=rows < N, other=0.0).to(tl.float32)
        dos, dou, udo, dkbar, dw, dw_t, duxu, xudu, sdh, dxu_v = _value_slices(
            V, DO, U, DU, HS, DHS, DV_, tm, beta, bh, c, t0, n_chunks, N, NP, DK, DV,
            dt, DOT_PREC, BT, BK, BVB, not TRANS,
        )  # fmt: skip
        # (what the loop does not read is loaded after it: fewer live registers across it)
        q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
        k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
        g = tl.load(GC + bh * NP + rows)
        g_last = tl.load(GC + bh * NP + t0 + BT - 1)
        eg = tl.exp(g)
        tail = tl.exp(g_last - g)
        d = tl.exp(tl.where(ii >= jj, g[:, None] - g[None, :], float("-inf")))
        d_t = tl.exp(tl.where(ii <= jj, g[None, :] - g[:, None], float("-inf")))
        ds = tl.where(ii > jj, d, 0.0)
        ds_t = tl.where(ii < jj, d_t, 0.0)
        # the output's intra-chunk scores and the state part
        dq = scale * dos * eg[:, None]
        dgc = tl.sum(q * dq, axis=1)
        da_qk = scale * dou * d
        dq += tl.dot((da_qk).to(dt), (k).to(dt), input_precision=DOT_PREC)
        p = da_qk * tl.dot((q).to(dt), (tl.trans(k)).to(dt), input_precision=DOT_PREC)
        dgc += tl.sum(p, axis=1) - tl.sum(p, axis=0)
        if TRANS:  # (the transposed twins as transposes: U do^T = (do U^T)^T)
            dk = tl.dot((tl.trans(da_qk)).to(dt), (q).to(dt), input_precision=DOT_PREC)
        else:
            da_qk_t = scale * udo * d_t
            dk = tl.dot((da_qk_t).to(dt), (q).to(dt), input_precision=DOT_PREC)
        # dq is final here: stored now, so that neither it nor q stays live through the UT part
        rr = rows[:, None]
        rk = tl.arange(0, BK)[None, :]
        if L2NORM:  # the norm's Jacobian (q is the normalised rows; padded rows are zero)
            rq = tl.load(RQ + bh * N + rows, mask=rows < N, other=0.0)
            dq = (dq - q * tl.sum(q * dq, axis=1)[:, None]) * rq[:, None]
        tl.store(DQ + bh * N * DK + rr * DK + rk, dq.to(DQ.dtype.element_ty), mask=(rr < N) & (rk < DK))
        # the state update's k exp(G_C - G)
        dk += dkbar * tail[:, None]
        kbar_term = tl.sum(dkbar * k, axis=1) * tail
        dgc -= kbar_term
        g_end = tl.sum(kbar_term, axis=0) + tl.exp(g_last) * tl.sum(sdh, axis=0)
        # the UT transform (dU X_u^T and X_u dU^T summed over the slices)
        # (X_w only as a dot operand, in its dtype: its float32 uses below go through k)
        xw = (k * (beta * eg)[:, None]).to(dt)
        dt_ = tl.dot((dw).to(dt), tl.trans(xw), duxu, input_precision=DOT_PREC)
        dxw, da = _ut_transform_bwd_w(tm, dw, dt_, dt, DOT_PREC)
        da = tl.where(ii > jj, da, 0.0)
        kk = tl.dot((k).to(dt), (tl.trans(k)).to(dt), input_precision=DOT_PREC)
        dab = da * ds * beta[:, None]
        if TRANS:  # (dA^T = -T dT^T T = the transpose of dA = -T^T dT T^T: dab_t = dab^T)
            dk += tl.dot((dab + tl.trans(dab)).to(dt), (k).to(dt), input_precision=DOT_PREC)
        else:
            dt_t = tl.dot(xw, (dw_t).to(dt), xudu, input_precision=DOT_PREC)
            da_t = -tl.dot(
                (tl.dot((tm).to(dt), (dt_t).to(dt), input_precision=DOT_PREC)).to(dt),
                (tm).to(dt),
                input_precision=DOT_PREC,
            )
            da_t = tl.where(ii < jj, da_t, 0.0)
            dab_t = da_t * ds_t * beta[None, :]
            dk += tl.dot((dab).to(dt), (k).to(dt), input_precision=DOT_PREC) + tl.dot(
                (dab_t).to(dt), (k).to(dt), input_precision=DOT_PREC
            )
        _scalar_tail(
            DK_, DB, DG, RK, k, dk, dgc, dxw, da, kk, ds, beta, eg, g_end, dxu_v, rows, bh, N, NP, DK,
            BT, BK, L2NORM,
        )  # fmt: skip


@triton.jit
def delta_bwd_chunk_channel_kernel(
    Q, K, V, BETA, GC, DO, HS, DHS, U, DU, T, BKK, DQ, DK_, DV_, DB, DG, DAQK, DBKK,
    N, NP, DK, DV, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BVB: tl.constexpr = 0,
):  # fmt: skip
    """The delta rule's gradients of one chunk per program (chunk, batch * head) under per-channel gates,
    but for the intra-chunk scores' own (left to :func:`score_bwd_kernel`): as
    :func:`delta_bwd_chunk_kernel` with exp(G) per channel, writing float32 partial dq, dk (state and UT
    parts), dv, dbeta, DG (per channel; the chunk-end terms exp(G_C) sum_v S * dH + sum_i dKbar * Kbar on
    the last row), and the score gradients DAQK = scale (do U^T) (i >= j) and DBKK = beta_i dA (i > j) of
    Aqk and of the unscaled strict key scores B (BKK, so that dbeta = rowsum(dA * B) needs no division).

    ``BVB``: as :func:`delta_bwd_chunk_kernel`'s (0: the whole V tile; else slices of BVB value columns,
    the products over V accumulated by :func:`_value_slices`, without the transposed twins)."""
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
    if BVB == 0:  # the whole V tile at once
        q, k, v, do, u, du, s, dh, tm = _chunk_tiles(
            Q, K, V, DO, U, DU, HS, DHS, T, bh, c, t0, n_chunks, N, NP, DK, DV, BT, BK, BV
        )
        bkk = _tile(BKK + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
        beta = tl.load(BETA + bh * N + rows, mask=rows < N, other=0.0).to(tl.float32)
        g = _tile(GC + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
        g_last = _row(GC + bh * NP * DK, t0 + BT - 1, 0, DK, DK, BK)
        eg = tl.exp(g)
        tail = tl.exp(g_last[None, :] - g)
        # the state part of the output
        dq = scale * tl.dot((do).to(dt), (tl.trans(s)).to(dt), input_precision=DOT_PREC) * eg
        dgc = q * dq
        daqk = tl.where(
            ii >= jj, scale * tl.dot((do).to(dt), (tl.trans(u)).to(dt), input_precision=DOT_PREC), 0.0
        )
        tl.store(DAQK + bh * NP * BT + rows[:, None] * BT + jj, daqk)
        # the state update's k exp(G_C - G)
        dkbar = tl.dot((u).to(dt), (tl.trans(dh)).to(dt), input_precision=DOT_PREC)
        dk = dkbar * tail
        kbar_term = dkbar * k * tail
        dgc -= kbar_term
        g_end = tl.sum(kbar_term, axis=0) + tl.exp(g_last) * tl.sum(s * dh, axis=1)
        # the UT transform
        xw = k * eg * beta[:, None]
        xu = v * beta[:, None]
        dw = -tl.dot((du).to(dt), (tl.trans(s)).to(dt), input_precision=DOT_PREC)
        dt_ = tl.dot((dw).to(dt), (tl.trans(xw)).to(dt), input_precision=DOT_PREC) + tl.dot(
            (du).to(dt), (tl.trans(xu)).to(dt), input_precision=DOT_PREC
        )
        dxw, dxu, da = _ut_transform_bwd(tm, dw, du, dt_, dt, DOT_PREC)
        da = tl.where(ii > jj, da, 0.0)
        tl.store(DBKK + bh * NP * BT + rows[:, None] * BT + jj, da * beta[:, None])
        db = tl.sum(da * tl.where(ii > jj, bkk, 0.0), axis=1)
        dk += dxw * eg * beta[:, None]
        db += tl.sum(dxw * k * eg, axis=1) + tl.sum(dxu * v, axis=1)
        dgc += dxw * xw
        dgc = tl.where(ii == BT - 1, dgc + g_end[None, :], dgc)
        rr = rows[:, None]
        rk = tl.arange(0, BK)[None, :]
        rv = tl.arange(0, BV)[None, :]
        tl.store(DQ + bh * NP * DK + rr * DK + rk, dq, mask=rk < DK)
        tl.store(DK_ + bh * NP * DK + rr * DK + rk, dk, mask=rk < DK)
        dv = dxu * beta[:, None]
        tl.store(DV_ + bh * N * DV + rr * DV + rv, dv.to(DV_.dtype.element_ty), mask=(rr < N) & (rv < DV))
        tl.store(DB + bh * N + rows, db, mask=rows < N)
        tl.store(DG + bh * NP * DK + rr * DK + rk, dgc, mask=rk < DK)
    else:  # slices of BVB value columns, the products over V accumulated (_value_slices)
        tl.static_assert(BVB <= BV)
        tm = _tile(T + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
        beta = tl.load(BETA + bh * N + rows, mask=rows < N, other=0.0).to(tl.float32)
        dos, dou, _, dkbar, dw, _, duxu, _, sdh, dxu_v = _value_slices(
            V, DO, U, DU, HS, DHS, DV_, tm, beta, bh, c, t0, n_chunks, N, NP, DK, DV,
            dt, DOT_PREC, BT, BK, BVB, False,
        )  # fmt: skip
        # (what the loop does not read is loaded after it: fewer live registers across it)
        q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
        k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
        bkk = _tile(BKK + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
        g = _tile(GC + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
        g_last = _row(GC + bh * NP * DK, t0 + BT - 1, 0, DK, DK, BK)
        eg = tl.exp(g)
        tail = tl.exp(g_last[None, :] - g)
        # the state part of the output
        dq = scale * dos * eg
        dgc = q * dq
        daqk = tl.where(ii >= jj, scale * dou, 0.0)
        tl.store(DAQK + bh * NP * BT + rows[:, None] * BT + jj, daqk)
        # the state update's k exp(G_C - G)
        dk = dkbar * tail
        kbar_term = dkbar * k * tail
        dgc -= kbar_term
        g_end = tl.sum(kbar_term, axis=0) + tl.exp(g_last) * sdh
        # the UT transform (dU X_u^T summed over the slices)
        xw = k * eg * beta[:, None]
        dt_ = tl.dot((dw).to(dt), (tl.trans(xw)).to(dt), duxu, input_precision=DOT_PREC)
        dxw, da = _ut_transform_bwd_w(tm, dw, dt_, dt, DOT_PREC)
        da = tl.where(ii > jj, da, 0.0)
        tl.store(DBKK + bh * NP * BT + rows[:, None] * BT + jj, da * beta[:, None])
        db = tl.sum(da * tl.where(ii > jj, bkk, 0.0), axis=1)
        dk += dxw * eg * beta[:, None]
        db += tl.sum(dxw * k * eg, axis=1) + dxu_v
        dgc += dxw * xw
        dgc = tl.where(ii == BT - 1, dgc + g_end[None, :], dgc)
        rr = rows[:, None]
        rk = tl.arange(0, BK)[None, :]
        tl.store(DQ + bh * NP * DK + rr * DK + rk, dq, mask=rk < DK)
        tl.store(DK_ + bh * NP * DK + rr * DK + rk, dk, mask=rk < DK)
        tl.store(DB + bh * N + rows, db, mask=rows < N)
        tl.store(DG + bh * NP * DK + rr * DK + rk, dgc, mask=rk < DK)
