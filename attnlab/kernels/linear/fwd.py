# mypy: ignore-errors
"""Tile helpers of the linear kernels and the recurrent step kernel (decode) of the gated linear recurrence
and of the gated delta rule. The chunked kernels are in ``chunk.py``. Layout: q, k (B*H, N, K), v and o
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
    Q, K, V, G, BETA, H0, O, HT,
    N, DK, DV, scale,
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, DELTA: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, G_SCALAR: tl.constexpr = False, L2NORM: tl.constexpr = False,
):  # fmt: skip
    """Decode: a few tokens, one at a time, per (value block, batch * head). G (B*H, N, K) log-decays, or
    (B*H, N) one per token with ``G_SCALAR``; BETA (B*H, N) (DELTA only). Gated linear:
    S = exp(g) S + k v^T; delta: S' = exp(g) S, u = beta (v - S'^T k), S = S' + k u^T; then
    o = scale S^T q. fp32 state. ``L2NORM``: q and k are first normalised, x / sqrt(sum x^2 + 1e-6), in
    fp32 (the delta rule's ``qk_l2norm``)."""
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
                s = s * tl.exp(tl.load(G + row).to(tl.float32))
            else:
                g = tl.load(G + row * DK + rk, mask=mk, other=0.0).to(tl.float32)
                s = s * tl.exp(g)[:, None]
        if DELTA:
            beta = tl.load(BETA + row).to(tl.float32)
            v = beta * (v - tl.sum(s * k[:, None], axis=0))
        s = s + k[:, None] * v[None, :]
        o = tl.sum(s * q[:, None], axis=0) * scale
        tl.store(O + row * DV + pid_v * BV + rv, o.to(O.dtype.element_ty), mask=mv)
    tl.store(HT + bh * DK * DV + state_off, s, mask=state_mask)
