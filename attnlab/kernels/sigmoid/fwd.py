"""FlashSigmoid forward (Triton): one pass over key blocks, no running max, no normaliser.

Grid: (cdiv(N_q, BLOCK_M), B * H). N_BUCKET (unused in the body) keys the autotuner by length. Program (m, b*h)
computes rows [m*BLOCK_M, (m+1)*BLOCK_M) of head h:
    acc = sum over key blocks of sigmoid(scale * q k^T + b) v        (fp32 accumulator)
Keys past N_k read as zeros, so their (non-zero) weight meets a zero value row and adds nothing; only the
causal diagonal blocks apply a mask. GQA: head h reads kv head h // GROUP.

Schedule knobs (constexpr, chosen by the autotuner in op.py; measured by benchmarks/sigmoid_probe.py):
- TMA: tiles move by Hopper tensor descriptors built in the kernel over each head's (N, D) matrix (the copy
  engine zero-fills rows past N and columns past D and drops out-of-range rows on store); otherwise by
  masked pointer loads. The launcher provides the descriptors' global scratch (op.py).
- SPLIT=2: the query tile is two row halves. Both halves' score products are issued before either
  sigmoid, so one half's sigmoid (special-function unit) runs while the other half's product is on the
  tensor cores (FlashAttention-3's intra-warpgroup overlap, here left to Triton's scheduler).
- WS: Triton's warp specialization of the unmasked key loop (a producer partition issues the copies,
  consumer partitions do the math; needs TMA).
"""

import triton
import triton.language as tl

from attnlab.kernels.sigmoid.common import causal_key_range, dot, dot_acc, load_rows, sigmoid_of, store_rows

#: Sequence-length arguments Triton must not specialise on (by ``== 1`` or divisibility by 16): a new
#: length then reuses the compiled kernel instead of compiling another (measured on the H100: no change in
#: kernel time at 16K/32K; benchmarks/results/h100-2026-11-22/session4/).
LENGTH_ARGS = ["N_Q", "N_K", "OFFSET"]


@triton.jit
def _tile_source(
    X, base, stride_n, n_rows, HEAD_D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr
):
    """What tiles of one head's (n_rows, HEAD_D) matrix at ``X + base`` are read from: a tensor descriptor
    with (ROWS, BLOCK_D) boxes when TMA, else the head's base pointer."""
    if TMA:
        return tl.make_tensor_descriptor(
            X + base, shape=[n_rows, HEAD_D], strides=[stride_n, 1], block_shape=[ROWS, BLOCK_D]
        )
    else:
        return X + base


@triton.jit
def _load_rows(
    src, stride_n, start, n_rows, HEAD_D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_ROWS: tl.constexpr,
    EVEN_D: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """The (ROWS, BLOCK_D) tile of rows [start, start + ROWS) from :func:`_tile_source`; rows >= n_rows and
    columns >= HEAD_D read as 0 (by the copy engine when TMA, by load masks otherwise)."""
    if TMA:
        return src.load([start, 0])
    else:
        return load_rows(src, stride_n, start, n_rows, HEAD_D, ROWS, BLOCK_D, EVEN_ROWS, EVEN_D)


@triton.jit
def _store_rows(
    dst, stride_n, start, value, n_rows, HEAD_D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    if TMA:
        dst.store([start, 0], value)
    else:
        store_rows(dst, stride_n, start, value, n_rows, HEAD_D, ROWS, BLOCK_D, EVEN_ROWS, EVEN_D)


@triton.jit
def _weigh(
    acc, s, v, offs_m, start_n, OFFSET, half_scale, half_bias, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """acc + sigmoid(s * scale + bias) v for raw scores s = q k^T; MASKED zeroes keys j > i + OFFSET."""
    p = sigmoid_of(s * half_scale + half_bias, FAST)
    if MASKED:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        p = tl.where(offs_n[None, :] <= offs_m[:, None] + OFFSET, p, 0.0)
    return dot_acc(p.to(v.dtype), v, acc, DOT_PREC, UPCAST)


@triton.jit
def _fwd_inner(
    acc0, acc1, q0, q1, k_src, v_src, stride_kn, stride_vn, offs_m0, offs_m1, lo, hi, OFFSET, N_K, HEAD_D,
    half_scale, half_bias, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, FAST: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """Add key blocks [lo, hi) to the accumulators of the query halves (acc1/q1 unused when SPLIT == 1);
    MASKED applies the bottom-right causal mask j <= i + OFFSET (only the diagonal blocks need it)."""
    if SPLIT == 1:  # acc1 stays out of this loop (not carried)
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
            k = _load_rows(k_src, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
            v = _load_rows(v_src, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
            s0 = dot(q0, tl.trans(k), DOT_PREC, UPCAST)
            acc0 = _weigh(acc0, s0, v, offs_m0, start_n, OFFSET, half_scale, half_bias, BLOCK_N, MASKED, FAST,
                          DOT_PREC, UPCAST)  # fmt: skip
    else:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
            k = _load_rows(k_src, stride_kn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
            v = _load_rows(v_src, stride_vn, start_n, N_K, HEAD_D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D, TMA)
            s0 = dot(q0, tl.trans(k), DOT_PREC, UPCAST)
            s1 = dot(q1, tl.trans(k), DOT_PREC, UPCAST)  # issued before the first sigmoid
            acc0 = _weigh(acc0, s0, v, offs_m0, start_n, OFFSET, half_scale, half_bias, BLOCK_N, MASKED, FAST,
                          DOT_PREC, UPCAST)  # fmt: skip
            acc1 = _weigh(acc1, s1, v, offs_m1, start_n, OFFSET, half_scale, half_bias, BLOCK_N, MASKED, FAST,
                          DOT_PREC, UPCAST)  # fmt: skip
    return acc0, acc1


@triton.jit(do_not_specialize=LENGTH_ARGS)
def sigmoid_fwd_kernel(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, GROUP, N_Q, N_K, OFFSET, HEAD_D, scale, bias, N_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    FAST: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    SPLIT: tl.constexpr, WS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
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
    start_m = pid_m * BLOCK_M
    offs_m0 = start_m + tl.arange(0, HALF)
    offs_m1 = offs_m0 + HALF
    q0 = _load_rows(q_src, stride_qn, start_m, N_Q, HEAD_D, HALF, BLOCK_D, EVEN_M, EVEN_D, TMA)
    q1 = q0
    if SPLIT == 2:
        q1 = _load_rows(q_src, stride_qn, start_m + HALF, N_Q, HEAD_D, HALF, BLOCK_D, EVEN_M, EVEN_D, TMA)
    acc0 = tl.zeros([HALF, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([HALF, BLOCK_D], dtype=tl.float32)
    half_scale = 0.5 * scale
    half_bias = 0.5 * bias
    full_end, hi = causal_key_range(start_m, OFFSET, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    acc0, acc1 = _fwd_inner(
        acc0, acc1, q0, q1, k_src, v_src, stride_kn, stride_vn, offs_m0, offs_m1, 0, full_end, OFFSET, N_K,
        HEAD_D, half_scale, half_bias, BLOCK_N, BLOCK_D, False, EVEN_N, EVEN_D, FAST, DOT_PREC, UPCAST, TMA,
        SPLIT, WS,
    )  # fmt: skip
    if CAUSAL:
        acc0, acc1 = _fwd_inner(
            acc0, acc1, q0, q1, k_src, v_src, stride_kn, stride_vn, offs_m0, offs_m1, full_end, hi, OFFSET,
            N_K, HEAD_D, half_scale, half_bias, BLOCK_N, BLOCK_D, True, EVEN_N, EVEN_D, FAST, DOT_PREC,
            UPCAST, TMA, SPLIT, False,
        )  # fmt: skip
    _store_rows(o_dst, stride_on, start_m, acc0.to(q0.dtype), N_Q, HEAD_D, HALF, BLOCK_D, EVEN_M, EVEN_D, TMA)
    if SPLIT == 2:
        _store_rows(o_dst, stride_on, start_m + HALF, acc1.to(q0.dtype), N_Q, HEAD_D, HALF, BLOCK_D, EVEN_M,
                    EVEN_D, TMA)  # fmt: skip
