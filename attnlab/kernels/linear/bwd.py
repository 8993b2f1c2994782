# mypy: ignore-errors
"""Triton backward kernels: dq/dk/dv of the chunked gated linear recurrence under per-channel gates (one
chunk per program; the scalar-gate one and the state-gradient pass are in ``chunk.py``), and the gated
delta rule's exact reverse recurrence.

Per chunk, with S the state at its start (saved by the forward), dH the gradient of the state at its end,
A_ij = sum_d q_id k_jd exp(G_id - G_jd) (j <= i) and dA_ij = do_i . v_j::

    dq_i = scale [ exp(G_i) * (S do_i) + sum_{j<=i} dA_ij k_j * exp(G_i - G_j) ]
    dk_j = scale sum_{i>=j} dA_ij q_i * exp(G_i - G_j) + exp(G_C - G_j) * (dH v_j)
    dv_j = scale sum_{i>=j} A_ij do_i + (k_j * exp(G_C - G_j)) dH
    dH_prev = exp(G_C) * dH + scale sum_i (q_i * exp(G_i)) do_i^T       (the state's gradient, backwards:
                                                                        ``chunk.py``'s stages 1 and 2)

The log-decays' gradient needs no kernel: dG_t = q_t * dq_t - k_t * dk_t per channel, plus at each
chunk's last row sum_v S_end * dS_end (the scan's tail), taken back through the cumsum by autograd.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.linear.fwd import _diag_scores, _row, _tile


@triton.jit
def _scores_t(q_ptr, k_ptr, g_ptr, ri, rj, N, DK, dt, BS: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr,
              DOT_PREC: tl.constexpr, DIAG: tl.constexpr):  # fmt: skip
    """A^T between query sub-block ri and key sub-block rj (rj < ri, or rj == ri with DIAG): rows are the
    keys. Built transposed (k q^T), never by transposing a dot's result: Triton 3.4 to 3.7.0 miscompiles
    tl.trans of a Hopper wgmma-layout tensor (fla issue #640)."""
    if DIAG:
        ii = tl.arange(0, BS)[:, None]
        jj = tl.arange(0, BS)[None, :]
        a = tl.where(ii >= jj, _diag_scores(q_ptr, k_ptr, g_ptr, ri, N, DK, BS, BK, BKS), 0.0)
        at = tl.trans(a)  # (an elementwise sum, not a dot result)
    else:
        q_i = _tile(q_ptr, ri, N, 0, DK, DK, BS, BK)
        g_i = _tile(g_ptr, ri, ri + BS, 0, DK, DK, BS, BK)
        k_j = _tile(k_ptr, rj, N, 0, DK, DK, BS, BK)
        g_j = _tile(g_ptr, rj, rj + BS, 0, DK, DK, BS, BK)
        g_n = _row(g_ptr, ri, 0, DK, DK, BK)
        q_n = (q_i * tl.exp(g_i - g_n[None, :])).to(dt)
        k_n = (k_j * tl.exp(g_n[None, :] - g_j)).to(dt)
        at = tl.dot(k_n, tl.trans(q_n), input_precision=DOT_PREC)
    return at


@triton.jit
def gla_bwd_kernel(
    Q, K, V, GC, DO, HS, DHS, DQ, DK_, DV_,
    N, NP, DK, DV, scale,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dq, dk, dv (float32) of one chunk per program (chunk, batch * head), from the saved state at the
    chunk's start (HS) and the state's gradient at its end (DHS). BV covers the whole value dim."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    q_ptr = Q + bh * N * DK
    k_ptr = K + bh * N * DK
    v_ptr = V + bh * N * DV
    do_ptr = DO + bh * N * DV
    g_ptr = GC + bh * NP * DK
    s_ptr = HS + (bh * n_chunks + c) * DK * DV
    dh_ptr = DHS + (bh * n_chunks + c) * DK * DV
    dq_ptr = DQ + bh * N * DK
    dk_ptr = DK_ + bh * N * DK
    dv_ptr = DV_ + bh * N * DV
    if UPCAST:  # noqa: SIM108  (Triton's CPU interpreter has no bfloat16 dot)
        dt = tl.float32
    else:
        dt = Q.dtype.element_ty
    t0 = c * BT
    ii = tl.arange(0, BS)[:, None]
    jj = tl.arange(0, BS)[None, :]
    low = (ii >= jj)[:, :, None]
    rs = tl.arange(0, BKS)[None, :]
    rv = tl.arange(0, BV)[None, :]
    g_last_row = t0 + BT - 1
    for i in range(BT // BS):  # runtime loops: unrolled, each 3-D product kept its own shared memory
        ri = t0 + i * BS
        do_i = _tile(do_ptr, ri, N, 0, DV, DV, BS, BV)
        v_i = _tile(v_ptr, ri, N, 0, DV, DV, BS, BV)
        da_ii = tl.where(ii >= jj, tl.dot(do_i.to(dt), tl.trans(v_i.to(dt)), input_precision=DOT_PREC), 0.0)
        # dv_i: the state part, then sum_{r>=i} A_ri^T do_r
        dv = tl.zeros((BS, BV), dtype=tl.float32)
        for s in range(BK // BKS):
            k_s = _tile(k_ptr, ri, N, s * BKS, DK, DK, BS, BKS)
            g_s = _tile(g_ptr, ri, NP, s * BKS, DK, DK, BS, BKS)
            gl_s = _row(g_ptr, g_last_row, s * BKS, DK, DK, BKS)
            dh_s = _tile(dh_ptr, s * BKS, DK, 0, DV, DV, BKS, BV)
            dv += tl.dot((k_s * tl.exp(gl_s[None, :] - g_s)).to(dt), dh_s.to(dt), input_precision=DOT_PREC)
        at = _scores_t(q_ptr, k_ptr, g_ptr, ri, ri, N, DK, dt, BS, BK, BKS, DOT_PREC, True)
        dv += scale * tl.dot(at.to(dt), do_i.to(dt), input_precision=DOT_PREC)
        for r in range(i + 1, BT // BS):
            rr = t0 + r * BS
            at = _scores_t(q_ptr, k_ptr, g_ptr, rr, ri, N, DK, dt, BS, BK, BKS, DOT_PREC, False)
            do_r = _tile(do_ptr, rr, N, 0, DV, DV, BS, BV)
            dv += scale * tl.dot(at.to(dt), do_r.to(dt), input_precision=DOT_PREC)
        tl.store(dv_ptr + (ri + ii) * DV + rv, dv, mask=(ri + ii < N) & (rv < DV))
        for s in range(BK // BKS):
            c0 = s * BKS
            g_is = _tile(g_ptr, ri, NP, c0, DK, DK, BS, BKS)
            q_is = _tile(q_ptr, ri, N, c0, DK, DK, BS, BKS)
            k_is = _tile(k_ptr, ri, N, c0, DK, DK, BS, BKS)
            e_diag = tl.exp(tl.where(low, g_is[:, None, :] - g_is[None, :, :], float("-inf")))  # (i, j, d)
            # dq_i
            s_s = _tile(s_ptr, c0, DK, 0, DV, DV, BKS, BV)
            dq = tl.exp(g_is) * tl.dot(do_i.to(dt), tl.trans(s_s.to(dt)), input_precision=DOT_PREC)
            g_n = _row(g_ptr, ri, c0, DK, DK, BKS)
            for j in range(i):
                rj = t0 + j * BS
                v_j = _tile(v_ptr, rj, N, 0, DV, DV, BS, BV)
                k_js = _tile(k_ptr, rj, N, c0, DK, DK, BS, BKS)
                g_js = _tile(g_ptr, rj, NP, c0, DK, DK, BS, BKS)
                da = tl.dot(do_i.to(dt), tl.trans(v_j.to(dt)), input_precision=DOT_PREC)
                k_n = (k_js * tl.exp(g_n[None, :] - g_js)).to(dt)
                dq += tl.dot(da.to(dt), k_n, input_precision=DOT_PREC) * tl.exp(g_is - g_n[None, :])
            dq += tl.sum(da_ii[:, :, None] * k_is[None, :, :] * e_diag, axis=1)
            tl.store(dq_ptr + (ri + ii) * DK + c0 + rs, dq * scale, mask=(ri + ii < N) & (c0 + rs < DK))
            # dk_i: the state part, the diagonal block, then the query sub-blocks after it
            gl_s = _row(g_ptr, g_last_row, c0, DK, DK, BKS)
            dh_s = _tile(dh_ptr, c0, DK, 0, DV, DV, BKS, BV)
            dk = tl.exp(gl_s[None, :] - g_is) * tl.dot(
                v_i.to(dt), tl.trans(dh_s.to(dt)), input_precision=DOT_PREC
            )
            dk += scale * tl.sum(da_ii[:, :, None] * q_is[:, None, :] * e_diag, axis=0)
            for r in range(i + 1, BT // BS):
                rr = t0 + r * BS
                do_r = _tile(do_ptr, rr, N, 0, DV, DV, BS, BV)
                q_rs = _tile(q_ptr, rr, N, c0, DK, DK, BS, BKS)
                g_rs = _tile(g_ptr, rr, NP, c0, DK, DK, BS, BKS)
                g_m = _row(g_ptr, rr, c0, DK, DK, BKS)
                # dA^T (i rows, r cols), built transposed (see _scores_t)
                da_t = tl.dot(v_i.to(dt), tl.trans(do_r.to(dt)), input_precision=DOT_PREC)
                q_m = (q_rs * tl.exp(g_rs - g_m[None, :])).to(dt)
                dk += scale * tl.dot(da_t.to(dt), q_m, input_precision=DOT_PREC) * tl.exp(g_m[None, :] - g_is)
            tl.store(dk_ptr + (ri + ii) * DK + c0 + rs, dk, mask=(ri + ii < N) & (c0 + rs < DK))


@triton.jit
def delta_bwd_kernel(
    Q, K, V, G, BETA, HS, DO, DHT, SCRATCH, DQ, DK_, DV_, DB, DG, DH0,
    N, DK, DV, NB, scale,
    HAS_G: tl.constexpr, HAS_DHT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """The gated delta rule's exact reverse recurrence, chunk by chunk backwards, per (value block,
    batch * head): each chunk's token states are recomputed from the saved state at its start into
    SCRATCH, then walked backwards. Per token (S' = exp(g) S_prev, r = S'^T k, u = beta (v - r),
    S = S' + k u^T, o = scale S^T q), with dS the gradient of S::

        dS += scale q do^T;  dq = scale S do;  dk = dS u;  du = dS^T k;  dv = beta du;
        dbeta = du . (v - r);  dr = -beta du;  dS' = dS + k dr^T;  dk += S' dr;
        dg = sum_v S' * dS';  dS_prev = exp(g) dS'

    dq, dk, dbeta and dg are partial sums over this value block (NB blocks, summed by the launcher)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < DK
    mv = pid_v * BV + rv < DV
    state_off = rk[:, None] * DV + pid_v * BV + rv[None, :]
    state_mask = mk[:, None] & mv[None, :]
    scratch_off = rk[:, None] * BV + rv[None, :]
    scratch = SCRATCH + (pid_v.to(tl.int64) * tl.num_programs(1) + bh) * BT * BK * BV
    part = pid_v.to(tl.int64) * tl.num_programs(1) * N  # this value block's rows of the partial sums
    if HAS_DHT:
        ds = tl.load(DHT + bh * DK * DV + state_off, mask=state_mask, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros((BK, BV), dtype=tl.float32)
    n_chunks = tl.cdiv(N, BT)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        s = tl.load(HS + (bh * n_chunks + c) * DK * DV + state_off, mask=state_mask, other=0.0)
        for tt in range(BT):  # recompute: SCRATCH[tt] = the state before token tt
            t = c * BT + tt
            if t < N:
                tl.store(scratch + tt * BK * BV + scratch_off, s)
                row = bh * N + t
                k = tl.load(K + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
                v = tl.load(V + row * DV + pid_v * BV + rv, mask=mv, other=0.0).to(tl.float32)
                if HAS_G:
                    g = tl.load(G + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
                    s = s * tl.exp(g)[:, None]
                beta = tl.load(BETA + row).to(tl.float32)
                u = beta * (v - tl.sum(s * k[:, None], axis=0))
                s = s + k[:, None] * u[None, :]
        for tt in range(BT):
            t = c * BT + BT - 1 - tt
            if t < N:
                row = bh * N + t
                s_prev = tl.load(scratch + (BT - 1 - tt) * BK * BV + scratch_off)
                q = tl.load(Q + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
                k = tl.load(K + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
                v = tl.load(V + row * DV + pid_v * BV + rv, mask=mv, other=0.0).to(tl.float32)
                do = tl.load(DO + row * DV + pid_v * BV + rv, mask=mv, other=0.0).to(tl.float32)
                beta = tl.load(BETA + row).to(tl.float32)
                if HAS_G:
                    g = tl.load(G + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
                    s1 = s_prev * tl.exp(g)[:, None]
                else:
                    s1 = s_prev
                r = tl.sum(s1 * k[:, None], axis=0)
                u = beta * (v - r)
                s_t = s1 + k[:, None] * u[None, :]
                dq = scale * tl.sum(s_t * do[None, :], axis=1)
                ds += scale * q[:, None] * do[None, :]
                dk = tl.sum(ds * u[None, :], axis=1)
                du = tl.sum(ds * k[:, None], axis=0)
                dbeta = tl.sum(du * (v - r), axis=0)
                dr = -beta * du
                ds = ds + k[:, None] * dr[None, :]
                dk += tl.sum(s1 * dr[None, :], axis=1)
                tl.store(DQ + part * DK + row * DK + rk, dq, mask=mk)
                tl.store(DK_ + part * DK + row * DK + rk, dk, mask=mk)
                tl.store(DV_ + row * DV + pid_v * BV + rv, beta * du, mask=mv)
                tl.store(DB + part + row, dbeta)
                if HAS_G:
                    tl.store(DG + part * DK + row * DK + rk, tl.sum(s1 * ds, axis=1), mask=mk)
                    ds = ds * tl.exp(g)[:, None]
    tl.store(DH0 + bh * DK * DV + state_off, ds, mask=state_mask)
