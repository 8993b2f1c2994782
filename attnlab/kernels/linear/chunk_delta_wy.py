# mypy: ignore-errors
"""The UT transform of the gated delta rule (Yang et al., "Parallelizing Linear Transformers with the Delta
Rule"; Gated DeltaNet): per chunk, with A_kk the strict lower scores beta_i sum_d k_id k_jd
exp(G_id - G_jd), T = (I + A_kk)^-1, W = T (beta K exp(G)) and U0 = T (beta V), all parallel over chunks.

:func:`delta_wy_block_kernel` (``op.WY_BLOCKWISE``): A_kk by 16-row blocks of tensor-core dots, the
diagonal 16 x 16 blocks inverted by forward substitution side by side, the blocks below them by block
forward substitution with dots, W and U0 by dots per block. Or :func:`delta_wy_kernel`: forward
substitution row by row over the whole chunk. (Then the sequential pass over the chunk states,
``chunk_state.py``, and the output stage with v replaced by U, ``chunk_scores.py``.) Under per-channel
gates both read A_kk's blocks made by ``intra_scores``, or (``AKK_BETA`` False: ``op.DELTA_SAVE_SCORES``,
the backward keeps the scores without beta) the scores without beta, their rows multiplied by beta here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.linear.fwd import _tile


@triton.jit
def delta_wy_kernel(
    K, V, GC, BETA, AKK, W, U, TT,
    N, NP, DK, DV,
    GATE: tl.constexpr, SAVE_T: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
    AKK_BETA: tl.constexpr = True,
):  # fmt: skip
    """The delta rule's UT transform of one chunk per program (chunk, batch * head): T = (I + A_kk)^-1 by
    forward substitution (A_kk strict lower: beta_i sum_d k_id k_jd exp(G_id - G_jd); read from AKK when
    GATE == 2, made here otherwise), then W = T (beta k exp(G)) (B*H, NP, K) and U0 = T (beta v)
    (B*H, NP, V), float32 (dots in float32: ``DOT_PREC`` tf32 or ieee); with SAVE_T, T itself
    (B*H, NP, BT) for the backward. ``AKK_BETA`` (GATE == 2): AKK holds A_kk (beta in); False: it holds
    the scores without beta (``op.DELTA_SAVE_SCORES``), their rows multiplied by beta here."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t0 = c * BT
    ii = tl.arange(0, BT)[:, None]
    jj = tl.arange(0, BT)[None, :]
    rows = t0 + tl.arange(0, BT)
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    beta = tl.load(BETA + bh * N + rows, mask=rows < N, other=0.0).to(tl.float32)
    if GATE == 2:
        g = _tile(GC + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
        kg = k * tl.exp(g)
        a = _tile(AKK + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
        if not AKK_BETA:  # (the scores without beta: the rows times beta, as intra_scores would)
            a = a * beta[:, None]
    else:
        g = tl.load(GC + bh * NP + rows)
        kg = k * tl.exp(g)[:, None]
        a = tl.dot(k, tl.trans(k), input_precision=DOT_PREC) * beta[:, None]
        a = a * tl.exp(tl.where(ii > jj, g[:, None] - g[None, :], float("-inf")))
    a = tl.where(ii > jj, a, 0.0)
    t = tl.where(ii == jj, 1.0, 0.0)
    for r in range(1, BT):  # row r of T: e_r - sum_{j<r} A_rj T_j
        a_r = tl.sum(tl.where(ii == r, a, 0.0), axis=0)
        t = tl.where(ii == r, t - tl.sum(a_r[:, None] * t, axis=0)[None, :], t)
    w = tl.dot(t, kg * beta[:, None], input_precision=DOT_PREC)
    v = _tile(V + bh * N * DV, t0, N, 0, DV, DV, BT, BV)
    u = tl.dot(t, v * beta[:, None], input_precision=DOT_PREC)
    rr = rows[:, None]
    rk = tl.arange(0, BK)[None, :]
    rv = tl.arange(0, BV)[None, :]
    tl.store(W + bh * NP * DK + rr * DK + rk, w, mask=rk < DK)
    tl.store(U + bh * NP * DV + rr * DV + rv, u, mask=rv < DV)
    if SAVE_T:
        tl.store(TT + bh * NP * BT + rr * BT + jj, t)


@triton.jit
def _kk_scale(p, ba, ga, gb, DIAG: tl.constexpr, BS: tl.constexpr):
    """A_ab = beta_a p exp(G_a - G_b), p = k_a k_b^T, between two 16-row blocks of a chunk under a scalar
    gate: block a after block b (every decay factor <= 1), or ``DIAG`` (a = b: the strict lower part, the
    exponent masked to -inf before the exp)."""
    a = p * ba[:, None]
    if DIAG:
        ii = tl.arange(0, BS)[:, None]
        jj = tl.arange(0, BS)[None, :]
        a = a * tl.exp(tl.where(ii > jj, ga[:, None] - gb[None, :], float("-inf")))
        a = tl.where(ii > jj, a, 0.0)
    else:
        a = a * tl.exp(ga[:, None] - gb[None, :])
    return a


@triton.jit
def _akk_block(
    a_ptr, r0, c0, NP, ba, DIAG: tl.constexpr, AKK_BETA: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr
):  # fmt: skip
    """The 16 x 16 block of a chunk's AKK (per-channel gates) at rows r0, columns c0: A_ab as read
    (``AKK_BETA``), or the scores without beta read and their rows multiplied by beta_a (``ba``) here (the
    product intra_scores makes: the same A_ab); ``DIAG``: its strict lower part (a = b)."""
    a = _tile(a_ptr, r0, NP, c0, BT, BT, BS, BS)
    if not AKK_BETA:
        a = a * ba[:, None]
    if DIAG:
        ii = tl.arange(0, BS)[:, None]
        jj = tl.arange(0, BS)[None, :]
        a = tl.where(ii > jj, a, 0.0)
    return a


@triton.jit
def _unit_lower_inverse_row(x, r, BS: tl.constexpr):
    """One step of the forward substitution of a 16 x 16 block: row r of X = (I + A)^-1 - I becomes
    x_r + sum_{c<r} x_rc X_c, x_r = -A_r (row r of x on entry; the rows above it are final)."""
    ii = tl.arange(0, BS)[:, None]
    xr = tl.sum(tl.where(ii == r, x, 0.0), axis=0)
    return tl.where(ii == r, (xr + tl.sum(xr[:, None] * x, axis=0))[None, :], x)


@triton.jit
def _wy_x(X, GC, bh, r0, N, NP, col0, DX, DECAY: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
    """x (times exp(G) per channel with ``DECAY``) of one 16-row block and BC columns from col0, float32."""
    x = _tile(X + bh * N * DX, r0, N, col0, DX, DX, BS, BC)
    if DECAY:
        x = x * tl.exp(_tile(GC + bh * NP * DX, r0, NP, col0, DX, DX, BS, BC))
    return x


@triton.jit
def _wy_store(OUT, y, bh, r0, NP, col0, DX, BS: tl.constexpr, BC: tl.constexpr):
    rr = (r0 + tl.arange(0, BS))[:, None]
    cc = col0 + tl.arange(0, BC)[None, :]
    tl.store(OUT + bh * NP * DX + rr * DX + cc, y, mask=cc < DX)


@triton.jit
def _wy_apply(
    X, GC, OUT, bh, t0, N, NP, DX, s0, s1, s2, s3,
    t00, t10, t11, t20, t21, t22, t30, t31, t32, t33,
    DECAY: tl.constexpr, NB: tl.constexpr, BS: tl.constexpr, BX: tl.constexpr, BC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """OUT = T diag(s) X of one chunk by 16-row blocks (X = x, or x exp(G) per channel with ``DECAY``;
    s the per-row scales: beta, or beta exp(G) under a scalar gate): row block a is
    sum_{b<=a} (T_ab diag(s_b)) X_b, BC columns at a time, the scales folded into T's columns once.
    NB (1, 2 or 4) blocks; those past NB are not read."""
    t00 = t00 * s0[None, :]
    if NB > 1:
        t10 = t10 * s0[None, :]
        t11 = t11 * s1[None, :]
    if NB > 2:
        t20 = t20 * s0[None, :]
        t21 = t21 * s1[None, :]
        t22 = t22 * s2[None, :]
        t30 = t30 * s0[None, :]
        t31 = t31 * s1[None, :]
        t32 = t32 * s2[None, :]
        t33 = t33 * s3[None, :]
    for col0 in range(0, BX, BC):
        x0 = _wy_x(X, GC, bh, t0, N, NP, col0, DX, DECAY, BS, BC)
        _wy_store(OUT, tl.dot(t00, x0, input_precision=DOT_PREC), bh, t0, NP, col0, DX, BS, BC)
        if NB > 1:
            x1 = _wy_x(X, GC, bh, t0 + BS, N, NP, col0, DX, DECAY, BS, BC)
            y = tl.dot(t10, x0, input_precision=DOT_PREC)
            y = tl.dot(t11, x1, y, input_precision=DOT_PREC)
            _wy_store(OUT, y, bh, t0 + BS, NP, col0, DX, BS, BC)
        if NB > 2:
            x2 = _wy_x(X, GC, bh, t0 + 2 * BS, N, NP, col0, DX, DECAY, BS, BC)
            y = tl.dot(t20, x0, input_precision=DOT_PREC)
            y = tl.dot(t21, x1, y, input_precision=DOT_PREC)
            y = tl.dot(t22, x2, y, input_precision=DOT_PREC)
            _wy_store(OUT, y, bh, t0 + 2 * BS, NP, col0, DX, BS, BC)
            x3 = _wy_x(X, GC, bh, t0 + 3 * BS, N, NP, col0, DX, DECAY, BS, BC)
            y = tl.dot(t30, x0, input_precision=DOT_PREC)
            y = tl.dot(t31, x1, y, input_precision=DOT_PREC)
            y = tl.dot(t32, x2, y, input_precision=DOT_PREC)
            y = tl.dot(t33, x3, y, input_precision=DOT_PREC)
            _wy_store(OUT, y, bh, t0 + 3 * BS, NP, col0, DX, BS, BC)


@triton.jit
def _t_store(TT, t, bh, r0, c0, NP, BT: tl.constexpr, BS: tl.constexpr):
    rr = (r0 + tl.arange(0, BS))[:, None]
    cc = (c0 + tl.arange(0, BS))[None, :]
    tl.store(TT + bh * NP * BT + rr * BT + cc, t)


@triton.jit
def delta_wy_block_kernel(
    K, V, GC, BETA, AKK, W, U, TT,
    N, NP, DK, DV,
    GATE: tl.constexpr, SAVE_T: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKS: tl.constexpr,
    BCK: tl.constexpr, BCV: tl.constexpr, DOT_PREC: tl.constexpr, INV_PREC: tl.constexpr,
    UPCAST: tl.constexpr, AKK_BETA: tl.constexpr = True,
):  # fmt: skip
    """:func:`delta_wy_kernel`'s results (W, U0, with SAVE_T T; the same layouts) by 16-row blocks, one
    chunk per program (chunk, batch * head). With NB = BT / 16 blocks (1, 2 or 4) and A_ab the (a, b)
    block of A_kk (GATE == 1: beta_a (k_a k_b^T) exp(G_a - G_b) by tensor-core dots in k's dtype
    (float32 with UPCAST); GATE == 2: read from AKK, beta in with ``AKK_BETA``, else AKK's rows are the
    scores without beta (``op.DELTA_SAVE_SCORES``), multiplied by beta_a here)::

        T_aa = (I + A_aa)^-1                            16-step forward substitution, float32
        T_ab = -T_aa sum_{b<=m<a} A_am T_mb   (a > b)   block forward substitution, dots in INV_PREC
        W_a  = sum_{b<=a} T_ab (beta k exp(G))_b,   U0_a = sum_{b<=a} T_ab (beta v)_b   dots in DOT_PREC

    The NB diagonal blocks are inverted in one loop (independent chains); W and U0 are made BCK / BCV
    columns at a time. No tl.trans of a dot's result (only of loaded k tiles)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    NB: tl.constexpr = BT // BS
    t0 = c * BT
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = K.dtype.element_ty
    ii = tl.arange(0, BS)[:, None]
    jj = tl.arange(0, BS)[None, :]
    eye = tl.where(ii == jj, 1.0, 0.0)
    k_ptr = K + bh * N * DK
    a_ptr = AKK + bh * NP * BT
    r = tl.arange(0, BS)
    # per block: beta, the scalar gate's G (GATE == 1), k (the A_kk dots); the strict lower A_ab
    b0 = tl.load(BETA + bh * N + t0 + r, mask=t0 + r < N, other=0.0).to(tl.float32)
    # (placeholders, never read: blocks past NB; GATE == 2's gates are read per channel)
    b1, b2, b3, g0, g1, g2, g3 = b0, b0, b0, b0, b0, b0, b0
    if GATE == 1:
        g0 = tl.load(GC + bh * NP + t0 + r)
    if NB > 1:
        b1 = tl.load(BETA + bh * N + t0 + BS + r, mask=t0 + BS + r < N, other=0.0).to(tl.float32)
        if GATE == 1:
            g1 = tl.load(GC + bh * NP + t0 + BS + r)
    if NB > 2:
        b2 = tl.load(BETA + bh * N + t0 + 2 * BS + r, mask=t0 + 2 * BS + r < N, other=0.0).to(tl.float32)
        b3 = tl.load(BETA + bh * N + t0 + 3 * BS + r, mask=t0 + 3 * BS + r < N, other=0.0).to(tl.float32)
        if GATE == 1:
            g2 = tl.load(GC + bh * NP + t0 + 2 * BS + r)
            g3 = tl.load(GC + bh * NP + t0 + 3 * BS + r)
    if GATE == 1:
        # k_a k_b^T, BKS channels at a time (every warp holds a 16-row dot operand whole: slices keep
        # the k tiles small), then beta and the decays
        z = tl.zeros((BS, BS), dtype=tl.float32)
        p00, p10, p11, p20, p21, p22, p30, p31, p32, p33 = z, z, z, z, z, z, z, z, z, z
        for kc in range(0, BK, BKS):
            k0 = _tile(k_ptr, t0, N, kc, DK, DK, BS, BKS).to(dt)
            p00 = tl.dot(k0, tl.trans(k0), p00, input_precision=DOT_PREC)
            if NB > 1:
                k1 = _tile(k_ptr, t0 + BS, N, kc, DK, DK, BS, BKS).to(dt)
                p10 = tl.dot(k1, tl.trans(k0), p10, input_precision=DOT_PREC)
                p11 = tl.dot(k1, tl.trans(k1), p11, input_precision=DOT_PREC)
            if NB > 2:
                k2 = _tile(k_ptr, t0 + 2 * BS, N, kc, DK, DK, BS, BKS).to(dt)
                k3 = _tile(k_ptr, t0 + 3 * BS, N, kc, DK, DK, BS, BKS).to(dt)
                p20 = tl.dot(k2, tl.trans(k0), p20, input_precision=DOT_PREC)
                p21 = tl.dot(k2, tl.trans(k1), p21, input_precision=DOT_PREC)
                p22 = tl.dot(k2, tl.trans(k2), p22, input_precision=DOT_PREC)
                p30 = tl.dot(k3, tl.trans(k0), p30, input_precision=DOT_PREC)
                p31 = tl.dot(k3, tl.trans(k1), p31, input_precision=DOT_PREC)
                p32 = tl.dot(k3, tl.trans(k2), p32, input_precision=DOT_PREC)
                p33 = tl.dot(k3, tl.trans(k3), p33, input_precision=DOT_PREC)
        a00 = _kk_scale(p00, b0, g0, g0, True, BS)
        if NB > 1:
            a10 = _kk_scale(p10, b1, g1, g0, False, BS)
            a11 = _kk_scale(p11, b1, g1, g1, True, BS)
        if NB > 2:
            a20 = _kk_scale(p20, b2, g2, g0, False, BS)
            a21 = _kk_scale(p21, b2, g2, g1, False, BS)
            a22 = _kk_scale(p22, b2, g2, g2, True, BS)
            a30 = _kk_scale(p30, b3, g3, g0, False, BS)
            a31 = _kk_scale(p31, b3, g3, g1, False, BS)
            a32 = _kk_scale(p32, b3, g3, g2, False, BS)
            a33 = _kk_scale(p33, b3, g3, g3, True, BS)
    else:  # GATE == 2: the blocks of AKK (the per-channel decays in; beta too with AKK_BETA)
        a00 = _akk_block(a_ptr, t0, 0, NP, b0, True, AKK_BETA, BT, BS)
        if NB > 1:
            a10 = _akk_block(a_ptr, t0 + BS, 0, NP, b1, False, AKK_BETA, BT, BS)
            a11 = _akk_block(a_ptr, t0 + BS, BS, NP, b1, True, AKK_BETA, BT, BS)
        if NB > 2:
            a20 = _akk_block(a_ptr, t0 + 2 * BS, 0, NP, b2, False, AKK_BETA, BT, BS)
            a21 = _akk_block(a_ptr, t0 + 2 * BS, BS, NP, b2, False, AKK_BETA, BT, BS)
            a22 = _akk_block(a_ptr, t0 + 2 * BS, 2 * BS, NP, b2, True, AKK_BETA, BT, BS)
            a30 = _akk_block(a_ptr, t0 + 3 * BS, 0, NP, b3, False, AKK_BETA, BT, BS)
            a31 = _akk_block(a_ptr, t0 + 3 * BS, BS, NP, b3, False, AKK_BETA, BT, BS)
            a32 = _akk_block(a_ptr, t0 + 3 * BS, 2 * BS, NP, b3, False, AKK_BETA, BT, BS)
            a33 = _akk_block(a_ptr, t0 + 3 * BS, 3 * BS, NP, b3, True, AKK_BETA, BT, BS)
    # the diagonal blocks' inverses, X = T - I, by forward substitution (rows 0 and 1 are -A's already)
    x0 = -a00
    if NB > 1:
        x1 = -a11
    if NB > 2:
        x2 = -a22
        x3 = -a33
    for i in range(2, BS):
        x0 = _unit_lower_inverse_row(x0, i, BS)
        if NB > 1:
            x1 = _unit_lower_inverse_row(x1, i, BS)
        if NB > 2:
            x2 = _unit_lower_inverse_row(x2, i, BS)
            x3 = _unit_lower_inverse_row(x3, i, BS)
    t00 = x0 + eye
    t10, t11, t20, t21, t22, t30, t31, t32, t33 = t00, t00, t00, t00, t00, t00, t00, t00, t00  # (past NB)
    # the blocks below the diagonal: T_ab = -T_aa sum_{b<=m<a} A_am T_mb
    if NB > 1:
        t11 = x1 + eye
        t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision=INV_PREC), input_precision=INV_PREC)
    if NB > 2:
        t22 = x2 + eye
        t33 = x3 + eye
        t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision=INV_PREC), input_precision=INV_PREC)
        t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision=INV_PREC), input_precision=INV_PREC)
        s = tl.dot(a20, t00, input_precision=INV_PREC)
        s = tl.dot(a21, t10, s, input_precision=INV_PREC)
        t20 = -tl.dot(t22, s, input_precision=INV_PREC)
        s = tl.dot(a31, t11, input_precision=INV_PREC)
        s = tl.dot(a32, t21, s, input_precision=INV_PREC)
        t31 = -tl.dot(t33, s, input_precision=INV_PREC)
        s = tl.dot(a30, t00, input_precision=INV_PREC)
        s = tl.dot(a31, t10, s, input_precision=INV_PREC)
        s = tl.dot(a32, t20, s, input_precision=INV_PREC)
        t30 = -tl.dot(t33, s, input_precision=INV_PREC)
    if SAVE_T:  # T (B*H, NP, BT): block (a, b) at rows t0 + a BS, columns b BS; zeros above the diagonal
        zero = tl.zeros((BS, BS), dtype=tl.float32)
        _t_store(TT, t00, bh, t0, 0, NP, BT, BS)
        for cb in tl.static_range(1, NB):
            _t_store(TT, zero, bh, t0, cb * BS, NP, BT, BS)
        if NB > 1:
            _t_store(TT, t10, bh, t0 + BS, 0, NP, BT, BS)
            _t_store(TT, t11, bh, t0 + BS, BS, NP, BT, BS)
            for cb in tl.static_range(2, NB):
                _t_store(TT, zero, bh, t0 + BS, cb * BS, NP, BT, BS)
        if NB > 2:
            _t_store(TT, t20, bh, t0 + 2 * BS, 0, NP, BT, BS)
            _t_store(TT, t21, bh, t0 + 2 * BS, BS, NP, BT, BS)
            _t_store(TT, t22, bh, t0 + 2 * BS, 2 * BS, NP, BT, BS)
            _t_store(TT, zero, bh, t0 + 2 * BS, 3 * BS, NP, BT, BS)
            _t_store(TT, t30, bh, t0 + 3 * BS, 0, NP, BT, BS)
            _t_store(TT, t31, bh, t0 + 3 * BS, BS, NP, BT, BS)
            _t_store(TT, t32, bh, t0 + 3 * BS, 2 * BS, NP, BT, BS)
            _t_store(TT, t33, bh, t0 + 3 * BS, 3 * BS, NP, BT, BS)
    if GATE == 1:  # W's per-row scales beta exp(G) (per channel: exp(G) on k's tiles, beta here)
        _wy_apply(
            K, GC, W, bh, t0, N, NP, DK, b0 * tl.exp(g0), b1 * tl.exp(g1), b2 * tl.exp(g2), b3 * tl.exp(g3),
            t00, t10, t11, t20, t21, t22, t30, t31, t32, t33, False, NB, BS, BK, BCK, DOT_PREC,
        )  # fmt: skip
    else:
        _wy_apply(
            K, GC, W, bh, t0, N, NP, DK, b0, b1, b2, b3,
            t00, t10, t11, t20, t21, t22, t30, t31, t32, t33, True, NB, BS, BK, BCK, DOT_PREC,
        )  # fmt: skip
    _wy_apply(
        V, GC, U, bh, t0, N, NP, DV, b0, b1, b2, b3,
        t00, t10, t11, t20, t21, t22, t30, t31, t32, t33, False, NB, BS, BV, BCV, DOT_PREC,
    )  # fmt: skip
