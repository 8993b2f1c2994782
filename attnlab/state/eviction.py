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


@dataclass
class StepEvictionState:
    """The state of an eviction policy that evicts at every call (``h2o`` with ``per_step=True``).

    ``kept`` (B, H_kv, K) int32: sorted cache positions each (batch, KV head) kept after the last call;
    ``score`` / ``seen`` (B, H_kv, K) float32, aligned with ``kept``: the attention each kept token has
    accumulated over every query that attended to it (summed over queries, mean over the query heads of the
    KV group) and the number of those queries; ``length``: the cache length of the last call. The next
    call, on a cache of ``N_k >= length`` tokens, attends to the kept tokens and to positions
    ``length .. N_k - 1`` (the tokens appended since), then keeps ``budget`` of them.
    """

    kept: Tensor
    score: Tensor
    seen: Tensor
    length: int

    def check(self, method: str, b: int, h_kv: int, n_k: int) -> None:
        """Raise ValueError when this state cannot belong to a cache (B, H_kv, n_k)."""
        if self.length > n_k:
            raise ValueError(
                f"{method}: the state was made for a {self.length}-token cache but the cache holds {n_k} "
                "tokens: a new sequence needs state=None"
            )
        if tuple(self.kept.shape[:2]) != (b, h_kv):
            raise ValueError(
                f"{method}: the state keeps tokens for (B, H_kv) = {tuple(self.kept.shape[:2])}, but k has "
                f"{(b, h_kv)}: pass state=None for a new cache"
            )

    def candidates(self, n_k: int) -> Tensor:
        """(B, H_kv, K + n_k - length) int64 sorted: the kept tokens then the tokens appended since."""
        b, h_kv = self.kept.shape[:2]
        new = torch.arange(self.length, n_k, device=self.kept.device)
        return torch.cat([self.kept.long(), new.expand(b, h_kv, -1)], dim=2)

    def complete(self) -> bool:
        """True while nothing was evicted: the kept tokens are every position ``0 .. length - 1``."""
        return int(self.kept.shape[2]) == self.length

    def kept_tokens(self, n_k: int) -> int:
        """Tokens per (batch, KV head) an evicting cache holds at length ``n_k``."""
        return int(self.kept.shape[2]) + n_k - self.length

    def rows(self, index: Tensor) -> StepEvictionState:
        """The state of the batch rows ``index`` (1-D int64)."""
        return StepEvictionState(self.kept[index], self.score[index], self.seen[index], self.length)
