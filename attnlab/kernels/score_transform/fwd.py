"""Score-transform softmax forward (Triton): FlashAttention-2's online softmax with the transform inlined.

Grid: (cdiv(N_q, BLOCK_M), B * H). Program (m, b*h) computes rows [m*BLOCK_M, (m+1)*BLOCK_M) of head h
(kv head h // GROUP), visiting key blocks [0, full_end) without the causal mask and [full_end, hi) with it
(bottom-right: query i sits at i + OFFSET). Per key block, with s = scale * q k^T:
    x = cap * tanh(s / cap)   (SOFTCAP)      x += bias[b, h, i, j]   (HAS_BIAS)      -inf outside the mask
    m_new = max(m, rowmax(x));  l = l * e^(m - m_new) + rowsum(e^(x - m_new));  acc likewise, + e^(x - m_new) v
After the loop a sink logit s_h joins the normaliser (HAS_SINK): l += e^(s_h - m) with m = max(m, s_h).
out = acc / l (0 where l == 0), lse = m + log(l) (-inf where l == 0). Keys past N_k are masked (-inf),
not read as zero scores. tanh is written with exp (the interpreter has no tanh): 1 - 2 / (e^(2y) + 1).
"""

import triton
import triton.language as tl

from attnlab.kernels.sigmoid.common import causal_key_range, dot, dot_acc, load_rows, store_rows

LENGTH_ARGS = ["N_Q", "N_K", "OFFSET"]


@triton.jit
def _block(
    acc, m_i, l_i, q, k_base, v_base, bias_base, stride_kn, stride_vn, stride_bm, stride_bn, offs_m, start_n,
    N_Q, N_K, OFFSET, HEAD_D, scale, cap, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    k = load_rows(k_base, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
    v = load_rows(v_base, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
    x = dot(q, tl.trans(k), DOT_PREC, UPCAST) * scale
    if SOFTCAP:
        x = cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        ptrs = bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn
        inside = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
        x += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    valid = offs_n[None, :] < N_K
    if MASKED:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + OFFSET)
    x = tl.where(valid, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: no NaN from -inf - -inf
    p = tl.exp(x - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], DOT_PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=LENGTH_ARGS)
def score_transform_fwd_kernel(
    Q, K, V, O, LSE, BIAS, SINKS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, GROUP, N_Q, N_K, OFFSET, HEAD_D, scale, cap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SINK: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = load_rows(q_base, stride_qn, start_m, N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end, hi = causal_key_range(start_m, OFFSET, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _block(
            acc, m_i, l_i, q, k_base, v_base, bias_base, stride_kn, stride_vn, stride_bm, stride_bn, offs_m,
            start_n, N_Q, N_K, OFFSET, HEAD_D, scale, cap, BLOCK_N, BLOCK_D, False, SOFTCAP, HAS_BIAS, EVEN_N,
            EVEN_D, DOT_PREC, UPCAST,
        )  # fmt: skip
    if CAUSAL:
        for start_n in range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = _block(
                acc, m_i, l_i, q, k_base, v_base, bias_base, stride_kn, stride_vn, stride_bm, stride_bn,
                offs_m, start_n, N_Q, N_K, OFFSET, HEAD_D, scale, cap, BLOCK_N, BLOCK_D, True, SOFTCAP,
                HAS_BIAS, EVEN_N, EVEN_D, DOT_PREC, UPCAST,
            )  # fmt: skip
    if HAS_SINK:
        sink = tl.load(SINKS + h).to(tl.float32)
        m_fin = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_fin)  # m_i = -inf (no key): 0
        l_i = l_i * alpha + tl.exp(sink - m_fin)
        acc = acc * alpha[:, None]
        m_i = m_fin
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    store_rows(o_base, stride_on, start_m, out.to(q.dtype), N_Q, HEAD_D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)
