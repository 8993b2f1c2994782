"""Block-sparse FlashAttention backward (Triton): the forward's tiles, recomputed from the saved lse.

With P = exp(scale q k^T - lse) on the plan's pairs (0 elsewhere) and Delta_i = sum_d dO_id O_id:
dV = P^T dO, dS = P (dO V^T - Delta), dQ = scale dS K, dK = scale dS^T Q.

- ``block_sparse_bwd_dq_kernel``: grid (cdiv(N_q, BLOCK_M), B * H), the forward's iteration (full
  tiles, partial tiles, token columns) accumulating dQ. Token columns have no transposed table: their dK and
  dV contributions are added here with fp32 atomics into DKC / DVC (B, H_kv, N_k, D), when HAS_COLS.
- ``block_sparse_bwd_dkdv_kernel``: grid (cdiv(N_k, BLOCK_N), B * H_kv); for each query head of the
  kv head's GQA group, the query blocks of the transposed tables (full, then partial with their pattern)
  in BLOCK_M steps; dK and dV summed over the group in registers. FUSED_DQ (the one-pass backward, for plans
  without token columns, SPLIT = 1): it also adds each pair's dQ into a float32 buffer
  (:mod:`attnlab.kernels.block_sparse.dq_reduce`), and the dQ kernel does not run.

SPLIT = 2 (schedule knob, both kernels, as in the forward): the program's own tile (query rows for dQ, key
rows for dK/dV) is two row halves whose products are issued before either half's exponentials.

Rows with no allowed key (lse = -inf) take lse = +inf, so their P is 0 (no NaN).
"""

import triton
import triton.language as tl

from attnlab.kernels.block_sparse.common import (
    column_keys,
    dot,
    head_rows,
    head_tile,
    load_kv,
    rounded,
    table_offset,
)
from attnlab.kernels.block_sparse.dq_reduce import add_dq, dq_target

LENGTH_ARGS = ["N_Q", "N_K", "OFFSET"]


@triton.jit
def block_sparse_bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, H, N_Q, HEAD_D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Delta_i = sum_d dO_id O_id in fp32, (B * H, N_q) contiguous; grid (cdiv(N_q, BLOCK_M), B * H)."""
    b, h, offs_m, offs_d, m = head_tile(H, N_Q, HEAD_D, BLOCK_M, BLOCK_D)
    o = tl.load(head_rows(O, b, h, stride_ob, stride_oh, stride_on, offs_m, offs_d), mask=m, other=0.0)
    do = tl.load(head_rows(DO, b, h, stride_dob, stride_doh, stride_don, offs_m, offs_d), mask=m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _lse2(LSE, row_base, offs_m, N_Q):
    """The saved natural-log lse of rows offs_m in base 2; +inf for rows without keys or past N_q."""
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < N_Q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k, v, qk_scale, keep, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
             UPCAST: tl.constexpr):  # fmt: skip
    s = dot(q, tl.trans(k), DOT_PREC, UPCAST)
    dp = dot(do, tl.trans(v), DOT_PREC, UPCAST)
    return _dq_update(dq, s, dp, lse2, delta, k, qk_scale, keep, MASKED, DOT_PREC, UPCAST)


@triton.jit
def _dq_update(dq, s, dp, lse2, delta, k, qk_scale, keep, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
               UPCAST: tl.constexpr):  # fmt: skip
    """:func:`_dq_step` given the raw products s = q k^T and dp = dO v^T (so that a split tile can issue
    both halves' products first); returns (dq, p, ds)."""
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(keep, p, 0.0)
    ds = p * (dp - delta[:, None])
    if UPCAST:
        dq = tl.dot(ds, k.to(tl.float32), dq, input_precision="ieee")
    else:
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq, p, ds


@triton.jit
def _rows(base, stride_n, offs, offs_d, N, HEAD_D, WIDE: tl.constexpr):
    """Rows ``offs`` of one head's (N, HEAD_D) matrix at ``base`` (rows past N and columns past HEAD_D: 0).
    WIDE: row offsets in int64 (the launcher's choice where a row offset may pass 2^31; int32 otherwise,
    which the dK/dV loop measured 5-6% faster on the H100)."""
    m = (offs[:, None] < N) & (offs_d[None, :] < HEAD_D)
    if WIDE:
        return tl.load(base + offs[:, None].to(tl.int64) * stride_n + offs_d[None, :], mask=m, other=0.0)
    else:
        return tl.load(base + offs[:, None] * stride_n + offs_d[None, :], mask=m, other=0.0)


@triton.jit
def _column_grads(DKC, DVC, col_base, idx, valid, p, ds, q, do, offs_d, scale, HEAD_D, DOT_PREC: tl.constexpr,
                  UPCAST: tl.constexpr):  # fmt: skip
    """Adds the token columns' dK and dV contributions (fp32 atomics; the columns have no transposed table)."""
    if UPCAST:
        dv_c = tl.dot(tl.trans(p), do.to(tl.float32), input_precision="ieee")
        dk_c = tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee") * scale
    else:
        dv_c = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dk_c = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * scale
    cptr = col_base + idx[:, None].to(tl.int64) * HEAD_D + offs_d[None, :]
    cmask = valid[:, None] & (offs_d[None, :] < HEAD_D)
    tl.atomic_add(DVC + cptr, dv_c, mask=cmask)
    tl.atomic_add(DKC + cptr, dk_c, mask=cmask)


@triton.jit(do_not_specialize=LENGTH_ARGS)
def block_sparse_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DKC, DVC,
    P_NUM, P_IDX, P_PAT, F_NUM, F_IDX, C_NUM, C_IDX, PATTERNS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    s_pn, s_pi, s_fn, s_fi, s_cn, s_ci,
    H, GROUP, N_Q, N_K, OFFSET, HEAD_D, qk_scale, scale, PLAN_H, HEAD_DIV,
    PLAN_B: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_COLS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_D: tl.constexpr, SPLIT: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK_M // SPLIT
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    row = start_m // BLOCK_Q
    rows_sub0 = start_m % BLOCK_Q + tl.arange(0, HALF)
    rows_sub1 = rows_sub0 + HALF
    offs_m0 = start_m + tl.arange(0, HALF)
    offs_m1 = offs_m0 + HALF
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * N_Q
    q0 = _rows(q_base, stride_qn, offs_m0, offs_d, N_Q, HEAD_D, WIDE)
    do0 = _rows(do_base, stride_don, offs_m0, offs_d, N_Q, HEAD_D, WIDE)
    lse0 = _lse2(LSE, row_base, offs_m0, N_Q)
    delta0 = tl.load(DELTA + row_base + offs_m0, mask=offs_m0 < N_Q, other=0.0)
    q1, do1, lse1, delta1 = q0, do0, lse0, delta0
    if SPLIT == 2:
        q1 = _rows(q_base, stride_qn, offs_m1, offs_d, N_Q, HEAD_D, WIDE)
        do1 = _rows(do_base, stride_don, offs_m1, offs_d, N_Q, HEAD_D, WIDE)
        lse1 = _lse2(LSE, row_base, offs_m1, N_Q)
        delta1 = tl.load(DELTA + row_base + offs_m1, mask=offs_m1 < N_Q, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq0 = tl.zeros([HALF, BLOCK_D], dtype=tl.float32)
    dq1 = dq0

    SUB: tl.constexpr = BLOCK_K // BLOCK_N
    t_fn, t_fi = table_offset(b, h, row, s_fn, s_fi, PLAN_B, PLAN_H, HEAD_DIV)
    n_full = tl.load(F_NUM + t_fn)
    for it in tl.range(0, n_full * SUB):
        kb = tl.load(F_IDX + t_fi + it // SUB)
        offs_n = kb * BLOCK_K + (it % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v = load_kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, N_K, HEAD_D, True, EVEN_D)
        s0 = dot(q0, tl.trans(k), DOT_PREC, UPCAST)
        dp0 = dot(do0, tl.trans(v), DOT_PREC, UPCAST)
        if SPLIT == 2:  # both halves' products issued before either half's exponentials
            s1 = dot(q1, tl.trans(k), DOT_PREC, UPCAST)
            dp1 = dot(do1, tl.trans(v), DOT_PREC, UPCAST)
            dq0, _, _ = _dq_update(dq0, s0, dp0, lse0, delta0, k, qk_scale, False, False, DOT_PREC, UPCAST)
            dq1, _, _ = _dq_update(dq1, s1, dp1, lse1, delta1, k, qk_scale, False, False, DOT_PREC, UPCAST)
        else:
            dq0, _, _ = _dq_update(dq0, s0, dp0, lse0, delta0, k, qk_scale, False, False, DOT_PREC, UPCAST)

    t_pn, t_pi = table_offset(b, h, row, s_pn, s_pi, PLAN_B, PLAN_H, HEAD_DIV)
    n_partial = tl.load(P_NUM + t_pn)
    for it in tl.range(0, n_partial * SUB):
        kb = tl.load(P_IDX + t_pi + it // SUB)
        pat = tl.load(P_PAT + t_pi + it // SUB).to(tl.int64)
        sub = (it % SUB) * BLOCK_N
        offs_n = kb * BLOCK_K + sub + tl.arange(0, BLOCK_N)
        k, v = load_kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, N_K, HEAD_D, False, EVEN_D)
        pat_base = PATTERNS + pat * (BLOCK_Q * BLOCK_K) + (sub + tl.arange(0, BLOCK_N))[None, :]
        s0 = dot(q0, tl.trans(k), DOT_PREC, UPCAST)
        dp0 = dot(do0, tl.trans(v), DOT_PREC, UPCAST)
        if SPLIT == 2:
            s1 = dot(q1, tl.trans(k), DOT_PREC, UPCAST)
            dp1 = dot(do1, tl.trans(v), DOT_PREC, UPCAST)
            keep0 = tl.load(pat_base + rows_sub0[:, None] * BLOCK_K) != 0
            keep1 = tl.load(pat_base + rows_sub1[:, None] * BLOCK_K) != 0
            dq0, _, _ = _dq_update(dq0, s0, dp0, lse0, delta0, k, qk_scale, keep0, True, DOT_PREC, UPCAST)
            dq1, _, _ = _dq_update(dq1, s1, dp1, lse1, delta1, k, qk_scale, keep1, True, DOT_PREC, UPCAST)
        else:
            keep0 = tl.load(pat_base + rows_sub0[:, None] * BLOCK_K) != 0
            dq0, _, _ = _dq_update(dq0, s0, dp0, lse0, delta0, k, qk_scale, keep0, True, DOT_PREC, UPCAST)

    if HAS_COLS:
        t_cn, t_ci = table_offset(b, h, row, s_cn, s_ci, PLAN_B, PLAN_H, HEAD_DIV)
        n_cols = tl.load(C_NUM + t_cn)
        col_base = (b * (H // GROUP) + hk) * N_K * HEAD_D
        for c0 in range(0, n_cols, BLOCK_N):
            idx, valid, k, v, keep0 = column_keys(C_IDX, t_ci, c0, n_cols, k_base, v_base, stride_kn, stride_vn,
                                                  offs_m0, offs_d, N_K, HEAD_D, OFFSET, BLOCK_N, CAUSAL,
                                                  EVEN_D)  # fmt: skip
            dq0, p, ds = _dq_step(dq0, q0, do0, lse0, delta0, k, v, qk_scale, keep0, True, DOT_PREC, UPCAST)
            _column_grads(
                DKC, DVC, col_base, idx, valid, p, ds, q0, do0, offs_d, scale, HEAD_D, DOT_PREC, UPCAST
            )
            if SPLIT == 2:
                keep1 = valid[None, :]
                if CAUSAL:
                    keep1 = keep1 & (idx[None, :] <= offs_m1[:, None] + OFFSET)
                dq1, p, ds = _dq_step(
                    dq1, q1, do1, lse1, delta1, k, v, qk_scale, keep1, True, DOT_PREC, UPCAST
                )
                _column_grads(DKC, DVC, col_base, idx, valid, p, ds, q1, do1, offs_d, scale, HEAD_D, DOT_PREC,
                              UPCAST)  # fmt: skip

    dq_base = DQ + b * stride_dqb + h * stride_dqh
    rmask0 = (offs_m0[:, None] < N_Q) & (offs_d[None, :] < HEAD_D)
    tl.store(dq_base + offs_m0[:, None].to(tl.int64) * stride_dqn + offs_d[None, :],
             rounded(dq0 * scale, DQ.dtype.element_ty, UPCAST), mask=rmask0)  # fmt: skip
    if SPLIT == 2:
        rmask1 = (offs_m1[:, None] < N_Q) & (offs_d[None, :] < HEAD_D)
        tl.store(dq_base + offs_m1[:, None].to(tl.int64) * stride_dqn + offs_d[None, :],
                 rounded(dq1 * scale, DQ.dtype.element_ty, UPCAST), mask=rmask1)  # fmt: skip


@triton.jit
def _dkdv_update(dk, dv, s_t, dp_t, q, do, lse2, delta, qk_scale, keep_t, MASKED: tl.constexpr,
                 DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """dK/dV of one (BLOCK_N keys) x (BLOCK_M queries) step in transposed form (rows are keys), given the raw
    products s^T = k q^T and dp^T = v dO^T; returns (dk, dv, ds^T)."""
    p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(keep_t, p_t, 0.0)
    ds_t = p_t * (dp_t - delta[None, :])
    if UPCAST:
        dv = tl.dot(p_t, do.to(tl.float32), dv, input_precision="ieee")
        dk = tl.dot(ds_t, q.to(tl.float32), dk, input_precision="ieee")
    else:
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv, ds_t


@triton.jit(do_not_specialize=LENGTH_ARGS)
def block_sparse_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQA,
    TP_NUM, TP_IDX, TP_PAT, TF_NUM, TF_IDX, PATTERNS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    s_pn, s_pi, s_fn, s_fi,
    H_KV, GROUP, N_Q, N_K, OFFSET, HEAD_D, qk_scale, scale, PLAN_H, HEAD_DIV,
    PLAN_B: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr, SPLIT: tl.constexpr,
    FUSED_DQ: tl.constexpr, DQ_TMA: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    tl.static_assert(not (FUSED_DQ and SPLIT == 2), "the one-pass backward takes SPLIT = 1")
    HALF: tl.constexpr = BLOCK_N // SPLIT  # SPLIT = 2: the key tile as two row halves
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // H_KV).to(tl.int64)
    hk = (pid_bk % H_KV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    col = start_n // BLOCK_K
    cols_sub0 = start_n % BLOCK_K + tl.arange(0, HALF)
    cols_sub1 = cols_sub0 + HALF
    offs_n0 = start_n + tl.arange(0, HALF)
    offs_n1 = offs_n0 + HALF
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    k0, v0 = load_kv(k_base, v_base, stride_kn, stride_vn, offs_n0, offs_d, N_K, HEAD_D, False, EVEN_D)
    k1, v1 = k0, v0
    if SPLIT == 2:
        k1, v1 = load_kv(k_base, v_base, stride_kn, stride_vn, offs_n1, offs_d, N_K, HEAD_D, False, EVEN_D)
    dk0 = tl.zeros([HALF, BLOCK_D], dtype=tl.float32)
    dv0 = tl.zeros([HALF, BLOCK_D], dtype=tl.float32)
    dk1, dv1 = dk0, dv0
    H = H_KV * GROUP
    SUB: tl.constexpr = BLOCK_Q // BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * N_Q
        dqa = DQA
        if FUSED_DQ:
            dqa = dq_target(DQA, row_base, N_Q, HEAD_D, BLOCK_M, BLOCK_D, DQ_TMA)
        t_fn, t_fi = table_offset(b, h, col, s_fn, s_fi, PLAN_B, PLAN_H, HEAD_DIV)
        n_full = tl.load(TF_NUM + t_fn)
        for it in tl.range(0, n_full * SUB):
            qb = tl.load(TF_IDX + t_fi + it // SUB)
            start_m = qb * BLOCK_Q + (it % SUB) * BLOCK_M
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _rows(q_base, stride_qn, offs_m, offs_d, N_Q, HEAD_D, WIDE)
            do = _rows(do_base, stride_don, offs_m, offs_d, N_Q, HEAD_D, WIDE)
            lse2 = _lse2(LSE, row_base, offs_m, N_Q)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
            s0 = dot(k0, tl.trans(q), DOT_PREC, UPCAST)
            dp0 = dot(v0, tl.trans(do), DOT_PREC, UPCAST)
            if SPLIT == 2:  # both halves' products issued before either half's exponentials
                s1 = dot(k1, tl.trans(q), DOT_PREC, UPCAST)
                dp1 = dot(v1, tl.trans(do), DOT_PREC, UPCAST)
                dk0, dv0, _ = _dkdv_update(dk0, dv0, s0, dp0, q, do, lse2, delta, qk_scale, False, False, DOT_PREC,
                                        UPCAST)  # fmt: skip
                dk1, dv1, _ = _dkdv_update(dk1, dv1, s1, dp1, q, do, lse2, delta, qk_scale, False, False, DOT_PREC,
                                        UPCAST)  # fmt: skip
            else:
                dk0, dv0, ds0 = _dkdv_update(dk0, dv0, s0, dp0, q, do, lse2, delta, qk_scale, False, False,
                                             DOT_PREC, UPCAST)  # fmt: skip
                if FUSED_DQ:
                    add_dq(dqa, ds0, k0, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, DOT_PREC, UPCAST, DQ_TMA)
        t_pn, t_pi = table_offset(b, h, col, s_pn, s_pi, PLAN_B, PLAN_H, HEAD_DIV)
        n_partial = tl.load(TP_NUM + t_pn)
        for it in tl.range(0, n_partial * SUB):
            qb = tl.load(TP_IDX + t_pi + it // SUB)
            pat = tl.load(TP_PAT + t_pi + it // SUB).to(tl.int64)
            sub = (it % SUB) * BLOCK_M
            start_m = qb * BLOCK_Q + sub
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _rows(q_base, stride_qn, offs_m, offs_d, N_Q, HEAD_D, WIDE)
            do = _rows(do_base, stride_don, offs_m, offs_d, N_Q, HEAD_D, WIDE)
            lse2 = _lse2(LSE, row_base, offs_m, N_Q)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
            pat_base = PATTERNS + pat * (BLOCK_Q * BLOCK_K) + (sub + tl.arange(0, BLOCK_M))[None, :] * BLOCK_K
            s0 = dot(k0, tl.trans(q), DOT_PREC, UPCAST)
            dp0 = dot(v0, tl.trans(do), DOT_PREC, UPCAST)
            if SPLIT == 2:
                s1 = dot(k1, tl.trans(q), DOT_PREC, UPCAST)
                dp1 = dot(v1, tl.trans(do), DOT_PREC, UPCAST)
                keep0 = tl.load(pat_base + cols_sub0[:, None]) != 0
                keep1 = tl.load(pat_base + cols_sub1[:, None]) != 0
                dk0, dv0, _ = _dkdv_update(dk0, dv0, s0, dp0, q, do, lse2, delta, qk_scale, keep0, True, DOT_PREC,
                                        UPCAST)  # fmt: skip
                dk1, dv1, _ = _dkdv_update(dk1, dv1, s1, dp1, q, do, lse2, delta, qk_scale, keep1, True, DOT_PREC,
                                        UPCAST)  # fmt: skip
            else:
                keep0 = tl.load(pat_base + cols_sub0[:, None]) != 0
                dk0, dv0, ds0 = _dkdv_update(dk0, dv0, s0, dp0, q, do, lse2, delta, qk_scale, keep0, True,
                                             DOT_PREC, UPCAST)  # fmt: skip
                if FUSED_DQ:
                    add_dq(dqa, ds0, k0, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, DOT_PREC, UPCAST, DQ_TMA)
    _store_kv_grads(DK, DV, b, hk, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, dk0, dv0,
                    offs_n0, offs_d, scale, N_K, HEAD_D, UPCAST)  # fmt: skip
    if SPLIT == 2:
        _store_kv_grads(DK, DV, b, hk, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, dk1,
                        dv1, offs_n1, offs_d, scale, N_K, HEAD_D, UPCAST)  # fmt: skip


@triton.jit
def _store_kv_grads(DK, DV, b, hk, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, dk, dv,
                    offs_n, offs_d, scale, N_K, HEAD_D, UPCAST: tl.constexpr):  # fmt: skip
    """dK (times the softmax scale) and dV of key rows ``offs_n``."""
    nmask = (offs_n[:, None] < N_K) & (offs_d[None, :] < HEAD_D)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :],
             rounded(dk * scale, DK.dtype.element_ty, UPCAST), mask=nmask)  # fmt: skip
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :],
             rounded(dv, DV.dtype.element_ty, UPCAST), mask=nmask)  # fmt: skip
