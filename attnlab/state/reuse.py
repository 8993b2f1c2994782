"""State of decode methods that reuse an earlier selection: recycled attention, TokenSelect, TidalDecode.

:class:`TokenSet` holds token positions chosen at some step (per batch and KV head) and the cache length
then; :meth:`TokenSet.index` lists them together with the tokens appended since, the form the decode
executors read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenSet:
    """``positions``: (B, H_kv, K) int32 cache positions chosen when the cache held ``n_k`` tokens
    (entries < 0 are holes); ``step``: calls since the choice (methods that refresh on a schedule);
    ``query``: (B, H, D) float32 fingerprint of the queries that chose them (TokenSelect), or None."""

    positions: Tensor
    n_k: int
    step: int = 0
    query: Tensor | None = None

    def check(self, method: str, b: int, h_kv: int, n_k: int) -> None:
        """Raise ValueError when this set cannot belong to a cache (B, H_kv, n_k)."""
        if not isinstance(self.positions, Tensor) or self.positions.dim() != 3:
            raise ValueError(f"{method}: the state's positions must be a (B, H_kv, K) tensor")
        if tuple(self.positions.shape[:2]) != (b, h_kv):
            raise ValueError(
                f"{method}: the state holds positions for (B, H_kv) = {tuple(self.positions.shape[:2])}, but k "
                f"has {(b, h_kv)}: pass state=None for a new cache"
            )
        if self.n_k > n_k:
            raise ValueError(
                f"{method}: the state was chosen on a {self.n_k}-token cache but the cache holds {n_k}: "
                "a new sequence needs state=None"
            )

    def index(self, n_k: int) -> Tensor:
        """(B, H_kv, K + n_k - self.n_k) int32: the chosen positions, then the tokens appended since."""
        b, h_kv = self.positions.shape[:2]
        new = torch.arange(self.n_k, n_k, device=self.positions.device, dtype=torch.int32)
        return torch.cat([self.positions.to(torch.int32), new.expand(b, h_kv, -1)], dim=2)


def sorted_positions(top: Tensor, n_k: int) -> Tensor:
    """(B, H_kv, K) int32: the distinct positions ``top`` (B, H_kv, K) of [0, n_k) in ascending order per
    row, by one sort of the whole tensor as a flat list (each row's positions offset by ``row * n_k``): on
    a GPU a row-wise sort of a few long rows runs one block per row (8 rows of 4096: 34 us on the H100),
    a flat sort spreads over the device."""
    b, h, kk = top.shape
    rows = b * h
    if rows * n_k >= 2**31:  # (offsets past int32)
        return top.sort(dim=-1).values.to(torch.int32)
    offset = torch.arange(0, rows * n_k, n_k, dtype=torch.int32, device=top.device)[:, None]
    flat = (top.reshape(rows, kk).to(torch.int32) + offset).flatten()
    return (flat.sort().values.view(rows, kk) - offset).view(b, h, kk)
