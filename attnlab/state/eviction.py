"""The state of an eviction policy (SnapKV, H2O): which prompt tokens survive, per (batch, KV head).

Eviction decides once, at the first call (the prefill, or the first decode step when the method only sees
decoding): of the ``prefix`` tokens then in the cache, each (batch, KV head) keeps ``kept`` (sorted token
indices). Every later call attends to the kept tokens and to every token appended since (positions
``prefix .. N_k - 1``), as kvpress does: it compresses the prompt's cache and keeps what is generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EvictionState:
    """``kept``: (B, H_kv, K) int32 sorted indices of the prompt tokens kept (None: all of them, the budget
    covered the prompt); ``prefix``: the prompt's length (tokens present when the choice was made)."""

    kept: Tensor | None
    prefix: int

    def check(self, method: str, b: int, h_kv: int, n_k: int) -> None:
        """Raise ValueError when this state cannot belong to a cache (B, H_kv, n_k)."""
        if self.prefix > n_k:
            raise ValueError(
                f"{method}: the state was made for a {self.prefix}-token prompt but the cache holds {n_k} "
                "tokens: a new sequence needs state=None"
            )
        if self.kept is not None and tuple(self.kept.shape[:2]) != (b, h_kv):
            raise ValueError(
                f"{method}: the state keeps tokens for (B, H_kv) = {tuple(self.kept.shape[:2])}, but k has "
                f"{(b, h_kv)}: pass state=None for a new cache"
            )

    def index(self, n_k: int) -> Tensor | None:
        """(B, H_kv, K + n_k - prefix) int32: the kept prompt tokens then the tokens appended since (None:
        every token)."""
        if self.kept is None:
            return None
        b, h_kv = self.kept.shape[:2]
        new = torch.arange(self.prefix, n_k, device=self.kept.device, dtype=torch.int32)
        return torch.cat([self.kept, new.expand(b, h_kv, -1)], dim=2)

    def kept_tokens(self, n_k: int) -> int:
        """Tokens per (batch, KV head) an evicting cache would hold at length ``n_k``."""
        return (self.prefix if self.kept is None else int(self.kept.shape[2])) + n_k - self.prefix
