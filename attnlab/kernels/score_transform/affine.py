"""The output transform of ``affine_scaled`` fused into one pass forward and one backward (Triton).

Given softmax attention's output ``out`` (B, H, N_q, D), the values ``v`` (B, H_kv, N_k, D) and per-query
``alpha``, ``beta`` (broadcastable to (B, H, N_q)), :func:`affine_finish` returns, in ``out``'s dtype::

    res_i = alpha_i * out_i + beta_i * mean_{j allowed for i} v_j

with the allowed keys ``j <= p_i = i + N_k - N_q`` when causal (bottom-right; a row with none has mean 0)
and every key otherwise. The mean is a running (prefix) sum of ``v`` along the keys in fp32, made inside
the kernel: one read of ``out`` and ``v`` and one write of ``res`` (the unfused PyTorch form,
``attnlab.catalog.variants.affine_scaled._finish``, makes about ten fp32 passes over (B, H, N, D)).

Backward (one kernel per (batch, KV head), its query heads in turn): ``d_out = alpha * dres``, ``d_alpha_i
= dres_i . out_i``, ``d_beta_i = dres_i . mean_i`` in an ascending pass over the keys (the prefix sums),
then ``d_v_j = sum_{h in group} sum_{i: p_i >= j} beta_i dres_i / (p_i + 1)`` in a descending pass (a
suffix sum; without ``causal`` the same vector ``sum_i beta_i dres_i / N_k`` for every key).
Differentiable in ``out``, ``v``, ``alpha`` and ``beta`` (a broadcast input's gradient is summed over its
broadcast dims).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.kernels.triton_utils import interpreting

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernels then take CPU tensors only).
IMPORTED_INTERPRETED = interpreting()
#: rows (keys) per step of the scans
BLOCK_N = 16 if IMPORTED_INTERPRETED else 64


@triton.jit
def _affine_fwd_kernel(
    OUT, V, ALPHA, BETA, RES,
    s_ob, s_oh, s_on, s_vb, s_vh, s_vn, s_ab, s_ah, s_an, s_bb, s_bh, s_bn, s_rb, s_rh, s_rn,
    H, GROUP, N_Q, N_K, D, OFF,
    CAUSAL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BETA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    g = h // GROUP
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    r = tl.arange(0, BLOCK_N)
    o_base = OUT + b * s_ob + h * s_oh
    r_base = RES + b * s_rb + h * s_rh
    v_base = V + b * s_vb + g * s_vh
    if CAUSAL:
        # rows that see no key (p_i < 0): alpha * out (out is 0 there; the mean is 0)
        n_empty = tl.minimum(tl.maximum(-OFF, 0), N_Q)
        for i0 in range(0, n_empty, BLOCK_N):
            rows = i0 + r
            rm = rows < n_empty
            m2 = rm[:, None] & dm[None, :]
            o = tl.load(o_base + rows[:, None] * s_on + d[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_ALPHA:
                a = tl.load(ALPHA + b * s_ab + h * s_ah + rows * s_an, mask=rm, other=0.0).to(tl.float32)
                o = o * a[:, None]
            tl.store(r_base + rows[:, None] * s_rn + d[None, :], o.to(RES.dtype.element_ty), mask=m2)
        carry = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j0 in range(0, N_K, BLOCK_N):
            keys = j0 + r
            km = keys < N_K
            vv = tl.load(
                v_base + keys[:, None] * s_vn + d[None, :], mask=km[:, None] & dm[None, :], other=0.0
            )
            vv = vv.to(tl.float32)
            prefix = tl.cumsum(vv, axis=0) + carry[None, :]
            carry += tl.sum(vv, axis=0)
            rows = keys - OFF  # the row whose last allowed key is this one
            rm = km & (rows >= 0)
            m2 = rm[:, None] & dm[None, :]
            o = tl.load(o_base + rows[:, None] * s_on + d[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_ALPHA:
                a = tl.load(ALPHA + b * s_ab + h * s_ah + rows * s_an, mask=rm, other=0.0).to(tl.float32)
                o = o * a[:, None]
            if HAS_BETA:
                be = tl.load(BETA + b * s_bb + h * s_bh + rows * s_bn, mask=rm, other=0.0).to(tl.float32)
                o += (be / (keys + 1).to(tl.float32))[:, None] * prefix
            tl.store(r_base + rows[:, None] * s_rn + d[None, :], o.to(RES.dtype.element_ty), mask=m2)
    else:
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BETA:
            for j0 in range(0, N_K, BLOCK_N):
                keys = j0 + r
                km = keys < N_K
                vv = tl.load(
                    v_base + keys[:, None] * s_vn + d[None, :], mask=km[:, None] & dm[None, :], other=0.0
                )
                total += tl.sum(vv.to(tl.float32), axis=0)
        mean = total / N_K
        for i0 in range(0, N_Q, BLOCK_N):
            rows = i0 + r
            rm = rows < N_Q
            m2 = rm[:, None] & dm[None, :]
            o = tl.load(o_base + rows[:, None] * s_on + d[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_ALPHA:
                a = tl.load(ALPHA + b * s_ab + h * s_ah + rows * s_an, mask=rm, other=0.0).to(tl.float32)
                o = o * a[:, None]
            if HAS_BETA:
                be = tl.load(BETA + b * s_bb + h * s_bh + rows * s_bn, mask=rm, other=0.0).to(tl.float32)
                o += be[:, None] * mean[None, :]
            tl.store(r_base + rows[:, None] * s_rn + d[None, :], o.to(RES.dtype.element_ty), mask=m2)


@triton.jit
def _affine_rows_bwd(
    DO, OUT, ALPHA, BETA, DOUT, DALPHA, DBETA, b, h, rows, rm, d, dm, mean,
    s_db, s_dh, s_dn, s_ob, s_oh, s_on, s_ab, s_ah, s_an, s_bb, s_bh, s_bn, s_xb, s_xh, s_xn, s_gb, s_gh,
    HAS_ALPHA: tl.constexpr, HAS_BETA: tl.constexpr,
):  # fmt: skip
    """d_out, d_alpha, d_beta of the given rows of head h (``mean``: their allowed means, fp32)."""
    m2 = rm[:, None] & dm[None, :]
    do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dn + d[None, :], mask=m2, other=0.0).to(
        tl.float32
    )
    if HAS_ALPHA:
        a = tl.load(ALPHA + b * s_ab + h * s_ah + rows * s_an, mask=rm, other=0.0).to(tl.float32)
        o = tl.load(OUT + b * s_ob + h * s_oh + rows[:, None] * s_on + d[None, :], mask=m2, other=0.0)
        tl.store(DALPHA + b * s_gb + h * s_gh + rows, tl.sum(do * o.to(tl.float32), axis=1), mask=rm)
        dout = do * a[:, None]
    else:
        dout = do
    tl.store(
        DOUT + b * s_xb + h * s_xh + rows[:, None] * s_xn + d[None, :],
        dout.to(DOUT.dtype.element_ty),
        mask=m2,
    )
    if HAS_BETA:
        tl.store(DBETA + b * s_gb + h * s_gh + rows, tl.sum(do * mean, axis=1), mask=rm)
    return do


@triton.jit
def _affine_bwd_kernel(
    DO, OUT, V, ALPHA, BETA, DOUT, DV, DALPHA, DBETA,
    s_db, s_dh, s_dn, s_ob, s_oh, s_on, s_vb, s_vh, s_vn, s_ab, s_ah, s_an, s_bb, s_bh, s_bn,
    s_xb, s_xh, s_xn, s_wb, s_wh, s_wn, s_gb, s_gh,
    H_KV, GROUP, N_Q, N_K, D, OFF,
    CAUSAL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BETA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H_KV
    g = pid % H_KV
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    r = tl.arange(0, BLOCK_N)
    v_base = V + b * s_vb + g * s_vh
    zero = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        n_empty = tl.minimum(tl.maximum(-OFF, 0), N_Q)
        for i0 in range(0, n_empty, BLOCK_N):
            rows = i0 + r
            rm = rows < n_empty
            for hh in range(0, GROUP):
                _affine_rows_bwd(DO, OUT, ALPHA, BETA, DOUT, DALPHA, DBETA, b, g * GROUP + hh, rows, rm, d, dm,
                                 zero, s_db, s_dh, s_dn, s_ob, s_oh, s_on, s_ab, s_ah, s_an, s_bb, s_bh, s_bn,
                                 s_xb, s_xh, s_xn, s_gb, s_gh, HAS_ALPHA, HAS_BETA)  # fmt: skip
        carry = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j0 in range(0, N_K, BLOCK_N):  # ascending: the prefix sums (means) of the rows
            keys = j0 + r
            km = keys < N_K
            vv = tl.load(
                v_base + keys[:, None] * s_vn + d[None, :], mask=km[:, None] & dm[None, :], other=0.0
            )
            vv = vv.to(tl.float32)
            mean = (tl.cumsum(vv, axis=0) + carry[None, :]) / (keys + 1).to(tl.float32)[:, None]
            carry += tl.sum(vv, axis=0)
            rows = keys - OFF
            rm = km & (rows >= 0)
            for hh in range(0, GROUP):
                _affine_rows_bwd(DO, OUT, ALPHA, BETA, DOUT, DALPHA, DBETA, b, g * GROUP + hh, rows, rm, d, dm,
                                 mean, s_db, s_dh, s_dn, s_ob, s_oh, s_on, s_ab, s_ah, s_an, s_bb, s_bh, s_bn,
                                 s_xb, s_xh, s_xn, s_gb, s_gh, HAS_ALPHA, HAS_BETA)  # fmt: skip
        if HAS_BETA:
            n_chunks = tl.cdiv(N_K, BLOCK_N)
            suffix = tl.zeros([BLOCK_D], dtype=tl.float32)
            for t in range(0, n_chunks):  # descending: d_v_j = sum over rows with p_i >= j
                keys = (n_chunks - 1 - t) * BLOCK_N + r
                km = keys < N_K
                rows = keys - OFF
                rm = km & (rows >= 0)
                m2 = rm[:, None] & dm[None, :]
                c = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                for hh in range(0, GROUP):
                    h = g * GROUP + hh
                    do = tl.load(
                        DO + b * s_db + h * s_dh + rows[:, None] * s_dn + d[None, :], mask=m2, other=0.0
                    )
                    be = tl.load(BETA + b * s_bb + h * s_bh + rows * s_bn, mask=rm, other=0.0).to(tl.float32)
                    c += (be / (keys + 1).to(tl.float32))[:, None] * do.to(tl.float32)
                tot = tl.sum(c, axis=0)
                dv = tot[None, :] - tl.cumsum(c, axis=0) + c + suffix[None, :]
                suffix += tot
                tl.store(DV + b * s_wb + g * s_wh + keys[:, None] * s_wn + d[None, :], dv,
                         mask=km[:, None] & dm[None, :])  # fmt: skip
    else:
        mean_row = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BETA:
            for j0 in range(0, N_K, BLOCK_N):
                keys = j0 + r
                km = keys < N_K
                vv = tl.load(
                    v_base + keys[:, None] * s_vn + d[None, :], mask=km[:, None] & dm[None, :], other=0.0
                )
                mean_row += tl.sum(vv.to(tl.float32), axis=0)
            mean_row = mean_row / N_K
        mean = zero + mean_row[None, :]
        csum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i0 in range(0, N_Q, BLOCK_N):
            rows = i0 + r
            rm = rows < N_Q
            for hh in range(0, GROUP):
                h = g * GROUP + hh
                do = _affine_rows_bwd(DO, OUT, ALPHA, BETA, DOUT, DALPHA, DBETA, b, h, rows, rm, d, dm,
                                      mean, s_db, s_dh, s_dn, s_ob, s_oh, s_on, s_ab, s_ah, s_an, s_bb, s_bh, s_bn,
                                      s_xb, s_xh, s_xn, s_gb, s_gh, HAS_ALPHA, HAS_BETA)  # fmt: skip
                if HAS_BETA:
                    be = tl.load(BETA + b * s_bb + h * s_bh + rows * s_bn, mask=rm, other=0.0).to(tl.float32)
                    csum += tl.sum(be[:, None] * do, axis=0)
        if HAS_BETA:
            dv_row = csum / N_K
            for j0 in range(0, N_K, BLOCK_N):
                keys = j0 + r
                km = keys < N_K
                tl.store(DV + b * s_wb + g * s_wh + keys[:, None] * s_wn + d[None, :], zero + dv_row[None, :],
                         mask=km[:, None] & dm[None, :])  # fmt: skip


def _row_input(t: Tensor | None, b: int, h: int, n_q: int) -> tuple[Tensor | None, tuple[int, int, int]]:
    """A per-query input expanded to (B, H, N_q) (broadcast dims stride 0) and its strides."""
    if t is None:
        return None, (0, 0, 0)
    e = t.expand(b, h, n_q)
    return e, (e.stride(0), e.stride(1), e.stride(2))


def _check(out: Tensor, v: Tensor) -> None:
    if out.dim() != 4 or v.dim() != 4 or out.shape[0] != v.shape[0] or out.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"affine_finish: expected out (B, H, N_q, D) and v (B, H_kv, N_k, D), got {tuple(out.shape)} and "
            f"{tuple(v.shape)}"
        )
    if out.shape[1] % v.shape[1]:
        raise ValueError(f"affine_finish: H={out.shape[1]} is not a multiple of H_kv={v.shape[1]}")


def _fwd(out: Tensor, v: Tensor, alpha: Tensor | None, beta: Tensor | None, causal: bool) -> Tensor:
    _check(out, v)
    out, v = out.contiguous(), v.contiguous()
    b, h, n_q, d = out.shape
    h_kv, n_k = v.shape[1], v.shape[2]
    a, sa = _row_input(alpha, b, h, n_q)
    be, sb = _row_input(beta, b, h, n_q)
    res = torch.empty_like(out)
    _affine_fwd_kernel[(b * h,)](
        out, v, out if a is None else a, out if be is None else be, res,
        out.stride(0), out.stride(1), out.stride(2), v.stride(0), v.stride(1), v.stride(2), *sa, *sb,
        res.stride(0), res.stride(1), res.stride(2),
        h, h // h_kv, n_q, n_k, d, n_k - n_q,
        CAUSAL=causal, HAS_ALPHA=a is not None, HAS_BETA=be is not None,
        BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(d), num_warps=4,
    )  # fmt: skip
    return res


def _summed(g: Tensor, like: Tensor) -> Tensor:
    """``g`` (B, H, N_q) summed over the broadcast dims of ``like`` (its shape, dtype)."""
    dims = tuple(i for i in range(3) if like.shape[-3 + i] == 1 and g.shape[i] != 1)
    return (g.sum(dim=dims, keepdim=True) if dims else g).reshape(like.shape).to(like.dtype)


def _bwd(
    dres: Tensor, out: Tensor, v: Tensor, alpha: Tensor | None, beta: Tensor | None, causal: bool
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    dres, out, v = dres.contiguous(), out.contiguous(), v.contiguous()
    b, h, n_q, d = out.shape
    h_kv, n_k = v.shape[1], v.shape[2]
    a, sa = _row_input(alpha, b, h, n_q)
    be, sb = _row_input(beta, b, h, n_q)
    dout = torch.empty_like(out)
    dv = torch.empty(v.shape, dtype=torch.float32, device=v.device) if be is not None else None
    dalpha = torch.empty(b, h, n_q, dtype=torch.float32, device=out.device) if a is not None else None
    dbeta = torch.empty(b, h, n_q, dtype=torch.float32, device=out.device) if be is not None else None
    scratch = (
        dalpha
        if dalpha is not None
        else dbeta
        if dbeta is not None
        else torch.empty(b, h, n_q, device=out.device)
    )
    dvw = dv if dv is not None else out
    _affine_bwd_kernel[(b * h_kv,)](
        dres, out, v, out if a is None else a, out if be is None else be, dout, dvw,
        scratch if dalpha is None else dalpha, scratch if dbeta is None else dbeta,
        dres.stride(0), dres.stride(1), dres.stride(2), out.stride(0), out.stride(1), out.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *sa, *sb, dout.stride(0), dout.stride(1), dout.stride(2),
        dvw.stride(0), dvw.stride(1), dvw.stride(2), scratch.stride(0), scratch.stride(1),
        h_kv, h // h_kv, n_q, n_k, d, n_k - n_q,
        CAUSAL=causal, HAS_ALPHA=a is not None, HAS_BETA=be is not None,
        BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(d), num_warps=4,
    )  # fmt: skip
    da = _summed(dalpha, alpha) if dalpha is not None and alpha is not None else None
    db = _summed(dbeta, beta) if dbeta is not None and beta is not None else None
    return dout, None if dv is None else dv.to(v.dtype), da, db


class _AffineFinish(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, out: Tensor, v: Tensor, alpha: Tensor | None, beta: Tensor | None, causal: bool
    ) -> Tensor:
        ctx.save_for_backward(out, v, alpha, beta)
        ctx.causal = causal
        return _fwd(out, v, alpha, beta, causal)

    @staticmethod
    def backward(ctx: Any, dres: Tensor) -> tuple[Tensor | None, ...]:
        out, v, alpha, beta = ctx.saved_tensors
        dout, dv, da, db = _bwd(dres, out, v, alpha, beta, ctx.causal)
        return dout, dv, da, db, None


def affine_finish(out: Tensor, v: Tensor, alpha: Tensor | None, beta: Tensor | None, causal: bool) -> Tensor:
    """``alpha_i * out_i + beta_i * mean_{j allowed} v_j`` in ``out``'s dtype (see the module docstring);
    ``alpha``/``beta`` broadcastable to (B, H, N_q) or None (scale 1, bias 0). Differentiable in every
    tensor."""
    return _AffineFinish.apply(out, v, alpha, beta, causal)  # type: ignore[no-any-return]
