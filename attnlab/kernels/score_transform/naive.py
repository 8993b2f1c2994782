"""The score-transform kernel's naive twin: the same forward in plain PyTorch (fp32, dense, O(N^2)).

Shapes: q (B, H, N_q, D), k/v (B, H_kv, N_k, D); ``bias`` broadcastable to (B, H, N_q, N_k) or None;
``sinks`` (H,) or None; ``cap > 0`` soft-caps the scaled logits, ``cap == 0`` leaves them; causal is
bottom-right aligned. Keyword-only: ``slopes`` (H,) adds ALiBi's ``-m_h * |i + N_k - N_q - j|``; ``u``
(.., N_q, r) and ``vf`` (.., N_k, r) add the low-rank bias ``u @ vf^T`` (FlashBias; fp32 here and in the
kernel); ``temp`` (broadcastable to (B, H, N_q)) multiplies the scaled logits of each
query before the transform (selective attention's temperature); ``softplus`` l1-normalises softplus weights
instead of the softmax. Returns (out in q's dtype, lse fp32 (B, H, N_q)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.kernels.heads import expand_kv


def _logits(
    q: Tensor,
    k: Tensor,
    bias: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    slopes: Tensor | None,
    u: Tensor | None,
    vf: Tensor | None,
    temp: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(x, dx/ds) in fp32: x the masked (-inf) transformed logits, ds the scaled scores' derivative."""
    n_q, n_k = q.shape[2], k.shape[2]
    s = torch.matmul(q.float(), expand_kv(k, q.shape[1]).float().transpose(-1, -2)) * scale
    if temp is not None:
        s = s * temp.float()[..., None]
    x, deriv = s, torch.ones_like(s)
    if cap > 0:
        x = torch.tanh(s / cap) * cap
        deriv = 1 - (x / cap) ** 2
    if bias is not None:
        x = x + bias.float()
    pos = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
    cols = torch.arange(n_k, device=q.device)[None, :]
    if slopes is not None:
        x = x - slopes.float()[None, :, None, None] * (pos - cols).abs().float()
    if u is not None and vf is not None:
        x = x + torch.matmul(u.float(), vf.float().transpose(-1, -2))
    if causal:
        x = x.masked_fill(cols > pos, float("-inf"))
    return x, deriv


def score_transform_fwd_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    *,
    slopes: Tensor | None = None,
    u: Tensor | None = None,
    vf: Tensor | None = None,
    temp: Tensor | None = None,
    softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """``x = T(scale * Q K^T) + bias`` with ``T(s) = cap * tanh(s / cap)`` (identity when cap == 0),
    masked to -inf outside the allowed keys; ``lse_i = log(sum_j exp(x_ij) + exp(s_h))`` (sink term only
    with ``sinks``); ``O = exp(x - lse) V``. Rows with no key and no sink: O = 0, lse = -inf.

    ``softplus``: l1-normalised softplus weights instead, ``A = softplus(x) / L`` with ``L_i = sum_j
    softplus(x_ij)`` over the allowed keys, ``lse = log L`` (no sinks); ``O = A V``."""
    x, _ = _logits(q, k, bias, scale, cap, causal, slopes, u, vf, temp)
    if softplus:
        if sinks is not None:
            raise ValueError("the softplus transform takes no sink logits: expected sinks=None")
        w = torch.where(torch.isfinite(x), torch.nn.functional.softplus(x), torch.zeros_like(x))
        total = w.sum(dim=-1)
        a = w / torch.where(total > 0, total, torch.ones_like(total))[..., None]
        out = torch.matmul(a, expand_kv(v, q.shape[1]).float())
        return out.to(q.dtype), torch.log(total)
    cols = x
    if sinks is not None:
        cols = torch.cat([x, sinks.float()[None, :, None, None].expand(*x.shape[:3], 1)], dim=-1)
    lse = torch.logsumexp(cols, dim=-1)
    p = torch.exp(x - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = torch.matmul(p, expand_kv(v, q.shape[1]).float())
    return out.to(q.dtype), lse


def score_transform_bwd_naive(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    *,
    slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dQ, dK, dV, dsinks) by the backward kernels' formulas (see ``bwd.py``); dK/dV summed over each GQA
    group; dsinks (H,) = -sum over batch and rows of exp(s_h - lse_i) * (dO_i . O_i), None without sinks."""
    h, h_kv = q.shape[1], k.shape[1]
    out, lse = score_transform_fwd_naive(q, k, v, bias, sinks, scale, cap, causal, slopes=slopes)
    n_k = k.shape[2]
    ke, ve = expand_kv(k, h).float(), expand_kv(v, h).float()
    x, deriv = _logits(q, k, bias, scale, cap, causal, slopes, None, None)
    safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    p = torch.exp(x - safe[..., None])
    do32 = do.float()
    delta = (do32 * out.float()).sum(-1)
    dv = torch.matmul(p.transpose(-1, -2), do32)
    ds = p * (torch.matmul(do32, ve.transpose(-1, -2)) - delta[..., None]) * deriv
    dq = scale * torch.matmul(ds, ke)
    dk = scale * torch.matmul(ds.transpose(-1, -2), q.float())
    b, _, _, d = dk.shape
    dk = dk.view(b, h_kv, h // h_kv, n_k, d).sum(2)
    dv = dv.view(b, h_kv, h // h_kv, n_k, dv.shape[-1]).sum(2)
    dsinks = None
    if sinks is not None:
        dsinks = -(torch.exp(sinks.float()[None, :, None] - lse) * delta).sum(dim=(0, 2))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks
