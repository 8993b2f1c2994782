"""The block selection rule in PyTorch (the reference, and the route on CPUs and for ``mass`` > 0)."""

from __future__ import annotations

import torch
from torch import Tensor


def block_geometry(
    nqb: int, nkb: int, n_q: int, n_k: int, block: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q_first, q_last, k_first, k_last): each query block's first / last position (bottom-right
    aligned: query ``i`` at ``i + N_k - N_q``) and each key block's first / last key inside the matrix."""
    offset = n_k - n_q
    iq = torch.arange(nqb, device=device)
    q_first = iq * block + offset
    q_last = torch.clamp((iq + 1) * block, max=n_q) - 1 + offset
    k_first = torch.arange(nkb, device=device) * block
    k_last = torch.clamp(k_first + block, max=n_k) - 1
    return q_first, q_last, k_first, k_last


def forced_blocks(
    q_first: Tensor,
    q_last: Tensor,
    nkb: int,
    n_k: int,
    block: int,
    *,
    sink: bool,
    local: bool,
    allowed: Tensor,
) -> tuple[Tensor, Tensor]:
    """(forced bool (NQB, NKB), extra long (NQB,)): the allowed forced tiles (block 0 with ``sink``; with
    ``local`` the key blocks from the one holding ``clamp(q_first)`` to the one holding ``clamp(q_last)``,
    positions clamped into the keys) and, per row, how many of them the budget does not count (1 where
    the span's first block is a forced tile that neither the sink nor the last position's block is)."""
    dev = allowed.device
    j = torch.arange(nkb, device=dev)[None, :]
    forced = torch.zeros(q_first.shape[0], nkb, dtype=torch.bool, device=dev)
    counted = torch.zeros_like(forced)
    if sink:
        forced |= j == 0
        counted |= j == 0
    if local:
        first = (torch.clamp(q_first, 0, n_k - 1) // block)[:, None]
        last = (torch.clamp(q_last, 0, n_k - 1) // block)[:, None]
        forced |= (j >= first) & (j <= last)
        counted |= j == last
    forced &= allowed
    return forced, forced.sum(-1) - (counted & allowed).sum(-1)


def select_blocks_naive(
    score: Tensor,
    *,
    n_q: int,
    n_k: int,
    block: int,
    topk: int,
    mass: float = 0.0,
    causal: bool,
    sink: bool,
    local: bool,
) -> tuple[Tensor, Tensor]:
    """(full, partial), bool (B, H, NQB, NKB), of the fp32 block scores ``score`` (B, H, NQB, NKB):

    - allowed tiles: every tile, or when ``causal`` those whose first key is at or before the query
      block's last position; ``score`` counts only there (-inf elsewhere);
    - forced (kept whatever their score, when allowed): block 0 (``sink``) and the query block's diagonal
      span (``local``): the key blocks holding one of its positions ``[q_first, q_last]``, one block, or
      two when ``N_k - N_q`` is not a multiple of ``block`` (the query block straddles two key blocks);
    - budget: ``topk`` counts the sink and the span's block of the query block's last position (so
      ``topk >= sink + local`` keeps every forced tile); the span's other block, when it has two, comes on
      top: such a row keeps up to ``topk + 1`` tiles (the scored share, ``topk - sink - local``, is
      the same on every row);
    - kept: the row's budget of highest ranked tiles with the forced ones ranked first (``torch.topk``;
      among equal scores at the cut, which one is kept is unspecified), or with ``mass`` > 0 the fewest
      highest whose softmax share of the row reaches ``mass`` (at most the budget), plus the forced ones;
      a kept tile must be allowed with a finite score, or forced;
    - causal: a kept tile lying wholly at or before the query block's first position is full, the others
      (straddling the diagonal) partial; non-causal: every kept tile full."""
    nqb, nkb = score.shape[-2:]
    dev = score.device
    q_first, q_last, k_first, k_last = block_geometry(nqb, nkb, n_q, n_k, block, dev)
    allowed = torch.ones(nqb, nkb, dtype=torch.bool, device=dev)
    if causal:
        allowed = k_first[None, :] <= q_last[:, None]
    score = score.masked_fill(~allowed, float("-inf"))
    forced, extra = forced_blocks(q_first, q_last, nkb, n_k, block, sink=sink, local=local, allowed=allowed)
    ranked = score.masked_fill(forced, float("inf"))
    most = min(topk + int(extra.max()), nkb)
    top = torch.topk(ranked, most, dim=-1)
    within = torch.arange(most, device=dev) < (topk + extra)[:, None]  # (NQB, most): the row's budget
    keep = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top.indices, within.expand_as(top.indices))
    if mass > 0:
        # the fewest highest blocks whose softmax share reaches `mass`, forced blocks counted first
        share = torch.softmax(score, dim=-1).nan_to_num(0.0)
        shares = torch.gather(share, -1, top.indices)
        before = torch.cumsum(shares, -1) - shares
        keep = torch.zeros_like(keep).scatter_(-1, top.indices, (before < mass) & within)
        keep |= forced[None, None]
    keep &= allowed & torch.isfinite(score) | forced
    if not causal:
        return keep, torch.zeros_like(keep)
    whole = k_last[None, :] <= q_first[:, None]
    return keep & whole, keep & ~whole
