"""Score-transform softmax forward (Triton): FlashAttention-2's online softmax with the transform inlined.

Grid: (cdiv(N_q, BLOCK_M), B * H). Program (m, b*h) computes rows [m*BLOCK_M, (m+1)*BLOCK_M) of head h
(kv head h // GROUP), visiting key blocks [0, full_end) without the causal mask and [full_end, hi) with it
(bottom-right: query i sits at i + OFFSET). Per key block, with s = q k^T and the logit x of
:func:`attnlab.kernels.score_transform.common.logits2` (soft cap, dense bias, ALiBi, low-rank bias U V^T;
a per-query temperature tau_i multiplies s first when TEMP;
base-2 units, so the exponentials are ``exp2``), -inf outside the mask:
    m_new = max(m, rowmax(x));  l = l * 2^(m - m_new) + rowsum(2^(x - m_new));  acc likewise, + 2^(x - m_new) v
After the loop a sink logit s_h joins the normaliser (HAS_SINK): l += 2^(s_h - m) with m = max(m, s_h)
(s_h = -inf adds nothing, also on a row with no key; s_h = +inf leaves only the sink: out 0, lse +inf).
out = acc / l (0 where l == 0), lse = (m + log2(l)) * ln(2) (-inf where l == 0). Keys past N_k are masked
(-inf), not read as zero scores. The low-rank bias tile U V_f^T is an fp32 product of fp32 factors
(:func:`~attnlab.kernels.score_transform.common.lowrank_tile`).

SOFTPLUS (l1-normalised softplus weights): no maximum is kept; per key block l += rowsum(w) and acc += w v with
w = log2(1 + 2^x) (softplus / ln 2: the ln 2 cancels in acc / l); out = acc / l (0 where l == 0) and the
returned lse is log(l ln 2), the log of the natural normaliser sum_j softplus(x_ij).

Schedule knobs (constexpr; the FlashSigmoid kernel's, see attnlab/kernels/sigmoid/fwd.py): TMA (tiles of
q, k, v, o move by tensor descriptors built in the kernel), SPLIT=2 (the query tile is two row halves whose
score products are issued before either half's exponentials), WS (Triton's warp specialization of the
unmasked key loop; needs TMA; not with the causal diagonal loop).
"""

import triton
import triton.language as tl

from attnlab.kernels.score_transform.common import LN2, LOG2E, load_factor, logits2, lowrank_tile, softplus2
from attnlab.kernels.sigmoid.common import causal_key_range, dot, dot_acc
from attnlab.kernels.sigmoid.fwd import _load_rows, _store_rows, _tile_source

LENGTH_ARGS = ["N_Q", "N_K", "OFFSET"]


@triton.jit
def _online(
    acc, m_i, l_i, s, v, offs_m, offs_n, bias_base, stride_bm, stride_bn, slope2, u, vf, N_Q, N_K, OFFSET,
    scale2, cap2, inv_cap, MASKED: tl.constexpr, BOUND: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, ALIBI: tl.constexpr, LOWRANK: tl.constexpr, FAST: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """One key block's online-softmax update of one query tile (rows offs_m) given raw scores ``s``.

    Without a transform (plain softmax, the sink variant) the scale is folded as in Triton's attention
    tutorial: the row maximum is taken on the raw scores and scaled once per row, and ``2^(s * scale2 - m)``
    is one fused multiply-add per score (the timed kernel multiplied, then subtracted; not timed since).

    SOFTPLUS: no maximum; the weights ``log2(1 + 2^x)`` (softplus / ln 2, which cannot overflow) are summed
    into ``l`` and multiply v directly; ``m`` is returned unchanged."""
    qi = offs_m[:, None]
    kj = offs_n[None, :]
    if SOFTPLUS:
        if SOFTCAP or HAS_BIAS or ALIBI or LOWRANK:
            lr = s
            if LOWRANK:
                lr = lowrank_tile(u, vf)
            w, _ = logits2(s, qi, kj, bias_base, stride_bm, stride_bn, slope2, lr, N_Q, N_K, OFFSET, scale2, cap2,
                           inv_cap, SOFTCAP, HAS_BIAS, ALIBI, LOWRANK, FAST)  # fmt: skip
        else:
            w = s * scale2
        w, _ = softplus2(w, FAST)
        if MASKED:
            w = tl.where(kj <= qi + OFFSET, w, 0.0)
        if BOUND:
            w = tl.where(kj < N_K, w, 0.0)
        l_i = l_i + tl.sum(w, 1)
        acc = dot_acc(w.to(v.dtype), v, acc, DOT_PREC, UPCAST)
        return acc, m_i, l_i
    if SOFTCAP or HAS_BIAS or ALIBI or LOWRANK:
        lr = s
        if LOWRANK:
            lr = lowrank_tile(u, vf)
        x, _ = logits2(s, qi, kj, bias_base, stride_bm, stride_bn, slope2, lr, N_Q, N_K, OFFSET, scale2, cap2,
                       inv_cap, SOFTCAP, HAS_BIAS, ALIBI, LOWRANK, FAST)  # fmt: skip
        x_scale = 1.0
    else:
        x = s
        x_scale = scale2  # > 0: the maximum commutes with it
    if MASKED:
        x = tl.where(kj <= qi + OFFSET, x, float("-inf"))
    if BOUND:
        x = tl.where(kj < N_K, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1) * x_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: no NaN from -inf - -inf
    p = tl.math.exp2(x * x_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], DOT_PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _fwd_inner(
    acc0, m0, l0, acc1, m1, l1, q0, q1, u0, u1, tau0, tau1, k_src, v_src, vf_base, stride_kn, stride_vn,
    stride_vfn, bias_base, stride_bm, stride_bn, slope2, offs_m0, offs_m1, lo, hi, N_Q, N_K, OFFSET, HEAD_D, R,
    scale2, cap2, inv_cap, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    MASKED: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, ALIBI: tl.constexpr, LOWRANK: tl.constexpr, TEMP: tl.constexpr, FAST: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr, WS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """Add key blocks [lo, hi) to the query halves' (acc, m, l) (the second half unused when SPLIT == 1)."""
    BOUND: tl.constexpr = not EVEN_N
    if SPLIT == 1:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_src, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
            v = _load_rows(v_src, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
            vf = k
            if LOWRANK:
                vf = load_factor(vf_base, stride_vfn, start_n, N_K, R, BLOCK_N, BLOCK_R)
            s0 = dot(q0, tl.trans(k), DOT_PREC, UPCAST)
            if TEMP:
                s0 = s0 * tau0[:, None]
            acc0, m0, l0 = _online(
                acc0, m0, l0, s0, v, offs_m0, offs_n, bias_base, stride_bm, stride_bn, slope2, u0, vf, N_Q, N_K,
                OFFSET, scale2, cap2, inv_cap, MASKED, BOUND, SOFTCAP, HAS_BIAS, ALIBI, LOWRANK, FAST, DOT_PREC,
                UPCAST, SOFTPLUS,
            )  # fmt: skip
    else:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_src, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
            v = _load_rows(v_src, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
            vf = k
            if LOWRANK:
                vf = load_factor(vf_base, stride_vfn, start_n, N_K, R, BLOCK_N, BLOCK_R)
            s0 = dot(q0, tl.trans(k), DOT_PREC, UPCAST)
            s1 = dot(q1, tl.trans(k), DOT_PREC, UPCAST)  # issued before the first half's exponentials
            if TEMP:
                s0 = s0 * tau0[:, None]
                s1 = s1 * tau1[:, None]
            acc0, m0, l0 = _online(
                acc0, m0, l0, s0, v, offs_m0, offs_n, bias_base, stride_bm, stride_bn, slope2, u0, vf, N_Q, N_K,
                OFFSET, scale2, cap2, inv_cap, MASKED, BOUND, SOFTCAP, HAS_BIAS, ALIBI, LOWRANK, FAST, DOT_PREC,
                UPCAST, SOFTPLUS,
            )  # fmt: skip
            acc1, m1, l1 = _online(
                acc1, m1, l1, s1, v, offs_m1, offs_n, bias_base, stride_bm, stride_bn, slope2, u1, vf, N_Q, N_K,
                OFFSET, scale2, cap2, inv_cap, MASKED, BOUND, SOFTCAP, HAS_BIAS, ALIBI, LOWRANK, FAST, DOT_PREC,
                UPCAST, SOFTPLUS,
            )  # fmt: skip
    return acc0, m0, l0, acc1, m1, l1


@triton.jit
def _finish(acc, m_i, l_i, sink2, HAS_SINK: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(out, lse) of one query tile: the sink joins the normaliser; rows with nothing give 0 and -inf.
    SOFTPLUS: ``l`` is the sum of base-2 softplus weights; the "lse" returned is the log of the natural
    normaliser, ``log(sum_j softplus(y_ij)) = log(l ln 2)``."""
    if SOFTPLUS:
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, tl.math.log2(tl.where(has, l_i * LN2, 1.0)) / LOG2E, float("-inf"))
        return out, lse
    if HAS_SINK:
        m_fin = tl.maximum(m_i, sink2)
        # m_fin = -inf: no key and s_h = -inf, nothing in the row (l stays 0: out 0, lse -inf); without the
        # guard exp2(-inf - -inf) is NaN. s_h = +inf: all the weight on the sink (l = 1, acc 0: out 0, lse +inf)
        m_fin = tl.where(m_fin == float("-inf"), 0.0, m_fin)
        alpha = tl.math.exp2(m_i - m_fin)  # m_i = -inf (no key): 0
        l_i = l_i * alpha + tl.where(sink2 == m_fin, 1.0, tl.math.exp2(sink2 - m_fin))
        acc = acc * alpha[:, None]
        m_i = m_fin
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) / LOG2E, float("-inf"))
    return out, lse


@triton.jit(do_not_specialize=LENGTH_ARGS)
def score_transform_fwd_kernel(
    Q, K, V, O, LSE, BIAS, SINKS, SLOPES, UF, VF, TAU,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ub, stride_uh, stride_un,
    stride_vfb, stride_vfh, stride_vfn,
    stride_tb, stride_th, stride_tn,
    H, GROUP, N_Q, N_K, OFFSET, HEAD_D, R, scale, cap, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SINK: tl.constexpr,
    ALIBI: tl.constexpr, LOWRANK: tl.constexpr, TEMP: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr, WS: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK_M // SPLIT
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_src = _tile_source(Q, b * stride_qb + h * stride_qh, stride_qn, N_Q, HEAD_D, HALF, BLOCK_D, TMA)
    k_src = _tile_source(K, b * stride_kb + hk * stride_kh, stride_kn, N_K, HEAD_D, BLOCK_N, BLOCK_D, TMA)
    v_src = _tile_source(V, b * stride_vb + hk * stride_vh, stride_vn, N_K, HEAD_D, BLOCK_N, BLOCK_D, TMA)
    o_dst = _tile_source(O, b * stride_ob + h * stride_oh, stride_on, N_Q, HEAD_D, HALF, BLOCK_D, TMA)
    bias_base = BIAS + b * stride_bb + h * stride_bh
    u_base = UF + b * stride_ub + h * stride_uh
    vf_base = VF + b * stride_vfb + h * stride_vfh
    start_m = pid_m * BLOCK_M
    offs_m0 = start_m + tl.arange(0, HALF)
    offs_m1 = offs_m0 + HALF
    q0 = _load_rows(q_src, stride_qn, start_m, N_Q, HEAD_D, HALF, BLOCK_D, EVEN_M, EVEN_D, TMA)
    q1 = q0
    if SPLIT == 2:
        q1 = _load_rows(q_src, stride_qn, start_m + HALF, N_Q, HEAD_D, HALF, BLOCK_D, EVEN_M, EVEN_D, TMA)
    u0 = q0
    u1 = q0
    if LOWRANK:
        u0 = load_factor(u_base, stride_un, start_m, N_Q, R, HALF, BLOCK_R)
        u1 = u0
        if SPLIT == 2:
            u1 = load_factor(u_base, stride_un, start_m + HALF, N_Q, R, HALF, BLOCK_R)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + h).to(tl.float32) * LOG2E
    tau0 = tl.full([HALF], 1.0, dtype=tl.float32)
    tau1 = tau0
    if TEMP:
        tau_base = TAU + b * stride_tb + h * stride_th
        tau0 = tl.load(tau_base + offs_m0 * stride_tn, mask=offs_m0 < N_Q, other=1.0).to(tl.float32)
        tau1 = tl.load(tau_base + offs_m1 * stride_tn, mask=offs_m1 < N_Q, other=1.0).to(tl.float32)
    acc0 = tl.zeros([HALF, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([HALF, BLOCK_D], dtype=tl.float32)
    m0 = tl.full([HALF], float("-inf"), dtype=tl.float32)
    m1 = tl.full([HALF], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([HALF], dtype=tl.float32)
    l1 = tl.zeros([HALF], dtype=tl.float32)
    scale2 = scale * LOG2E
    cap2 = cap * LOG2E
    inv_cap = scale / cap
    full_end, hi = causal_key_range(start_m, OFFSET, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    acc0, m0, l0, acc1, m1, l1 = _fwd_inner(
        acc0, m0, l0, acc1, m1, l1, q0, q1, u0, u1, tau0, tau1, k_src, v_src, vf_base, stride_kn, stride_vn,
        stride_vfn, bias_base, stride_bm, stride_bn, slope2, offs_m0, offs_m1, 0, full_end, N_Q, N_K, OFFSET, HEAD_D, R,
        scale2, cap2, inv_cap, BLOCK_N, BLOCK_D, BLOCK_R, False, EVEN_N, EVEN_D, SOFTCAP, HAS_BIAS, ALIBI,
        LOWRANK, TEMP, FAST, DOT_PREC, UPCAST, TMA, SPLIT, WS, SOFTPLUS,
    )  # fmt: skip
    if CAUSAL:
        acc0, m0, l0, acc1, m1, l1 = _fwd_inner(
            acc0, m0, l0, acc1, m1, l1, q0, q1, u0, u1, tau0, tau1, k_src, v_src, vf_base, stride_kn,
            stride_vn, stride_vfn, bias_base, stride_bm, stride_bn, slope2, offs_m0, offs_m1, full_end, hi, N_Q, N_K,
            OFFSET, HEAD_D, R, scale2, cap2, inv_cap, BLOCK_N, BLOCK_D, BLOCK_R, True, EVEN_N, EVEN_D, SOFTCAP,
            HAS_BIAS, ALIBI, LOWRANK, TEMP, FAST, DOT_PREC, UPCAST, TMA, SPLIT, False, SOFTPLUS,
        )  # fmt: skip
    sink2 = 0.0
    if HAS_SINK:
        sink2 = tl.load(SINKS + h).to(tl.float32) * LOG2E
    lse_base = LSE + pid_bh.to(tl.int64) * N_Q
    out0, lse0 = _finish(acc0, m0, l0, sink2, HAS_SINK, SOFTPLUS)
    _store_rows(o_dst, stride_on, start_m, out0.to(q0.dtype), N_Q, HEAD_D, HALF, BLOCK_D, EVEN_M, EVEN_D, TMA)
    tl.store(lse_base + offs_m0, lse0, mask=offs_m0 < N_Q)
    if SPLIT == 2:
        out1, lse1 = _finish(acc1, m1, l1, sink2, HAS_SINK, SOFTPLUS)
        _store_rows(o_dst, stride_on, start_m + HALF, out1.to(q0.dtype), N_Q, HEAD_D, HALF, BLOCK_D, EVEN_M,
                    EVEN_D, TMA)  # fmt: skip
        tl.store(lse_base + offs_m1, lse1, mask=offs_m1 < N_Q)
