# mypy: ignore-errors
"""Chunk-parallel Triton kernels of the gated linear recurrence (GLA; lightning and linear as a scalar
gate) and of the gated delta rule (WY/UT form), forward, and the state-gradient pass of the backward.

Layout: q, k (B*H, N, K), v and o (B*H, N, V), contiguous. ``GC`` holds the chunk-local inclusive cumsum
G of the log-decays, zero-padded to NP = chunks * BT rows: per channel (GATE == 2: (B*H, NP, K)) or one
per token (GATE == 1: (B*H, NP); lightning's per-head decays, linear's zeros, gated_delta's per-head
gate). States (K, V) are float32 (but the chunk-start states of a forward without a backward, kept in
the inputs' 16-bit dtype: ``op.GLA_H_COMPACT``, ``op.DELTA_H_COMPACT``). Every decay factor is exp of a
difference G_i - G_j with i after j, or a product of two such factors split at a row between i and j
(each <= 1): nothing overflows, however strong the decay (no exp(G) / exp(-G) split across a chunk).

The gated linear forward: ``GC`` per channel by :func:`gate_cumsum_kernel` (one pass over g in its own dtype,
``op.GLA_FUSED_GLUE``; its backward :func:`gate_cumsum_bwd_kernel`), then three stages (the backward's
state gradient takes stages 1 and 2 with ``BACKWARD``):

1. :func:`chunk_local_state_kernel`, parallel over (chunk, batch * head, state tile): each chunk's own
   contribution M_c = sum_j (k_j * exp(G_C - G_j)) v_j^T (backward: scale sum_i (q_i * exp(G_i)) do_i^T).
2. :func:`chunk_scan_kernel`, parallel over (batch * head, state tile), sequential over chunks with one
   multiply-add of a (BK, BV) tile each: S_{c+1} = exp(G_C) S_c + M_c, the state at each chunk start
   written over M_c (backward: reversed, the state's gradient at each chunk end).

   The forward takes stages 1 and 2 in one sequential pass instead (``op.GLA_H_PASS``):
   :func:`gla_h_kernel`, parallel over (key tile, value tile, batch * head), sequential over chunks: the
   state at each chunk start stored, then S = exp(G_C) S + (k exp(G_C - G))^T v by one tensor-core dot
   into the register tile (k^T loaded transposed), no M buffer written and read back.
3. :func:`chunk_out_kernel`, parallel over (chunk, batch * head, value block): o = scale [(q * exp(G)) S_c
   + A v], A the intra-chunk causal scores: for a scalar gate (q k^T) * exp(G_i - G_j) in the kernel;
   per channel sum_d q_id k_jd exp(G_id - G_jd) into a (B*H, NP, BT) buffer, made by
   :func:`intra_scores_v2_kernel` (``op.GLA_INTRA_V2``: a chunk per program, log2(BT) tensor-core dots,
   level b pairing the rows whose chunk-local indices first differ at bit b, split at the first row of
   the later half) or :func:`intra_scores_kernel` (16-row sub-blocks, off-diagonal ones by tensor-core
   dots split at the query sub-block's first row, diagonal ones exactly element by element).

The gated delta rule (Yang et al., "Parallelizing Linear Transformers with the Delta Rule"; Gated
DeltaNet): per chunk, with A_kk the strict lower scores beta_i sum_d k_id k_jd exp(G_id - G_jd),
T = (I + A_kk)^-1, W = T (beta K exp(G)) and U0 = T (beta V), all parallel over chunks
(:func:`delta_wy_block_kernel`: A_kk by 16-row blocks of tensor-core dots, the diagonal 16 x 16 blocks
inverted by forward substitution side by side, the blocks below them by block forward substitution with
dots, W and U0 by dots per block; or :func:`delta_wy_kernel`, forward substitution row by row over the
whole chunk, ``op.WY_BLOCKWISE``); then a sequential pass per (batch * head, value block): U_c = U0_c -
W_c S_c (the u_t of the recurrence, all at once), S_{c+1} = exp(G_C) S_c + (K exp(G_C - G))^T U_c
(:func:`delta_h_v2_kernel`: the state in 64-row register tiles, k^T loaded transposed, 16-bit dot operands
with fp32 accumulation, and without a backward the chunk states and U kept in 16 bits; or
:func:`delta_h_kernel`, ``op.DELTA_H_V2``); then stage 3 with v replaced by U.

Backward. The state's gradient at every chunk end by stages 1 and 2 reversed (``BACKWARD``; the scan also
gives the log-decays' gradient at each chunk's last row, sum_v S_end * dS_end); then dq, dk, dv per chunk
in parallel: :func:`chunk_bwd_scalar_kernel` (scalar gate, 64-row tiles) or, per-channel gates,
:func:`gla_bwd_chunk_kernel` (``op.GLA_BWD_FUSED``: a whole chunk per program, dq, dk, dv and dg, the
intra-chunk sums by the forward's split dots, the chunk-end term from S and dH, dg's reverse cumsum
folded in; the state gradient then by :func:`gla_h_kernel` with ``REVERSE``, ``op.GLA_BWD_H_PASS``) or
:func:`gla_bwd_sub_kernel` (16-row sub-blocks, the forward's intra-chunk scores;
:func:`gla_bwd_inter_kernel` first with ``op.GLA_BWD_SPLIT``) and dg from the cumsum's gradient by
:func:`gate_cumsum_bwd_kernel`. The
delta rule: :func:`delta_bwd_dh_kernel` (the reverse sequential pass: dH, dU), then
:func:`delta_bwd_chunk_kernel` (scalar gate: every chunk's gradients from the saved S, U, T), or per
channel :func:`delta_bwd_chunk_channel_kernel` and :func:`score_bwd_kernel` (the intra-chunk scores' own
gradients by 16-row sub-blocks). The delta rule's ``GC`` is made by :func:`gate_cumsum_kernel` (one pass
over g in its own dtype; ``op.DELTA_FUSED_GLUE``). Packed sequences (varlen): the sequential kernels walk
each sequence's chunks alone (``VARLEN``, chunk offsets ``SEQ``; :func:`_chunk_range`).

Transposes are taken of loaded tiles only, never of a dot's result (Triton 3.4 to 3.7.0 miscompile
tl.trans of a Hopper wgmma-layout tensor: fla issue #640).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnlab.kernels.linear.fwd import _row, _tile


@triton.jit
def _chunk_range(SEQ, sh, BHM, n_chunks, VARLEN: tl.constexpr):
    """(batch * head, first chunk, end chunk) of program ``sh`` of a sequential kernel: every chunk of head
    ``sh``, or with VARLEN (``sh`` = sequence * BHM + head, a packed batch of BHM heads) the sequence's
    chunks SEQ[s] .. SEQ[s + 1]. (The chunk bounds are int32 tensors in both cases.)"""
    if VARLEN:
        bh = sh % BHM
        c_lo = tl.load(SEQ + sh // BHM)
        c_hi = tl.load(SEQ + sh // BHM + 1)
    else:
        bh = sh
        c_lo = tl.zeros((), dtype=tl.int32)
        c_hi = tl.zeros((), dtype=tl.int32) + n_chunks
    return bh, c_lo, c_hi


@triton.jit
def chunk_local_state_kernel(
    X, Y, GC, M,
    N, NP, DK, DV, NKB, scale,
    BACKWARD: tl.constexpr, GATE: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Stage 1: M[bh, c] (a (BK, BV) tile of it) = sum_j (x_j * f_j) y_j^T over chunk c's rows, with
    f_j = exp(G_C - G_j) (forward: x = k, y = v) or scale exp(G_j) (BACKWARD: x = q, y = do)."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    kb = pid % NKB
    vb = pid // NKB
    n_chunks = tl.cdiv(N, BT)
    t0 = c * BT
    if UPCAST:  # noqa: SIM108
        dt = tl.float32
    else:
        dt = X.dtype.element_ty
    x = _tile(X + bh * N * DK, t0, N, kb * BK, DK, DK, BT, BK)
    y = _tile(Y + bh * N * DV, t0, N, vb * BV, DV, DV, BT, BV)
    if GATE == 2:
        g = _tile(GC + bh * NP * DK, t0, NP, kb * BK, DK, DK, BT, BK)
        if BACKWARD:
            x = x * (tl.exp(g) * scale)
        else:
            g_last = _row(GC + bh * NP * DK, t0 + BT - 1, kb * BK, DK, DK, BK)
            x = x * tl.exp(g_last[None, :] - g)
    else:
        g = tl.load(GC + bh * NP + t0 + tl.arange(0, BT))
        if BACKWARD:
            x = x * (tl.exp(g) * scale)[:, None]
        else:
            g_last = tl.load(GC + bh * NP + t0 + BT - 1)
            x = x * tl.exp(g_last - g)[:, None]
    m = tl.dot(tl.trans(x.to(dt)), y.to(dt), input_precision=DOT_PREC)
    rk = kb * BK + tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    tl.store(
        M + (bh * n_chunks + c) * DK * DV + rk[:, None] * DV + rv[None, :],
        m,
        mask=(rk[:, None] < DK) & (rv[None, :] < DV),
    )


@triton.jit
def chunk_scan_kernel(
    M, GC, INIT, FINAL, HS, HT, TAIL, SEQ,
    N, NP, DK, DV, NKB, BHM,
    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, GATE: tl.constexpr, HAS_TAIL: tl.constexpr,
    VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Stage 2, in place: M[c] becomes the state at chunk c's start (REVERSE: the state's gradient at
    chunk c's end); FINAL the state after the last chunk (REVERSE: the initial state's gradient). One
    program per (state tile, batch * head). With HAS_TAIL (REVERSE), TAIL[value block, bh, c] gets this
    tile's part of sum_v S_end * dS_end per key channel (S_end the forward state at chunk c's end: HS[c+1],
    or HT after the last chunk): the log-decays' gradient at the chunk's last row. VARLEN: one program per
    (state tile, sequence * head) over the sequence's chunks SEQ[s] .. SEQ[s + 1] of a packed batch of
    BHM heads (INIT, FINAL, HT per sequence and head)."""
    pid = tl.program_id(0)
    sh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    bh, c_lo, c_hi = _chunk_range(SEQ, sh, BHM, n_chunks, VARLEN)
    kb = pid % NKB
    vb = pid // NKB
    rk = kb * BK + tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    mk = rk < DK
    mask = mk[:, None] & (rv[None, :] < DV)
    off = rk[:, None] * DV + rv[None, :]
    if HAS_INIT:
        s = tl.load(INIT + sh * DK * DV + off, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BK, BV), dtype=tl.float32)
    # Software-pipelined by hand: chunk c's local state and gate are loaded one step ahead (while chunk
    # c - 1 is stored and folded in), so each step waits for one memory round trip at most, not two.
    # (M[c + 1] is read before M[c] is overwritten: different addresses.)
    # (Indices past the ends are clamped to a chunk of this head: a harmless load, never used.)
    c = tl.minimum(tl.maximum(c_hi - 1 if REVERSE else c_lo, 0), n_chunks - 1)
    m = tl.load(M + (bh * n_chunks + c) * DK * DV + off, mask=mask, other=0.0)
    if GATE == 2:
        gl = tl.load(GC + (bh * NP + c * BT + BT - 1) * DK + rk, mask=mk, other=0.0)
    else:
        gl = tl.load(GC + bh * NP + c * BT + BT - 1)
    for cc in range(c_lo, c_hi):
        if REVERSE:
            c = c_lo + c_hi - 1 - cc
            cn = tl.maximum(c - 1, 0)
        else:
            c = cc
            cn = tl.minimum(c + 1, n_chunks - 1)
        m_next = tl.load(M + (bh * n_chunks + cn) * DK * DV + off, mask=mask, other=0.0)
        if GATE == 2:
            g_next = tl.load(GC + (bh * NP + cn * BT + BT - 1) * DK + rk, mask=mk, other=0.0)
        else:
            g_next = tl.load(GC + bh * NP + cn * BT + BT - 1)
        tl.store(M + (bh * n_chunks + c) * DK * DV + off, s, mask=mask)
        if HAS_TAIL:
            if c + 1 < c_hi:
                s_end = tl.load(HS + (bh * n_chunks + c + 1) * DK * DV + off, mask=mask, other=0.0)
            else:
                s_end = tl.load(HT + sh * DK * DV + off, mask=mask, other=0.0)
            tail_ptr = TAIL + ((vb * BHM + bh) * n_chunks + c) * DK + rk
            tl.store(tail_ptr, tl.sum(s_end * s, axis=1), mask=mk)
        if GATE == 2:  # noqa: SIM108
            s = s * tl.exp(gl)[:, None] + m
        else:
            s = s * tl.exp(gl) + m
        m = m_next
        gl = g_next
    tl.store(FINAL + sh * DK * DV + off, s, mask=mask)


@triton.jit
def gla_h_kernel(
    K, V, GC, H0, HS, HT, SEQ,
    N, NP, DK, DV, NKB, BHM, scale,
    GATE: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr, DOT_PREC: tl.constexpr,
    REVERSE: tl.constexpr = False,
):  # fmt: skip
    """Stages 1 and 2 of the forward in one sequential pass (``op.GLA_H_PASS``), one program per (state
    tile, batch * head) walking its chunks: HS[c] = S (the state at chunk c's start, in HS's dtype), then
    S = exp(G_C) * S + (k exp(G_C - G))^T v by one tensor-core dot into the float32 register tile, k^T
    (and per-channel gates' G^T) loaded transposed (BK, BT) from k's rows (no transpose in registers;
    GATE == 1: the row decays exp(G_C - G_j) on k^T's columns). HT the final state (float32). The key
    rows evolve independently, so the state is split over key and value tiles alike (no M buffer written
    and read back, as stages 1 and 2 do). LOWP: dot operands in k's dtype (16-bit; k exp(G_C - G)
    rounded to it), float32 accumulation; else float32 operands (``DOT_PREC``). VARLEN: as
    :func:`chunk_scan_kernel` (H0, HT per sequence and head).

    REVERSE (the backward's state gradient, ``op.GLA_BWD_H_PASS``: stages 1 and 2 with ``BACKWARD`` in one
    pass): K = q, V = do, H0 = the final state's gradient, the chunks walked from the last: HS[c] = dS (the
    gradient at chunk c's end), then dS = exp(G_C) * dS + scale (q exp(G))^T do; HT the initial state's
    gradient. ``scale`` is read only then."""
    pid = tl.program_id(0)
    sh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    bh, c_lo, c_hi = _chunk_range(SEQ, sh, BHM, n_chunks, VARLEN)
    kb = pid % NKB
    vb = pid // NKB
    rk = kb * BK + tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    mk = rk < DK
    mv = rv < DV
    mask = mk[:, None] & mv[None, :]
    off = rk[:, None] * DV + rv[None, :]
    if HAS_H0:
        s = tl.load(H0 + sh * DK * DV + off, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BK, BV), dtype=tl.float32)
    k_ptr = K + bh * N * DK
    v_ptr = V + bh * N * DV
    for cc in range(c_lo, c_hi):
        if REVERSE:  # noqa: SIM108
            c = c_lo + c_hi - 1 - cc
        else:
            c = cc
        t0 = c * BT
        r = t0 + rt
        tl.store(HS + (bh * n_chunks + c) * DK * DV + off, s.to(HS.dtype.element_ty), mask=mask)
        kt = tl.load(k_ptr + r[None, :] * DK + rk[:, None], mask=mk[:, None] & (r[None, :] < N), other=0.0)
        v = tl.load(v_ptr + r[:, None] * DV + rv[None, :], mask=(r[:, None] < N) & mv[None, :], other=0.0)
        if GATE == 2:
            gt = tl.load(GC + (bh * NP + r[None, :]) * DK + rk[:, None], mask=mk[:, None], other=0.0)
            gl = tl.load(GC + (bh * NP + t0 + BT - 1) * DK + rk, mask=mk, other=0.0)
            if REVERSE:
                kd = kt.to(tl.float32) * (tl.exp(gt) * scale)
            else:
                kd = kt.to(tl.float32) * tl.exp(gl[:, None] - gt)
            s = s * tl.exp(gl)[:, None]
        else:
            g = tl.load(GC + bh * NP + r)
            gl = tl.load(GC + bh * NP + t0 + BT - 1)
            if REVERSE:
                kd = kt.to(tl.float32) * (tl.exp(g) * scale)[None, :]
            else:
                kd = kt.to(tl.float32) * tl.exp(gl - g)[None, :]
            s = s * tl.exp(gl)
        if LOWP:
            s = tl.dot(kd.to(K.dtype.element_ty), v.to(K.dtype.element_ty), s)
        else:
            s = tl.dot(kd, v.to(tl.float32), s, input_precision=DOT_PREC)
    tl.store(HT + sh * DK * DV + off, s, mask=mask)


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
    (the delta rule's scores, ``op.DELTA_INTRA_V2``: :func:`intra_scores_kernel`'s other results)."""
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
    for kc in range(0, BK, BKS):
        cols = kc + tl.arange(0, BKS)[None, :]
        x = _tile(x_ptr, t0, N, kc, DK, DK, BT, BKS)
        k = _tile(k_ptr, t0, N, kc, DK, DK, BT, BKS)
        g = _tile(g_ptr, t0, NP, kc, DK, DK, BT, BKS)
        diag += tl.sum(x * k, axis=1)
        for b in range(LBT):  # (a loop, not unrolled: the levels' masks and gathers are not all live at once)
            up = (((rt >> b) & 1) == 1)[:, None]  # rows on the later side of their level-b split
            ref = t0 + (((rt >> b) | 1) << b)
            gr = tl.load(g_ptr + ref[:, None] * DK + cols, mask=cols < DK, other=0.0)
            e = tl.exp(tl.where(up, g - gr, gr - g))
            xb = tl.where(up, x * e, 0.0).to(dt)
            kb = tl.where(up, 0.0, k * e).to(dt)
            p = tl.dot(xb, tl.trans(kb), input_precision=DOT_PREC)
            acc += tl.where((ii >> (b + 1)) == (jj >> (b + 1)), p, 0.0)
    if not STRICT:
        acc += tl.where(ii == jj, diag[:, None], 0.0)
    if HAS_BETA:
        b_t = tl.load(BETA + bh * N + t0 + rt, mask=t0 + rt < N, other=0.0).to(tl.float32)
        acc = acc * b_t[:, None]
    tl.store(A + bh * NP * BT + (t0 + ii) * BT + jj, acc)


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
def delta_wy_kernel(
    K, V, GC, BETA, AKK, W, U, TT,
    N, NP, DK, DV,
    GATE: tl.constexpr, SAVE_T: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The delta rule's UT transform of one chunk per program (chunk, batch * head): T = (I + A_kk)^-1 by
    forward substitution (A_kk strict lower: beta_i sum_d k_id k_jd exp(G_id - G_jd); read from AKK when
    GATE == 2, made here otherwise), then W = T (beta k exp(G)) (B*H, NP, K) and U0 = T (beta v)
    (B*H, NP, V), float32 (dots in float32: ``DOT_PREC`` tf32 or ieee); with SAVE_T, T itself
    (B*H, NP, BT) for the backward."""
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
    UPCAST: tl.constexpr,
):  # fmt: skip
    """:func:`delta_wy_kernel`'s results (W, U0, with SAVE_T T; the same layouts) by 16-row blocks, one
    chunk per program (chunk, batch * head). With NB = BT / 16 blocks (1, 2 or 4) and A_ab the (a, b)
    block of A_kk (GATE == 1: beta_a (k_a k_b^T) exp(G_a - G_b) by tensor-core dots in k's dtype
    (float32 with UPCAST); GATE == 2: read from AKK)::

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
    else:  # GATE == 2: the blocks of AKK (beta and the per-channel decays in)
        a00 = tl.where(ii > jj, _tile(a_ptr, t0, NP, 0, BT, BT, BS, BS), 0.0)
        if NB > 1:
            a10 = _tile(a_ptr, t0 + BS, NP, 0, BT, BT, BS, BS)
            a11 = tl.where(ii > jj, _tile(a_ptr, t0 + BS, NP, BS, BT, BT, BS, BS), 0.0)
        if NB > 2:
            a20 = _tile(a_ptr, t0 + 2 * BS, NP, 0, BT, BT, BS, BS)
            a21 = _tile(a_ptr, t0 + 2 * BS, NP, BS, BT, BT, BS, BS)
            a22 = tl.where(ii > jj, _tile(a_ptr, t0 + 2 * BS, NP, 2 * BS, BT, BT, BS, BS), 0.0)
            a30 = _tile(a_ptr, t0 + 3 * BS, NP, 0, BT, BT, BS, BS)
            a31 = _tile(a_ptr, t0 + 3 * BS, NP, BS, BT, BT, BS, BS)
            a32 = _tile(a_ptr, t0 + 3 * BS, NP, 2 * BS, BT, BT, BS, BS)
            a33 = tl.where(ii > jj, _tile(a_ptr, t0 + 3 * BS, NP, 3 * BS, BT, BT, BS, BS), 0.0)
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


@triton.jit
def gate_cumsum_kernel(
    G, GC, N, NP, D,
    PER_CHANNEL: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """The chunk-local inclusive cumsum of log-decays, float32, zero-padded to NP = chunks * BT rows, in one
    pass (G in any float dtype, contiguous). PER_CHANNEL: G (B*H, N, D) -> GC (B*H, NP, D), one program
    per (chunk, batch * head, BD channels). Else one gate per token: G (B*H, N) -> GC (B*H, NP), one
    program per (BR chunks, batch * head), a (BR, BT) tile of them."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    if PER_CHANNEL:
        rows = pid * BT + tl.arange(0, BT)[:, None]
        cols = tl.program_id(2) * BD + tl.arange(0, BD)[None, :]
        g = tl.load(G + bh * N * D + rows * D + cols, mask=(rows < N) & (cols < D), other=0.0)
        tl.store(GC + bh * NP * D + rows * D + cols, tl.cumsum(g.to(tl.float32), axis=0), mask=cols < D)
    else:
        rows = (pid * BR + tl.arange(0, BR))[:, None] * BT + tl.arange(0, BT)[None, :]
        g = tl.load(G + bh * N + rows, mask=rows < N, other=0.0)
        tl.store(GC + bh * NP + rows, tl.cumsum(g.to(tl.float32), axis=1), mask=rows < NP)


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
def delta_h_kernel(
    K, W, U, GC, H0, HS, HT, SEQ,
    N, NP, DK, DV, BHM,
    GATE: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The delta rule's sequential pass, one program per (value block, batch * head): per chunk, HS[c] = S
    (the state at its start), U_c = U0_c - W_c S written over U0, S = exp(G_C) S + (k exp(G_C - G))^T U_c.
    HT the final state. Dots in float32 (``DOT_PREC`` tf32 or ieee); BK covers the whole key dim. VARLEN:
    per (value block, sequence * head), as ``chunk_scan_kernel``."""
    vb = tl.program_id(0)
    sh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    bh, c_lo, c_hi = _chunk_range(SEQ, sh, BHM, n_chunks, VARLEN)
    rk = tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    mk = rk < DK
    mask = mk[:, None] & (rv[None, :] < DV)
    off = rk[:, None] * DV + rv[None, :]
    if HAS_H0:
        s = tl.load(H0 + sh * DK * DV + off, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BK, BV), dtype=tl.float32)
    rt = tl.arange(0, BT)[:, None]
    for c in range(c_lo, c_hi):
        t0 = c * BT
        tl.store(HS + (bh * n_chunks + c) * DK * DV + off, s, mask=mask)
        w = _tile(W + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
        u_ptr = U + bh * NP * DV + (t0 + rt) * DV + rv[None, :]
        u = tl.load(u_ptr, mask=rv[None, :] < DV, other=0.0) - tl.dot(w, s, input_precision=DOT_PREC)
        tl.store(u_ptr, u, mask=rv[None, :] < DV)
        k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
        if GATE == 2:
            g = _tile(GC + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
            g_last = _row(GC + bh * NP * DK, t0 + BT - 1, 0, DK, DK, BK)
            kd = k * tl.exp(g_last[None, :] - g)
            s = s * tl.exp(g_last)[:, None]
        else:
            g = tl.load(GC + bh * NP + t0 + tl.arange(0, BT))
            g_last = tl.load(GC + bh * NP + t0 + BT - 1)
            kd = k * tl.exp(g_last - g)[:, None]
            s = s * tl.exp(g_last)
        s += tl.dot(tl.trans(kd), u, input_precision=DOT_PREC)
    tl.store(HT + sh * DK * DV + off, s, mask=mask)


@triton.jit
def _h2_state_io(ptr, s, k0, rv, DK, DV, STORE: tl.constexpr, BKT: tl.constexpr):
    """One BKT-row tile (key rows k0..) of a (DK, DV) state at ``ptr``: stored (in ``ptr``'s dtype) when
    STORE, else loaded as float32 (``s`` unused)."""
    rk = k0 + tl.arange(0, BKT)
    off = rk[:, None] * DV + rv[None, :]
    mask = (rk[:, None] < DK) & (rv[None, :] < DV)
    if STORE:
        tl.store(ptr + off, s.to(ptr.dtype.element_ty), mask=mask)
    else:
        s = tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _h2_ws(W, K, s, acc, t0, k0, NP, DK, BT: tl.constexpr, BKT: tl.constexpr, LOWP: tl.constexpr,
           DOT_PREC: tl.constexpr):  # fmt: skip
    """acc + W[t0.., k0..] s for one BKT-row state tile (W float32 (NP, DK) rows of a head); operands in
    k's dtype (LOWP) or float32."""
    w = _tile(W, t0, NP, k0, DK, DK, BT, BKT)
    if LOWP:
        acc = tl.dot(w.to(K.dtype.element_ty), s.to(K.dtype.element_ty), acc)
    else:
        acc = tl.dot(w, s, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _h2_fold(K, GC, s, ud, t0, k0, N, NP, DK, GATE: tl.constexpr, BT: tl.constexpr, BKT: tl.constexpr,
             LOWP: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """One BKT-row tile of the next chunk's state: s (already decayed by exp(G_C) under a gate shared by
    the channels) + k^T ud, with k^T loaded transposed (BKT, BT) from k's rows (no transpose in
    registers). Per channel (GATE == 2) the decays are applied here: s exp(G_C) + (k^T exp(G_C - G^T)) ud,
    G^T loaded transposed too; else ud carries them (exp(G_C - G) per row)."""
    rk = k0 + tl.arange(0, BKT)
    rt = t0 + tl.arange(0, BT)
    kt = tl.load(K + rt[None, :] * DK + rk[:, None], mask=(rk[:, None] < DK) & (rt[None, :] < N), other=0.0)
    if GATE == 2:
        gt = tl.load(GC + rt[None, :] * DK + rk[:, None], mask=rk[:, None] < DK, other=0.0)
        gl = tl.load(GC + (t0 + BT - 1) * DK + rk, mask=rk < DK, other=0.0)
        kt = kt.to(tl.float32) * tl.exp(gl[:, None] - gt)
        s = s * tl.exp(gl)[:, None]
    if LOWP:
        s = tl.dot(kt.to(K.dtype.element_ty), ud, s)
    else:
        s = tl.dot(kt.to(tl.float32), ud, s, input_precision=DOT_PREC)
    return s


@triton.jit
def delta_h_v2_kernel(
    K, W, U, UO, GC, H0, HS, HT, SEQ,
    N, NP, DK, DV, BHM,
    GATE: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr,
    BT: tl.constexpr, BKT: tl.constexpr, NKT: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The delta rule's sequential pass (as :func:`delta_h_kernel`), the state held as NKT register tiles
    of BKT key rows (NKT <= 4: K <= 4 * BKT), one program per (value block, batch * head). Per chunk:
    HS[c] = S (in HS's dtype), U_c = U0_c - W_c S (W's BKT-column slices against the tiles, accumulated)
    written to UO (UO's dtype; UO may be U), then each tile S_i = exp(G_C) S_i + k_i^T (exp(G_C - G) U_c),
    k_i^T loaded transposed (under a gate shared by the channels the row decays are folded into U_c once,
    for all tiles). LOWP: dot operands in k's dtype (16-bit; W, S and U_c rounded to it), float32
    accumulation; else float32 operands (``DOT_PREC``). VARLEN: as :func:`delta_h_kernel`."""
    vb = tl.program_id(0)
    sh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    bh, c_lo, c_hi = _chunk_range(SEQ, sh, BHM, n_chunks, VARLEN)
    rv = vb * BV + tl.arange(0, BV)
    mv = rv[None, :] < DV
    rt = tl.arange(0, BT)
    k_ptr = K + bh * N * DK
    w_ptr = W + bh * NP * DK
    if GATE == 2:  # noqa: SIM108
        g_ptr = GC + bh * NP * DK
    else:
        g_ptr = GC + bh * NP
    if HAS_H0:
        s0 = _h2_state_io(H0 + sh * DK * DV, 0, 0, rv, DK, DV, False, BKT)
        if NKT > 1:
            s1 = _h2_state_io(H0 + sh * DK * DV, 0, BKT, rv, DK, DV, False, BKT)
        if NKT > 2:
            s2 = _h2_state_io(H0 + sh * DK * DV, 0, 2 * BKT, rv, DK, DV, False, BKT)
        if NKT > 3:
            s3 = _h2_state_io(H0 + sh * DK * DV, 0, 3 * BKT, rv, DK, DV, False, BKT)
    else:
        s0 = tl.zeros((BKT, BV), dtype=tl.float32)
        if NKT > 1:
            s1 = tl.zeros((BKT, BV), dtype=tl.float32)
        if NKT > 2:
            s2 = tl.zeros((BKT, BV), dtype=tl.float32)
        if NKT > 3:
            s3 = tl.zeros((BKT, BV), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        t0 = c * BT
        hs_ptr = HS + (bh * n_chunks + c) * DK * DV
        _h2_state_io(hs_ptr, s0, 0, rv, DK, DV, True, BKT)
        if NKT > 1:
            _h2_state_io(hs_ptr, s1, BKT, rv, DK, DV, True, BKT)
        if NKT > 2:
            _h2_state_io(hs_ptr, s2, 2 * BKT, rv, DK, DV, True, BKT)
        if NKT > 3:
            _h2_state_io(hs_ptr, s3, 3 * BKT, rv, DK, DV, True, BKT)
        ws = tl.zeros((BT, BV), dtype=tl.float32)
        ws = _h2_ws(w_ptr, k_ptr, s0, ws, t0, 0, NP, DK, BT, BKT, LOWP, DOT_PREC)
        if NKT > 1:
            ws = _h2_ws(w_ptr, k_ptr, s1, ws, t0, BKT, NP, DK, BT, BKT, LOWP, DOT_PREC)
        if NKT > 2:
            ws = _h2_ws(w_ptr, k_ptr, s2, ws, t0, 2 * BKT, NP, DK, BT, BKT, LOWP, DOT_PREC)
        if NKT > 3:
            ws = _h2_ws(w_ptr, k_ptr, s3, ws, t0, 3 * BKT, NP, DK, BT, BKT, LOWP, DOT_PREC)
        u_off = bh * NP * DV + (t0 + rt)[:, None] * DV + rv[None, :]
        u = tl.load(U + u_off, mask=mv, other=0.0).to(tl.float32) - ws
        tl.store(UO + u_off, u.to(UO.dtype.element_ty), mask=mv)
        if GATE == 2:
            ud = u
        else:
            g = tl.load(g_ptr + t0 + rt)
            g_last = tl.load(g_ptr + t0 + BT - 1)
            ud = u * tl.exp(g_last - g)[:, None]
            decay = tl.exp(g_last)
            s0 = s0 * decay
            if NKT > 1:
                s1 = s1 * decay
            if NKT > 2:
                s2 = s2 * decay
            if NKT > 3:
                s3 = s3 * decay
        if LOWP:
            ud = ud.to(K.dtype.element_ty)
        s0 = _h2_fold(k_ptr, g_ptr, s0, ud, t0, 0, N, NP, DK, GATE, BT, BKT, LOWP, DOT_PREC)
        if NKT > 1:
            s1 = _h2_fold(k_ptr, g_ptr, s1, ud, t0, BKT, N, NP, DK, GATE, BT, BKT, LOWP, DOT_PREC)
        if NKT > 2:
            s2 = _h2_fold(k_ptr, g_ptr, s2, ud, t0, 2 * BKT, N, NP, DK, GATE, BT, BKT, LOWP, DOT_PREC)
        if NKT > 3:
            s3 = _h2_fold(k_ptr, g_ptr, s3, ud, t0, 3 * BKT, N, NP, DK, GATE, BT, BKT, LOWP, DOT_PREC)
    _h2_state_io(HT + sh * DK * DV, s0, 0, rv, DK, DV, True, BKT)
    if NKT > 1:
        _h2_state_io(HT + sh * DK * DV, s1, BKT, rv, DK, DV, True, BKT)
    if NKT > 2:
        _h2_state_io(HT + sh * DK * DV, s2, 2 * BKT, rv, DK, DV, True, BKT)
    if NKT > 3:
        _h2_state_io(HT + sh * DK * DV, s3, 3 * BKT, rv, DK, DV, True, BKT)


@triton.jit
def delta_bwd_dh_kernel(
    Q, K, DO, GC, W, AQK, DHT, DHS, DU, DH0, SEQ,
    N, NP, DK, DV, BHM, scale,
    HAS_DHT: tl.constexpr, VARLEN: tl.constexpr, GATE: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """The delta rule's backward sequential pass (scalar gate), one program per (value block, batch *
    head), chunks in reverse. With dH the gradient of the state at the chunk's end, D^T_ij =
    exp(G_j - G_i) for j >= i::

        DHS[c] = dH;  dU = scale ((k q^T) * D^T) do + (k exp(G_C - G)) dH   (written to DU)
        dH <- exp(G_C) dH + scale (q exp(G))^T do - W^T dU

    DH0 the initial state's gradient. Dots in float32 (``DOT_PREC`` tf32 or ieee); BK covers the key dim.
    GATE == 2 (per-channel gates): the scores (q k^T) * D^T are AQK's rows transposed (the forward's
    intra-chunk scores), and the decays per channel. VARLEN: per (value block, sequence * head), as ``chunk_scan_kernel``."""
    vb = tl.program_id(0)
    sh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    bh, c_lo, c_hi = _chunk_range(SEQ, sh, BHM, n_chunks, VARLEN)
    rk = tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    mask = (rk[:, None] < DK) & (rv[None, :] < DV)
    off = rk[:, None] * DV + rv[None, :]
    if HAS_DHT:
        dh = tl.load(DHT + sh * DK * DV + off, mask=mask, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros((BK, BV), dtype=tl.float32)
    ii = tl.arange(0, BT)[:, None]
    jj = tl.arange(0, BT)[None, :]
    rt = tl.arange(0, BT)[:, None]
    for cc in range(c_lo, c_hi):
        c = c_lo + c_hi - 1 - cc
        t0 = c * BT
        tl.store(DHS + (bh * n_chunks + c) * DK * DV + off, dh, mask=mask)
        q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
        k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
        w = _tile(W + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
        do = _tile(DO + bh * N * DV, t0, N, vb * BV, DV, DV, BT, BV)
        if GATE == 2:
            g = _tile(GC + bh * NP * DK, t0, NP, 0, DK, DK, BT, BK)
            g_last = _row(GC + bh * NP * DK, t0 + BT - 1, 0, DK, DK, BK)
            a = _tile(AQK + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
            a_t = tl.trans(tl.where(ii >= jj, a, 0.0))
            kbar = k * tl.exp(g_last[None, :] - g)
            qt = q * tl.exp(g) * scale
            decay = tl.exp(g_last)[:, None]
        else:
            g = tl.load(GC + bh * NP + t0 + tl.arange(0, BT))
            g_last = tl.load(GC + bh * NP + t0 + BT - 1)
            d_t = tl.exp(tl.where(ii <= jj, g[None, :] - g[:, None], float("-inf")))
            a_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * d_t
            kbar = k * tl.exp(g_last - g)[:, None]
            qt = q * (tl.exp(g) * scale)[:, None]
            decay = tl.exp(g_last)
        du = scale * tl.dot(a_t, do, input_precision=DOT_PREC) + tl.dot(kbar, dh, input_precision=DOT_PREC)
        tl.store(DU + bh * NP * DV + (t0 + rt) * DV + rv[None, :], du, mask=rv[None, :] < DV)
        dh = dh * decay + tl.dot(tl.trans(qt), do, input_precision=DOT_PREC)
        dh -= tl.dot(tl.trans(w), du, input_precision=DOT_PREC)
    tl.store(DH0 + sh * DK * DV + off, dh, mask=mask)


@triton.jit
def delta_bwd_chunk_kernel(
    Q, K, V, BETA, GC, DO, HS, DHS, U, DU, T, DQ, DK_, DV_, DB, DG, RQ, RK,
    N, NP, DK, DV, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    L2NORM: tl.constexpr = False,
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
    q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    v = _tile(V + bh * N * DV, t0, N, 0, DV, DV, BT, BV)
    do = _tile(DO + bh * N * DV, t0, N, 0, DV, DV, BT, BV)
    u = _tile(U + bh * NP * DV, t0, NP, 0, DV, DV, BT, BV)
    du = _tile(DU + bh * NP * DV, t0, NP, 0, DV, DV, BT, BV)
    s = _tile(HS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV)
    dh = _tile(DHS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV)
    tm = _tile(T + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
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
    dxw = tl.dot((tl.trans(tm)).to(dt), (dw).to(dt), input_precision=DOT_PREC)
    dxu = tl.dot((tl.trans(tm)).to(dt), (du).to(dt), input_precision=DOT_PREC)
    da = -tl.dot(
        (tl.dot((tl.trans(tm)).to(dt), (dt_).to(dt), input_precision=DOT_PREC)).to(dt),
        (tl.trans(tm)).to(dt),
        input_precision=DOT_PREC,
    )
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
    v = tl.load(V + bh * N * DV + rows * DV + rv, mask=mtv, other=0.0).to(dt)
    da = tl.dot(do, tl.trans(v), input_precision=DOT_PREC) * scale  # dA: queries t, keys j
    da = tl.where(ii >= jj, da, 0.0)
    dd = tl.sum(tl.where(ii == jj, da, 0.0), axis=1)[:, None]  # dA_tt (float32)
    da = da.to(dt)
    dat = tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * scale  # dA^T: keys j, queries t
    dat = tl.where(ii <= jj, dat, 0.0).to(dt)
    # dv first (its accumulator is not live in the dq / dk loop below: fewer registers spilled)
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
        tail = tl.exp(gl) * tl.sum(s * dh, axis=1) + tl.sum(k * dk, axis=0)  # sum_v S_end dH per channel
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


@triton.jit
def delta_bwd_chunk_channel_kernel(
    Q, K, V, BETA, GC, DO, HS, DHS, U, DU, T, BKK, DQ, DK_, DV_, DB, DG, DAQK, DBKK,
    N, NP, DK, DV, scale,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The delta rule's gradients of one chunk per program (chunk, batch * head) under per-channel gates,
    but for the intra-chunk scores' own (left to :func:`score_bwd_kernel`): as
    :func:`delta_bwd_chunk_kernel` with exp(G) per channel, writing float32 partial dq, dk (state and UT
    parts), dv, dbeta, DG (per channel; the chunk-end terms exp(G_C) sum_v S * dH + sum_i dKbar * Kbar on
    the last row), and the score gradients DAQK = scale (do U^T) (i >= j) and DBKK = beta_i dA (i > j) of
    Aqk and of the unscaled strict key scores B (BKK, so that dbeta = rowsum(dA * B) needs no division)."""
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
    q = _tile(Q + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    k = _tile(K + bh * N * DK, t0, N, 0, DK, DK, BT, BK)
    v = _tile(V + bh * N * DV, t0, N, 0, DV, DV, BT, BV)
    do = _tile(DO + bh * N * DV, t0, N, 0, DV, DV, BT, BV)
    u = _tile(U + bh * NP * DV, t0, NP, 0, DV, DV, BT, BV)
    du = _tile(DU + bh * NP * DV, t0, NP, 0, DV, DV, BT, BV)
    s = _tile(HS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV)
    dh = _tile(DHS + (bh * n_chunks + c) * DK * DV, 0, DK, 0, DV, DV, BK, BV)
    tm = _tile(T + bh * NP * BT, t0, NP, 0, BT, BT, BT, BT)
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
    dxw = tl.dot((tl.trans(tm)).to(dt), (dw).to(dt), input_precision=DOT_PREC)
    dxu = tl.dot((tl.trans(tm)).to(dt), (du).to(dt), input_precision=DOT_PREC)
    da = -tl.dot(
        (tl.dot((tl.trans(tm)).to(dt), (dt_).to(dt), input_precision=DOT_PREC)).to(dt),
        (tl.trans(tm)).to(dt),
        input_precision=DOT_PREC,
    )
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
