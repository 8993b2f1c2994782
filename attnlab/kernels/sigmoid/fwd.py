"""FlashSigmoid forward (Triton): one pass over key blocks, no running max, no normaliser.

Grid: (cdiv(N_q, BLOCK_M), B * H). N_BUCKET (unused in the body) keys the autotuner by length. Program (m, b*h)
computes rows [m*BLOCK_M, (m+1)*BLOCK_M) of head h:
    acc = sum over key blocks of sigmoid(scale * q k^T + b) v        (fp32 accumulator)
Keys past N_k read as zeros, so their (non-zero) weight meets a zero value row and adds nothing; only the
causal diagonal blocks apply a mask. GQA: head h reads kv head h // GROUP.

Tiles move one of two ways (constexpr ``TMA``): Q, K, V and O are pointers read with masked loads, or
Hopper tensor descriptors over the 4-D (B, H, N, D) tensors (the copy engine zero-fills past N and D and
drops out-of-range rows on store). On the H100 the descriptors are 2-5% faster (benchmarks/results).
"""

import triton
import triton.language as tl

from attnlab.kernels.sigmoid.common import causal_key_range, dot, load_tile, sigmoid_of, store_tile


@triton.jit
def _load_kv(
    X, x_base, stride_xn, b, hk, start_n, N_K, HEAD_D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """The (BLOCK_N, BLOCK_D) key or value tile of rows [start_n, start_n + BLOCK_N) of kv head hk, batch b;
    rows >= N_K and columns >= HEAD_D read as 0 (by the copy engine when TMA, by load masks otherwise)."""
    if TMA:
        return X.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        return load_tile(
            x_base + offs_n[:, None] * stride_xn + offs_d[None, :],
            offs_n,
            N_K,
            offs_d,
            HEAD_D,
            EVEN_N,
            EVEN_D,
        )


@triton.jit
def _fwd_inner(
    acc, q, K, V, k_base, v_base, stride_kn, stride_vn, b, hk, offs_m, lo, hi, OFFSET, N_K, HEAD_D,
    half_scale, half_bias, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """acc (BLOCK_M, BLOCK_D) += sigmoid(scale * q k^T + bias) v over key blocks [lo, hi); MASKED applies the
    bottom-right causal mask j <= i + OFFSET (only the diagonal blocks need it)."""
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_kv(K, k_base, stride_kn, b, hk, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
        v = _load_kv(V, v_base, stride_vn, b, hk, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
        s = dot(q, tl.trans(k), DOT_PREC, UPCAST)
        p = sigmoid_of(s * half_scale + half_bias, FAST)
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + OFFSET, p, 0.0)
        acc += dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
    return acc


@triton.jit
def sigmoid_fwd_kernel(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, GROUP, N_Q, N_K, OFFSET, HEAD_D, scale, bias, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if TMA:
        q = Q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
        q = load_tile(q_ptrs, offs_m, N_Q, offs_d, HEAD_D, EVEN_M, EVEN_D)
    if TMA:  # the descriptors carry the head offsets
        k_base = K
        v_base = V
    else:
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
    half_scale = 0.5 * scale
    half_bias = 0.5 * bias
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = causal_key_range(start_m, OFFSET, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    acc = _fwd_inner(
        acc, q, K, V, k_base, v_base, stride_kn, stride_vn, b, hk, offs_m, 0, full_end, OFFSET, N_K, HEAD_D,
        half_scale, half_bias, BLOCK_N, BLOCK_D, False, EVEN_N, EVEN_D, FAST, DOT_PREC, UPCAST, TMA,
    )  # fmt: skip
    if CAUSAL:
        acc = _fwd_inner(
            acc, q, K, V, k_base, v_base, stride_kn, stride_vn, b, hk, offs_m, full_end, hi, OFFSET, N_K,
            HEAD_D, half_scale, half_bias, BLOCK_N, BLOCK_D, True, EVEN_N, EVEN_D, FAST, DOT_PREC, UPCAST,
            TMA,
        )  # fmt: skip
    out = acc.to(q.dtype)
    if TMA:
        O.store([b, h, start_m, 0], out.reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
        store_tile(o_ptrs, out, offs_m, N_Q, offs_d, HEAD_D, EVEN_M, EVEN_D)
