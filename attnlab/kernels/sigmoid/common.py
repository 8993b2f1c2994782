"""Triton helpers shared by the sigmoid forward and backward kernels."""

import triton
import triton.language as tl


@triton.jit
def sigmoid_of(x_half, FAST: tl.constexpr):
    """sigmoid(x) given x/2: 0.5 + 0.5 * tanh(x/2). FAST uses PTX tanh.approx.f32 (one MUFU op)."""
    if FAST:
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x_half], dtype=tl.float32, is_pure=True, pack=1
        )
        return 0.5 + 0.5 * t
    else:
        return 1.0 / (1.0 + tl.exp(-2.0 * x_half))


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Load a 2-D tile; rows >= n_rows and cols >= n_cols read as 0 (masks only where needed)."""
    if EVEN_ROWS:
        if EVEN_COLS:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        if EVEN_COLS:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def store_tile(ptrs, value, rows, n_rows, cols, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    if EVEN_ROWS:
        if EVEN_COLS:
            tl.store(ptrs, value)
        else:
            tl.store(ptrs, value, mask=cols[None, :] < n_cols)
    else:
        if EVEN_COLS:
            tl.store(ptrs, value, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def load_rows(
    base, stride_n, start, n_rows, HEAD_D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_ROWS: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    """The (ROWS, BLOCK_D) tile of rows [start, start + ROWS) of one head's (n_rows, HEAD_D) matrix at
    ``base`` (row stride ``stride_n``, unit column stride); rows >= n_rows and columns >= HEAD_D read as 0."""
    offs_r = start + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    return load_tile(base + offs_r[:, None] * stride_n + offs_d[None, :], offs_r, n_rows, offs_d, HEAD_D,
                     EVEN_ROWS, EVEN_D)  # fmt: skip


@triton.jit
def store_rows(
    base, stride_n, start, value, n_rows, HEAD_D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Store ``value`` as rows [start, start + ROWS) of :func:`load_rows`'s matrix (rows/columns past the
    matrix are not written)."""
    offs_r = start + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    store_tile(base + offs_r[:, None] * stride_n + offs_d[None, :], value, offs_r, n_rows, offs_d, HEAD_D,
               EVEN_ROWS, EVEN_D)  # fmt: skip


@triton.jit
def causal_key_range(
    start_m, OFFSET, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """Key ranges for a query block: [0, full_end) needs no mask, [full_end, hi) needs the causal mask.

    Query i sits at position i + OFFSET and may see keys j <= i + OFFSET (bottom-right alignment).
    """
    if CAUSAL:
        first_pos = start_m + OFFSET
        last_pos = tl.minimum(start_m + BLOCK_M, N_Q) - 1 + OFFSET
        hi = tl.minimum(last_pos + 1, N_K)
        hi = tl.maximum(hi, 0)
        full_end = tl.maximum(((first_pos + 1) // BLOCK_N) * BLOCK_N, 0)
        full_end = tl.minimum(full_end, hi)
    else:
        hi = N_K
        full_end = N_K
    return full_end, hi


@triton.jit
def dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with an fp32 accumulator. UPCAST computes in fp32 (Triton's CPU interpreter multiplies
    bf16 tiles as raw integers, so interpreted bf16 runs upcast the already-rounded operands)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def dot_acc(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a b, accumulated by the matrix unit in place (see :func:`dot`)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)
