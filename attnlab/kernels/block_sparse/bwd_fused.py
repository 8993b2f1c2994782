"""Block-sparse backward in one pass over the key tiles (Triton): dK and dV as in
:func:`~attnlab.kernels.block_sparse.bwd.block_sparse_bwd_dkdv_kernel`, and dQ added into a float32 buffer
from the same tile pairs, so the scores and dP are computed once per pair (5 matrix products per pair,
against 7 for the dQ kernel plus the dK/dV kernel, which recompute them).

Grid (cdiv(N_k, BLOCK_N), B * H_kv), as the dK/dV kernel. Per visited (key tile, query tile) pair the
program adds ``dS Q_tile^T``'s transpose, ``dS_tile K`` (BLOCK_M x D, unscaled), into DQA (B * H, N_q, D),
float32, zeroed by the launcher, which multiplies by the softmax scale and rounds to q's dtype afterwards:
- DQ_TMA: by a tensor-descriptor reduction (Hopper's bulk ``cp.reduce.async.bulk.tensor`` add: one
  asynchronous copy engine operation per tile, rows past N_q dropped by the descriptor's bounds);
- else by relaxed element-wise ``atomic_add`` (any GPU; Triton's CPU interpreter, which has no descriptor
  reductions).

The sum over key tiles is in an order the scheduler decides, so dQ is not bitwise reproducible from run to
run (float32 additions of the same terms in another order); dK and dV are. Token columns (the plan's
column tables) are not handled here: the launcher takes the two-kernel backward for plans that have them.
"""

import triton
import triton.language as tl

from attnlab.kernels.block_sparse.bwd import LENGTH_ARGS, _dkdv_update, _lse2, _rows, _store_kv_grads
from attnlab.kernels.block_sparse.common import dot, load_kv, rounded, table_offset


@triton.jit
def _add_dq(dqa, ds_t, k, start_m, offs_m, offs_d, N_Q, HEAD_D, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
            DQ_TMA: tl.constexpr):  # fmt: skip
    """Adds ds_t^T k (BLOCK_M query rows from ``start_m``, unscaled) into one head's rows of the float32 dQ
    buffer: ``dqa`` is its tensor descriptor (DQ_TMA) or its base pointer."""
    if UPCAST:
        dq = tl.dot(tl.trans(ds_t), k.to(tl.float32), input_precision="ieee")
    else:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PREC)
    if DQ_TMA:
        dqa.atomic_add([start_m, 0], dq)
    else:
        ptrs = dqa + offs_m[:, None].to(tl.int64) * HEAD_D + offs_d[None, :]
        tl.atomic_add(ptrs, dq, mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D), sem="relaxed")


@triton.jit(do_not_specialize=LENGTH_ARGS)
def block_sparse_bwd_fused_kernel(
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
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr, DQ_TMA: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // H_KV).to(tl.int64)
    hk = (pid_bk % H_KV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    col = start_n // BLOCK_K
    cols_sub = start_n % BLOCK_K + tl.arange(0, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    k, v = load_kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, N_K, HEAD_D, False, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    H = H_KV * GROUP
    SUB: tl.constexpr = BLOCK_Q // BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * N_Q
        dqa_base = DQA + row_base * HEAD_D
        if DQ_TMA:
            dqa = tl.make_tensor_descriptor(dqa_base, shape=[N_Q, HEAD_D], strides=[HEAD_D, 1],
                                            block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
        else:
            dqa = dqa_base
        t_fn, t_fi = table_offset(b, h, col, s_fn, s_fi, PLAN_B, PLAN_H, HEAD_DIV)
        n_full = tl.load(TF_NUM + t_fn)
        for it in tl.range(0, n_full * SUB):
            qb = tl.load(TF_IDX + t_fi + it // SUB)
            start_m = qb * BLOCK_Q + (it % SUB) * BLOCK_M
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _rows(q_base, stride_qn, offs_m, offs_d, N_Q, HEAD_D)
            do = _rows(do_base, stride_don, offs_m, offs_d, N_Q, HEAD_D)
            lse2 = _lse2(LSE, row_base, offs_m, N_Q)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
            s_t = dot(k, tl.trans(q), DOT_PREC, UPCAST)
            dp_t = dot(v, tl.trans(do), DOT_PREC, UPCAST)
            dk, dv, ds_t = _dkdv_update(dk, dv, s_t, dp_t, q, do, lse2, delta, qk_scale, False, False, DOT_PREC,
                                        UPCAST)  # fmt: skip
            _add_dq(dqa, ds_t, k, start_m, offs_m, offs_d, N_Q, HEAD_D, DOT_PREC, UPCAST, DQ_TMA)
        t_pn, t_pi = table_offset(b, h, col, s_pn, s_pi, PLAN_B, PLAN_H, HEAD_DIV)
        n_partial = tl.load(TP_NUM + t_pn)
        for it in tl.range(0, n_partial * SUB):
            qb = tl.load(TP_IDX + t_pi + it // SUB)
            pat = tl.load(TP_PAT + t_pi + it // SUB).to(tl.int64)
            sub = (it % SUB) * BLOCK_M
            start_m = qb * BLOCK_Q + sub
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _rows(q_base, stride_qn, offs_m, offs_d, N_Q, HEAD_D)
            do = _rows(do_base, stride_don, offs_m, offs_d, N_Q, HEAD_D)
            lse2 = _lse2(LSE, row_base, offs_m, N_Q)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
            pat_base = PATTERNS + pat * (BLOCK_Q * BLOCK_K) + (sub + tl.arange(0, BLOCK_M))[None, :] * BLOCK_K
            keep_t = tl.load(pat_base + cols_sub[:, None]) != 0
            s_t = dot(k, tl.trans(q), DOT_PREC, UPCAST)
            dp_t = dot(v, tl.trans(do), DOT_PREC, UPCAST)
            dk, dv, ds_t = _dkdv_update(dk, dv, s_t, dp_t, q, do, lse2, delta, qk_scale, keep_t, True, DOT_PREC,
                                        UPCAST)  # fmt: skip
            _add_dq(dqa, ds_t, k, start_m, offs_m, offs_d, N_Q, HEAD_D, DOT_PREC, UPCAST, DQ_TMA)
    _store_kv_grads(DK, DV, b, hk, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, dk, dv,
                    offs_n, offs_d, scale, N_K, HEAD_D, UPCAST)  # fmt: skip


@triton.jit
def block_sparse_dq_finish_kernel(DQA, DQ, stride_dqb, stride_dqh, stride_dqn, H, N_Q, HEAD_D, scale,
                                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """DQ = scale * DQA rounded to DQ's dtype; grid (cdiv(N_q, BLOCK_M), B * H), DQA (B * H, N_q, HEAD_D)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D)
    acc = tl.load(
        DQA + (pid_bh.to(tl.int64) * N_Q + offs_m[:, None]) * HEAD_D + offs_d[None, :], mask=m, other=0.0
    )
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             rounded(acc * scale, DQ.dtype.element_ty, UPCAST), mask=m)  # fmt: skip
