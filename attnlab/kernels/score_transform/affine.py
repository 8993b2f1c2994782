"""The output transform of ``affine_scaled`` as two light Triton passes forward and two backward.

Given softmax attention's output ``out`` (B, H, N_q, D), the values ``v`` (B, H_kv, N_k, D) and per-query
``alpha``, ``beta`` (broadcastable to (B, H, N_q)), :func:`affine_finish` returns, in ``out``'s dtype::

    res_i = alpha_i * out_i + beta_i * mean_{j allowed for i} v_j

with the allowed keys ``j <= p_i = i + N_k - N_q`` when causal (bottom-right; a row with none has mean 0)
and every key otherwise. The mean is a prefix sum of ``v`` along the keys in fp32, computed in chunks of
``CHUNK`` keys so that every (batch, head, chunk, D block) is its own program (the GPU stays full at B=1):
a first kernel writes each chunk's sum of ``v`` (one read of ``v``), PyTorch turns them into exclusive
prefix sums (a (B, H_kv, N_k / CHUNK, D) tensor), and the main kernel reads ``out`` and its chunk of ``v``
once, scans inside the chunk and writes ``res``. (The unfused PyTorch form,
``attnlab.catalog.variants.affine_scaled._finish_torch``, makes about ten fp32 passes over (B, H, N, D)
plus their autograd.)

Backward: ``d_out = alpha * dres``, ``d_alpha_i = dres_i . out_i``, ``d_beta_i = dres_i . mean_i`` (each D
block's share, summed after), and ``d_v_j = sum_{h in group} sum_{i: p_i >= j} beta_i dres_i / (p_i + 1)``
(causal): the chunk sums of those terms first, their exclusive suffix sums in PyTorch, then one kernel per
(batch, KV head, chunk, D block) with the group's heads in turn. Without ``causal`` ``d_v`` is one vector
per (batch, KV head), ``sum_i beta_i dres_i / N_k``, made by an einsum. Rows that see no key (causal, N_q
> N_k) are done in PyTorch (``alpha * out``; no mean). Differentiable in ``out``, ``v``, ``alpha`` and
``beta`` (a broadcast input's gradient is summed over its broadcast dims).
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
#: keys (rows) per program: the scans run inside a chunk, across chunks through the chunk sums
CHUNK = 16 if IMPORTED_INTERPRETED else 128
#: head-dim columns per program
BLOCK_D = 16 if IMPORTED_INTERPRETED else 32


@triton.jit
def _chunk_sums_kernel(
    V, DO, BETA, SV, SC,
    s_vb, s_vh, s_vn, s_db, s_dh, s_dn, s_bb, s_bh, s_bn, s_sb, s_sh, s_sc,
    H_KV, GROUP, N_K, D, OFF,
    WITH_C: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per (batch, KV head, key chunk, D block): ``SV`` = the chunk's sum of v; with ``WITH_C``, ``SC`` =
    the chunk's sum over its keys ``j`` and the group's heads of ``beta_i dres_i / (j + 1)``, ``i = j - OFF``
    the row whose last allowed key is ``j`` (the causal d_v's terms)."""
    pid = tl.program_id(0)
    b = pid // H_KV
    g = pid % H_KV
    c = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    keys = c * CHUNK + tl.arange(0, CHUNK)
    km = keys < N_K
    vv = tl.load(
        V + b * s_vb + g * s_vh + keys[:, None] * s_vn + d[None, :], mask=km[:, None] & dm[None, :], other=0.0
    )
    out_off = b * s_sb + g * s_sh + c * s_sc + d
    tl.store(SV + out_off, tl.sum(vv.to(tl.float32), axis=0), mask=dm)
    if WITH_C:
        rows = keys - OFF
        rm = km & (rows >= 0)
        m2 = rm[:, None] & dm[None, :]
        acc = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
        for hh in range(0, GROUP):
            h = g * GROUP + hh
            do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dn + d[None, :], mask=m2, other=0.0)
            be = tl.load(BETA + b * s_bb + h * s_bh + rows * s_bn, mask=rm, other=0.0).to(tl.float32)
            acc += (be / (keys + 1).to(tl.float32))[:, None] * do.to(tl.float32)
        tl.store(SC + out_off, tl.sum(acc, axis=0), mask=dm)


@triton.jit
def _affine_fwd_kernel(
    OUT, V, ALPHA, BETA, PRE, RES,
    s_ob, s_oh, s_on, s_vb, s_vh, s_vn, s_ab, s_ah, s_an, s_bb, s_bh, s_bn, s_pb, s_ph, s_pc, s_rb, s_rh, s_rn,
    H, GROUP, N_Q, N_K, D, OFF,
    CAUSAL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BETA: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per (batch, head, chunk, D block). Causal: the chunk of keys ``j`` and their rows ``i = j - OFF``,
    mean_i = (PRE[chunk] + in-chunk prefix sum of v up to j) / (j + 1). Not causal: the chunk of rows,
    mean = PRE[b, kv head, 0] (the mean of every value)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    g = h // GROUP
    c = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    idx = c * CHUNK + tl.arange(0, CHUNK)
    if CAUSAL:
        km = idx < N_K
        rows = idx - OFF
        rm = km & (rows >= 0)
    else:
        rows = idx
        rm = rows < N_Q
    m2 = rm[:, None] & dm[None, :]
    o = tl.load(OUT + b * s_ob + h * s_oh + rows[:, None] * s_on + d[None, :], mask=m2, other=0.0).to(
        tl.float32
    )
    if HAS_ALPHA:
        a = tl.load(ALPHA + b * s_ab + h * s_ah + rows * s_an, mask=rm, other=0.0).to(tl.float32)
        o = o * a[:, None]
    if HAS_BETA:
        be = tl.load(BETA + b * s_bb + h * s_bh + rows * s_bn, mask=rm, other=0.0).to(tl.float32)
        pre_off = b * s_pb + g * s_ph + d
        if CAUSAL:
            pre_off += c * s_pc
        pre = tl.load(PRE + pre_off, mask=dm, other=0.0)
        if CAUSAL:
            vv = tl.load(V + b * s_vb + g * s_vh + idx[:, None] * s_vn + d[None, :], mask=km[:, None] & dm[None, :],
                         other=0.0)  # fmt: skip
            mean = (tl.cumsum(vv.to(tl.float32), axis=0) + pre[None, :]) / (idx + 1).to(tl.float32)[:, None]
        else:
            mean = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32) + pre[None, :]
        o += be[:, None] * mean
    tl.store(
        RES + b * s_rb + h * s_rh + rows[:, None] * s_rn + d[None, :], o.to(RES.dtype.element_ty), mask=m2
    )


@triton.jit
def _affine_bwd_kernel(
    DO, OUT, V, ALPHA, BETA, PRE, SUF, DOUT, DV, DALPHA, DBETA,
    s_db, s_dh, s_dn, s_ob, s_oh, s_on, s_vb, s_vh, s_vn, s_ab, s_ah, s_an, s_bb, s_bh, s_bn,
    s_pb, s_ph, s_pc, s_xb, s_xh, s_xn, s_wb, s_wh, s_wn, s_gk, s_gb, s_gh,
    H_KV, GROUP, N_Q, N_K, D, OFF,
    CAUSAL: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_BETA: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per (batch, KV head, chunk, D block), the group's heads in turn: d_out = alpha dres, the D block's
    share of d_alpha = dres . out and d_beta = dres . mean (summed over the D blocks afterwards); causal
    with beta: d_v of the chunk's keys = in-chunk suffix sum of beta_i dres_i / (j + 1) + SUF[chunk] (the
    later chunks' sums). (Not causal, d_v is made outside: one vector for every key.)"""
    pid = tl.program_id(0)
    b = pid // H_KV
    g = pid % H_KV
    c = tl.program_id(1)
    db = tl.program_id(2)
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    idx = c * CHUNK + tl.arange(0, CHUNK)
    if CAUSAL:
        km = idx < N_K
        rows = idx - OFF
        rm = km & (rows >= 0)
    else:
        km = idx < N_K
        rows = idx
        rm = rows < N_Q
    m2 = rm[:, None] & dm[None, :]
    mean = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
    if HAS_BETA:
        pre_off = b * s_pb + g * s_ph + d
        if CAUSAL:
            pre_off += c * s_pc
        pre = tl.load(PRE + pre_off, mask=dm, other=0.0)
        if CAUSAL:
            vv = tl.load(V + b * s_vb + g * s_vh + idx[:, None] * s_vn + d[None, :], mask=km[:, None] & dm[None, :],
                         other=0.0)  # fmt: skip
            mean = (tl.cumsum(vv.to(tl.float32), axis=0) + pre[None, :]) / (idx + 1).to(tl.float32)[:, None]
        else:
            mean += pre[None, :]
    acc = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
    for hh in range(0, GROUP):
        h = g * GROUP + hh
        do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dn + d[None, :], mask=m2, other=0.0)
        do = do.to(tl.float32)
        if HAS_ALPHA:
            a = tl.load(ALPHA + b * s_ab + h * s_ah + rows * s_an, mask=rm, other=0.0).to(tl.float32)
            o = tl.load(OUT + b * s_ob + h * s_oh + rows[:, None] * s_on + d[None, :], mask=m2, other=0.0)
            tl.store(
                DALPHA + db * s_gk + b * s_gb + h * s_gh + rows,
                tl.sum(do * o.to(tl.float32), axis=1),
                mask=rm,
            )
            dout = do * a[:, None]
        else:
            dout = do
        tl.store(DOUT + b * s_xb + h * s_xh + rows[:, None] * s_xn + d[None, :], dout.to(DOUT.dtype.element_ty),
                 mask=m2)  # fmt: skip
        if HAS_BETA:
            tl.store(DBETA + db * s_gk + b * s_gb + h * s_gh + rows, tl.sum(do * mean, axis=1), mask=rm)
            if CAUSAL:
                be = tl.load(BETA + b * s_bb + h * s_bh + rows * s_bn, mask=rm, other=0.0).to(tl.float32)
                acc += (be / (idx + 1).to(tl.float32))[:, None] * do
    if CAUSAL and HAS_BETA:
        suf = tl.load(SUF + b * s_pb + g * s_ph + c * s_pc + d, mask=dm, other=0.0)
        dv = tl.sum(acc, axis=0)[None, :] - tl.cumsum(acc, axis=0) + acc + suf[None, :]
        tl.store(
            DV + b * s_wb + g * s_wh + idx[:, None] * s_wn + d[None, :],
            dv,
            mask=km[:, None] & dm[None, :],
        )


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


def _chunk_sums(
    v: Tensor, causal: bool, do: Tensor | None = None, beta: Tensor | None = None, n_q: int = 0
) -> tuple[Tensor, Tensor | None]:
    """(SV, SC): fp32 (B, H_kv, chunks, D) chunk sums of v and, given dres and beta, of the causal d_v terms."""
    b, h_kv, n_k, d = v.shape
    chunks = triton.cdiv(n_k, CHUNK)
    sv = torch.empty(b, h_kv, chunks, d, dtype=torch.float32, device=v.device)
    sc = torch.empty_like(sv) if do is not None else None
    h = do.shape[1] if do is not None else h_kv
    be, sb = _row_input(beta, b, h, n_q)
    dd = do if do is not None else v
    _chunk_sums_kernel[(b * h_kv, chunks, triton.cdiv(d, BLOCK_D))](
        v, dd, v if be is None else be, sv, sv if sc is None else sc,
        v.stride(0), v.stride(1), v.stride(2), dd.stride(0), dd.stride(1), dd.stride(2), *sb,
        sv.stride(0), sv.stride(1), sv.stride(2),
        h_kv, h // h_kv, n_k, d, n_k - n_q,
        WITH_C=do is not None, CHUNK=CHUNK, BLOCK_D=BLOCK_D, num_warps=4,
    )  # fmt: skip
    return sv, sc


def _empty_rows(causal: bool, n_q: int, n_k: int) -> int:
    """Rows that see no key (causal, N_q > N_k): the first N_q - N_k."""
    return max(0, n_q - n_k) if causal else 0


def _fwd(
    out: Tensor, v: Tensor, alpha: Tensor | None, beta: Tensor | None, causal: bool
) -> tuple[Tensor, Tensor]:
    _check(out, v)
    out, v = out.contiguous(), v.contiguous()
    b, h, n_q, d = out.shape
    h_kv, n_k = v.shape[1], v.shape[2]
    a, sa = _row_input(alpha, b, h, n_q)
    be, sb = _row_input(beta, b, h, n_q)
    if be is not None:
        sv, _ = _chunk_sums(v, causal)
        pre = (sv.cumsum(dim=2) - sv) if causal else sv.sum(dim=2, keepdim=True) / n_k
    else:
        pre = torch.zeros(b, h_kv, 1, d, dtype=torch.float32, device=v.device)
    res = torch.empty_like(out)
    chunks = triton.cdiv(n_k if causal else n_q, CHUNK)
    _affine_fwd_kernel[(b * h, chunks, triton.cdiv(d, BLOCK_D))](
        out, v, out if a is None else a, out if be is None else be, pre, res,
        out.stride(0), out.stride(1), out.stride(2), v.stride(0), v.stride(1), v.stride(2), *sa, *sb,
        pre.stride(0), pre.stride(1), pre.stride(2), res.stride(0), res.stride(1), res.stride(2),
        h, h // h_kv, n_q, n_k, d, n_k - n_q,
        CAUSAL=causal, HAS_ALPHA=a is not None, HAS_BETA=be is not None,
        CHUNK=CHUNK, BLOCK_D=BLOCK_D, num_warps=4,
    )  # fmt: skip
    e = _empty_rows(causal, n_q, n_k)
    if e:  # no key: no mean, alpha * out (the kernel's programs cover the rows with a key)
        res[:, :, :e] = (out[:, :, :e].float() * (1.0 if a is None else a[:, :, :e, None].float())).to(
            res.dtype
        )
    return res, pre


def _summed(g: Tensor, like: Tensor) -> Tensor:
    """``g`` (B, H, N_q) summed over the broadcast dims of ``like`` (its shape, dtype)."""
    dims = tuple(i for i in range(3) if like.shape[-3 + i] == 1 and g.shape[i] != 1)
    return (g.sum(dim=dims, keepdim=True) if dims else g).reshape(like.shape).to(like.dtype)


def _bwd(
    dres: Tensor, out: Tensor, v: Tensor, alpha: Tensor | None, beta: Tensor | None, pre: Tensor, causal: bool
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    dres, out, v = dres.contiguous(), out.contiguous(), v.contiguous()
    b, h, n_q, d = out.shape
    h_kv, n_k = v.shape[1], v.shape[2]
    group = h // h_kv
    a, sa = _row_input(alpha, b, h, n_q)
    be, sb = _row_input(beta, b, h, n_q)
    n_db = triton.cdiv(d, BLOCK_D)
    dout = torch.empty_like(out)
    parts = torch.zeros(2, n_db, b, h, n_q, dtype=torch.float32, device=out.device)  # d_alpha, d_beta shares
    dv: Tensor | None = None
    suf = pre
    if be is not None and causal:
        _, sc = _chunk_sums(v, True, dres, beta, n_q)
        assert sc is not None
        suf = sc.flip(2).cumsum(dim=2).flip(2) - sc  # the later chunks' sums
        dv = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    dvw = dv if dv is not None else v
    chunks = triton.cdiv(n_k if causal else n_q, CHUNK)
    _affine_bwd_kernel[(b * h_kv, chunks, n_db)](
        dres, out, v, out if a is None else a, out if be is None else be, pre, suf, dout, dvw, parts[0], parts[1],
        dres.stride(0), dres.stride(1), dres.stride(2), out.stride(0), out.stride(1), out.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *sa, *sb, pre.stride(0), pre.stride(1), pre.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), dvw.stride(0), dvw.stride(1), dvw.stride(2),
        parts.stride(1), parts.stride(2), parts.stride(3),
        h_kv, group, n_q, n_k, d, n_k - n_q,
        CAUSAL=causal, HAS_ALPHA=a is not None, HAS_BETA=be is not None,
        CHUNK=CHUNK, BLOCK_D=BLOCK_D, num_warps=4,
    )  # fmt: skip
    e = _empty_rows(causal, n_q, n_k)
    if e:  # no key: d_out = alpha dres, d_alpha = dres . out, no d_beta, no d_v
        de = dres[:, :, :e].float()
        dout[:, :, :e] = (de * (1.0 if a is None else a[:, :, :e, None].float())).to(dout.dtype)
        parts[:, :, :, :, :e] = 0.0
        parts[0, 0, :, :, :e] = (de * out[:, :, :e].float()).sum(-1)
    if be is not None and not causal:  # every key: sum_{h in group, i} beta_i dres_i / N_k
        per_head = torch.einsum("bhn,bhnd->bhd", be.float(), dres.float()) / n_k
        dv = per_head.view(b, h_kv, group, d).sum(2)[:, :, None].expand(b, h_kv, n_k, d)
    da = _summed(parts[0].sum(0), alpha) if alpha is not None else None
    db = _summed(parts[1].sum(0), beta) if beta is not None else None
    return dout, None if dv is None else dv.to(v.dtype), da, db


class _AffineFinish(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, out: Tensor, v: Tensor, alpha: Tensor | None, beta: Tensor | None, causal: bool
    ) -> Tensor:
        res, pre = _fwd(out, v, alpha, beta, causal)
        ctx.save_for_backward(out, v, alpha, beta, pre)
        ctx.causal = causal
        return res

    @staticmethod
    def backward(ctx: Any, dres: Tensor) -> tuple[Tensor | None, ...]:
        out, v, alpha, beta, pre = ctx.saved_tensors
        dout, dv, da, db = _bwd(dres, out, v, alpha, beta, pre, ctx.causal)
        return dout, dv, da, db, None


def affine_finish(out: Tensor, v: Tensor, alpha: Tensor | None, beta: Tensor | None, causal: bool) -> Tensor:
    """``alpha_i * out_i + beta_i * mean_{j allowed} v_j`` in ``out``'s dtype (see the module docstring);
    ``alpha``/``beta`` broadcastable to (B, H, N_q) or None (scale 1, bias 0). Differentiable in every
    tensor."""
    return _AffineFinish.apply(out, v, alpha, beta, causal)  # type: ignore[no-any-return]
