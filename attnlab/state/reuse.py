"""State of decode methods that reuse an earlier selection: recycled attention, TokenSelect, TidalDecode.

:class:`TokenSet` holds token positions chosen at some step (per batch and KV head) and the cache length
then; :meth:`TokenSet.index` lists them together with the tokens appended since, the form the decode
executors read. Each set names the method that made it (``method``): the three methods read their positions
differently (tokenselect's hold holes, recycled's count steps), so a method refuses another's set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenSet:
    """``positions``: (B, H_kv, K) int32 cache positions chosen when the cache held ``n_k`` tokens
    (entries < 0 are holes; in no particular order: the decode executors read a list in any order);
    ``step``: calls since the choice (methods that refresh on a schedule); ``query``: (B, H, D) float32
    fingerprint of the queries that chose them (TokenSelect), or None; ``method``: the method that made the
    set ("recycled", "tokenselect", "tidal"; None for a set built by hand, which any of them reads)."""

    positions: Tensor
    n_k: int
    step: int = 0
    query: Tensor | None = None
    method: str | None = None

    def check(self, method: str, b: int, h_kv: int, n_k: int) -> None:
        """Raise ValueError when this set cannot belong to a cache (B, H_kv, n_k) of ``method``."""
        if self.method is not None and self.method != method:
            raise ValueError(
                f"{method}: the state is a TokenSet made by method {self.method!r}, but it was given to "
                f"{method!r}, which reads only its own: pass the state {method!r} returned, or state=None"
            )
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

    def mask(self, n_k: int) -> Tensor:
        """(B, H_kv, n_k) bool: the chosen positions (holes left out) and the tokens appended since, the
        tokens :meth:`index` lists (for references that mask dense attention)."""
        b, h_kv = self.positions.shape[:2]
        out = torch.zeros(b, h_kv, n_k + 1, dtype=torch.bool, device=self.positions.device)
        out.scatter_(2, torch.where(self.positions >= 0, self.positions, n_k).long(), True)
        out[..., self.n_k :] = True
        return out[..., :n_k]
