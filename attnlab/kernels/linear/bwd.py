# mypy: ignore-errors
"""The gated delta rule's exact reverse recurrence, token by token (the backward under per-channel gates,
KDA-style; gates shared by the channels take the chunked backward of ``chunk.py``)."""

from __future__ import annotations

import triton
import triton.language as tl


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
