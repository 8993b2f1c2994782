# mypy: ignore-errors
"""The per-chunk kernels that the gated linear recurrence and the gated delta rule share: the gates'
chunk-local cumsum, the intra-chunk scores of per-channel gates and their backward, and the per-chunk
output (stage 3).

- :func:`gate_cumsum_kernel`: ``GC`` from g in one pass over g in its own dtype (``op.GLA_FUSED_GLUE``,
  ``op.DELTA_FUSED_GLUE``); the gradient back to per-channel g: :func:`gate_cumsum_bwd_kernel`.
- The intra-chunk scores of per-channel gates, sum_d x_id k_jd exp(G_id - G_jd), into a (B*H, NP, BT)
  buffer: :func:`intra_scores_v2_kernel` (``op.GLA_INTRA_V2``, ``op.DELTA_INTRA_V2``: a chunk per
  program, log2(BT) tensor-core dots, level b pairing the rows whose chunk-local indices first differ at
  bit b, split at the first row of the later half) or :func:`intra_scores_kernel` (16-row sub-blocks,
  off-diagonal ones by tensor-core dots split at the query sub-block's first row, diagonal ones exactly
  element by element); with STRICT and beta the delta rule's A_kk. Their backward by 16-row sub-blocks:
  :func:`score_bwd_kernel` (the delta rule under per-channel gates).
- :func:`chunk_out_kernel` (stage 3), parallel over (chunk, batch * head, value block): o = scale
  [(q * exp(G)) S_c + A v], A the intra-chunk causal scores: for a scalar gate (q k^T) * exp(G_i - G_j)
  in the kernel, per channel read from the scores' buffer; the delta rule's with v replaced by U.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.linear.fwd import _row, _tile
from attnlab.kernels.linear.naive import GATE_FLOOR

#: ``naive.GATE_FLOOR`` as the kernels read it (a float global inside ``@triton.jit`` must be constexpr).
_GATE_FLOOR: tl.constexpr = tl.constexpr(GATE_FLOOR)


@triton.jit
def gate_cumsum_kernel(
    G, GC, N, NP, D,
    PER_CHANNEL: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
    K=None, KG=None, HAS_KG: tl.constexpr = False,
):  # fmt: skip
    """The chunk-local inclusive cumsum of log-decays, float32, zero-padded to NP = chunks * BT rows, in one
    pass (G in any float dtype, contiguous). PER_CHANNEL: G (B*H, N, D) -> GC (B*H, NP, D), one program
    per (chunk, batch * head, BD channels). Else one gate per token: G (B*H, N) -> GC (B*H, NP), one
    program per (BR chunks, batch * head), a (BR, BT) tile of them. Each gate is floored at
    ``naive.GATE_FLOOR`` in float32 before the sum (``naive.floor_gate``: no -inf in the cumsum, whatever
    g's dtype and magnitude). HAS_KG (PER_CHANNEL): also KG (B*H, NP, D) in KG's dtype = K (B*H, N, D) times
    exp(G_C - G), G_C the chunk's last cumsum row (0 in the padded rows): the delta rule's decayed keys
    (``op.DELTA_H_KG``), from the same cumsum."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    if PER_CHANNEL:
        rows = pid * BT + tl.arange(0, BT)[:, None]
        cols = tl.program_id(2) * BD + tl.arange(0, BD)[None, :]
        g = tl.load(G + bh * N * D + rows * D + cols, mask=(rows < N) & (cols < D), other=0.0)
        g = tl.maximum(g.to(tl.float32), _GATE_FLOOR)
        gc = tl.cumsum(g, axis=0)
        tl.store(GC + bh * NP * D + rows * D + cols, gc, mask=cols < D)
        if HAS_KG:
            g_last = tl.sum(tl.where(rows == pid * BT + BT - 1, gc, 0.0), axis=0)
            k = tl.load(K + bh * N * D + rows * D + cols, mask=(rows < N) & (cols < D), other=0.0)
            kg = k.to(tl.float32) * tl.exp(g_last[None, :] - gc)
            tl.store(KG + bh * NP * D + rows * D + cols, kg.to(KG.dtype.element_ty), mask=cols < D)
    else:
        rows = (pid * BR + tl.arange(0, BR))[:, None] * BT + tl.arange(0, BT)[None, :]
        g = tl.load(G + bh * N + rows, mask=rows < N, other=0.0)
        g = tl.maximum(g.to(tl.float32), _GATE_FLOOR)
        tl.store(GC + bh * NP + rows, tl.cumsum(g, axis=1), mask=rows < NP)


@triton.jit
def gate_cumsum_bwd_kernel(
    DGC, TAIL, DG, N, NP, D,
    BT: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """The gradient of per-channel log-decays through their chunk-local cumsum (``op.GLA_FUSED_GLUE``):
    DG[t] = sum over the rows s >= t of t's chunk of DGC[s], plus TAIL[c] (the chunk-end term, which
    reaches every row of the chunk), in DG's dtype. DGC (B*H, NP, D) float32, TAIL (B*H, chunks, D),
    DG (B*H, N, D); one program per (chunk, batch * head, BD channels)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    rows = c * BT + tl.arange(0, BT)[:, None]
    cols = tl.program_id(2) * BD + tl.arange(0, BD)[None, :]
    x = tl.load(DGC + (bh * NP + rows) * D + cols, mask=cols < D, other=0.0)
    tail = tl.load(TAIL + (bh * n_chunks + c) * D + cols, mask=cols < D, other=0.0)
    y = tl.cumsum(x, axis=0, reverse=True) + tail
    tl.store(DG + (bh * N + rows) * D + cols, y.to(DG.dtype.element_ty), mask=(rows < N) & (cols < D))


@triton.jit
def _diag_block(x_ptr, k_ptr, g_ptr, r0, N, DK, STRICT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                BKS: tl.constexpr):  # fmt: skip
    """A_ij = sum_d x_id k_jd exp(G_id - G_jd) for j <= i (j < i when STRICT) inside one sub-block, exact
    (the exponent masked to -inf before the exp), over slices of BKS channels; 0 elsewhere."""
    ii = tl.arange(0, BS)[:, None]
    jj = tl.arange(0, BS)[None, :]
    if STRICT:  # noqa: SIM108
        keep = (ii > jj)[:, :, None]
    else:
        keep = (ii >= jj)[:, :, None]
    a = tl.zeros((BS, BS), dtype=tl.float32)
    for s in range(BK // BKS):
        xs = _tile(x_ptr, r0, N, s * BKS, DK, DK, BS, BKS)
        ks = _tile(k_ptr, r0, N, s * BKS, DK, DK, BS, BKS)
        gs = _tile(g_ptr, r0, r0 + BS, s * BKS, DK, DK, BS, BKS)
        e = tl.exp(tl.where(keep, gs[:, None, :] - gs[None, :, :], float("-inf")))
        a += tl.sum(xs[:, None, :] * ks[None, :, :] * e, axis=2)
    return a


@triton.jit
def intra_scores_kernel(
    X, K, GC, BETA, A,
    N, NP, DK,
    STRICT: tl.constexpr, HAS_BETA: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The intra-chunk scores of per-channel gates, one 16-row query sub-block per program (sub-block,
    batch * head): A[t, j] = (beta_t) sum_d x_td k_jd exp(G_td - G_jd) for the chunk's key j <= t (j < t
    when STRICT), 0 for later keys. Rows of A are tokens (NP of them), columns the chunk's BT keys."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_sub = BT // BS
    c = pid // n_sub
    i = pid % n_sub
    t0 = c * BT
    ri = t0 + i * BS
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = X.dtype.element_ty
    x_ptr = X + bh * N * DK
    k_ptr = K + bh * N * DK
    g_ptr = GC + bh * NP * DK
    a_ptr = A + bh * NP * BT
    rows = ri + tl.arange(0, BS)[:, None]
    cols = tl.arange(0, BS)[None, :]
    x_i = _tile(x_ptr, ri, N, 0, DK, DK, BS, BK)
    g_i = _tile(g_ptr, ri, NP, 0, DK, DK, BS, BK)
    g_n = _row(g_ptr, ri, 0, DK, DK, BK)
    x_n = (x_i * tl.exp(g_i - g_n[None, :])).to(dt)
    if HAS_BETA:
        r1 = ri + tl.arange(0, BS)
        b_i = tl.load(BETA + bh * N + r1, mask=r1 < N, other=0.0).to(tl.float32)
    for j in range(i):
        rj = t0 + j * BS
        k_j = _tile(k_ptr, rj, N, 0, DK, DK, BS, BK)
        g_j = _tile(g_ptr, rj, NP, 0, DK, DK, BS, BK)
        a = tl.dot(x_n, tl.trans((k_j * tl.exp(g_n[None, :] - g_j)).to(dt)), input_precision=DOT_PREC)
        if HAS_BETA:
            a = a * b_i[:, None]
        tl.store(a_ptr + rows * BT + j * BS + cols, a)
    a = _diag_block(x_ptr, k_ptr, g_ptr, ri, N, DK, STRICT, BS, BK, BKS)
    if HAS_BETA:
        a = a * b_i[:, None]
    tl.store(a_ptr + rows * BT + i * BS + cols, a)
    for j in range(i + 1, n_sub):
        tl.store(a_ptr + rows * BT + j * BS + cols, tl.zeros((BS, BS), dtype=tl.float32))


@triton.jit
def intra_scores_v2_kernel(
    X, K, GC, A,
    N, NP, DK,
    BT: tl.constexpr, LBT: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    STRICT: tl.constexpr = False, HAS_BETA: tl.constexpr = False, BETA=None,
    Q2=None, A2=None, PAIR: tl.constexpr = False,
):  # fmt: skip
    """The intra-chunk scores of per-channel gates (``op.GLA_INTRA_V2``; :func:`intra_scores_kernel`'s
    non-strict result without beta, the same layout), one whole chunk per program (chunk, batch * head),
    by LBT = log2(BT) tensor-core dots over the chunk's rows per slice of BKS channels, no
    element-by-element products. Level b pairs the rows t with bit b of t (chunk-local) set with the rows
    j with it clear and the same higher bits, split at the row r_b = ((t >> b) | 1) << b between them (the
    first row of the later half of their 2^(b+1)-row block)::

        A_tj = sum_b [bits of t, j above b equal] (x_t exp(G_t - G_r)) . (k_j exp(G_r - G_j))    (t > j)
        A_tt = x_t . k_t

    Every t > j is paired at exactly one level (the highest bit where they differ), and both factors are
    exps of a later row's G minus an earlier one's (<= 1: nothing overflows, however strong the decay).
    One exp per element and level (the row's own side: exp(G_t - G_r) if bit b is set, exp(G_r - G_t)
    if not), BKS channels at a time; dot operands in x's dtype (float32 with UPCAST: then in DOT_PREC).
    Upper entries are exactly 0. STRICT: the diagonal too (j < t); HAS_BETA: row t times BETA[t] (B*H, N)
    (the delta rule's scores, ``op.DELTA_INTRA_V2``: :func:`intra_scores_kernel`'s other results).
    PAIR (X is K): also A2 = the non-strict scores of Q2 against K without beta, from the same loads of K
    and G, the same exps and K's side of every level's dot (the delta rule's k k^T and q k^T in one launch,
    ``op.DELTA_INTRA_PAIR``); A's products are made exactly as without PAIR."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t0 = c * BT
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = X.dtype.element_ty
    x_ptr = X + bh * N * DK
    k_ptr = K + bh * N * DK
    g_ptr = GC + bh * NP * DK
    rt = tl.arange(0, BT)
    ii = rt[:, None]
    jj = rt[None, :]
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    diag = tl.zeros((BT,), dtype=tl.float32)
    acc2 = acc  # (PAIR's: Q2 against K)
    diag2 = diag
    for kc in range(0, BK, BKS):
        cols = kc + tl.arange(0, BKS)[None, :]
        k = _tile(k_ptr, t0, N, kc, DK, DK, BT, BKS)
        if PAIR:  # noqa: SIM108
            x = k
        else:
            x = _tile(x_ptr, t0, N, kc, DK, DK, BT, BKS)
        g = _tile(g_ptr, t0, NP, kc, DK, DK, BT, BKS)
        diag += tl.sum(x * k, axis=1)
        if PAIR:
            q2 = _tile(Q2 + bh * N * DK, t0, N, kc, DK, DK, BT, BKS)
            diag2 += tl.sum(q2 * k, axis=1)
        for b in range(LBT):  # (a loop, not unrolled: the levels' masks and gathers are not all live at once)
            up = (((rt >> b) & 1) == 1)[:, None]  # rows on the later side of their level-b split
            ref = t0 + (((rt >> b) | 1) << b)
            gr = tl.load(g_ptr + ref[:, None] * DK + cols, mask=cols < DK, other=0.0)
            e = tl.exp(tl.where(up, g - gr, gr - g))
            xb = tl.where(up, x * e, 0.0).to(dt)
            kb = tl.where(up, 0.0, k * e).to(dt)
            same = (ii >> (b + 1)) == (jj >> (b + 1))
            p = tl.dot(xb, tl.trans(kb), input_precision=DOT_PREC)
            acc += tl.where(same, p, 0.0)
            if PAIR:
                qb = tl.where(up, q2 * e, 0.0).to(dt)
                p2 = tl.dot(qb, tl.trans(kb), input_precision=DOT_PREC)
                acc2 += tl.where(same, p2, 0.0)
    if not STRICT:
        acc += tl.where(ii == jj, diag[:, None], 0.0)
    if HAS_BETA:
        b_t = tl.load(BETA + bh * N + t0 + rt, mask=t0 + rt < N, other=0.0).to(tl.float32)
        acc = acc * b_t[:, None]
    tl.store(A + bh * NP * BT + (t0 + ii) * BT + jj, acc)
    if PAIR:
        acc2 += tl.where(ii == jj, diag2[:, None], 0.0)
        tl.store(A2 + bh * NP * BT + (t0 + ii) * BT + jj, acc2)


@triton.jit
def score_bwd_kernel(
    X, Y, GC, DP, DX, DY, DG,
    N, NP, DK,
    SAME_OUT: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The backward of per-channel decayed intra-chunk scores P_ij = sum_d x_id y_jd exp(G_id - G_jd)
    (j <= i within a chunk) given their gradient DP (B*H, NP, BT; zero where there is no score), one
    16-row sub-block i per program (sub-block, batch * head), added to the float32 buffers (NP rows)::

        DX_i += sum_{j<=i} dP_ij y_j exp(G_i - G_j);  DY_i += sum_{r>=i} dP_ri x_r exp(G_r - G_i)
        DG_i += x_i * (that DX part) - y_i * (that DY part)

    Earlier / later sub-blocks by dots with the decay split at a row between them; the diagonal
    sub-block row by row, exactly. dP^T blocks are loaded tiles transposed. SAME_OUT: DX and DY are one
    buffer (x = y = k: both parts added at once)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_sub = BT // BS
    c = pid // n_sub
    i = pid % n_sub
    t0 = c * BT
    ri = t0 + i * BS
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = X.dtype.element_ty
    x_ptr = X + bh * N * DK
    y_ptr = Y + bh * N * DK
    g_ptr = GC + bh * NP * DK
    p_ptr = DP + bh * NP * BT
    ii = tl.arange(0, BS)[:, None]
    jj = tl.arange(0, BS)[None, :]
    rk = tl.arange(0, BK)
    mk = rk < DK
    x_i = _tile(x_ptr, ri, N, 0, DK, DK, BS, BK)
    y_i = _tile(y_ptr, ri, N, 0, DK, DK, BS, BK)
    g_i = _tile(g_ptr, ri, NP, 0, DK, DK, BS, BK)
    # DX_i
    g_n = _row(g_ptr, ri, 0, DK, DK, BK)
    acc = tl.zeros((BS, BK), dtype=tl.float32)
    for j in range(i):
        rj = t0 + j * BS
        y_j = _tile(y_ptr, rj, N, 0, DK, DK, BS, BK)
        g_j = _tile(g_ptr, rj, NP, 0, DK, DK, BS, BK)
        dp = _tile(p_ptr, ri, NP, j * BS, BT, BT, BS, BS)
        acc += tl.dot(dp.to(dt), (y_j * tl.exp(g_n[None, :] - g_j)).to(dt), input_precision=DOT_PREC)
    dx = acc * tl.exp(g_i - g_n[None, :])
    dp_ii = tl.where(ii >= jj, _tile(p_ptr, ri, NP, i * BS, BT, BT, BS, BS), 0.0)
    for j in range(BS):
        col = tl.sum(tl.where(jj == j, dp_ii, 0.0), axis=1)
        y_row = tl.load(y_ptr + (ri + j) * DK + rk, mask=mk & (ri + j + 0 * rk < N), other=0.0).to(tl.float32)
        g_row = tl.load(g_ptr + (ri + j) * DK + rk, mask=mk, other=0.0)
        dx += col[:, None] * y_row[None, :] * tl.exp(tl.where(ii >= j, g_i - g_row[None, :], float("-inf")))
    # DY_i
    g_m = _row(g_ptr, ri + BS - 1, 0, DK, DK, BK)
    acc = tl.zeros((BS, BK), dtype=tl.float32)
    for r in range(i + 1, n_sub):
        rr = t0 + r * BS
        x_r = _tile(x_ptr, rr, N, 0, DK, DK, BS, BK)
        g_r = _tile(g_ptr, rr, NP, 0, DK, DK, BS, BK)
        dp_t = tl.trans(_tile(p_ptr, rr, NP, i * BS, BT, BT, BS, BS))
        acc += tl.dot(dp_t.to(dt), (x_r * tl.exp(g_r - g_m[None, :])).to(dt), input_precision=DOT_PREC)
    dy = acc * tl.exp(g_m[None, :] - g_i)
    dp_t_ii = tl.trans(dp_ii)
    for j in range(BS):
        col = tl.sum(tl.where(jj == j, dp_t_ii, 0.0), axis=1)
        x_row = tl.load(x_ptr + (ri + j) * DK + rk, mask=mk & (ri + j + 0 * rk < N), other=0.0).to(tl.float32)
        g_row = tl.load(g_ptr + (ri + j) * DK + rk, mask=mk, other=0.0)
        dy += col[:, None] * x_row[None, :] * tl.exp(tl.where(ii <= j, g_row[None, :] - g_i, float("-inf")))
    off = (ri + ii) * DK + rk[None, :]
    m2 = mk[None, :]
    if SAME_OUT:
        tl.store(
            DX + bh * NP * DK + off, tl.load(DX + bh * NP * DK + off, mask=m2, other=0.0) + dx + dy, mask=m2
        )
    else:
        tl.store(DX + bh * NP * DK + off, tl.load(DX + bh * NP * DK + off, mask=m2, other=0.0) + dx, mask=m2)
        tl.store(DY + bh * NP * DK + off, tl.load(DY + bh * NP * DK + off, mask=m2, other=0.0) + dy, mask=m2)
    dg = tl.load(DG + bh * NP * DK + off, mask=m2, other=0.0) + x_i * dx - y_i * dy
    tl.store(DG + bh * NP * DK + off, dg, mask=m2)


@triton.jit
def _split_g(g_ptr, ii, t0, ck, mk, b, DK):
    """G of the channels ck at each row's level-b split row t0 + (((t >> b) | 1) << b): (BT, BKS)."""
    return tl.load(g_ptr + (t0 + (((ii >> b) | 1) << b)) * DK + ck[None, :], mask=mk[None, :], other=0.0)


@triton.jit
def _old_grads(DX, DY, DG, off, mo, SAME_OUT: tl.constexpr):
    """The float32 buffers' contents that :func:`score_bwd_v2_kernel` adds to (DY's: DX's when SAME_OUT)."""
    dx0 = tl.load(DX + off, mask=mo, other=0.0)
    dy0 = dx0 if SAME_OUT else tl.load(DY + off, mask=mo, other=0.0)
    return dx0, dy0, tl.load(DG + off, mask=mo, other=0.0)


@triton.jit
def _score_bwd_level(x, y, g, gr, dp, dx, dy, ii, jj, b, dt: tl.constexpr, DOT_PREC: tl.constexpr,
                     SAME: tl.constexpr):  # fmt: skip
    """Level b of :func:`score_bwd_v2_kernel`: (dx, dy) plus the pairs (t, j) whose chunk-local indices
    first differ at bit b (t's bit set, j's clear), the decay split at the row whose G is gr. SAME: x is
    y (one decayed operand serves both dots)."""
    up = ((ii >> b) & 1) == 1  # rows on the later side of their level-b split
    # exp(G_t - G_r) on the later rows, exp(G_r - G_j) on the earlier ones (both <= 1)
    e = tl.exp2((g - gr) * tl.where(up, 1.4426950408889634, -1.4426950408889634))
    keep = ((ii >> (b + 1)) == (jj >> (b + 1))) & up & (((jj >> b) & 1) == 0)  # the level's pairs
    dpm = tl.where(keep, dp, 0.0)  # (its rows of earlier t and columns of later j are 0: no other selects)
    ye = (y * e).to(dt)
    xe = ye if SAME else (x * e).to(dt)
    dx += e * tl.dot(dpm, ye, input_precision=DOT_PREC)
    dy += e * tl.dot(tl.trans(dpm), xe, input_precision=DOT_PREC)
    return dx, dy


@triton.jit
def score_bwd_v2_kernel(
    X, Y, GC, DP, DX, DY, DG,
    N, NP, DK,
    SAME_OUT: tl.constexpr, BT: tl.constexpr, LBT: tl.constexpr, BKS: tl.constexpr, UNROLL: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """:func:`score_bwd_kernel`'s sums into the same buffers, one whole chunk per program (chunk, batch *
    head), by ``intra_scores_v2_kernel``'s split (as the gla backward's ``_gla_bwd_level``): for the
    scores P_tj = sum_d x_td y_jd exp(G_td - G_jd) (j <= t) and their gradient dP (DP, (B*H, NP, BT)
    float32; entries above the diagonal are never used), added to the float32 buffers DX, DY, DG (B*H,
    NP, K)::

        DX_t += sum_{j<=t} dP_tj y_j exp(G_t - G_j);  DY_j += sum_{t>=j} dP_tj x_t exp(G_t - G_j)
        DG_t += x_t * (that DX part) - y_t * (that DY part)

    LBT = log2(BT) levels; level b pairs the rows t with bit b set with the rows j with it clear and the
    same higher bits, the decay split at r_b = ((t >> b) | 1) << b (both factors exps of a later row's G
    minus an earlier one's: <= 1, nothing overflows, however strong the decay): one exp tile e per level
    (exp(G_t - G_r) on the later rows, exp(G_r - G_j) on the earlier ones) serves both dx += e * (dP_b
    (y * e)) and dy += e * (dP_b^T (x * e)), dP_b = dP masked to the level's pairs (no other selects;
    dP_b^T is its transpose, not a second load). The diagonal (G_t - G_t = 0) exactly, in float32:
    dx_t += dP_tt y_t, dy_t += dP_tt x_t. Per slice of BKS channels (K not a multiple of BKS: masked),
    the slices split over the grid's third axis if it has more than one program. UNROLL: the levels
    unrolled (their masks constant: the masked dP_b are made once per chunk, not per slice), each level's
    split rows of G loaded while the level before it computes and the buffers' old contents while the
    last one does; else a loop over the levels.

    Dot operands: in x's dtype, or float32 with UPCAST (then the dots in DOT_PREC: tf32 for 16-bit inputs,
    ieee for float32 ones). :func:`score_bwd_kernel` takes x's dtype for its off-diagonal sub-blocks and
    float32 for the pairs inside its diagonal 16-row sub-blocks; here every off-diagonal pair goes through
    the dots, so 16-bit operands also round dP and y e / x e (2^-9) on the pairs inside 16-row blocks (a
    quarter of a 64-row chunk's pairs). Measured on an H100 (bf16, chunk 64, K = 128, against float64):
    the same largest error as the old kernel's (3e-3 of the largest gradient), about 2x its RMS error
    (2e-3 against 0.9e-3). Float32 operands with tf32 dots (UPCAST) beat the old kernel on every pair
    (1e-3 largest, 0.65e-3 RMS) at about 1.6x this kernel's time. SAME_OUT: x = y = k and DX, DY one
    buffer: both parts added at once; Y is not read (X's rows serve as both). Rows past N read x = y = 0;
    every one of the chunk's BT rows (< NP) is written."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t0 = c * BT
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = X.dtype.element_ty
    rt = tl.arange(0, BT)
    ii = rt[:, None]
    jj = rt[None, :]
    rows = t0 + ii
    mrow = rows < N
    x_ptr = X + bh * N * DK
    y_ptr = Y + bh * N * DK
    g_ptr = GC + bh * NP * DK
    dp = tl.load(DP + bh * NP * BT + rows * BT + jj)  # dP: rows t, columns j
    dd = tl.sum(tl.where(ii == jj, dp, 0.0), axis=1)[:, None]  # dP_tt (float32)
    dp = dp.to(dt)
    for kc in range(tl.program_id(2) * BKS, DK, tl.num_programs(2) * BKS):
        ck = kc + tl.arange(0, BKS)
        mk = ck < DK
        mo = mk[None, :]
        off = bh * NP * DK + rows * DK + ck[None, :]
        x = tl.load(x_ptr + rows * DK + ck[None, :], mask=mrow & mo, other=0.0).to(tl.float32)
        if SAME_OUT:
            y = x
        else:
            y = tl.load(y_ptr + rows * DK + ck[None, :], mask=mrow & mo, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows * DK + ck[None, :], mask=mo, other=0.0)
        dx = dd * y
        dy = dd * x
        if UNROLL:
            gr = _split_g(g_ptr, ii, t0, ck, mk, 0, DK)
            for b in tl.static_range(LBT):
                grb = gr
                if b + 1 < LBT:  # (loads in flight during this level)
                    gr = _split_g(g_ptr, ii, t0, ck, mk, b + 1, DK)
                else:
                    dx0, dy0, dg0 = _old_grads(DX, DY, DG, off, mo, SAME_OUT)
                dx, dy = _score_bwd_level(x, y, g, grb, dp, dx, dy, ii, jj, b, dt, DOT_PREC, SAME_OUT)
        else:
            for b in range(LBT):
                gr = _split_g(g_ptr, ii, t0, ck, mk, b, DK)
                dx, dy = _score_bwd_level(x, y, g, gr, dp, dx, dy, ii, jj, b, dt, DOT_PREC, SAME_OUT)
            dx0, dy0, dg0 = _old_grads(DX, DY, DG, off, mo, SAME_OUT)
        if SAME_OUT:
            tl.store(DX + off, dx0 + dx + dy, mask=mo)
            tl.store(DG + off, dg0 + x * (dx - dy), mask=mo)
        else:
            tl.store(DX + off, dx0 + dx, mask=mo)
            tl.store(DY + off, dy0 + dy, mask=mo)
            tl.store(DG + off, dg0 + x * dx - y * dy, mask=mo)


@triton.jit
def chunk_out_kernel(
    Q, K, V, GC, HS, A, O,
    N, NV, NP, DK, DV, scale,
    GATE: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Stage 3, one program per (value block, chunk, batch * head): o = scale [(q * exp(G)) S_c + A v]
    with S_c the state at the chunk's start (HS) and A the causal intra-chunk scores (GATE == 2: read from
    A; GATE == 1: (q k^T) * exp(G_i - G_j) here). V has NV rows per batch * head (N, or NP for the delta
    rule's U). BK covers the whole key dim."""
    vb = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    t0 = c * BT
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = Q.dtype.element_ty
    ii = tl.arange(0, BT)[:, None]
    jj = tl.arange(0, BT)[None, :]
    q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    if GATE == 2:
        g = _tile(GC + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
        qg = q * tl.exp(g)
    else:
        g = tl.load(GC + bh * NP + t0 + tl.arange(0, BT))
        qg = q * tl.exp(g)[:, None]
    s = _tile(HS + (bh * n_chunks + c) * DK * DV, 0, DK, vb * BV, DV, DV, BK, BV)
    acc = tl.dot(qg.to(dt), s.to(dt), input_precision=DOT_PREC)
    if GATE == 2:
        a = _tile(A + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
    else:
        k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
        a = tl.dot(q.to(dt), tl.trans(k.to(dt)), input_precision=DOT_PREC)
        a = a * tl.exp(tl.where(ii >= jj, g[:, None] - g[None, :], float("-inf")))
    a = tl.where(ii >= jj, a, 0.0)
    v = _tile(V + bh * NV * DV, t0, NV, vb * BV, DV, DV, BT, BV)
    acc += tl.dot(a.to(dt), v.to(dt), input_precision=DOT_PREC)
    r = t0 + ii
    rv = vb * BV + tl.arange(0, BV)[None, :]
    tl.store(O + bh * N * DV + r * DV + rv, (acc * scale).to(O.dtype.element_ty), mask=(r < N) & (rv < DV))
