"""Score-transform softmax backward (Triton): P is recomputed from Q, K and the forward's log-sum-exp.

With x the logit of :func:`attnlab.kernels.score_transform.common.logits2` (s = q k^T, x = T(scale s) + bias
terms, T the soft cap or the identity), P = exp(x - lse) (0 outside the mask, and on rows with no key: the
launcher passes lse as +inf there; base-2 units inside), Delta_i = dO_i . O_i (computed by the launcher; a
sink has no value, so it adds nothing to Delta):
    dV = P^T dO;   dX = P (dO V^T - Delta);   dS = dX * T'(scale s),  T' = 1 - tanh^2 under the soft cap;
    dQ = scale * dS K;   dK = scale * dS^T Q;   low-rank bias x += U V^T:  dU = dX V_f,  dV_f = dX^T U.
Two kernels, no atomics: ``score_transform_bwd_dkdv_kernel`` (grid (cdiv(N_k, BLOCK_N), B * H_kv); a key
block accumulates over the query blocks of every query head of its GQA group, in the (keys, queries)
orientation, and writes dV_f per query head) and ``score_transform_bwd_dq_kernel`` (grid (cdiv(N_q,
BLOCK_M), B * H); writes dU). Only the causal diagonal blocks apply the causal mask. The sink logits'
gradient, -sum_i exp(s_h - lse_i) Delta_i, is a reduction the launcher does in PyTorch; the ALiBi slopes'
gradient, -sum_ij dX_ij |i + N_k - N_q - j|, is summed per dQ program (ALIBI_GRAD) and over the programs by
the launcher; a per-query temperature (TEMP: s -> tau_i s) scales dS by tau_i, and its gradient
scale * sum_j dS_ij s_ij is a row of the dQ program (TEMP_GRAD); a dense bias gets none. A gradient of the
returned lse (dlse) enters through Delta: d lse_i / d x_ij = P_ij, so dX = P (dO V^T - (Delta - dlse)); the
launcher passes Delta - dlse (the sinks' gradient takes the same Delta). The low-rank factors are fp32:
the bias tile U V_f^T is recomputed as the forward computes it (an fp32 product,
:func:`~attnlab.kernels.score_transform.common.lowrank_tile`), so P matches the forward's lse; dU and dV_f
multiply dX by the factors in q's dtype with fp32 accumulation, as dQ and dK do (16-bit operands keep
these tiles' shared memory as it was; their error is a gradient's relative rounding, not a logit offset).

SOFTPLUS (l1-normalised softplus weights, no exponential): the forward's lse is log L_i, L_i = sum_j
softplus(x_ij), so with A = softplus(x) / L the same two kernels compute
    dV = A^T dO;   dX = sigmoid(x) (dO V^T - Delta) / L
(the softmax's P in the dX formula becomes sigmoid(x) / L; 1 / L = exp(-lse), 0 on rows with no key).
"""

import triton
import triton.language as tl

from attnlab.kernels.score_transform.common import (
    LN2,
    LOG2E,
    distance,
    load_factor,
    logits2,
    lowrank_tile,
    softplus2,
    store_factor,
)
from attnlab.kernels.sigmoid.common import causal_key_range, dot, load_rows, store_rows

LENGTH_ARGS = ["N_Q", "N_K", "OFFSET"]


@triton.jit
def _dkdv_inner(
    dk, dv, dvf, k, v, vf, q_base, do_base, u_base, tau_base, lse_base, delta_base, bias_base, stride_qn,
    stride_don, stride_un, stride_tn, stride_bm, stride_bn, slope2, offs_n, lo, hi, N_Q, N_K, OFFSET, HEAD_D, R,
    scale2, cap2, inv_cap, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    MASKED: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, ALIBI: tl.constexpr, LOWRANK: tl.constexpr, TEMP: tl.constexpr, FAST: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """dK, dV (and dV_f) of one key block += the contributions of query blocks [lo, hi) of one head."""
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
        lr = s_t
        u = q
        if LOWRANK:
            u = load_factor(u_base, stride_un, start_m, N_Q, R, BLOCK_M, BLOCK_R)
            lr = lowrank_tile(vf, u)
        qi = offs_m[None, :]
        kj = offs_n[:, None]
        x_t, t_t = logits2(s_t, qi, kj, bias_base, stride_bm, stride_bn, slope2, lr, N_Q, N_K, OFFSET, scale2,
                           cap2, inv_cap, SOFTCAP, HAS_BIAS, ALIBI, LOWRANK, FAST)  # fmt: skip
        if SOFTPLUS:  # A = softplus(y) / L, dY = sigmoid(y) (dP - Delta) / L; 1 / L = 2^-lse2 (0 on +inf)
            w_t, g_t = softplus2(x_t, FAST)
            inv = tl.math.exp2(-lse2)
            p_t = w_t * (LN2 * inv[None, :])
            g_t = g_t * inv[None, :]
            if MASKED:
                p_t = tl.where(kj <= qi + OFFSET, p_t, 0.0)
                g_t = tl.where(kj <= qi + OFFSET, g_t, 0.0)
        else:
            p_t = tl.math.exp2(x_t - lse2[None, :])
            if MASKED:
                p_t = tl.where(kj <= qi + OFFSET, p_t, 0.0)
            g_t = p_t
        dv += dot(p_t.to(do.dtype), do, DOT_PREC, UPCAST)
        dp_t = dot(v, tl.trans(do), DOT_PREC, UPCAST)
        dx_t = g_t * (dp_t - delta[None, :])
        ds_t = dx_t
        if SOFTCAP:
            ds_t = dx_t * (1.0 - t_t * t_t)
        if TEMP:
            ds_t = ds_t * tau[None, :]
        dk += dot(ds_t.to(q.dtype), q, DOT_PREC, UPCAST)
        if LOWRANK:
            dvf += dot(dx_t.to(q.dtype), u.to(q.dtype), DOT_PREC, UPCAST)  # (q's dtype, as dK's operands)
    return dk, dv, dvf


@triton.jit(do_not_specialize=LENGTH_ARGS)
def score_transform_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, BIAS, SLOPES, UF, VF, TAU, DK, DV, DVF,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ub, stride_uh, stride_un,
    stride_vfb, stride_vfh, stride_vfn,
    stride_tb, stride_th, stride_tn,
    H, H_KV, GROUP, N_Q, N_K, OFFSET, HEAD_D, R, scale, cap, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, ALIBI: tl.constexpr,
    LOWRANK: tl.constexpr, TEMP: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, SOFTPLUS: tl.constexpr,
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
        row_base = (b * H + h) * N_Q
        bias_base = BIAS + b * stride_bb + h * stride_bh
        u_base = UF + b * stride_ub + h * stride_uh
        tau_base = TAU + b * stride_tb + h * stride_th
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(SLOPES + h).to(tl.float32) * LOG2E
        vf = k
        dvf = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
        if LOWRANK:
            vf = load_factor(
                VF + b * stride_vfb + h * stride_vfh, stride_vfn, start_n, N_K, R, BLOCK_N, BLOCK_R
            )
        if CAUSAL:
            dk, dv, dvf = _dkdv_inner(
                dk, dv, dvf, k, v, vf, q_base, do_base, u_base, tau_base, LSE + row_base, DELTA + row_base,
                bias_base, stride_qn, stride_don, stride_un, stride_tn, stride_bm, stride_bn, slope2, offs_n, lo, full_start, N_Q, N_K,
                OFFSET, HEAD_D, R, scale2, cap2, inv_cap, BLOCK_M, BLOCK_D, BLOCK_R, True, EVEN_M, EVEN_D,
                SOFTCAP, HAS_BIAS, ALIBI, LOWRANK, TEMP, FAST, DOT_PREC, UPCAST, SOFTPLUS,
            )  # fmt: skip
        dk, dv, dvf = _dkdv_inner(
            dk, dv, dvf, k, v, vf, q_base, do_base, u_base, tau_base, LSE + row_base, DELTA + row_base,
            bias_base, stride_qn, stride_don, stride_un, stride_tn, stride_bm, stride_bn, slope2, offs_n, full_start, N_Q, N_Q, N_K,
            OFFSET, HEAD_D, R, scale2, cap2, inv_cap, BLOCK_M, BLOCK_D, BLOCK_R, False, EVEN_M, EVEN_D, SOFTCAP,
            HAS_BIAS, ALIBI, LOWRANK, TEMP, FAST, DOT_PREC, UPCAST, SOFTPLUS,
        )  # fmt: skip
        if LOWRANK:  # (B, H, N_k, BLOCK_R) fp32, contiguous
            store_factor(DVF + (b * H + h) * N_K * BLOCK_R, BLOCK_R, start_n, dvf, N_K, R, BLOCK_N, BLOCK_R)
    dk *= scale
    store_rows(DK + b * stride_dkb + hk * stride_dkh, stride_dkn, start_n, dk.to(DK.dtype.element_ty), N_K, HEAD_D,
               BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)  # fmt: skip
    store_rows(DV + b * stride_dvb + hk * stride_dvh, stride_dvn, start_n, dv.to(DV.dtype.element_ty), N_K, HEAD_D,
               BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)  # fmt: skip


@triton.jit
def _dq_inner(
    dq, du, dsl, dtau, q, do, u, tau, lse2, delta, k_base, v_base, vf_base, bias_base, stride_kn, stride_vn,
    stride_vfn, stride_bm, stride_bn, slope2, offs_m, lo, hi, N_Q, N_K, OFFSET, HEAD_D, R, scale2, cap2, inv_cap,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, MASKED: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    ALIBI: tl.constexpr, LOWRANK: tl.constexpr, ALIBI_GRAD: tl.constexpr, TEMP: tl.constexpr,
    TEMP_GRAD: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """dQ (and dU, the ALiBi slope's and the temperature's gradients) of one query block += the
    contributions of key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
        v = load_rows(v_base, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
        s_raw = dot(q, tl.trans(k), DOT_PREC, UPCAST)
        s = s_raw
        if TEMP:  # the temperature multiplies the scores: s_eff = tau_i s
            s = s_raw * tau[:, None]
        lr = s
        vf = k
        if LOWRANK:
            vf = load_factor(vf_base, stride_vfn, start_n, N_K, R, BLOCK_N, BLOCK_R)
            lr = lowrank_tile(u, vf)
        qi = offs_m[:, None]
        kj = offs_n[None, :]
        x, t = logits2(s, qi, kj, bias_base, stride_bm, stride_bn, slope2, lr, N_Q, N_K, OFFSET, scale2, cap2,
                       inv_cap, SOFTCAP, HAS_BIAS, ALIBI, LOWRANK, FAST)  # fmt: skip
        if SOFTPLUS:  # see _dkdv_inner
            _w, g = softplus2(x, FAST)
            inv = tl.math.exp2(-lse2)
            g = g * inv[:, None]
            if MASKED:
                g = tl.where(kj <= qi + OFFSET, g, 0.0)
            if not EVEN_N:
                g = tl.where(kj < N_K, g, 0.0)
        else:
            p = tl.math.exp2(x - lse2[:, None])
            if MASKED:
                p = tl.where(kj <= qi + OFFSET, p, 0.0)
            if not EVEN_N:  # keys past N_k read as zero rows: their scores are not -inf
                p = tl.where(kj < N_K, p, 0.0)
            g = p
        dp = dot(do, tl.trans(v), DOT_PREC, UPCAST)
        dx = g * (dp - delta[:, None])
        ds = dx
        if SOFTCAP:
            ds = dx * (1.0 - t * t)
        if TEMP:
            if TEMP_GRAD:  # d(scale s_eff)/d tau_i = scale s (the launcher's scale)
                dtau += tl.sum(ds * s_raw, 1)
            ds = ds * tau[:, None]
        dq += dot(ds.to(k.dtype), k, DOT_PREC, UPCAST)
        if LOWRANK:
            du += dot(dx.to(k.dtype), vf.to(k.dtype), DOT_PREC, UPCAST)  # (k's dtype, as dQ's operands)
        if ALIBI_GRAD:  # x = ... - m_h |i + OFFSET - j|: dL/dm_h = -sum dX |i + OFFSET - j|
            dsl -= tl.sum(tl.sum(dx * tl.abs(distance(qi, kj, OFFSET)), 1), 0)
    return dq, du, dsl, dtau


@triton.jit(do_not_specialize=LENGTH_ARGS)
def score_transform_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, BIAS, SLOPES, UF, VF, TAU, DQ, DU, DSL, DTAU,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ub, stride_uh, stride_un,
    stride_vfb, stride_vfh, stride_vfn,
    stride_tb, stride_th, stride_tn,
    H, GROUP, N_Q, N_K, OFFSET, HEAD_D, R, scale, cap, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, ALIBI: tl.constexpr,
    LOWRANK: tl.constexpr, ALIBI_GRAD: tl.constexpr, TEMP: tl.constexpr, TEMP_GRAD: tl.constexpr,
    FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, SOFTPLUS: tl.constexpr,
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
    lse2 = tl.load(LSE + row_base + offs_m, mask=offs_m < N_Q, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    vf_base = VF + b * stride_vfb + h * stride_vfh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + h).to(tl.float32) * LOG2E
    u = q
    if LOWRANK:
        u = load_factor(UF + b * stride_ub + h * stride_uh, stride_un, start_m, N_Q, R, BLOCK_M, BLOCK_R)
    scale2 = scale * LOG2E
    cap2 = cap * LOG2E
    inv_cap = scale / cap
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    du = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    dsl = 0.0
    tau = delta
    if TEMP:
        tau = tl.load(TAU + b * stride_tb + h * stride_th + offs_m * stride_tn, mask=offs_m < N_Q, other=1.0)
        tau = tau.to(tl.float32)
    dtau = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end, hi = causal_key_range(start_m, OFFSET, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    dq, du, dsl, dtau = _dq_inner(
        dq, du, dsl, dtau, q, do, u, tau, lse2, delta, k_base, v_base, vf_base, bias_base, stride_kn, stride_vn,
        stride_vfn, stride_bm, stride_bn, slope2, offs_m, 0, full_end, N_Q, N_K, OFFSET, HEAD_D, R, scale2, cap2, inv_cap,
        BLOCK_N, BLOCK_D, BLOCK_R, False, EVEN_N, EVEN_D, SOFTCAP, HAS_BIAS, ALIBI, LOWRANK, ALIBI_GRAD, TEMP,
        TEMP_GRAD, FAST, DOT_PREC, UPCAST, SOFTPLUS,
    )  # fmt: skip
    if CAUSAL:
        dq, du, dsl, dtau = _dq_inner(
            dq, du, dsl, dtau, q, do, u, tau, lse2, delta, k_base, v_base, vf_base, bias_base, stride_kn,
            stride_vn, stride_vfn, stride_bm, stride_bn, slope2, offs_m, full_end, hi, N_Q, N_K, OFFSET, HEAD_D, R, scale2, cap2,
            inv_cap, BLOCK_N, BLOCK_D, BLOCK_R, True, EVEN_N, EVEN_D, SOFTCAP, HAS_BIAS, ALIBI, LOWRANK,
            ALIBI_GRAD, TEMP, TEMP_GRAD, FAST, DOT_PREC, UPCAST, SOFTPLUS,
        )  # fmt: skip
    dq *= scale
    store_rows(DQ + b * stride_dqb + h * stride_dqh, stride_dqn, start_m, dq.to(DQ.dtype.element_ty), N_Q, HEAD_D,
               BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)  # fmt: skip
    if TEMP_GRAD:  # (B * H, N_q) fp32, one row per query
        tl.store(DTAU + row_base + offs_m, dtau * scale, mask=offs_m < N_Q)
    if ALIBI_GRAD:  # (query blocks, B * H) fp32, zero-filled: one partial sum per program
        tl.store(DSL + tl.program_id(0).to(tl.int64) * tl.num_programs(1) + pid_bh, dsl)
    if LOWRANK:  # (B, H, N_q, BLOCK_R) fp32, contiguous
        store_factor(DU + pid_bh.to(tl.int64) * N_Q * BLOCK_R, BLOCK_R, start_m, du, N_Q, R, BLOCK_M, BLOCK_R)
