"""Triton helpers shared by the block-sparse forward and backward kernels."""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with an fp32 accumulator. UPCAST computes in fp32 (Triton's CPU interpreter multiplies
    bf16 tiles as raw integers, so interpreted bf16 runs upcast the already-rounded operands)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def head_tile(H, N_Q, HEAD_D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's tile of a row-wise kernel with grid (cdiv(N_q, BLOCK_M), B * H): (b, h, offs_m, offs_d,
    mask), b and h int64, mask (BLOCK_M, BLOCK_D) of rows < N_q and columns < HEAD_D."""
    pid_bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_D)
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), offs_m, offs_d, mask


@triton.jit
def head_rows(base, b, h, stride_b, stride_h, stride_n, offs_m, offs_d):
    """Pointers to rows ``offs_m`` (columns ``offs_d``) of head (b, h) of a (B, H, N, D) tensor at ``base``
    (int64 row offsets)."""
    return base + b * stride_b + h * stride_h + offs_m[:, None].to(tl.int64) * stride_n + offs_d[None, :]


@triton.jit
def table_offset(b, h, row, s_num, s_idx, PLAN_B: tl.constexpr, PLAN_H, HEAD_DIV):
    """Offsets of (b, h, row) in a count table (Bp, Hp, R) and an index table (Bp, Hp, R, W) (contiguous;
    ``s_num`` = R, ``s_idx`` = W). A plan batch of 1 broadcasts; query head h reads plan head
    ``h // HEAD_DIV`` (HEAD_DIV = H / Hp: 1 for per-head plans, the GQA group for per-kv-head plans, H for
    one plan shared by all heads)."""
    pb = b if PLAN_B > 1 else 0
    ph = h // HEAD_DIV
    cell = (pb * PLAN_H + ph) * s_num + row
    return cell, cell * s_idx


@triton.jit
def load_kv(
    k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, N_K, HEAD_D, IN_RANGE: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    """K and V rows ``offs_n`` (BLOCK_N, BLOCK_D); rows outside [0, N_K) and columns >= HEAD_D read as 0
    (IN_RANGE: every row is known to be inside, no row mask)."""
    k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
    if IN_RANGE:
        if EVEN_D:
            return tl.load(k_ptrs), tl.load(v_ptrs)
        else:
            dmask = offs_d[None, :] < HEAD_D
            return tl.load(k_ptrs, mask=dmask, other=0.0), tl.load(v_ptrs, mask=dmask, other=0.0)
    else:
        m = (offs_n[:, None] >= 0) & (offs_n[:, None] < N_K) & (offs_d[None, :] < HEAD_D)
        return tl.load(k_ptrs, mask=m, other=0.0), tl.load(v_ptrs, mask=m, other=0.0)


@triton.jit
def attend(acc, m_i, l_i, q, k, v, qk_scale, keep, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
           UPCAST: tl.constexpr):  # fmt: skip
    """One online-softmax step (base 2): scores s = qk_scale * q k^T (-inf where ``keep`` is False when
    MASKED); returns the updated (acc, running max, running sum). A row with no key so far keeps
    max = -inf, sum = 0 and acc = 0 (no NaN: exponents are taken against 0 there)."""
    s = dot(q, tl.trans(k), DOT_PREC, UPCAST)
    return attend_scores(acc, m_i, l_i, s, v, qk_scale, keep, MASKED, DOT_PREC, UPCAST)


@triton.jit
def attend_scores(acc, m_i, l_i, s, v, qk_scale, keep, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
                  UPCAST: tl.constexpr):  # fmt: skip
    """:func:`attend` given the raw scores ``s = q k^T`` (so that a split query tile can issue both halves'
    products before either half's exponentials)."""
    s = s * qk_scale
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def rounded(x, dtype, UPCAST: tl.constexpr):
    """fp32 ``x`` converted to ``dtype`` rounding to nearest even. Under UPCAST (bf16 in Triton's CPU
    interpreter, whose conversion truncates) the rounding is done on the bits first."""
    if UPCAST:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def tile_source(base, stride_n, n_rows, HEAD_D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """What (ROWS, BLOCK_D) tiles of one head's (n_rows, HEAD_D) matrix at ``base`` are read from: a tensor
    descriptor when TMA, else the base pointer."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_D], strides=[stride_n, 1],
                                         block_shape=[ROWS, BLOCK_D])  # fmt: skip
    else:
        return base


@triton.jit
def kv_tile(
    k_src, v_src, stride_kn, stride_vn, start_n, offs_d, N_K, HEAD_D, BLOCK_N: tl.constexpr,
    IN_RANGE: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """K and V rows [start_n, start_n + BLOCK_N) from :func:`tile_source`; rows past N_K read as 0."""
    if TMA:
        return k_src.load([start_n, 0]), v_src.load([start_n, 0])
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        return load_kv(k_src, v_src, stride_kn, stride_vn, offs_n, offs_d, N_K, HEAD_D, IN_RANGE, EVEN_D)


@triton.jit
def column_keys(
    C_IDX, t_ci, c0, n_cols, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, N_K, HEAD_D, OFFSET,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """(idx, valid, k, v, keep) of the token columns [c0, c0 + BLOCK_N) of a row's column list at
    ``C_IDX + t_ci`` (``n_cols`` long, -1 padded): the key positions, which are real, their K and V rows
    (gathered; 0 where not real) and the (queries ``offs_m``, columns) mask, causal when CAUSAL."""
    offs_c = c0 + tl.arange(0, BLOCK_N)
    idx = tl.load(C_IDX + t_ci + offs_c, mask=offs_c < n_cols, other=-1)
    valid = idx >= 0
    k, v = load_kv(k_base, v_base, stride_kn, stride_vn, idx, offs_d, N_K, HEAD_D, False, EVEN_D)
    keep = valid[None, :]
    if CAUSAL:
        keep = keep & (idx[None, :] <= offs_m[:, None] + OFFSET)
    return idx, valid, k, v, keep
