"""The score-transform kernel's naive twin: the same forward in plain PyTorch (fp32, dense, O(N^2)).

Shapes: q (B, H, N_q, D), k/v (B, H_kv, N_k, D); ``bias`` broadcastable to (B, H, N_q, N_k) or None;
``sinks`` (H,) or None; ``cap > 0`` soft-caps the scaled logits, ``cap == 0`` leaves them; causal is
bottom-right aligned. Returns (out in q's dtype, lse fp32 (B, H, N_q)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.kernels.heads import expand_kv


def score_transform_fwd_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
) -> tuple[Tensor, Tensor]:
    """``x = T(scale * Q K^T) + bias`` with ``T(s) = cap * tanh(s / cap)`` (identity when cap == 0),
    masked to -inf outside the allowed keys; ``lse_i = log(sum_j exp(x_ij) + exp(s_h))`` (sink term only
    with ``sinks``); ``O = exp(x - lse) V``. Rows with no key and no sink: O = 0, lse = -inf."""
    n_q, n_k = q.shape[2], k.shape[2]
    x = torch.matmul(q.float(), expand_kv(k, q.shape[1]).float().transpose(-1, -2)) * scale
    if cap > 0:
        x = torch.tanh(x / cap) * cap
    if bias is not None:
        x = x + bias.float()
    if causal:
        pos = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        x = x.masked_fill(torch.arange(n_k, device=q.device)[None, :] > pos, float("-inf"))
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
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dQ, dK, dV, dsinks) by the backward kernels' formulas (see ``bwd.py``); dK/dV summed over each GQA
    group; dsinks (H,) = -sum over batch and rows of exp(s_h - lse_i) * (dO_i . O_i), None without sinks."""
    h, h_kv = q.shape[1], k.shape[1]
    out, lse = score_transform_fwd_naive(q, k, v, bias, sinks, scale, cap, causal)
    n_q, n_k = q.shape[2], k.shape[2]
    ke, ve = expand_kv(k, h).float(), expand_kv(v, h).float()
    s = torch.matmul(q.float(), ke.transpose(-1, -2)) * scale
    x, deriv = s, torch.ones_like(s)
    if cap > 0:
        x = torch.tanh(s / cap) * cap
        deriv = 1 - (x / cap) ** 2
    if bias is not None:
        x = x + bias.float()
    if causal:
        pos = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        x = x.masked_fill(torch.arange(n_k, device=q.device)[None, :] > pos, float("-inf"))
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
