# mypy: ignore-errors
"""Tile helpers of the linear kernels and the recurrent step kernel (decode) of the gated linear recurrence
and of the gated delta rule. The chunked kernels are in ``chunk_*.py``. Layout: q, k (B*H, N, K), v and o
(B*H, N, V), contiguous; the state (K, V) float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(ptr, row0, n_rows, col0, n_cols, stride, BR: tl.constexpr, BC: tl.constexpr):
    """A (BR, BC) float32 tile from rows row0.. and columns col0.. of a row-major matrix; 0 outside."""
    r = row0 + tl.arange(0, BR)
    c = col0 + tl.arange(0, BC)
    m = (r[:, None] < n_rows) & (c[None, :] < n_cols)
    return tl.load(ptr + r[:, None] * stride + c[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _row(ptr, row, col0, n_cols, stride, BC: tl.constexpr):
    """One row (BC,) float32 of a row-major matrix; 0 outside."""
    c = col0 + tl.arange(0, BC)
    return tl.load(ptr + row * stride + c, mask=c < n_cols, other=0.0).to(tl.float32)


@triton.jit
def recurrent_step_kernel(
    Q, K, V, G, BETA, H0, O, HT, BAD,
    N, DK, DV, scale,
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, DELTA: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, G_SCALAR: tl.constexpr = False, L2NORM: tl.constexpr = False,
    CHECK: tl.constexpr = False,
):  # fmt: skip
    """Decode: a few tokens, one at a time, per (value block, batch * head). G (B*H, N, K) log-decays, or
    (B*H, N) one per token with ``G_SCALAR``; BETA (B*H, N) (DELTA only). Gated linear:
    S = exp(g) S + k v^T; delta: S' = exp(g) S, u = beta (v - S'^T k), S = S' + k u^T; then
    o = scale S^T q. fp32 state. ``L2NORM``: q and k are first normalised, x / sqrt(sum x^2 + 1e-6), in
    fp32 (the delta rule's ``qk_l2norm``). ``CHECK``: the gates' and beta's range check folded in (no
    separate reduction): each program writes to BAD[bh * programs(0) + pid_v] how many of the values it
    read are out of range (g NaN, > 0 or -inf in its own dtype, as ``check_log_decay`` checks it: a float64
    gate below float32's range is in range, its decay exp(g) 0; beta NaN or infinite); the host reads BAD
    after the launch."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mk = rk < DK
    mv = pid_v * BV + rv < DV
    state_off = rk[:, None] * DV + pid_v * BV + rv[None, :]
    state_mask = mk[:, None] & mv[None, :]
    if HAS_H0:
        s = tl.load(H0 + bh * DK * DV + state_off, mask=state_mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BK, BV), dtype=tl.float32)
    n_bad = tl.zeros((), dtype=tl.int32)
    for t in range(N):
        row = bh * N + t
        q = tl.load(Q + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(K + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(V + row * DV + pid_v * BV + rv, mask=mv, other=0.0).to(tl.float32)
        if L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6)
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
        if HAS_G:
            if G_SCALAR:
                g1 = tl.load(G + row)
                if CHECK:  # (NaN fails g1 <= 0; in g's dtype: a float64 -1e300 is finite, -inf in float32)
                    n_bad += ((~(g1 <= 0.0)) | (g1 == float("-inf"))).to(tl.int32)
                s = s * tl.exp(g1.to(tl.float32))
            else:
                g = tl.load(G + row * DK + rk, mask=mk, other=0.0)
                if CHECK:  # (in g's dtype, as above)
                    n_bad += tl.sum(((~(g <= 0.0)) | (g == float("-inf"))).to(tl.int32), axis=0)
                s = s * tl.exp(g.to(tl.float32))[:, None]
        if DELTA:
            beta = tl.load(BETA + row).to(tl.float32)
            if CHECK:  # (NaN fails the comparison)
                n_bad += (~(tl.abs(beta) < float("inf"))).to(tl.int32)
            v = beta * (v - tl.sum(s * k[:, None], axis=0))
        s = s + k[:, None] * v[None, :]
        o = tl.sum(s * q[:, None], axis=0) * scale
        tl.store(O + row * DV + pid_v * BV + rv, o.to(O.dtype.element_ty), mask=mv)
    tl.store(HT + bh * DK * DV + state_off, s, mask=state_mask)
    if CHECK:
        tl.store(BAD + bh * tl.num_programs(0) + pid_v, n_bad)


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), still float32: what the GPU's cast does.
    Triton's CPU interpreter truncates float32 -> bfloat16 instead; this keeps its results the GPU's."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _l2norm_rows(
    X, Y, R, r0, N, D, EPS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, RTNE_BF16: tl.constexpr
):  # fmt: skip
    """Rows r0.. (BR of them) of X (rows, D): y = x * rstd, rstd = 1 / sqrt(sum x^2 + EPS) in float32;
    y in Y's dtype, rstd (float32) to R. ``RTNE_BF16``: round to bfloat16 explicitly (the interpreter)."""
    r = r0 + tl.arange(0, BR)
    c = tl.arange(0, BD)
    m = (r[:, None] < N) & (c[None, :] < D)
    x = tl.load(X + r[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32)
    rs = tl.rsqrt(tl.sum(x * x, axis=1) + EPS)
    y = x * rs[:, None]
    if RTNE_BF16:
        y = _round_bf16(y)
    tl.store(Y + r[:, None] * D + c[None, :], y.to(Y.dtype.element_ty), mask=m)
    tl.store(R + r, rs, mask=r < N)


@triton.jit
def l2norm_fwd_kernel(
    X0, Y0, R0, X1, Y1, R1, N, D,
    EPS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, RTNE_BF16: tl.constexpr = False,
):  # fmt: skip
    """The delta rule's q/k L2 normalisation, both tensors in one launch (grid (row blocks, 2): axis 1
    picks q or k). X (rows, D) contiguous; Y the normalised rows (X's dtype), R (rows,) float32 the
    reciprocal norms the backward takes."""
    r0 = tl.program_id(0).to(tl.int64) * BR  # int64: row offsets past 2**31 elements
    if tl.program_id(1) == 0:
        _l2norm_rows(X0, Y0, R0, r0, N, D, EPS, BR, BD, RTNE_BF16)
    else:
        _l2norm_rows(X1, Y1, R1, r0, N, D, EPS, BR, BD, RTNE_BF16)


@triton.jit
def _l2norm_bwd_rows(
    Y, R, DY, DX, bh, r0, N, NP, D, BR: tl.constexpr, BD: tl.constexpr
):  # fmt: skip
    r = r0 + tl.arange(0, BR)
    c = tl.arange(0, BD)
    m = (r[:, None] < N) & (c[None, :] < D)
    y = tl.load(Y + (bh * N + r[:, None]) * D + c[None, :], mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + (bh * NP + r[:, None]) * D + c[None, :], mask=m, other=0.0).to(tl.float32)
    rs = tl.load(R + bh * N + r, mask=r < N, other=0.0)
    dx = (dy - y * tl.sum(y * dy, axis=1)[:, None]) * rs[:, None]
    tl.store(DX + (bh * N + r[:, None]) * D + c[None, :], dx.to(DX.dtype.element_ty), mask=m)


@triton.jit
def l2norm_bwd_kernel(
    Y0, R0, DY0, DX0, Y1, R1, DY1, DX1, N, NP, D,
    BR: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """The Jacobian of y = x * rstd applied to dy, for q and k in one launch (grid (row blocks, B*H, 2)):
    dx = rstd (dy - y sum(y dy)). Y (B*H, N, D) the normalised rows, R (B*H, N) float32, DY (B*H, NP, D)
    (NP >= N rows per head: the chunk backward's padded float32 buffers), DX (B*H, N, D) in its dtype."""
    r0 = tl.program_id(0).to(tl.int64) * BR  # int64: row offsets past 2**31 elements
    bh = tl.program_id(1).to(tl.int64)
    if tl.program_id(2) == 0:
        _l2norm_bwd_rows(Y0, R0, DY0, DX0, bh, r0, N, NP, D, BR, BD)
    else:
        _l2norm_bwd_rows(Y1, R1, DY1, DX1, bh, r0, N, NP, D, BR, BD)
