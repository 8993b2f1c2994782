"""The block-sparse executor's naive twin: dense masked attention over the token mask its tables encode.

The mask is rebuilt from the same tables the kernels read (not from the plan), so a test of the kernels
against it checks the kernels, and a test of it against ``Plan.dense_mask`` checks the tables.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab.kernels.heads import expand_kv


def tables_mask(
    p_num: Tensor,
    p_idx: Tensor,
    p_pat: Tensor,
    f_num: Tensor,
    f_idx: Tensor,
    c_num: Tensor,
    c_idx: Tensor,
    patterns: Tensor,
    n_q: int,
    n_k: int,
    causal: bool,
) -> Tensor:
    """bool (Bp, Hp, N_q, N_k): the pairs the tables visit (partial tiles through their pattern, full tiles,
    columns; a column when causal only where ``j <= i + N_k - N_q``)."""
    bp, hp, nqb = p_num.shape
    bq, bk = patterns.shape[1:]
    nkb = -(-n_k // bk)
    grid = torch.zeros(bp, hp, nqb * bq, nkb * bk, dtype=torch.bool)
    col_grid = torch.zeros_like(grid)
    for b in range(bp):
        for h in range(hp):
            for r in range(nqb):
                rows = slice(r * bq, (r + 1) * bq)
                for t in range(int(p_num[b, h, r])):
                    kb = int(p_idx[b, h, r, t])
                    grid[b, h, rows, kb * bk : (kb + 1) * bk] |= patterns[int(p_pat[b, h, r, t])].cpu() != 0
                for t in range(int(f_num[b, h, r])):
                    kb = int(f_idx[b, h, r, t])
                    grid[b, h, rows, kb * bk : (kb + 1) * bk] = True
                for t in range(int(c_num[b, h, r])):
                    col_grid[b, h, rows, int(c_idx[b, h, r, t])] = True
    cols = col_grid[:, :, :n_q, :n_k]
    if causal:  # tiles carry causality in their patterns; columns get it here
        pos = torch.arange(n_q)[:, None] + (n_k - n_q)
        cols = cols & (torch.arange(n_k)[None, :] <= pos)
    return grid[:, :, :n_q, :n_k] | cols


def block_sparse_naive(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """(out, lse) of softmax attention over ``mask`` (bool, broadcast to (B, H, N_q, N_k)) in fp32: rows
    with no allowed key give out = 0 and lse = -inf. q (B, H, N_q, D); k, v (B, H_kv, N_k, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf, vf = expand_kv(k.float(), q.shape[1]), expand_kv(v.float(), q.shape[1])
    mask = mask.to(q.device)
    if mask.shape[1] not in (1, q.shape[1]):  # a per-kv-head plan: each query head reads its group's row
        mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p @ vf, lse
