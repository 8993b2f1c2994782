"""Plain-PyTorch building blocks of the methods' references: dense, masked, easy to read, slow.

Every reference takes q (B, H, N_q, D), k (B, H_kv, N_k, D), v (B, H_kv, N_k, D_v) and returns
(B, H, N_q, D_v) in the input dtype. With ``upcast=True`` (the default, "the fp32 reference") the math
runs in float32 whatever the input dtype; with ``upcast=False`` it runs in the input dtype, which is the
yardstick of the accuracy rule (see :mod:`attnlab.testing`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.kernels.heads import expand_kv
from attnlab.masks import check_dense_size


def scores(q: Tensor, k: Tensor, scale: float, upcast: bool) -> Tensor:
    """``scale * q @ k^T`` of shape (B, H, N_q, N_k), in fp32 when ``upcast``."""
    b, h, n_q, _ = q.shape
    check_dense_size(b * h * n_q * k.shape[2], "the reference", "a fast backend (backend=None)")
    dtype = torch.float32 if upcast else q.dtype
    return torch.matmul(q.to(dtype), expand_kv(k, h).to(dtype).transpose(-1, -2)) * scale


def masked_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor | None, upcast: bool = True
) -> Tensor:
    """``O = softmax(scale * Q K^T + M) V`` with ``M = -inf`` where ``mask`` is False.

    ``mask`` is a bool tensor broadcastable to (B, H, N_q, N_k), or None for full attention. A row
    with no allowed key returns 0 (not NaN), and its gradients are 0.
    """
    s = scores(q, k, scale, upcast)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp(s - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    else:
        p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, _v(v, q.shape[1], upcast))  # p is already in the compute dtype
    return out.to(q.dtype)


def masked_sigmoid_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: float, mask: Tensor | None, upcast: bool = True
) -> Tensor:
    """``O = (sigmoid(scale * Q K^T + b) * M) V``: each allowed weight is an independent sigmoid."""
    s = scores(q, k, scale, upcast)
    p = torch.sigmoid(s + bias)
    if mask is not None:
        p = p * mask
    out = torch.matmul(p, _v(v, q.shape[1], upcast))
    return out.to(q.dtype)


def _v(v: Tensor, heads: int, upcast: bool) -> Tensor:
    v = expand_kv(v, heads)
    return v.float() if upcast else v
