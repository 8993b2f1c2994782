"""Per-page key summaries of a growing KV cache (Quest's page metadata), kept up to date incrementally.

The cache (B, H_kv, N, D) is cut into pages of ``page`` tokens from position 0: page ``p`` holds tokens
``[p * page, (p + 1) * page)``, the last page possibly partial. For each page the summary keeps the
elementwise maximum and minimum of its keys over the tokens it holds::

    kmax[b, h, p, d] = max_{t in page p, t < N} k[b, h, t, d]        kmin likewise with min

With a key mask (B, N) (> 0: a real token), padding tokens are left out of the max and min; a page of
padding only has max -inf and min +inf (its scores must be masked by whoever reads it).

Summaries are stored in the cache's dtype (max and min are exact in any dtype). Buffers have a capacity
of whole pages that grows by doubling, so a decode step writes only the pages that changed: appending
tokens to a cache summarised up to ``tokens`` recomputes the page that held token ``tokens - 1`` (if it
was partial) and the new pages, never the earlier ones.

On the GPU, page_topk recomputes a decode step's stale pages inside its fused selection kernel:
:func:`advance` brings the bookkeeping (tokens, grown buffers) up to date and says which pages are stale,
and the kernel writes them (``attnlab.kernels.decode.op.page_select``); :func:`summarize` does both in
PyTorch. ``counter`` holds that kernel's per-row completion counters (zero between launches).

Contract: the cache only grows by appending, and the tokens already summarised do not change. A new
sequence, a cache that was cropped or reordered (beam search) needs a fresh summary (``state=None``).
An update writes into the buffers it shares with the previous summary: keep only the newest one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Pages the buffers hold at least when first made.
MIN_CAPACITY = 64
#: Decode-kernel merge counters kept per (batch, KV head): one per block of up to 64 of a KV group's
#: GROUP * N_q query rows (8: up to 512 rows, e.g. 32 query heads per KV head x 16 queries).
MERGE_SLOTS = 8


@dataclass
class PageSummary:
    """Key min/max per page of a cache. ``kmax``/``kmin``: (B, H_kv, capacity, D) buffers whose first
    :attr:`n_pages` pages are valid; ``tokens``: the cache tokens summarised; ``page``: tokens per page."""

    page: int
    kmax: Tensor
    kmin: Tensor
    tokens: int
    #: int32 zeros, (1 + MERGE_SLOTS) * B * H_kv: the per-row completion counters of the fused selection
    #: kernel (the first B * H_kv) and of the decode kernel's in-launch merge (the rest); the kernels
    #: leave them zero. Made on first use and handed on with the buffers.
    counter: Tensor | None = None

    def _counters(self) -> Tensor:
        if self.counter is None:
            b, h_kv = self.kmax.shape[:2]
            self.counter = torch.zeros(
                (1 + MERGE_SLOTS) * b * h_kv, dtype=torch.int32, device=self.kmax.device
            )
        return self.counter

    def select_counter(self) -> Tensor:
        """The selection kernel's row counters, (B * H_kv,) (made here on first use)."""
        b, h_kv = self.kmax.shape[:2]
        return self._counters()[: b * h_kv]

    def merge_counter(self) -> Tensor:
        """The decode kernel's merge counters (``MERGE_SLOTS`` per (batch, KV head))."""
        b, h_kv = self.kmax.shape[:2]
        return self._counters()[b * h_kv :]

    @property
    def n_pages(self) -> int:
        """Pages holding at least one summarised token: ceil(tokens / page)."""
        return -(-self.tokens // self.page)

    @property
    def capacity(self) -> int:
        return int(self.kmax.shape[2])

    def valid(self) -> tuple[Tensor, Tensor]:
        """(kmax, kmin) views of the valid pages: (B, H_kv, n_pages, D)."""
        n = self.n_pages
        return self.kmax[:, :, :n], self.kmin[:, :, :n]

    def real_pages(self, key_mask: Tensor | None) -> Tensor | None:
        """(B, n_pages) bool: pages holding at least one real token (None without a key mask)."""
        if key_mask is None:
            return None
        n = self.n_pages
        valid = torch.nn.functional.pad(key_mask[:, : self.tokens] > 0, (0, n * self.page - self.tokens))
        return valid.view(valid.shape[0], n, self.page).any(-1)

    def nbytes(self) -> int:
        """Bytes of the summaries' valid pages (what a scoring pass reads)."""
        n = self.n_pages
        return 2 * self.kmax[:, :, :n].numel() * self.kmax.element_size()


def _page_minmax(seg: Tensor, page: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(max, min) over pages of ``page`` tokens of seg (B, H, n, D); the last page may be partial; tokens
    where ``valid`` (B, n) is False are left out."""
    if valid is not None:
        keep = valid[:, None, :, None]
        hi = torch.where(keep, seg, torch.full_like(seg, float("-inf")))
        lo = torch.where(keep, seg, torch.full_like(seg, float("inf")))
        return _page_minmax(hi, page)[0], _page_minmax(lo, page)[1]
    b, h, n, d = seg.shape
    full = n // page
    maxs, mins = [], []
    if full:
        blocks = seg[:, :, : full * page].reshape(b, h, full, page, d)
        maxs.append(blocks.amax(3))
        mins.append(blocks.amin(3))
    if n > full * page:
        tail = seg[:, :, full * page :]
        maxs.append(tail.amax(2, keepdim=True))
        mins.append(tail.amin(2, keepdim=True))
    if len(maxs) == 1:  # (a decode step: only the last page)
        return maxs[0], mins[0]
    return torch.cat(maxs, 2), torch.cat(mins, 2)


def _check(state: PageSummary, k: Tensor, page: int) -> None:
    if not isinstance(state, PageSummary):
        raise TypeError(f"state must be a PageSummary or None, got {type(state).__name__}")
    b, h_kv, n_k, d = k.shape
    want = (b, h_kv, d)
    got = (state.kmax.shape[0], state.kmax.shape[1], state.kmax.shape[3])
    if state.page != page:
        raise ValueError(f"the page summary has page={state.page}, but this call uses page={page}")
    if got != want:
        raise ValueError(
            f"the page summary is of a cache with (B, H_kv, D) = {got}, but k has {want}: pass state=None "
            "for a new cache"
        )
    if state.tokens > n_k:
        raise ValueError(
            f"the page summary covers {state.tokens} tokens but the cache now holds {n_k}: a cache that "
            "shrank (cropped, a new sequence) needs a fresh summary (state=None)"
        )
    if state.kmax.device != k.device or state.kmax.dtype != k.dtype:
        raise ValueError(
            f"the page summary is {state.kmax.dtype} on {state.kmax.device}, the cache {k.dtype} on "
            f"{k.device}: pass state=None for a new cache"
        )


def advance(k: Tensor, page: int, state: PageSummary | None) -> tuple[PageSummary, int]:
    """The summary of the cache ``k`` (B, H_kv, N, D) with buffers grown as needed, but the pages from the
    one holding token ``state.tokens - 1`` onward *not yet recomputed*: returns (summary, first stale
    page); the caller computes pages ``[first, summary.n_pages)`` (:func:`summarize` here, or the fused
    selection kernel on the GPU). ``state=None``: fresh buffers, every page stale."""
    b, h_kv, n_k, d = k.shape
    if page < 1:
        raise ValueError(f"page={page} must be >= 1")
    pages = -(-n_k // page)
    if state is None:
        cap = max(MIN_CAPACITY, pages)
        return PageSummary(page, k.new_empty(b, h_kv, cap, d), k.new_empty(b, h_kv, cap, d), n_k), 0
    _check(state, k, page)
    if state.tokens == n_k:
        return state, pages
    kmax, kmin = state.kmax, state.kmin
    first = state.tokens // page  # the first page that is partial or new
    if pages > state.capacity:
        cap = max(pages, 2 * state.capacity)
        bigger_max = k.new_empty(b, h_kv, cap, d)
        bigger_min = k.new_empty(b, h_kv, cap, d)
        bigger_max[:, :, :first] = kmax[:, :, :first]
        bigger_min[:, :, :first] = kmin[:, :, :first]
        kmax, kmin = bigger_max, bigger_min
    return PageSummary(page, kmax, kmin, n_k, state.counter), first


def summarize(
    k: Tensor, page: int, state: PageSummary | None = None, key_mask: Tensor | None = None
) -> PageSummary:
    """The page summary of the cache ``k`` (B, H_kv, N, D), updated from ``state`` (the summary of an
    earlier, shorter version of the same cache; None: from scratch). Only the pages from the one holding
    token ``state.tokens - 1`` onward are recomputed; the buffers grow by doubling when full.
    ``key_mask`` (B, N): tokens <= 0 are padding, left out of the summaries."""
    summary, first = advance(k, page, state)
    pages = summary.n_pages
    if pages > first:
        valid = None if key_mask is None else key_mask[:, first * page :] > 0
        new_max, new_min = _page_minmax(k[:, :, first * page :], page, valid)
        summary.kmax[:, :, first:pages] = new_max
        summary.kmin[:, :, first:pages] = new_min
    return summary
