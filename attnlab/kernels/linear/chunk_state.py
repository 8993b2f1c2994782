# mypy: ignore-errors
"""The chunk states of the chunked kernels: every kernel here makes the state (K, V) at each chunk boundary
(or its gradient), the sequential ones walking a head's chunks one after the other.

The gated linear recurrence (gla; lightning and linear as a gate shared by the channels):

1. :func:`chunk_local_state_kernel`, parallel over (chunk, batch * head, state tile): each chunk's own
   contribution M_c = sum_j (k_j * exp(G_C - G_j)) v_j^T (backward: scale sum_i (q_i * exp(G_i)) do_i^T).
2. :func:`chunk_scan_kernel`, parallel over (batch * head, state tile), sequential over chunks with one
   multiply-add of a (BK, BV) tile each: S_{c+1} = exp(G_C) S_c + M_c, the state at each chunk start
   written over M_c (backward: reversed, the state's gradient at each chunk end; the scan also gives the
   log-decays' gradient at each chunk's last row, sum_v S_end * dS_end).

   Or stages 1 and 2 in one sequential pass (``op.GLA_H_PASS``; the backward's with ``REVERSE``,
   ``op.GLA_BWD_H_PASS``): :func:`gla_h_kernel`, parallel over (key tile, value tile, batch * head),
   sequential over chunks: the state at each chunk start stored, then S = exp(G_C) S + (k exp(G_C - G))^T v
   by one tensor-core dot into the register tile (k^T loaded transposed), no M buffer written and read back.

The gated delta rule, after its UT transform (``chunk_delta_wy.py``): a sequential pass per (batch * head,
value block): U_c = U0_c - W_c S_c (the u_t of the recurrence, all at once), S_{c+1} = exp(G_C) S_c +
(K exp(G_C - G))^T U_c (:func:`delta_h_v2_kernel`: the state in 64-row register tiles, k^T loaded
transposed, 16-bit dot operands with fp32 accumulation, and without a backward the chunk states and U kept
in 16 bits; or :func:`delta_h_kernel`, ``op.DELTA_H_V2``). Its backward's reverse pass:
:func:`delta_bwd_dh_kernel` (dH at every chunk end, and dU).

Packed sequences (varlen): the sequential kernels walk each sequence's chunks alone (``VARLEN``, chunk
offsets ``SEQ``; :func:`_chunk_range`).
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
    G^T loaded transposed too; GATE == 3: K holds k exp(G_C - G) already (``gate_cumsum_kernel``'s KG), only
    s exp(G_C) is made here; else ud carries them (exp(G_C - G) per row)."""
    rk = k0 + tl.arange(0, BKT)
    rt = t0 + tl.arange(0, BT)
    kt = tl.load(K + rt[None, :] * DK + rk[:, None], mask=(rk[:, None] < DK) & (rt[None, :] < N), other=0.0)
    if GATE == 2:
        gt = tl.load(GC + rt[None, :] * DK + rk[:, None], mask=rk[:, None] < DK, other=0.0)
        gl = tl.load(GC + (t0 + BT - 1) * DK + rk, mask=rk < DK, other=0.0)
        kt = kt.to(tl.float32) * tl.exp(gl[:, None] - gt)
        s = s * tl.exp(gl)[:, None]
    if GATE == 3:
        gl = tl.load(GC + (t0 + BT - 1) * DK + rk, mask=rk < DK, other=0.0)
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
    for all tiles). GATE 3: per channel with K = k exp(G_C - G) precomputed (B*H, NP, DK; ``op.DELTA_H_KG``),
    G read for its chunk-end rows only. LOWP: dot operands in k's dtype (16-bit; W, S and U_c rounded to
    it), float32 accumulation; else float32 operands (``DOT_PREC``). VARLEN: as :func:`delta_h_kernel`."""
    vb = tl.program_id(0)
    sh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(N, BT)
    bh, c_lo, c_hi = _chunk_range(SEQ, sh, BHM, n_chunks, VARLEN)
    rv = vb * BV + tl.arange(0, BV)
    mv = rv[None, :] < DV
    rt = tl.arange(0, BT)
    if GATE == 3:  # noqa: SIM108  (KG has NP rows per head)
        k_ptr = K + bh * NP * DK
    else:
        k_ptr = K + bh * N * DK
    w_ptr = W + bh * NP * DK
    if GATE >= 2:  # noqa: SIM108
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
        if GATE >= 2:
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
