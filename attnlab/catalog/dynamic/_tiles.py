"""Shared pieces of the dynamic estimators: tile geometry, block pooling, plans from kept tiles, and the
reference that runs an estimated plan.

Conventions (as in ``block_topk``): positions are bottom-right aligned, query ``i`` at ``i + N_k - N_q``;
tiles are ``block x block``; query block ``i`` holds rows ``[i * block, min((i + 1) * block, N_q))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.plans import Plan
from attnlab.reference import masked_softmax_attention

#: Tile sizes the block-sparse executor takes.
BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Geometry:
    """Token ranges of the tiles of an (N_q, N_k) problem, bottom-right aligned positions."""

    n_q: int
    n_k: int
    block: int
    q_first: Tensor  # (NQB,) position of each query block's first row
    q_last: Tensor  # (NQB,) position of its last row
    k_first: Tensor  # (NKB,)
    k_last: Tensor  # (NKB,)

    @property
    def offset(self) -> int:
        return self.n_k - self.n_q

    @property
    def nqb(self) -> int:
        return int(self.q_first.shape[0])

    @property
    def nkb(self) -> int:
        return int(self.k_first.shape[0])

    def allowed(self, causal: bool) -> Tensor:
        """bool (NQB, NKB): tiles holding some computed pair of the dense pattern."""
        if not causal:
            return torch.ones(self.nqb, self.nkb, dtype=torch.bool, device=self.q_first.device)
        return self.k_first[None, :] <= self.q_last[:, None]

    def whole(self) -> Tensor:
        """bool (NQB, NKB): tiles entirely in every row's causal past (full tiles of a causal plan)."""
        return self.k_last[None, :] <= self.q_first[:, None]

    def local(self) -> Tensor:
        """long (NQB,): the key block holding each query block's last position (clamped into the keys)."""
        return torch.clamp(self.q_last, 0, self.n_k - 1) // self.block

    def local_first(self) -> Tensor:
        """long (NQB,): the key block holding each query block's first position (clamped into the keys)."""
        return torch.clamp(self.q_first, 0, self.n_k - 1) // self.block

    def local_span(self) -> Tensor:
        """bool (NQB, NKB): the query block's diagonal span, the key blocks holding one of its positions
        ``[q_first, q_last]`` (clamped into the keys): one block when ``N_k - N_q`` is a multiple of
        ``block``, else up to two (the query block then straddles two key blocks, and the block of its
        last position alone would miss its first rows' own positions)."""
        j = torch.arange(self.nkb, device=self.q_first.device)[None, :]
        return (j >= self.local_first()[:, None]) & (j <= self.local()[:, None])


def top_entries(ranked: Tensor, count: int, extra: Tensor) -> Tensor:
    """bool like ``ranked`` (..., M): the ``count + extra`` highest entries of each row (``extra`` long,
    broadcastable to the rows ``ranked.shape[:-1]``; at most M in all), those ranked -inf left out.

    The estimators with a forced diagonal span count it in their budget as the block of the query block's
    last position; ``extra`` (:func:`span_extra`) is the one more block the span adds when it straddles two
    key blocks, kept on top of the budget (so the scored share of the budget is the same on every row)."""
    m = ranked.shape[-1]
    most = min(m, count + (int(extra.max()) if extra.numel() else 0))
    top = torch.topk(ranked, most, dim=-1)
    within = torch.arange(most, device=ranked.device) < (count + extra)[..., None]
    keep = within & (top.values > float("-inf"))
    return torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top.indices, keep)


def span_extra(forced: Tensor, forced_last: Tensor) -> Tensor:
    """long (...): forced blocks per row (bool (..., M)) beyond those of the same rule applied to the query
    block's last position alone (``forced_last``): 0, or 1 where the diagonal span adds a block."""
    return forced.sum(-1) - forced_last.sum(-1)


def geometry(n_q: int, n_k: int, block: int, device: torch.device) -> Geometry:
    """The tile ranges of an (n_q, n_k) problem in ``block``-sized tiles."""
    nqb, nkb = -(-n_q // block), -(-n_k // block)
    off = n_k - n_q
    iq = torch.arange(nqb, device=device)
    ik = torch.arange(nkb, device=device)
    return Geometry(
        n_q,
        n_k,
        block,
        iq * block + off,
        torch.clamp((iq + 1) * block, max=n_q) - 1 + off,
        ik * block,
        torch.clamp((ik + 1) * block, max=n_k) - 1,
    )


def pool_mean(x: Tensor, block: int) -> Tensor:
    """Mean of x (B, H, N, D) over blocks of ``block`` rows (the last block over its real rows), fp32."""
    b, h, n, d = x.shape
    nb = -(-n // block)
    pad = nb * block - n
    # fp32 accumulation over the input dtype (no fp32 copy of x; padding only for a ragged tail)
    xp = x.detach() if pad == 0 else torch.nn.functional.pad(x.detach(), (0, 0, 0, pad))
    sums = xp.reshape(b, h, nb, block, d).sum(3, dtype=torch.float32)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts[:, None]


def pool_sum(x: Tensor, block: int) -> Tensor:
    """Sum of x (..., N) over consecutive groups of ``block`` entries (zero-padded at the end)."""
    n = x.shape[-1]
    nb = -(-n // block)
    xf = torch.nn.functional.pad(x, (0, nb * block - n))
    return xf.view(*x.shape[:-1], nb, block).sum(-1)


def causal_mask_mod(offset: int) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The bottom-right causal rule ``kv_idx <= q_idx + offset`` as a FlexAttention-style mask_mod."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx + offset

    return mask_mod


def tiles_plan(tiles: Tensor, geo: Geometry, causal: bool) -> Plan:
    """The dynamic plan visiting ``tiles`` (bool (B, H, NQB, NKB)); causal: tiles outside the causal
    pattern are dropped and tiles straddling the diagonal are partial with the causal rule."""
    if causal:
        tiles = tiles & geo.allowed(True)
        whole = geo.whole()
        return Plan(geo.n_q, geo.n_k, True, geo.block, geo.block, tiles & whole, tiles & ~whole,
                    causal_mask_mod(geo.offset), kind="dynamic", rule="causal")  # fmt: skip
    return Plan(geo.n_q, geo.n_k, False, geo.block, geo.block, tiles, torch.zeros_like(tiles), None,
                kind="dynamic")  # fmt: skip


def last_query_probs(q: Tensor, k: Tensor, last_q: int, scale: float) -> tuple[Tensor, Tensor]:
    """(A (B, H, R, N_k) fp32: softmax of the last R = min(last_q, N_q) queries over the keys each may see
    (bottom-right causal), their positions (R,)). A row that sees no key is all zeros. GQA: each query
    head uses its kv head (k is not repeated in the caller's memory)."""
    h, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    r = min(last_q, n_q)
    kf = k.detach().float().repeat_interleave(h // k.shape[1], dim=1)
    s = (q[:, :, n_q - r :].detach().float() @ kf.transpose(-1, -2)) * scale
    pos = torch.arange(n_q - r, n_q, device=q.device) + (n_k - n_q)
    visible = torch.arange(n_k, device=q.device)[None, :] <= pos[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0), pos


def diagonal_sums(a: Tensor, pos: Tensor) -> Tensor:
    """slash[o] = sum_r a[..., r, pos_r - o] for distances o in [0, N_k) -> (..., N_k)."""
    n_k = a.shape[-1]
    o = torch.arange(n_k, device=a.device)
    j = pos[:, None] - o[None, :]  # (R, N_k)
    valid = j >= 0
    idx = j.clamp_min(0).expand(*a.shape[:-2], -1, -1)
    return (torch.gather(a, -1, idx) * valid).sum(-2)


def plan_reference(
    estimate: Callable[..., Plan],
) -> Callable[..., Tensor]:
    """The reference of a dynamic method: softmax attention over the pairs of ``estimate``'s plan."""

    def reference(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        params: object,
        *,
        causal: bool,
        scale: float,
        upcast: bool = True,
    ) -> Tensor:
        """Softmax attention over the pairs of the method's estimated plan (dense, from its token mask);
        fp32 when ``upcast``. Rows with no computed pair give zeros."""
        mask = estimate(q, k, params, causal=causal, scale=scale).dense_mask()
        return masked_softmax_attention(q, k, v, scale=scale, mask=mask, upcast=upcast)

    return reference
