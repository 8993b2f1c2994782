# mypy: ignore-errors
"""Triton forward kernels of the gated linear recurrence (GLA; lightning and linear are special cases) and
the recurrent step kernel (decode) of it and of the gated delta rule.

Layout: q, k (B*H, N, K), v and o (B*H, N, V), contiguous; ``GC`` (B*H, NP, K) float32 is the chunk-local
inclusive cumsum of the log-decays g, zero-padded to NP = chunks * BT rows (zeros where there is no g).
The state tile S (K, V) is float32. Within a chunk, tokens are taken in 16-row sub-blocks: between two
sub-blocks the pairwise decay exp(G_i - G_j) is split at G_n, the first row of the query sub-block, into
exp(G_i - G_n) <= 1 and exp(G_n - G_j) <= 1 (tensor-core dots, nothing overflows); inside a sub-block it
is taken exactly, element by element, over slices of BKS key channels. See ``naive.py`` for the math.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(ptr, row0, n_rows, col0, n_cols, stride, BR: tl.constexpr, BC: tl.constexpr):
    """A (BR, BC) float32 tile from rows row0.. and columns col0.. of a row-major matrix; 0 outside."""
    r = row0 + tl.arange(0, BR)
    c = col0 + tl.arange(0, BC)
    m = (r[:, None] < n_rows) & (c[None, :] < n_cols)
    return tl.load(ptr + r[:, None] * stride + c[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _row(ptr, row, col0, n_cols, stride, BC: tl.constexpr):
    """One row (BC,) float32 of a row-major matrix; 0 outside."""
    c = col0 + tl.arange(0, BC)
    return tl.load(ptr + row * stride + c, mask=c < n_cols, other=0.0).to(tl.float32)


@triton.jit
def _diag_scores(q_ptr, k_ptr, g_ptr, r0, N, DK, BS: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr):
    """A_ij = sum_d q_id k_jd exp(G_id - G_jd) for j <= i inside one sub-block (0 above the diagonal)."""
    ii = tl.arange(0, BS)[:, None]
    jj = tl.arange(0, BS)[None, :]
    low = (ii >= jj)[:, :, None]
    a = tl.zeros((BS, BS), dtype=tl.float32)
    for s in range(BK // BKS):  # (a runtime loop: one 3-D product's shared memory, reused)
        qs = _tile(q_ptr, r0, N, s * BKS, DK, DK, BS, BKS)
        ks = _tile(k_ptr, r0, N, s * BKS, DK, DK, BS, BKS)
        gs = _tile(g_ptr, r0, r0 + BS, s * BKS, DK, DK, BS, BKS)
        e = tl.exp(tl.where(low, gs[:, None, :] - gs[None, :, :], float("-inf")))
        a += tl.sum(qs[:, None, :] * ks[None, :, :] * e, axis=2)
    return a


@triton.jit
def gla_fwd_kernel(
    Q, K, V, GC, H0, O, HT, HS,
    N, NP, DK, DV, scale,
    HAS_H0: tl.constexpr, SAVE_HS: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program per (value block, batch * head): the chunks in order, the state S in registers.
    Writes o, the final state HT and, with SAVE_HS, the state at the start of every chunk (HS)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    q_ptr = Q + bh * N * DK
    k_ptr = K + bh * N * DK
    v_ptr = V + bh * N * DV + pid_v * BV
    o_ptr = O + bh * N * DV + pid_v * BV
    g_ptr = GC + bh * NP * DK
    dv_left = DV - pid_v * BV
    if UPCAST:  # noqa: SIM108  (Triton's CPU interpreter has no bfloat16 dot)
        dt = tl.float32
    else:
        dt = O.dtype.element_ty
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    state_mask = (rk[:, None] < DK) & (rv[None, :] < dv_left)
    state_off = rk[:, None] * DV + pid_v * BV + rv[None, :]
    if HAS_H0:
        s = tl.load(H0 + bh * DK * DV + state_off, mask=state_mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BK, BV), dtype=tl.float32)
    ii = tl.arange(0, BS)[:, None]
    jj = tl.arange(0, BS)[None, :]
    n_chunks = tl.cdiv(N, BT)
    for c in range(n_chunks):
        t0 = c * BT
        if SAVE_HS:
            tl.store(HS + (bh * n_chunks + c) * DK * DV + state_off, s, mask=state_mask)
        s_dot = s.to(dt)
        for i in range(BT // BS):
            r0 = t0 + i * BS
            q_i = _tile(q_ptr, r0, N, 0, DK, DK, BS, BK)
            g_i = _tile(g_ptr, r0, NP, 0, DK, DK, BS, BK)
            acc = tl.dot((q_i * tl.exp(g_i)).to(dt), s_dot, input_precision=DOT_PREC)
            g_n = _row(g_ptr, r0, 0, DK, DK, BK)
            q_n = (q_i * tl.exp(g_i - g_n[None, :])).to(dt)
            for j in range(i):
                rj = t0 + j * BS
                k_j = _tile(k_ptr, rj, N, 0, DK, DK, BS, BK)
                g_j = _tile(g_ptr, rj, NP, 0, DK, DK, BS, BK)
                v_j = _tile(v_ptr, rj, N, 0, dv_left, DV, BS, BV)
                a = tl.dot(q_n, tl.trans((k_j * tl.exp(g_n[None, :] - g_j)).to(dt)), input_precision=DOT_PREC)
                acc += tl.dot(a.to(dt), v_j.to(dt), input_precision=DOT_PREC)
            a = _diag_scores(q_ptr, k_ptr, g_ptr, r0, N, DK, BS, BK, BKS)
            a = tl.where(ii >= jj, a, 0.0)
            v_i = _tile(v_ptr, r0, N, 0, dv_left, DV, BS, BV)
            acc += tl.dot(a.to(dt), v_i.to(dt), input_precision=DOT_PREC)
            r = r0 + ii
            tl.store(o_ptr + r * DV + tl.arange(0, BV)[None, :], (acc * scale).to(dt),
                     mask=(r < N) & (tl.arange(0, BV)[None, :] < dv_left))  # fmt: skip
        k_c = _tile(k_ptr, t0, N, 0, DK, DK, BT, BK)
        v_c = _tile(v_ptr, t0, N, 0, dv_left, DV, BT, BV)
        g_c = _tile(g_ptr, t0, NP, 0, DK, DK, BT, BK)
        g_last = _row(g_ptr, t0 + BT - 1, 0, DK, DK, BK)
        k_d = (k_c * tl.exp(g_last[None, :] - g_c)).to(dt)
        s = s * tl.exp(g_last)[:, None] + tl.dot(tl.trans(k_d), v_c.to(dt), input_precision=DOT_PREC)
    tl.store(HT + bh * DK * DV + state_off, s, mask=state_mask)


@triton.jit
def recurrent_step_kernel(
    Q, K, V, G, BETA, H0, O, HT,
    N, DK, DV, scale,
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, DELTA: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Decode: a few tokens, one at a time, per (value block, batch * head). G (B*H, N, K) log-decays,
    BETA (B*H, N) (DELTA only). Gated linear: S = exp(g) S + k v^T; delta: S' = exp(g) S,
    u = beta (v - S'^T k), S = S' + k u^T; then o = scale S^T q. fp32 state."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < DK
    mv = pid_v * BV + rv < DV
    state_off = rk[:, None] * DV + pid_v * BV + rv[None, :]
    state_mask = mk[:, None] & mv[None, :]
    if HAS_H0:
        s = tl.load(H0 + bh * DK * DV + state_off, mask=state_mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BK, BV), dtype=tl.float32)
    for t in range(N):
        row = bh * N + t
        q = tl.load(Q + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(K + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(V + row * DV + pid_v * BV + rv, mask=mv, other=0.0).to(tl.float32)
        if HAS_G:
            g = tl.load(G + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
            s = s * tl.exp(g)[:, None]
        if DELTA:
            beta = tl.load(BETA + row).to(tl.float32)
            v = beta * (v - tl.sum(s * k[:, None], axis=0))
        s = s + k[:, None] * v[None, :]
        o = tl.sum(s * q[:, None], axis=0) * scale
        tl.store(O + row * DV + pid_v * BV + rv, o.to(O.dtype.element_ty), mask=mv)
    tl.store(HT + bh * DK * DV + state_off, s, mask=state_mask)


@triton.jit
def delta_fwd_kernel(
    Q, K, V, G, BETA, H0, O, HT, HS,
    N, DK, DV, scale,
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, SAVE_HS: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """The gated delta rule token by token, per (value block, batch * head) (the state's value columns
    evolve independently), saving the state at the start of every chunk of BT tokens for the backward.
    S' = exp(g_t) S; u = beta_t (v_t - S'^T k_t); S = S' + k_t u^T; o_t = scale S^T q_t."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < DK
    mv = pid_v * BV + rv < DV
    state_off = rk[:, None] * DV + pid_v * BV + rv[None, :]
    state_mask = mk[:, None] & mv[None, :]
    if HAS_H0:
        s = tl.load(H0 + bh * DK * DV + state_off, mask=state_mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BK, BV), dtype=tl.float32)
    n_chunks = tl.cdiv(N, BT)
    for c in range(n_chunks):
        if SAVE_HS:
            tl.store(HS + (bh * n_chunks + c) * DK * DV + state_off, s, mask=state_mask)
        for tt in range(BT):
            t = c * BT + tt
            if t < N:
                row = bh * N + t
                q = tl.load(Q + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
                k = tl.load(K + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
                v = tl.load(V + row * DV + pid_v * BV + rv, mask=mv, other=0.0).to(tl.float32)
                if HAS_G:
                    g = tl.load(G + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
                    s = s * tl.exp(g)[:, None]
                beta = tl.load(BETA + row).to(tl.float32)
                u = beta * (v - tl.sum(s * k[:, None], axis=0))
                s = s + k[:, None] * u[None, :]
                o = tl.sum(s * q[:, None], axis=0) * scale
                tl.store(O + row * DV + pid_v * BV + rv, o.to(O.dtype.element_ty), mask=mv)
    tl.store(HT + bh * DK * DV + state_off, s, mask=state_mask)
