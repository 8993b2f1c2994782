"""Score-transform softmax backward (Triton): P is recomputed from Q, K and the forward's log-sum-exp.

With x = T(s) + bias, s = scale * q k^T, T the soft cap (or the identity), P = exp(x - lse) (0 outside the
mask, and on rows with no key: lse is passed as +inf there), Delta_i = dO_i . O_i (computed by the
launcher; a sink has no value, so it adds nothing to Delta):
    dV = P^T dO;   dX = P (dO V^T - Delta);   dS = dX * T'(s),  T'(s) = 1 - (T(s) / cap)^2;
    dQ = scale * dS K;   dK = scale * dS^T Q.
Two kernels, no atomics: ``score_transform_bwd_dkdv_kernel`` (grid (cdiv(N_k, BLOCK_N), B * H_kv); a key
block accumulates over the query blocks of every query head of its GQA group) and
``score_transform_bwd_dq_kernel`` (grid (cdiv(N_q, BLOCK_M), B * H)). Every tile applies the bounds and
causal masks (no unmasked fast loop yet). The sink logits' gradient, -sum_i exp(s_h - lse_i) Delta_i, is
a reduction the launcher does in PyTorch; the bias has no gradient here.
"""

import triton
import triton.language as tl

from attnlab.kernels.sigmoid.common import dot, load_rows, store_rows

LENGTH_ARGS = ["N_Q", "N_K", "OFFSET"]


@triton.jit
def _scores(
    s, bias_base, stride_bm, stride_bn, offs_m, offs_n, N_Q, N_K, OFFSET, cap, SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """(x, T'(s), allowed) of the (rows offs_m, cols offs_n) tile of scaled scores ``s``."""
    deriv = tl.full(s.shape, 1.0, tl.float32)
    x = s
    if SOFTCAP:
        x = cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))
        deriv = 1.0 - (x / cap) * (x / cap)
    if HAS_BIAS:
        inside = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
        ptrs = bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn
        x += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    ok = (offs_n[None, :] < N_K) & (offs_m[:, None] < N_Q)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + OFFSET)
    return x, deriv, ok


@triton.jit(do_not_specialize=LENGTH_ARGS)
def score_transform_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, BIAS, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, H_KV, GROUP, N_Q, N_K, OFFSET, HEAD_D, scale, cap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
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
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # the first query block holding a query that sees a key of this block (i + OFFSET >= start_n)
        lo = (tl.maximum(start_n - OFFSET, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * N_Q
        bias_base = BIAS + b * stride_bb + h * stride_bh
        for start_m in range(lo, N_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = load_rows(q_base, stride_qn, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
            do = load_rows(do_base, stride_don, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < N_Q, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
            s = dot(q, tl.trans(k), DOT_PREC, UPCAST) * scale  # (BLOCK_M, BLOCK_N)
            x, deriv, ok = _scores(s, bias_base, stride_bm, stride_bn, offs_m, offs_n, N_Q, N_K, OFFSET, cap,
                                   SOFTCAP, HAS_BIAS, CAUSAL)  # fmt: skip
            p = tl.where(ok, tl.exp(x - lse[:, None]), 0.0)
            dv += dot(tl.trans(p).to(do.dtype), do, DOT_PREC, UPCAST)
            dp = dot(do, tl.trans(v), DOT_PREC, UPCAST)
            ds = p * (dp - delta[:, None]) * deriv
            dk += dot(tl.trans(ds).to(q.dtype), q, DOT_PREC, UPCAST)
    dk *= scale
    store_rows(DK + b * stride_dkb + hk * stride_dkh, stride_dkn, start_n, dk.to(DK.dtype.element_ty), N_K, HEAD_D,
               BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)  # fmt: skip
    store_rows(DV + b * stride_dvb + hk * stride_dvh, stride_dvn, start_n, dv.to(DV.dtype.element_ty), N_K, HEAD_D,
               BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)  # fmt: skip


@triton.jit(do_not_specialize=LENGTH_ARGS)
def score_transform_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, BIAS, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, GROUP, N_Q, N_K, OFFSET, HEAD_D, scale, cap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
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
    row_base = pid_bh.to(tl.int64) * N_Q
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < N_Q, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    hi = N_K
    if CAUSAL:  # keys up to the block's last position
        hi = tl.maximum(tl.minimum(tl.minimum(start_m + BLOCK_M, N_Q) + OFFSET, N_K), 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
        v = load_rows(v_base, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
        s = dot(q, tl.trans(k), DOT_PREC, UPCAST) * scale
        x, deriv, ok = _scores(s, bias_base, stride_bm, stride_bn, offs_m, offs_n, N_Q, N_K, OFFSET, cap, SOFTCAP,
                               HAS_BIAS, CAUSAL)  # fmt: skip
        p = tl.where(ok, tl.exp(x - lse[:, None]), 0.0)
        dp = dot(do, tl.trans(v), DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None]) * deriv
        dq += dot(ds.to(k.dtype), k, DOT_PREC, UPCAST)
    dq *= scale
    store_rows(DQ + b * stride_dqb + h * stride_dqh, stride_dqn, start_m, dq.to(DQ.dtype.element_ty), N_Q, HEAD_D,
               BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)  # fmt: skip
