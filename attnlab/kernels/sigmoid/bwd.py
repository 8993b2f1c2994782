"""FlashSigmoid backward (Triton): P is recomputed from Q and K; nothing but the inputs is saved.

Two kernels, no atomics (deterministic):
- ``sigmoid_bwd_dkdv_kernel``, grid (cdiv(N_k, BLOCK_N), B * H_kv): a key block accumulates
      dV += P^T dO,   dK += scale * (P (1 - P) (dO V^T))^T Q
  over the query blocks of every query head in its GQA group (so GQA needs no reduction afterwards).
- ``sigmoid_bwd_dq_kernel``, grid (cdiv(N_q, BLOCK_M), B * H): a query block accumulates
      dQ += scale * (P (1 - P) (dO V^T)) K
  over key blocks, with the forward's key ranges.
Rows past N_q / N_k read as zeros; a zero dO or zero value row makes their contribution zero. Tiles move by
masked pointer loads (the forward's descriptor path is not used here: the backward meets its target without).
"""

import triton
import triton.language as tl

from attnlab.kernels.sigmoid.common import causal_key_range, dot, load_rows, sigmoid_of, store_rows

#: Sequence-length arguments Triton must not specialise on (by ``== 1`` or divisibility by 16): a new
#: length then reuses the compiled kernel instead of compiling another (measured on the H100: no change in
#: kernel time at 16K/32K; benchmarks/results/h100-2026-11-22/session4/).
LENGTH_ARGS = ["N_Q", "N_K", "OFFSET"]


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, stride_qn, stride_don, offs_n, lo, hi, OFFSET, N_Q, HEAD_D, half_scale,
    half_bias, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_D: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block += the contributions of query blocks [lo, hi) of one query head."""
    for start_m in range(lo, hi, BLOCK_M):
        q = load_rows(q_base, stride_qn, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
        do = load_rows(do_base, stride_don, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
        s_t = dot(k, tl.trans(q), DOT_PREC, UPCAST)  # (BLOCK_N, BLOCK_M)
        p_t = sigmoid_of(s_t * half_scale + half_bias, FAST)
        if MASKED:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + OFFSET, p_t, 0.0)
        dv += dot(p_t.to(do.dtype), do, DOT_PREC, UPCAST)
        dp_t = dot(v, tl.trans(do), DOT_PREC, UPCAST)
        ds_t = p_t * (1.0 - p_t) * dp_t
        dk += dot(ds_t.to(q.dtype), q, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit(do_not_specialize=LENGTH_ARGS)
def sigmoid_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H_KV, GROUP, N_Q, N_K, OFFSET, HEAD_D, scale, bias, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hk = (pid_bh % H_KV).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(K + b * stride_kb + hk * stride_kh, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N,
                  EVEN_D)  # fmt: skip
    v = load_rows(V + b * stride_vb + hk * stride_vh, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N,
                  EVEN_D)  # fmt: skip
    half_scale = 0.5 * scale
    half_bias = 0.5 * bias
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # queries that see some key of this block: position i + OFFSET >= start_n
        lo = tl.maximum(start_n - OFFSET, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        # queries that see every key of it: i + OFFSET >= start_n + BLOCK_N - 1
        full_start = tl.maximum(start_n + BLOCK_N - 1 - OFFSET, 0)
        full_start = tl.minimum(((full_start + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, N_Q)
        full_start = tl.maximum(full_start, lo)
    else:
        lo = 0
        full_start = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        if CAUSAL:
            dk, dv = _dkdv_inner(
                dk, dv, k, v, q_base, do_base, stride_qn, stride_don, offs_n, lo, full_start, OFFSET, N_Q, HEAD_D,
                half_scale, half_bias, BLOCK_M, BLOCK_D, True, EVEN_M, EVEN_D, FAST, DOT_PREC, UPCAST,
            )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, stride_qn, stride_don, offs_n, full_start, N_Q, OFFSET, N_Q, HEAD_D,
            half_scale, half_bias, BLOCK_M, BLOCK_D, False, EVEN_M, EVEN_D, FAST, DOT_PREC, UPCAST,
        )  # fmt: skip
    dk *= scale
    store_rows(DK + b * stride_dkb + hk * stride_dkh, stride_dkn, start_n, dk.to(DK.dtype.element_ty), N_K, HEAD_D,
               BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)  # fmt: skip
    store_rows(DV + b * stride_dvb + hk * stride_dvh, stride_dvn, start_n, dv.to(DV.dtype.element_ty), N_K, HEAD_D,
               BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)  # fmt: skip


@triton.jit
def _dq_inner(
    dq, q, do, k_base, v_base, stride_kn, stride_vn, offs_m, lo, hi, OFFSET, N_K, HEAD_D, half_scale, half_bias,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dQ of one query block += the contributions of key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        k = load_rows(k_base, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
        v = load_rows(v_base, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
        s = dot(q, tl.trans(k), DOT_PREC, UPCAST)
        p = sigmoid_of(s * half_scale + half_bias, FAST)
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + OFFSET, p, 0.0)
        dp = dot(do, tl.trans(v), DOT_PREC, UPCAST)
        ds = p * (1.0 - p) * dp
        dq += dot(ds.to(k.dtype), k, DOT_PREC, UPCAST)
    return dq


@triton.jit(do_not_specialize=LENGTH_ARGS)
def sigmoid_bwd_dq_kernel(
    Q, K, V, DO, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, GROUP, N_Q, N_K, OFFSET, HEAD_D, scale, bias, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = load_rows(Q + b * stride_qb + h * stride_qh, stride_qn, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M,
                  EVEN_D)  # fmt: skip
    do = load_rows(DO + b * stride_dob + h * stride_doh, stride_don, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M,
                   EVEN_D)  # fmt: skip
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    half_scale = 0.5 * scale
    half_bias = 0.5 * bias
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = causal_key_range(start_m, OFFSET, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_inner(
        dq, q, do, k_base, v_base, stride_kn, stride_vn, offs_m, 0, full_end, OFFSET, N_K, HEAD_D, half_scale,
        half_bias, BLOCK_N, BLOCK_D, False, EVEN_N, EVEN_D, FAST, DOT_PREC, UPCAST,
    )  # fmt: skip
    if CAUSAL:
        dq = _dq_inner(
            dq, q, do, k_base, v_base, stride_kn, stride_vn, offs_m, full_end, hi, OFFSET, N_K, HEAD_D, half_scale,
            half_bias, BLOCK_N, BLOCK_D, True, EVEN_N, EVEN_D, FAST, DOT_PREC, UPCAST,
        )  # fmt: skip
    dq *= scale
    store_rows(DQ + b * stride_dqb + h * stride_dqh, stride_dqn, start_m, dq.to(DQ.dtype.element_ty), N_Q, HEAD_D,
               BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)  # fmt: skip
