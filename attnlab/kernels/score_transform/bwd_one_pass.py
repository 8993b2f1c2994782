"""Score-transform backward in one pass (Triton): P is recomputed once per (key block, query block) pair.

The formulas are ``bwd.py``'s (dV = P^T dO; dX = P (dO V^T - Delta); dS = dX * T'(scale s), times tau_i
under TEMP; dQ = scale * dS K; dK = scale * dS^T Q; SOFTPLUS: P -> A and dX's P -> sigmoid(x) / L). Grid
(cdiv(N_k, BLOCK_N), B * H_kv), like ``score_transform_bwd_dkdv_kernel``: a key block accumulates dK and dV
in registers over the query blocks of every query head of its GQA group, in the (keys, queries)
orientation (only the causal diagonal blocks apply the mask; query blocks that see none of its keys are
skipped), and adds each tile pair's dQ contribution ``(dS K)^T = K^T dS^T``, computed as the product of the
loaded K^T and the (keys, queries) dS tile (no transpose of a product's result), to an fp32 (B, H, N_q, D)
buffer with relaxed atomic adds. The launcher zero-fills that buffer and converts it to q's dtype (times
the scale) afterwards. dQ is therefore order-dependent in its last bits: the key blocks' contributions
reach each element in whatever order the programs run (not deterministic from run to run).

Five matrix products per tile pair instead of the two-kernel path's seven. Not here (the launcher falls
back to the two kernels): the low-rank bias (LOWRANK) and the ALiBi slopes' and temperature's gradients
(ALIBI_GRAD, TEMP_GRAD). A dense bias, ALiBi, a temperature without its gradient, the soft cap and the
softplus weights are here; the sink logits' gradient is the launcher's PyTorch reduction either way.
"""

import triton
import triton.language as tl

from attnlab.kernels.score_transform.common import LN2, LOG2E, logits2, softplus2
from attnlab.kernels.sigmoid.common import dot, load_rows, store_rows

LENGTH_ARGS = ["N_Q", "N_K", "OFFSET"]


@triton.jit
def _add_rows_t(
    base, stride_n, offs_m, value, N_Q, HEAD_D, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    """Atomically add ``value``, a (BLOCK_D, BLOCK_M) tile, to rows ``offs_m`` of one head's (N_q, HEAD_D)
    fp32 matrix at ``base`` (row stride ``stride_n``) as its transpose; rows >= N_q and columns >= HEAD_D
    are not touched."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + offs_m[None, :] * stride_n + offs_d[:, None]
    if EVEN_M:
        if EVEN_D:
            tl.atomic_add(ptrs, value, sem="relaxed")
        else:
            tl.atomic_add(ptrs, value, mask=offs_d[:, None] < HEAD_D, sem="relaxed")
    else:
        if EVEN_D:
            tl.atomic_add(ptrs, value, mask=offs_m[None, :] < N_Q, sem="relaxed")
        else:
            tl.atomic_add(
                ptrs, value, mask=(offs_m[None, :] < N_Q) & (offs_d[:, None] < HEAD_D), sem="relaxed"
            )


@triton.jit
def _one_pass_inner(
    dk, dv, k, k_t, v, q_base, do_base, dq_base, tau_base, lse_base, delta_base, bias_base, stride_qn,
    stride_don, stride_dqn, stride_tn, stride_bm, stride_bn, slope2, offs_n, lo, hi, N_Q, N_K, OFFSET, HEAD_D,
    scale2, cap2, inv_cap, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, ALIBI: tl.constexpr, TEMP: tl.constexpr, FAST: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block += the contributions of query blocks [lo, hi) of one head, whose dQ rows get
    this key block's contribution (unscaled) by atomic adds."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(q_base, stride_qn, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
        do = load_rows(do_base, stride_don, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
        lse2 = tl.load(lse_base + offs_m, mask=offs_m < N_Q, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < N_Q, other=0.0)
        s_t = dot(k, tl.trans(q), DOT_PREC, UPCAST)  # (BLOCK_N, BLOCK_M)
        tau = delta
        if TEMP:  # the temperature multiplies the scores: s_eff = tau_i s
            tau = tl.load(tau_base + offs_m * stride_tn, mask=offs_m < N_Q, other=1.0).to(tl.float32)
            s_t = s_t * tau[None, :]
        qi = offs_m[None, :]
        kj = offs_n[:, None]
        x_t, t_t = logits2(s_t, qi, kj, bias_base, stride_bm, stride_bn, slope2, s_t, N_Q, N_K, OFFSET, scale2,
                           cap2, inv_cap, SOFTCAP, HAS_BIAS, ALIBI, False, FAST)  # fmt: skip
        # keys past N_k read as zero rows: their P is not 0 (only their dK/dV rows, never stored, would see
        # it), and it must not reach dQ (an overflowing P times a zero key row is NaN)
        if SOFTPLUS:  # A = softplus(y) / L, dY = sigmoid(y) (dP - Delta) / L; 1 / L = 2^-lse2 (0 on +inf)
            w_t, g_t = softplus2(x_t, FAST)
            inv = tl.math.exp2(-lse2)
            p_t = w_t * (LN2 * inv[None, :])
            g_t = g_t * inv[None, :]
            if MASKED:
                p_t = tl.where(kj <= qi + OFFSET, p_t, 0.0)
                g_t = tl.where(kj <= qi + OFFSET, g_t, 0.0)
            if not EVEN_N:
                g_t = tl.where(kj < N_K, g_t, 0.0)
        else:
            p_t = tl.math.exp2(x_t - lse2[None, :])
            if MASKED:
                p_t = tl.where(kj <= qi + OFFSET, p_t, 0.0)
            if not EVEN_N:
                p_t = tl.where(kj < N_K, p_t, 0.0)
            g_t = p_t
        dv += dot(p_t.to(do.dtype), do, DOT_PREC, UPCAST)
        dp_t = dot(v, tl.trans(do), DOT_PREC, UPCAST)
        ds_t = g_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        if TEMP:
            ds_t = ds_t * tau[None, :]
        ds_t = ds_t.to(q.dtype)
        dk += dot(ds_t, q, DOT_PREC, UPCAST)
        dq_t = dot(k_t, ds_t, DOT_PREC, UPCAST)  # (BLOCK_D, BLOCK_M): this key block's (dS K)^T
        _add_rows_t(dq_base, stride_dqn, offs_m, dq_t, N_Q, HEAD_D, BLOCK_D, EVEN_M, EVEN_D)
    return dk, dv


@triton.jit(do_not_specialize=LENGTH_ARGS)
def score_transform_bwd_one_pass_kernel(
    Q, K, V, DO, LSE, DELTA, BIAS, SLOPES, TAU, DK, DV, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqb, stride_dqh, stride_dqn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_tb, stride_th, stride_tn,
    H, H_KV, GROUP, N_Q, N_K, OFFSET, HEAD_D, scale, cap, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, ALIBI: tl.constexpr,
    TEMP: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """dK, dV (B, H_kv, N_k, D) of one key block, and its contributions to ``DQ``, the fp32 (B, H, N_q, D)
    buffer of unscaled dQ (zero-filled by the launcher; see the module doc)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hk = (pid_bh % H_KV).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_rows(K + b * stride_kb + hk * stride_kh, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N,
                  EVEN_D)  # fmt: skip
    v = load_rows(V + b * stride_vb + hk * stride_vh, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N,
                  EVEN_D)  # fmt: skip
    k_t = tl.trans(k)  # (BLOCK_D, BLOCK_N), a loaded tile's transpose
    scale2 = scale * LOG2E
    cap2 = cap * LOG2E
    inv_cap = scale / cap
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
        dq_base = DQ + b * stride_dqb + h * stride_dqh
        row_base = (b * H + h) * N_Q
        bias_base = BIAS + b * stride_bb + h * stride_bh
        tau_base = TAU + b * stride_tb + h * stride_th
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(SLOPES + h).to(tl.float32) * LOG2E
        if CAUSAL:
            dk, dv = _one_pass_inner(
                dk, dv, k, k_t, v, q_base, do_base, dq_base, tau_base, LSE + row_base, DELTA + row_base,
                bias_base, stride_qn, stride_don, stride_dqn, stride_tn, stride_bm, stride_bn, slope2, offs_n,
                lo, full_start, N_Q, N_K, OFFSET, HEAD_D, scale2, cap2, inv_cap, BLOCK_M, BLOCK_D, True, EVEN_M,
                EVEN_N, EVEN_D, SOFTCAP, HAS_BIAS, ALIBI, TEMP, FAST, DOT_PREC, UPCAST, SOFTPLUS,
            )  # fmt: skip
        dk, dv = _one_pass_inner(
            dk, dv, k, k_t, v, q_base, do_base, dq_base, tau_base, LSE + row_base, DELTA + row_base, bias_base,
            stride_qn, stride_don, stride_dqn, stride_tn, stride_bm, stride_bn, slope2, offs_n, full_start, N_Q,
            N_Q, N_K, OFFSET, HEAD_D, scale2, cap2, inv_cap, BLOCK_M, BLOCK_D, False, EVEN_M, EVEN_N, EVEN_D,
            SOFTCAP, HAS_BIAS, ALIBI, TEMP, FAST, DOT_PREC, UPCAST, SOFTPLUS,
        )  # fmt: skip
    dk *= scale
    store_rows(DK + b * stride_dkb + hk * stride_dkh, stride_dkn, start_n, dk.to(DK.dtype.element_ty), N_K, HEAD_D,
               BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)  # fmt: skip
    store_rows(DV + b * stride_dvb + hk * stride_dvh, stride_dvn, start_n, dv.to(DV.dtype.element_ty), N_K, HEAD_D,
               BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)  # fmt: skip
