"""FlashSigmoid forward (Triton): one pass over key blocks, no running max, no normaliser.

Grid: (cdiv(N_q, BLOCK_M), B * H). N_BUCKET (unused in the body) keys the autotuner by length. Program (m, b*h) computes rows [m*BLOCK_M, (m+1)*BLOCK_M) of head h:
    acc = sum over key blocks of sigmoid(scale * q k^T + b) v        (fp32 accumulator)
Keys past N_k read as zeros, so their (non-zero) weight meets a zero value row and adds nothing; only the
causal diagonal blocks apply a mask. GQA: head h reads kv head h // GROUP.
"""

import triton
import triton.language as tl

from attnlab.kernels.sigmoid.common import causal_key_range, dot, load_tile, sigmoid_of, store_tile


@triton.jit
def _fwd_inner(
    acc,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_m,
    offs_d,
    lo,
    hi,
    OFFSET,
    N_K,
    HEAD_D,
    half_scale,
    half_bias,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    FAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
            offs_n,
            N_K,
            offs_d,
            HEAD_D,
            EVEN_N,
            EVEN_D,
        )
        v = load_tile(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
            offs_n,
            N_K,
            offs_d,
            HEAD_D,
            EVEN_N,
            EVEN_D,
        )
        s = dot(q, tl.trans(k), DOT_PREC, UPCAST)
        p = sigmoid_of(s * half_scale + half_bias, FAST)
        if MASKED:
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + OFFSET, p, 0.0)
        acc += dot(p.to(v.dtype), v, DOT_PREC, UPCAST)
    return acc


@triton.jit
def sigmoid_fwd_kernel(
    Q,
    K,
    V,
    O,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    H,
    GROUP,
    N_Q,
    N_K,
    OFFSET,
    HEAD_D,
    scale,
    bias,
    N_BUCKET,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    FAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = load_tile(q_ptrs, offs_m, N_Q, offs_d, HEAD_D, EVEN_M, EVEN_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    half_scale = 0.5 * scale
    half_bias = 0.5 * bias
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = causal_key_range(start_m, OFFSET, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    acc = _fwd_inner(
        acc,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_m,
        offs_d,
        0,
        full_end,
        OFFSET,
        N_K,
        HEAD_D,
        half_scale,
        half_bias,
        BLOCK_N,
        False,
        EVEN_N,
        EVEN_D,
        FAST,
        DOT_PREC,
        UPCAST,
    )
    if CAUSAL:
        acc = _fwd_inner(
            acc,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_vn,
            offs_m,
            offs_d,
            full_end,
            hi,
            OFFSET,
            N_K,
            HEAD_D,
            half_scale,
            half_bias,
            BLOCK_N,
            True,
            EVEN_N,
            EVEN_D,
            FAST,
            DOT_PREC,
            UPCAST,
        )
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    store_tile(o_ptrs, acc.to(O.dtype.element_ty), offs_m, N_Q, offs_d, HEAD_D, EVEN_M, EVEN_D)
