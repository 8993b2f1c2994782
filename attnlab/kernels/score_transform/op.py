"""Launchers and ``torch.library`` custom ops of the score-transform kernels.

``score_transform_fwd(q, k, v, bias, sinks, scale, cap, causal) -> (out, lse)`` runs the Triton forward
(``attnlab::score_transform_fwd``) and is differentiable in q, k, v and sinks through the backward kernels
(``attnlab::score_transform_bwd``), both with fake-tensor rules so ``torch.compile`` traces through them.
Not differentiable: the bias (its gradient would be an N_q x N_k tensor; asking for it raises) and the
returned lse (its gradient is ignored; no backend exposes it).
One fixed tile per dtype for now: 64 x 64 (32 x 32 for fp32 and D > 128), 16 x 16 under the interpreter;
no autotuning and no GPU measurement yet.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from attnlab.kernels.score_transform.bwd import score_transform_bwd_dkdv_kernel, score_transform_bwd_dq_kernel
from attnlab.kernels.score_transform.fwd import score_transform_fwd_kernel
from attnlab.kernels.triton_utils import head_block, interpreting

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernel then takes CPU tensors only).
IMPORTED_INTERPRETED = interpreting()


def _tile(q: Tensor) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps) for these inputs."""
    if IMPORTED_INTERPRETED:
        return 16, 16, 1
    if q.dtype == torch.float32 or head_block(q.shape[-1]) > 128:
        return 32, 32, 4
    return 64, 64, 4


def score_transform_fwd_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    block: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """See :func:`attnlab.kernels.score_transform.naive.score_transform_fwd_naive` for the math. q (B, H,
    N_q, D), k/v (B, H_kv, N_k, D), D <= 256; ``bias`` broadcastable to (B, H, N_q, N_k); ``sinks`` (H,).
    ``block`` = (BLOCK_M, BLOCK_N) overrides the tile (tests)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    for t in (q, k, v):
        if (t.shape[2] - 1) * t.stride(2) + t.shape[3] >= 2**31:
            raise ValueError("one head's (N, D) matrix spans 2^31 elements or more; split the sequence")
    o = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    bm, bn, warps = _tile(q)
    if block is not None:
        bm, bn = block
    bias_t = q if bias is None else bias.expand(b, h, n_q, n_k)
    bias_strides = (0, 0, 0, 0) if bias is None else bias_t.stride()
    sinks_t = q if sinks is None else sinks.float().contiguous()
    block_d = head_block(d)
    grid = (triton.cdiv(n_q, bm), b * h)
    score_transform_fwd_kernel[grid](
        q, k, v, o, lse, bias_t, sinks_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        *bias_strides,
        h, h // h_kv, n_q, n_k, n_k - n_q, d, float(scale), float(cap) if cap > 0 else 1.0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, CAUSAL=bool(causal), SOFTCAP=cap > 0,
        HAS_BIAS=bias is not None, HAS_SINK=sinks is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=IMPORTED_INTERPRETED and q.dtype == torch.bfloat16,
        EVEN_M=n_q % bm == 0, EVEN_N=n_k % bn == 0, EVEN_D=d == block_d,
        num_warps=warps, num_stages=2,
    )  # fmt: skip
    return o, lse


@torch.library.custom_op("attnlab::score_transform_fwd", mutates_args=())
def score_transform_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
) -> tuple[Tensor, Tensor]:
    return score_transform_fwd_launch(q, k, v, bias, sinks, scale, cap, causal)


@score_transform_fwd.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(q if q.stride(-1) == 1 else q.contiguous())
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


def score_transform_bwd_launch(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dQ, dK, dV, dsinks) of :func:`score_transform_fwd_launch` given dO, its output and lse (see
    ``bwd.py`` for the formulas); dK/dV summed over each GQA group; dsinks None without sinks."""
    do, q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (do, q, k, v))
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    delta = (do.float() * out.float()).sum(-1).contiguous()
    lse_in = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf"))).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bm, bn, warps = _tile(q)
    bias_t = q if bias is None else bias.expand(b, h, n_q, n_k)
    bias_strides = (0, 0, 0, 0) if bias is None else bias_t.stride()
    block_d = head_block(d)
    common = dict(
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, CAUSAL=bool(causal), SOFTCAP=cap > 0,
        HAS_BIAS=bias is not None, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=IMPORTED_INTERPRETED and q.dtype == torch.bfloat16,
        EVEN_M=n_q % bm == 0, EVEN_N=n_k % bn == 0, EVEN_D=d == block_d, num_warps=warps, num_stages=2,
    )  # fmt: skip
    cap_arg = float(cap) if cap > 0 else 1.0
    score_transform_bwd_dkdv_kernel[(triton.cdiv(n_k, bn), b * h_kv)](
        q, k, v, do, lse_in, delta, bias_t, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        *bias_strides,
        h, h_kv, h // h_kv, n_q, n_k, n_k - n_q, d, float(scale), cap_arg, **common,
    )  # fmt: skip
    score_transform_bwd_dq_kernel[(triton.cdiv(n_q, bm), b * h)](
        q, k, v, do, lse_in, delta, bias_t, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *bias_strides,
        h, h // h_kv, n_q, n_k, n_k - n_q, d, float(scale), cap_arg, **common,
    )  # fmt: skip
    dsinks = None
    if sinks is not None:
        dsinks = -(torch.exp(sinks.float()[None, :, None] - lse) * delta).sum(dim=(0, 2)).to(sinks.dtype)
    return dq, dk, dv, dsinks


@torch.library.custom_op("attnlab::score_transform_bwd", mutates_args=())
def score_transform_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dsinks = score_transform_bwd_launch(do, q, k, v, out, lse, bias, sinks, scale, cap, causal)
    return dq, dk, dv, (dsinks if dsinks is not None else q.new_zeros(q.shape[1], dtype=torch.float32))


@score_transform_bwd.register_fake
def _(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv = (torch.empty_like(t if t.stride(-1) == 1 else t.contiguous()) for t in (q, k, v))
    dsinks = q.new_empty(q.shape[1], dtype=sinks.dtype if sinks is not None else torch.float32)
    return dq, dk, dv, dsinks


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, bias, sinks, scale, cap, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, sinks)
    ctx.args = (scale, cap, causal)


def _backward(ctx, do: Tensor, dlse: Tensor):  # type: ignore[no-untyped-def]
    q, k, v, out, lse, bias, sinks = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise NotImplementedError(
            "the score-transform Triton kernel has no gradient for the bias tensor (it would be N_q x N_k); "
            "use backend='flex' or 'eager' when the bias requires grad"
        )
    dq, dk, dv, dsinks = score_transform_bwd(do, q, k, v, out, lse, bias, sinks, *ctx.args)
    return dq, dk, dv, None, (dsinks if sinks is not None else None), None, None, None


score_transform_fwd.register_autograd(_backward, setup_context=_setup_context)
