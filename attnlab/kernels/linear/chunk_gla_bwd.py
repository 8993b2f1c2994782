# mypy: ignore-errors
"""The per-chunk backward kernels of the gated linear recurrence (gla; lightning and linear as a gate shared
by the channels): dq, dk, dv and the gate's gradient of every chunk in parallel, from the states at the
chunk starts S and the state's gradient at the chunk ends dH (``chunk_state.py``).

- A gate shared by the channels: :func:`chunk_bwd_scalar_kernel` (64-row tiles).
- Per-channel gates: :func:`gla_bwd_chunk_kernel` (``op.GLA_BWD_FUSED``: a whole chunk per program, dq,
  dk, dv and dg, the intra-chunk sums by the forward's split dots, the chunk-end term from S and dH,
  dg's reverse cumsum folded in), or :func:`gla_bwd_sub_kernel` (16-row sub-blocks, the forward's
  intra-chunk scores; :func:`gla_bwd_inter_kernel` first with ``op.GLA_BWD_SPLIT``), dg then from the
  cumsum's gradient by ``gate_cumsum_bwd_kernel``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.linear.fwd import _row, _tile


@triton.jit
def chunk_bwd_scalar_kernel(
    Q, K, V, GC, DO, HS, DHS, DQ, DK_, DV_, DG,
    N, NP, DK, DV, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dq, dk, dv (in DQ's, DK_'s, DV_'s dtypes) and DG = sum_d (q dq - k dk) per token (float32, NP rows:
    the gradient of the chunk-local cumsum G but for the chunk-end term) of one chunk per program (chunk, batch * head) under a scalar gate (GATE 1),
    from the state at the chunk's start S (HS) and its gradient at the chunk's end dH (DHS); with
    D_ij = exp(G_i - G_j) for j <= i (else 0), dA = (do v^T) * D, A = (q k^T) * D::

        dq = scale [exp(G) * (do S^T) + dA k]
        dk = scale dA^T q + exp(G_C - G) * (v dH^T)
        dv = scale A^T do + (k * exp(G_C - G)) dH

    The transposed scores are built transposed (k q^T, v do^T), never by transposing a dot's result.
    BK and BV cover the whole key and value dims."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    t0 = c * BT
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = Q.dtype.element_ty
    ii = tl.arange(0, BT)[:, None]
    jj = tl.arange(0, BT)[None, :]
    q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK).to(dt)
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK).to(dt)
    v = _tile(V + bh * N * DV, t0, N, 0, DV, DV, BT, BV).to(dt)
    do = _tile(DO + bh * N * DV, t0, N, 0, DV, DV, BT, BV).to(dt)
    g = tl.load(GC + bh * NP + t0 + tl.arange(0, BT))
    g_last = tl.load(GC + bh * NP + t0 + BT - 1)
    d = tl.exp(tl.where(ii >= jj, g[:, None] - g[None, :], float("-inf")))  # D
    dtr = tl.exp(tl.where(ii <= jj, g[None, :] - g[:, None], float("-inf")))  # D^T
    s = _tile(HS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV).to(dt)
    dh = _tile(DHS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV).to(dt)
    da = (tl.dot(do, tl.trans(v), input_precision=DOT_PREC) * d).to(dt)
    dq = tl.dot(do, tl.trans(s), input_precision=DOT_PREC) * tl.exp(g)[:, None]
    dq += tl.dot(da, k, input_precision=DOT_PREC)
    da_t = (tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * dtr).to(dt)
    tail = tl.exp(g_last - g)[:, None]
    dk = scale * tl.dot(da_t, q, input_precision=DOT_PREC)
    dk += tl.dot(v, tl.trans(dh), input_precision=DOT_PREC) * tail
    a_t = (tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * dtr).to(dt)
    dv = scale * tl.dot(a_t, do, input_precision=DOT_PREC)
    dv += tl.dot((k.to(tl.float32) * tail).to(dt), dh, input_precision=DOT_PREC)
    r = t0 + ii
    rk = tl.arange(0, BK)[None, :]
    rv = tl.arange(0, BV)[None, :]
    dq = dq * scale
    tl.store(
        DG + bh * NP + t0 + tl.arange(0, BT), tl.sum(q.to(tl.float32) * dq - k.to(tl.float32) * dk, axis=1)
    )
    tl.store(DQ + bh * N * DK + r * DK + rk, dq.to(DQ.dtype.element_ty), mask=(r < N) & (rk < DK))
    tl.store(DK_ + bh * N * DK + r * DK + rk, dk.to(DK_.dtype.element_ty), mask=(r < N) & (rk < DK))
    tl.store(DV_ + bh * N * DV + r * DV + rv, dv.to(DV_.dtype.element_ty), mask=(r < N) & (rv < DV))


@triton.jit
def gla_bwd_inter_kernel(
    K, V, GC, DO, HS, DHS, PQ, PK, PV,
    N, NP, DK, DV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The state (inter-chunk) terms of the per-channel-gate backward, one whole chunk per program (chunk,
    batch * head), 64-row tiles (tensor-core dots of M = BT), S and dH read once per chunk::

        PQ = exp(G) * (do S^T)      PK = exp(G_C - G) * (v dH^T)      PV = (k * exp(G_C - G)) dH

    float32 (B*H, NP, K) / (B*H, NP, V), unscaled: ``gla_bwd_sub_kernel`` with ``SPLIT`` adds the
    intra-chunk terms to them (``GLA_BWD_SPLIT`` in op.py)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    t0 = c * BT
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = K.dtype.element_ty
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    v = _tile(V + bh * N * DV, t0, N, 0, DV, DV, BT, BV).to(dt)
    do = _tile(DO + bh * N * DV, t0, N, 0, DV, DV, BT, BV).to(dt)
    g = _tile(GC + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
    g_last = _row(GC + bh * NP * DK, t0 + BT - 1, 0, DK, DK, BK)
    tail = tl.exp(g_last[None, :] - g)
    s = _tile(HS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV).to(dt)
    dh = _tile(DHS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV).to(dt)
    pq = tl.dot(do, tl.trans(s), input_precision=DOT_PREC) * tl.exp(g)
    pk = tl.dot(v, tl.trans(dh), input_precision=DOT_PREC) * tail
    pv = tl.dot((k * tail).to(dt), dh, input_precision=DOT_PREC)
    rr = (t0 + tl.arange(0, BT))[:, None]
    rk = tl.arange(0, BK)[None, :]
    rv = tl.arange(0, BV)[None, :]
    tl.store(PQ + bh * NP * DK + rr * DK + rk, pq, mask=rk < DK)
    tl.store(PK + bh * NP * DK + rr * DK + rk, pk, mask=rk < DK)
    tl.store(PV + bh * NP * DV + rr * DV + rv, pv, mask=rv < DV)


@triton.jit
def gla_bwd_sub_kernel(
    Q, K, V, GC, DO, HS, DHS, A, DQ, DK_, DV_, DG,
    N, NP, DK, DV, scale,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT: tl.constexpr = False, PQ=None, PK=None, PV=None,
):  # fmt: skip
    """dq, dk, dv (in DQ's, DK_'s, DV_'s dtypes) and DG = q dq - k dk (float32 (B*H, NP, K): the gradient
    of the chunk-local cumsum G but for the chunk-end term) of one 16-row sub-block i of a chunk per program (sub-block, batch * head),
    per-channel gates, from S (the state at the chunk's start), dH (its gradient at the chunk's end) and
    A (the forward's intra-chunk scores, ``intra_scores_kernel``). With dA = scale do v^T::

        dq_i = scale exp(G_i) (do_i S^T) + sum_{j<=i} dA_ij k_j exp(G_i - G_j)
        dk_j = sum_{i>=j} dA_ij q_i exp(G_i - G_j) + exp(G_C - G_j) (v_j dH^T)
        dv_j = scale sum_{i>=j} A_ij do_i + (k_j exp(G_C - G_j)) dH

    Earlier / later sub-blocks by tensor-core dots with the decay split at a row between them (the query
    sub-block's first row for dq, the key sub-block's last row for dk: both factors <= 1); the diagonal
    sub-block row by row, exactly (the exponent masked before the exp). dA^T blocks are built transposed
    (v do^T), never by transposing a dot's result. BK and BV cover the head dims. ``SPLIT``: the state
    terms are not made here (no S / dH loads) but read from PQ, PK, PV (``gla_bwd_inter_kernel``)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_sub = BT // BS
    c = pid // n_sub
    i = pid % n_sub
    n_chunks = tl.cdiv(N, BT)
    t0 = c * BT
    ri = t0 + i * BS
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = Q.dtype.element_ty
    q_ptr = Q + bh * N * DK
    k_ptr = K + bh * N * DK
    v_ptr = V + bh * N * DV
    do_ptr = DO + bh * N * DV
    g_ptr = GC + bh * NP * DK
    a_ptr = A + bh * NP * BT
    ii = tl.arange(0, BS)[:, None]
    jj = tl.arange(0, BS)[None, :]
    rk = tl.arange(0, BK)
    mk = rk < DK
    do_i = _tile(do_ptr, ri, N, 0, DV, DV, BS, BV).to(dt)
    v_i = _tile(v_ptr, ri, N, 0, DV, DV, BS, BV).to(dt)
    k_i = _tile(k_ptr, ri, N, 0, DK, DK, BS, BK)
    g_i = _tile(g_ptr, ri, NP, 0, DK, DK, BS, BK)
    g_last = _row(g_ptr, t0 + BT - 1, 0, DK, DK, BK)
    tail = tl.exp(g_last[None, :] - g_i)
    # dq_i
    if SPLIT:
        dq = _tile(PQ + bh * NP * DK, ri, NP, 0, DK, DK, BS, BK)
    else:
        s = _tile(HS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV).to(dt)
        dq = tl.dot(do_i, tl.trans(s), input_precision=DOT_PREC) * tl.exp(g_i)
    g_n = _row(g_ptr, ri, 0, DK, DK, BK)
    acc = tl.zeros((BS, BK), dtype=tl.float32)
    for j in range(i):
        rj = t0 + j * BS
        v_j = _tile(v_ptr, rj, N, 0, DV, DV, BS, BV).to(dt)
        k_j = _tile(k_ptr, rj, N, 0, DK, DK, BS, BK)
        g_j = _tile(g_ptr, rj, NP, 0, DK, DK, BS, BK)
        da = tl.dot(do_i, tl.trans(v_j), input_precision=DOT_PREC)
        acc += tl.dot(da.to(dt), (k_j * tl.exp(g_n[None, :] - g_j)).to(dt), input_precision=DOT_PREC)
    dq += acc * tl.exp(g_i - g_n[None, :])
    da_ii = tl.where(ii >= jj, tl.dot(do_i, tl.trans(v_i), input_precision=DOT_PREC), 0.0)
    for j in range(BS):  # the diagonal sub-block, one key row at a time
        col = tl.sum(tl.where(jj == j, da_ii, 0.0), axis=1)
        k_row = tl.load(k_ptr + (ri + j) * DK + rk, mask=mk & (ri + j + 0 * rk < N), other=0.0).to(tl.float32)
        g_row = tl.load(g_ptr + (ri + j) * DK + rk, mask=mk, other=0.0)
        e = tl.exp(tl.where(ii >= j, g_i - g_row[None, :], float("-inf")))
        dq += col[:, None] * k_row[None, :] * e
    r_i = ri + ii
    dq = dq * scale
    q_i = _tile(q_ptr, ri, N, 0, DK, DK, BS, BK)
    dg = q_i * dq
    tl.store(
        DQ + bh * N * DK + r_i * DK + rk[None, :], dq.to(DQ.dtype.element_ty), mask=(r_i < N) & mk[None, :]
    )
    # dk_i
    if SPLIT:
        dk = _tile(PK + bh * NP * DK, ri, NP, 0, DK, DK, BS, BK)
    else:
        dh = _tile(DHS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV).to(dt)
        dk = tl.dot(v_i, tl.trans(dh), input_precision=DOT_PREC) * tail
    g_m = _row(g_ptr, ri + BS - 1, 0, DK, DK, BK)
    acc = tl.zeros((BS, BK), dtype=tl.float32)
    for r in range(i + 1, n_sub):
        rr = t0 + r * BS
        do_r = _tile(do_ptr, rr, N, 0, DV, DV, BS, BV).to(dt)
        q_r = _tile(q_ptr, rr, N, 0, DK, DK, BS, BK)
        g_r = _tile(g_ptr, rr, NP, 0, DK, DK, BS, BK)
        da_t = tl.dot(v_i, tl.trans(do_r), input_precision=DOT_PREC)  # dA^T: keys i, queries r
        acc += tl.dot(da_t.to(dt), (q_r * tl.exp(g_r - g_m[None, :])).to(dt), input_precision=DOT_PREC)
    intra = acc * tl.exp(g_m[None, :] - g_i)
    da_t_ii = tl.where(ii <= jj, tl.dot(v_i, tl.trans(do_i), input_precision=DOT_PREC), 0.0)
    for j in range(BS):  # the diagonal sub-block, one query row at a time
        col = tl.sum(tl.where(jj == j, da_t_ii, 0.0), axis=1)
        q_row = tl.load(q_ptr + (ri + j) * DK + rk, mask=mk & (ri + j + 0 * rk < N), other=0.0).to(tl.float32)
        g_row = tl.load(g_ptr + (ri + j) * DK + rk, mask=mk, other=0.0)
        e = tl.exp(tl.where(ii <= j, g_row[None, :] - g_i, float("-inf")))
        intra += col[:, None] * q_row[None, :] * e
    dk += scale * intra
    dg -= k_i * dk
    tl.store(DG + bh * NP * DK + r_i * DK + rk[None, :], dg, mask=mk[None, :])
    tl.store(
        DK_ + bh * N * DK + r_i * DK + rk[None, :], dk.to(DK_.dtype.element_ty), mask=(r_i < N) & mk[None, :]
    )
    # dv_i
    if SPLIT:
        dv = _tile(PV + bh * NP * DV, ri, NP, 0, DV, DV, BS, BV)
    else:
        dv = tl.dot((k_i * tail).to(dt), dh, input_precision=DOT_PREC)
    acc = tl.zeros((BS, BV), dtype=tl.float32)
    for r in range(i, n_sub):
        rr = t0 + r * BS
        a_ri = _tile(a_ptr, rr, NP, i * BS, BT, BT, BS, BS)  # A rows r, columns i (loaded: transposable)
        do_r = _tile(do_ptr, rr, N, 0, DV, DV, BS, BV).to(dt)
        acc += tl.dot(tl.trans(a_ri).to(dt), do_r, input_precision=DOT_PREC)
    dv += scale * acc
    rv = tl.arange(0, BV)[None, :]
    tl.store(DV_ + bh * N * DV + r_i * DV + rv, dv.to(DV_.dtype.element_ty), mask=(r_i < N) & (rv < DV))


@triton.jit
def _gla_bwd_level(g_ptr, q, k, g, da, dat, dq, dk, ii, jj, t0, ck, mk, b, DK, dt: tl.constexpr,
                   DOT_PREC: tl.constexpr):  # fmt: skip
    """Level b of :func:`gla_bwd_chunk_kernel`'s intra-chunk sums: (dq, dk) plus the pairs (t, j) whose
    chunk-local indices first differ at bit b (t's bit set), the decay split at r = ((t >> b) | 1) << b."""
    up = ((ii >> b) & 1) == 1  # rows on the later side of their level-b split
    ref = t0 + (((ii >> b) | 1) << b)
    gr = tl.load(g_ptr + ref * DK + ck[None, :], mask=mk[None, :], other=0.0)
    e = tl.exp(tl.where(up, g - gr, gr - g))  # exp(G_t - G_r) on the later rows, exp(G_r - G_j) on the others
    pair = (ii >> (b + 1)) == (jj >> (b + 1))  # (the other pairs meet a zero row of kb / qb or are dropped)
    kb = tl.where(up, 0.0, k * e).to(dt)
    qb = tl.where(up, q * e, 0.0).to(dt)
    pq = tl.dot(tl.where(pair, da, 0.0), kb, input_precision=DOT_PREC)
    pk = tl.dot(tl.where(pair, dat, 0.0), qb, input_precision=DOT_PREC)
    dq += tl.where(up, e * pq, 0.0)
    dk += tl.where(up, 0.0, e * pk)
    return dq, dk


@triton.jit
def _gla_bwd_chunk_setup(Q, K, GC, HS, DHS, DO, c, bh, n_chunks, t0, N, NP, DK, DV, BT: tl.constexpr,
                         BV: tl.constexpr, dt: tl.constexpr):  # fmt: skip
    """The per-chunk indices, masks and pointers of the per-channel-gate backward kernels, and do (BT, BV)
    in dt: (ii, jj, rows, mrow, rv, mtv, q_ptr, k_ptr, g_ptr, s_ptr, dh_ptr, do)."""
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
    return ii, jj, rows, mrow, rv, mtv, q_ptr, k_ptr, g_ptr, s_ptr, dh_ptr, do


@triton.jit
def _gla_bwd_da(do, v, ii, jj, scale, dt: tl.constexpr, DOT_PREC: tl.constexpr):
    """(dA = scale do v^T masked to j <= t, dA^T built as scale v do^T masked to j >= t, both in dt; the
    diagonal dA_tt (BT, 1) in float32)."""
    da = tl.dot(do, tl.trans(v), input_precision=DOT_PREC) * scale  # dA: queries t, keys j
    da = tl.where(ii >= jj, da, 0.0)
    dd = tl.sum(tl.where(ii == jj, da, 0.0), axis=1)[:, None]  # dA_tt (float32)
    da = da.to(dt)
    dat = tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * scale  # dA^T: keys j, queries t
    dat = tl.where(ii <= jj, dat, 0.0).to(dt)
    return da, dat, dd


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
def _gla_bwd_dv_state(dv, k_ptr, g_ptr, dh_ptr, rows, mrow, rv, t0, DK, DV, BT: tl.constexpr,
                      BKS: tl.constexpr, dt: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """dv plus the state term of a chunk's dv, (k exp(G_C - G)) dH, over the key channels in slices of
    BKS (``gla_bwd_chunk_kernel`` and ``gla_bwd_sliced_kernel``'s dv program)."""
    for kc in range(0, DK, BKS):
        ck = kc + tl.arange(0, BKS)
        mk = ck < DK
        k = tl.load(k_ptr + rows * DK + ck[None, :], mask=mrow & mk[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows * DK + ck[None, :], mask=mk[None, :], other=0.0)
        gl = tl.load(g_ptr + (t0 + BT - 1) * DK + ck, mask=mk, other=0.0)
        dh = tl.load(dh_ptr + ck[:, None] * DV + rv, mask=mk[:, None] & (rv < DV), other=0.0)
        dv = tl.dot((k * tl.exp(gl[None, :] - g)).to(dt), dh.to(dt), dv, input_precision=DOT_PREC)
    return dv


@triton.jit
def _gla_bwd_slice(
    kc, q_ptr, k_ptr, g_ptr, s_ptr, dh_ptr, do, v, da, dat, dd, DQ, DK_, DG, bh, N, NP, DK, DV, scale,
    rows, mrow, rv, ii, jj, t0, RAW_G: tl.constexpr, BT: tl.constexpr, LBT: tl.constexpr,
    BKS: tl.constexpr, NARROW: tl.constexpr, JOINT: tl.constexpr, UNROLL: tl.constexpr, dt: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dq, dk and dg of the key channels kc .. kc + BKS of one chunk, stored (``gla_bwd_chunk_kernel``'s
    formulas; its loop body and ``gla_bwd_sliced_kernel``'s): the state terms from S and dH, the
    intra-chunk sums level by level from dA / dA^T (da, dat; their diagonal dd), dg with the chunk-end
    term. NARROW: q and k kept in the dots' dtype (else float32); JOINT: dq's and dk's level sums in one
    pass sharing each level's exps (else one pass each); UNROLL: the levels unrolled."""
    ck = kc + tl.arange(0, BKS)
    mk = ck < DK
    mtk = mrow & mk[None, :]
    if NARROW:  # noqa: SIM108
        xt = dt
    else:
        xt = tl.float32
    q = tl.load(q_ptr + rows * DK + ck[None, :], mask=mtk, other=0.0).to(xt)
    k = tl.load(k_ptr + rows * DK + ck[None, :], mask=mtk, other=0.0).to(xt)
    g = tl.load(g_ptr + rows * DK + ck[None, :], mask=mk[None, :], other=0.0)
    gl = tl.load(g_ptr + (t0 + BT - 1) * DK + ck, mask=mk, other=0.0)
    msv = mk[:, None] & (rv < DV)
    s = tl.load(s_ptr + ck[:, None] * DV + rv, mask=msv, other=0.0)  # (BKS, BV) of S
    dh = tl.load(dh_ptr + ck[:, None] * DV + rv, mask=msv, other=0.0)  # (BKS, BV) of dH
    # the state terms (do and v stay in shared memory as the dots' operands)
    dq = tl.dot(do, tl.trans(s.to(dt)), input_precision=DOT_PREC) * (tl.exp(g) * scale)
    dk = tl.dot(v, tl.trans(dh.to(dt)), input_precision=DOT_PREC) * tl.exp(gl[None, :] - g)
    # sum_v S_end dH per channel (in float32: S and dH may be 16-bit, GLA_SAVED_LOWP)
    tail = tl.exp(gl) * tl.sum(s.to(tl.float32) * dh.to(tl.float32), axis=1) + tl.sum(k * dk, axis=0)
    # the intra-chunk terms, level by level
    if JOINT:
        if UNROLL:  # (the levels' masked dA / dA^T are the same for every slice: made once, kept)
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
                dq = _gla_bwd_level_one(g_ptr, k, g, da, dq, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC, True)
            for b in tl.static_range(LBT):
                dk = _gla_bwd_level_one(g_ptr, q, g, dat, dk, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC, False)
        else:
            for b in range(LBT):
                dq = _gla_bwd_level_one(g_ptr, k, g, da, dq, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC, True)
            for b in range(LBT):
                dk = _gla_bwd_level_one(g_ptr, q, g, dat, dk, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC, False)
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


@triton.jit
def gla_bwd_chunk_kernel(
    Q, K, V, GC, DO, HS, DHS, A, DQ, DK_, DV_, DG,
    N, NP, DK, DV, scale,
    RAW_G: tl.constexpr, BT: tl.constexpr, LBT: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
    UNROLL: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Every gradient of one chunk of the per-channel-gate (gla) backward in one program (chunk, batch *
    head) (``op.GLA_BWD_FUSED``): dq, dk, dv in DQ's, DK_'s, DV_'s dtypes and the gate's gradient, from S
    (HS: the state at the chunk's start), dH (DHS: its gradient at the chunk's end) and A (the forward's
    intra-chunk scores). With dA = scale (do v^T) masked to j <= t, built once per chunk (and dA^T by
    v do^T, never by transposing a dot's result)::

        dq_t = scale exp(G_t) (do_t S^T) + sum_{j<=t} dA_tj k_j exp(G_t - G_j)
        dk_j = exp(G_C - G_j) (v_j dH^T) + sum_{t>=j} dA_tj q_t exp(G_t - G_j)
        dv_j = scale sum_{t>=j} A_tj do_t + (k_j exp(G_C - G_j)) dH

    The intra-chunk sums by ``intra_scores_v2_kernel``'s split (LBT = log2(BT) levels; level b pairs the
    rows t with bit b set with the rows j with it clear and the same higher bits, the decay split at
    r_b = ((t >> b) | 1) << b: exp(G_t - G_j) = exp(G_t - G_r) exp(G_r - G_j), both <= 1): per level one
    exp tile e (exp(G_t - G_r) on the later rows, exp(G_r - G_j) on the earlier ones) serves both
    dq += e * ((dA masked to the level's pairs) (k * e)) and dk += e * ((dA^T masked) (q * e)); the
    diagonal (G_t - G_t = 0) is dA_tt k_t / dA_tt q_t, exact. Per slice of BKS key channels; dv (BT, BV)
    accumulates over them. The gate's gradient DG = q dq - k dk, plus on the chunk's last row the
    chunk-end term exp(G_C) sum_v S dH + sum_j k_j (exp(G_C - G_j) v_j dH^T) (= sum_v S_end dH: no
    forward state past the chunk read): the gradient of the chunk-local cumsum (float32, NP rows); with
    RAW_G that of g itself: the reverse cumsum within the chunk (N rows, DG's dtype). Dot operands in
    q's dtype (float32 with UPCAST), float32 accumulation; BV covers the value dim. UNROLL: the levels
    unrolled (their masks constant; compiled for sm_90 at BKS = 16 about 0.6x the instructions issued
    per chunk of the loop, at the cost of more shared memory)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    t0 = c * BT
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = Q.dtype.element_ty
    ii, jj, rows, mrow, rv, mtv, q_ptr, k_ptr, g_ptr, s_ptr, dh_ptr, do = _gla_bwd_chunk_setup(
        Q, K, GC, HS, DHS, DO, c, bh, n_chunks, t0, N, NP, DK, DV, BT, BV, dt
    )
    v = tl.load(V + bh * N * DV + rows * DV + rv, mask=mtv, other=0.0).to(dt)
    da, dat, dd = _gla_bwd_da(do, v, ii, jj, scale, dt, DOT_PREC)
    # dv first (its accumulator is not live in the dq / dk loop below: fewer registers spilled)
    at = tl.load(A + bh * NP * BT + (t0 + jj) * BT + ii)  # A^T: keys j, queries t (loaded transposed)
    dv = tl.dot(tl.where(ii <= jj, at, 0.0).to(dt), do, input_precision=DOT_PREC) * scale
    dv = _gla_bwd_dv_state(dv, k_ptr, g_ptr, dh_ptr, rows, mrow, rv, t0, DK, DV, BT, BKS, dt, DOT_PREC)
    tl.store(DV_ + bh * N * DV + rows * DV + rv, dv.to(DV_.dtype.element_ty), mask=mtv)
    # (the body of _gla_bwd_slice with NARROW False, JOINT True, written out: the call compiles differently
    # for sm_90 under RAW_G False (Triton 3.6, offline), and this body is the one checked on the H100)
    for kc in range(0, DK, BKS):
        ck = kc + tl.arange(0, BKS)
        mk = ck < DK
        mtk = mrow & mk[None, :]
        q = tl.load(q_ptr + rows * DK + ck[None, :], mask=mtk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + rows * DK + ck[None, :], mask=mtk, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows * DK + ck[None, :], mask=mk[None, :], other=0.0)
        gl = tl.load(g_ptr + (t0 + BT - 1) * DK + ck, mask=mk, other=0.0)
        msv = mk[:, None] & (rv < DV)
        s = tl.load(s_ptr + ck[:, None] * DV + rv, mask=msv, other=0.0)  # (BKS, BV) of S
        dh = tl.load(dh_ptr + ck[:, None] * DV + rv, mask=msv, other=0.0)  # (BKS, BV) of dH
        # the state terms (do and v stay in shared memory as the dots' operands)
        dq = tl.dot(do, tl.trans(s.to(dt)), input_precision=DOT_PREC) * (tl.exp(g) * scale)
        dk = tl.dot(v, tl.trans(dh.to(dt)), input_precision=DOT_PREC) * tl.exp(gl[None, :] - g)
        # sum_v S_end dH per channel (in float32: S and dH may be 16-bit, GLA_SAVED_LOWP)
        tail = tl.exp(gl) * tl.sum(s.to(tl.float32) * dh.to(tl.float32), axis=1) + tl.sum(k * dk, axis=0)
        # the intra-chunk terms, level by level
        if UNROLL:  # (the levels' masked dA / dA^T are the same for every slice: made once, kept)
            for b in tl.static_range(LBT):
                dq, dk = _gla_bwd_level(
                    g_ptr, q, k, g, da, dat, dq, dk, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC
                )
        else:
            for b in range(LBT):
                dq, dk = _gla_bwd_level(
                    g_ptr, q, k, g, da, dat, dq, dk, ii, jj, t0, ck, mk, b, DK, dt, DOT_PREC
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
