"""Triton helpers shared by the score-transform forward and backward kernels: the transformed logit of a
tile, in base-2 units (the kernels use ``exp2``; ``LOG2E`` is folded into the scale, cap and bias).

A tile's query and key positions come as broadcastable 2-D index arrays ``qi`` and ``kj`` (``offs_m[:,
None]`` and ``offs_n[None, :]`` for a (queries, keys) tile, the transposes for a (keys, queries) tile), so
one helper serves both orientations.
"""

import triton
import triton.language as tl

#: log2(e): natural-log logits times this are base-2 logits
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def tanh_of(x, FAST: tl.constexpr):
    """tanh(x). FAST (its bit 0: see :func:`softplus2` for bit 1) uses PTX ``tanh.approx.f32`` (one
    special-function op; max relative error about 2^-11), else ``1 - 2 / (e^(2x) + 1)`` (the interpreter
    has no tanh)."""
    if FAST % 2 == 1:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def distance(qi, kj, OFFSET):
    """``i + OFFSET - j`` in fp32 (exact below 2^24), converted on the row and column vectors before they
    broadcast: one subtraction per score instead of an integer subtraction and a conversion, whose unit
    runs at a quarter of the fp32 rate on Hopper. The ALiBi forward measured 0.54-0.70x of cuDNN with the
    per-score conversion and 0.55-0.66x with this form (774d414, ``h100-2026-11-24-s12/variants``): no
    change beyond the spread, so the conversion was not what limits it."""
    return (qi + OFFSET).to(tl.float32) - kj.to(tl.float32)


@triton.jit
def logits2(
    s, qi, kj, bias_base, stride_bm, stride_bn, slope2, lr, N_Q, N_K, OFFSET, scale2, cap2, inv_cap,
    SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, ALIBI: tl.constexpr, LOWRANK: tl.constexpr,
    FAST: tl.constexpr,
):  # fmt: skip
    """(x * log2(e), t) for raw scores ``s = q . k`` of a tile, with x the variant's logit:
        x = cap * tanh(scale * s / cap)  (SOFTCAP; t is the tanh)   or   scale * s  (t unused)
          + bias[b, h, i, j]  (HAS_BIAS, read through ``bias_base`` and the strides; 0 outside the matrix)
          - slope_h * |i + OFFSET - j|  (ALIBI; ``slope2`` = slope_h * log2(e))
          + lr  (LOWRANK: the tile of U V^T, already in base-2 units)
    ``scale2`` = scale * log2(e), ``cap2`` = cap * log2(e), ``inv_cap`` = scale / cap."""
    if SOFTCAP:
        t = tanh_of(s * inv_cap, FAST)
        x = cap2 * t
    else:
        t = s
        x = s * scale2
    if HAS_BIAS:
        inside = (qi < N_Q) & (kj < N_K)
        x += (
            tl.load(bias_base + qi * stride_bm + kj * stride_bn, mask=inside, other=0.0).to(tl.float32)
            * LOG2E
        )
    if ALIBI:
        x -= slope2 * tl.abs(distance(qi, kj, OFFSET))
    if LOWRANK:
        x += lr
    return x, t


@triton.jit
def lowrank_tile(a, b):
    """``a b^T`` of two fp32 low-rank factor tiles, (rows, BLOCK_R) and (cols, BLOCK_R), in base-2 units: the
    bias tile ``U V_f^T`` (or its transpose) as a full-precision fp32 product. ``input_precision="ieee"``:
    Triton's default for fp32 tiles on a GPU is tf32, which rounds each factor to 10 mantissa bits (about
    |u||vf| 2^-11 per logit: 0.15 at the values of ALiBi written as rank 2 at N = 600). FlashBias keeps its
    factors in fp32 too."""
    return tl.dot(a, tl.trans(b), input_precision="ieee") * LOG2E


@triton.jit
def load_factor(base, stride_n, start, n_rows, R, ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    """The (ROWS, BLOCK_R) tile of rows [start, start + ROWS) of one head's (n_rows, R) low-rank factor
    (unit column stride; fp32, as the launcher passes the factors); rows >= n_rows and columns >= R read as
    0."""
    offs_r = start + tl.arange(0, ROWS)
    offs_c = tl.arange(0, BLOCK_R)
    ptrs = base + offs_r[:, None] * stride_n + offs_c[None, :]
    return tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < R), other=0.0)


@triton.jit
def store_factor(base, stride_n, start, value, n_rows, R, ROWS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Store ``value`` as rows [start, start + ROWS) of :func:`load_factor`'s matrix."""
    offs_r = start + tl.arange(0, ROWS)
    offs_c = tl.arange(0, BLOCK_R)
    ptrs = base + offs_r[:, None] * stride_n + offs_c[None, :]
    tl.store(ptrs, value, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < R))


#: ln(2): base-2 softplus weights times this are natural ones
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def log2_of(x, FAST: tl.constexpr):
    """log2(x). FAST uses PTX ``lg2.approx.f32`` (one special-function op; absolute error about 2^-22 on
    [1, 2]); ``tl.math.log2`` lowers to libdevice's accurate ``__nv_log2f``, a branching software sequence
    (offline sm_90 PTX of the softplus forward: every log2 a ~20-instruction block, 280 selects in the loop).
    (FAST's bit 0; True counts as 1.)"""
    if FAST % 2 == 1:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.math.log2(x)


@triton.jit
def softplus2(x, FAST: tl.constexpr):
    """``(log2(1 + 2^x), sigmoid(x ln 2))`` of base-2 logits ``x`` (``softplus(y) / ln 2`` and its derivative
    for the natural logit ``y = x ln 2``). Written as ``max(x, 0) + log2(1 + 2^-|x|)``, which never
    overflows (softplus grows linearly); below ``x = -8`` as the series ``2^x (1 - 2^x / 2) / ln 2``
    (relative error under 1e-5), so that rows of very negative logits keep their relative weights instead
    of rounding ``1 + 2^x`` to 1 (``lg2`` is accurate in absolute, not relative, terms near 1). FAST: the
    logarithm by ``lg2.approx`` and the sigmoid as ``0.5 + 0.5 tanh(y / 2)`` by ``tanh.approx`` (no
    division); the compiler drops whichever output a caller does not use.

    FAST is two bits: bit 0 the approximations above; bit 1 (:data:`~attnlab.kernels.score_transform.op.
    SOFTPLUS_POLY_DEVICES`) ``log2(1 + e)``, ``e = 2^-|x|`` in [0, 1], as ``e P(e)`` with ``P`` a degree-6
    polynomial (:data:`SOFTPLUS_POLY`, a least-squares fit of ``log2(1 + e) / e`` on Chebyshev nodes of
    [0, 1]; relative error under 2e-6 in exact arithmetic): seven fused multiply-adds instead of a second
    special-function op per score (the exp2 stays), so the softplus forward does as many as a softmax."""
    e = tl.math.exp2(-tl.abs(x))
    if FAST % 2 == 1:
        sig = 0.5 + 0.5 * tanh_of(x * 0.34657359027997264, FAST)  # y / 2 = x ln(2) / 2
    else:
        r = 1.0 / (1.0 + e)
        sig = tl.where(x >= 0.0, r, e * r)
    if FAST // 2 == 1:
        p = 0.019929469324607846
        p = p * e - 0.09436073554716287
        p = p * e + 0.21363744838857676
        p = p * e - 0.33821431178656336
        p = p * e + 0.4774568040464606
        p = p * e - 0.7211405298928082
        p = p * e + 1.4426929299139422
        log1pe = e * p
    else:
        log1pe = log2_of(1.0 + e, FAST)
    sp = tl.where(x < -8.0, e * (1.0 - 0.5 * e) * 1.4426950408889634, tl.maximum(x, 0.0) + log1pe)
    return sp, sig


#: :func:`softplus2`'s polynomial (FAST bit 1), lowest degree first: ``log2(1 + e) ~ e * sum_i c_i e^i`` on
#: [0, 1] (kept here for the tests; the kernel spells the same constants out in Horner form)
SOFTPLUS_POLY = (
    1.4426929299139422,
    -0.7211405298928082,
    0.4774568040464606,
    -0.33821431178656336,
    0.21363744838857676,
    -0.09436073554716287,
    0.019929469324607846,
)
