"""The Triton kernel's naive twin: the same forward and explicit backward formulas in plain PyTorch.

It states what the kernels compute, step by step (fp32 math, dense, O(N^2) memory), so that a test can
check the backward formulas against autograd of the method's reference and the kernels against this.
Shapes: q (B, H, N_q, D), k/v (B, H_kv, N_k, D); causal is bottom-right aligned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.kernels.heads import expand_kv


def _probs(q: Tensor, k: Tensor, scale: float, bias: float, causal: bool) -> Tensor:
    n_q, n_k = q.shape[2], k.shape[2]
    s = torch.matmul(q.float(), expand_kv(k, q.shape[1]).float().transpose(-1, -2)) * scale + bias
    p = torch.sigmoid(s)
    if causal:
        pos = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        p = p * (torch.arange(n_k, device=q.device)[None, :] <= pos)
    return p


def sigmoid_fwd_naive(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: float, causal: bool) -> Tensor:
    """O = P V with P = sigmoid(scale * Q K^T + bias), masked entries 0."""
    p = _probs(q, k, scale, bias, causal)
    return torch.matmul(p, expand_kv(v, q.shape[1]).float()).to(q.dtype)


def sigmoid_bwd_naive(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, bias: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV from dO by the kernel's formulas; dK/dV summed over each GQA group."""
    h, h_kv = q.shape[1], k.shape[1]
    p = _probs(q, k, scale, bias, causal)
    do32 = do.float()
    ve = expand_kv(v, h).float()
    ke = expand_kv(k, h).float()
    dv = torch.matmul(p.transpose(-1, -2), do32)
    dp = torch.matmul(do32, ve.transpose(-1, -2))
    ds = p * (1 - p) * dp
    dq = scale * torch.matmul(ds, ke)
    dk = scale * torch.matmul(ds.transpose(-1, -2), q.float())
    b, _, n_k, d = dk.shape
    dk = dk.view(b, h_kv, h // h_kv, n_k, d).sum(2)
    dv = dv.view(b, h_kv, h // h_kv, n_k, dv.shape[-1]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
