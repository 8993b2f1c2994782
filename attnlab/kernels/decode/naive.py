"""The decode kernels' naive twins: the same math in plain PyTorch (fp32, dense over the cache).

Shapes: q (B, H, N_q, D), k/v (B, H_kv, N_k, D) the whole cache; ``index`` (B, H_kv, n) int, entry ``e``
of (b, h_kv) covers cache tokens ``index[b, h_kv, e] * page + [0, page)``, negative entries cover
nothing, and with ``count`` (B, H_kv) only the first ``count[b, h_kv]`` entries count. Entries must not
repeat (a repeated token would be counted twice). Causal is bottom-right aligned: query ``i`` sits at
``i + N_k - N_q`` and sees tokens at or before it. ``key_mask`` (B, N_k): tokens whose entry is <= 0 are
padding and never attended.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.kernels.heads import expand_kv


def selected_mask(index: Tensor, page: int, n_k: int, count: Tensor | None = None) -> Tensor:
    """(B, H_kv, N_k) bool: the cache tokens the entries of ``index`` cover."""
    b, h_kv, n = index.shape
    idx = index.long()
    valid = idx >= 0
    if count is not None:
        valid &= torch.arange(n, device=idx.device) < count.long()[..., None]
    tok = (idx[..., None] * page + torch.arange(page, device=idx.device)).flatten(2)  # (B, H_kv, n * page)
    ok = (valid[..., None].expand(b, h_kv, n, page).flatten(2)) & (tok < n_k) & (tok >= 0)
    mask = torch.zeros(b, h_kv, n_k + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(2, torch.where(ok, tok, n_k), True)
    return mask[..., :n_k]


def decode_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    page: int,
    scale: float,
    causal: bool,
    count: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, N_q, D_v) in q's dtype, lse (B, H, N_q) float32): softmax attention of each query over
    the selected tokens of its KV head (and, when causal, at or before its position). Rows with no
    allowed token: out 0, lse -inf."""
    h, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    sel = expand_kv(selected_mask(index, page, n_k, count), h)[:, :, None, :]  # (B, H, 1, N_k)
    if key_mask is not None:
        sel = sel & (key_mask > 0)[:, None, None, :]
    if causal:
        pos = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        sel = sel & (torch.arange(n_k, device=q.device)[None, :] <= pos)
    s = torch.matmul(q.float(), expand_kv(k, h).float().transpose(-1, -2)) * scale
    s = s.masked_fill(~sel, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe[..., None])
    out = torch.matmul(p, expand_kv(v, h).float())
    return out.to(q.dtype), lse


def page_scores_naive(q: Tensor, kmax: Tensor, kmin: Tensor, reduce: str = "max") -> Tensor:
    """(B, H_kv, n_pages) float32: Quest's bound ``u = sum_d max(q_d max_d, q_d min_d)`` of each query row
    over each page (kmax/kmin (B, H_kv, n_pages, D)), reduced over the GROUP * N_q rows of each KV group
    by ``reduce`` ("max" or "mean")."""
    b, h, n_q, d = q.shape
    h_kv = kmax.shape[1]
    qg = q.float().reshape(b, h_kv, (h // h_kv) * n_q, 1, d)
    u = torch.maximum(qg * kmax.float()[:, :, None], qg * kmin.float()[:, :, None]).sum(-1)
    return u.amax(2) if reduce == "max" else u.mean(2)


def row_topk_naive(x: Tensor, k: int) -> Tensor:
    """(..., k) int32: positions of the k largest values of each row of x (..., N), ascending; ties at
    the k-th value go to the lowest positions."""
    n = x.shape[-1]
    order = torch.argsort(x.float(), dim=-1, descending=True, stable=True)  # stable: lower position first
    return order[..., :k].sort(dim=-1).values.to(torch.int32) if k <= n else order.to(torch.int32)
