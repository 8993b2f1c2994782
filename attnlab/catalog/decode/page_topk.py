"""``page_topk``: Quest (Tang et al., 2024): per-page key min/max, the pages with the highest upper bound.

Selection (per batch and KV head, every step; fp32 whatever the input dtype)::

    cache pages of ``page`` tokens from position 0 (the last one possibly partial)
    kmax[p], kmin[p] = elementwise max / min of the keys of page p        (state: PageSummary)
    u[r, p] = sum_d max(q_r[d] * kmax[p, d], q_r[d] * kmin[p, d])          (>= q_r . k for every k in p)
    score[p] = max over the group's query rows r of u[r, p]  (reduce="max"; "mean": their mean)
    keep the budget // page pages with the highest score; the pages holding the step's query positions
    (N_k - N_q .. N_k - 1) are always kept (Quest's kernel always adds the current page)

then exact causal softmax attention over the kept pages' tokens. Budget in tokens (a multiple of
``page`` is used: budget // page pages); budget >= N_k, or a cache of at most budget // page pages, runs
exact attention. Ties in the scores: ``torch.topk``'s choice (PyTorch and split paths), the lowest pages
(Triton ranking).

Fast path (GPU; ``SMALL_SELECT`` / ``LARGE_SELECT`` choose among equivalent selections, the fastest
measured by default): ``attnlab.kernels.decode.op.page_select`` with ``rank="triton", dot=True``: one
launch recomputes the summaries of the pages a decode step appended to and scores every page (the bounds of
all query heads of a KV group as two tensor-core products in one program), then attnlab's row top-k
(an order-preserving int32 image of the scores, a search for the ``keep``-th value and one scan); then one
split-K decode launch and its merge (the kernel can merge in the same launch, on counters kept in the
state: ``op.FUSED_MERGE``, off, measured slower): four launches, no host synchronisation, fixed shapes
(CUDA-graph capturable). Alternatives: the same in one fused launch (the row's last scoring program ranks it), or the
split path (the summary update in PyTorch, the page-score kernel, ``torch.topk``, ties: its choice).
Bytes per step: the summaries, 2 x N / page x D per KV head (1 / page of the K/V cache: 1/16 at page 16),
plus the selected K/V, 2 x budget x D per KV head.

Conventions of other code: Quest's page 16 and budgets 512-4096 are the defaults here. Quest's emulation
(evaluation/quest_attention.py) selects per query head after ``repeat_kv`` and forces no page; its
kernels (MHA only) take top-(budget - 1) pages besides the current one. With GQA a group here shares one
choice (so its K/V are read once): ``reduce="max"`` keeps a page if any head of the group may attend to it
strongly, the conservative analogue of per-head selection. Quest keeps its first two layers dense; which
layers run which method is the model plan's business (attnlab.hf).

State: :class:`attnlab.state.PageSummary` (summaries plus the number of tokens summarised); a step that
appends tokens recomputes only the last (partial) page and the new ones. Padding (``key_mask``) is left
out of the summaries, and pages of padding only are never chosen (unless the budget exceeds the real
pages; the executor then still hides their tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.decode_select import Selection, torch_decode, triton_decode
from attnlab.catalog.decode._common import (
    CAUSAL_PATTERNS,
    KEY_MASK,
    attend_reference,
    require_causal,
    selection_reference,
)
from attnlab.core import Call, MethodSpec
from attnlab.errors import InputError
from attnlab.params import Params
from attnlab.state.pages import PageSummary, advance, summarize

REDUCES = ("max", "mean")
#: ``SMALL_SELECT`` applies up to this many scores (B * H_kv * pages), ``LARGE_SELECT`` above it.
FUSED_MAX_SCORES = 1 << 18
#: The fast path's selection up to ``FUSED_MAX_SCORES`` scores (``SMALL_SELECT``) and above it
#: (``LARGE_SELECT``): ``(rank, dot)`` of :func:`attnlab.kernels.decode.op.page_select` (rank "fused": one
#: launch; "triton": the kernel scores and updates the step's summaries, attnlab's row top-k ranks, two
#: launches; dot: the bounds as tensor-core products), or None: the split path (summary update in PyTorch,
#: the page-score kernel, ``torch.topk``). Every choice is the same rule (exactly, up to the bounds'
#: summation order and ties); they differ in speed only. Measured on the H100 (5ae368a, 128K, GQA 32:8,
#: page 16, budget 4096, the whole step in a CUDA graph), B=1 / B=8: two launches with tensor-core bounds
#: 60 / 197 us; two launches elementwise 63 / 221; fused with tensor-core bounds 75 / 322; fused
#: elementwise 79 / 378; split 118 / 273. The fused launch loses because its scoring programs carry the
#: ranking code (a row of scores in registers) and run far below bandwidth; two launches win everywhere.
SMALL_SELECT: tuple[str, bool] | None = ("triton", True)
LARGE_SELECT: tuple[str, bool] | None = ("triton", True)


#: The fused / two-launch selection holds the group's query rows (GROUP * N_q) in one register tile: above
#: this many rows a call takes the split path (the page-score kernel loops over the rows), same pages.
FAST_SELECT_MAX_ROWS = 64


def fast_select_mode(n_scores: int) -> tuple[str, bool] | None:
    """The fast path's selection for ``n_scores`` = B * H_kv * pages (see ``SMALL_SELECT``)."""
    return SMALL_SELECT if n_scores <= FUSED_MAX_SCORES else LARGE_SELECT


@dataclass(frozen=True)
class PageTopkParams(Params):
    """``budget``: tokens attended per (batch, KV head), pages of the step's queries included (default
    4096; >= the cache length: exact attention). ``page``: tokens per page, a power of two in [1, 256]
    (default 16, Quest's). ``reduce``: how the query rows of a GQA group combine their page bounds into
    the group's score, "max" (default) or "mean"."""

    method = "page_topk"
    budget: int = 4096
    page: int = 16
    reduce: str = "max"

    def validate(self) -> None:
        self.check_int("budget", minimum=1)
        self.check_int("page", minimum=1, maximum=256)
        if self.page & (self.page - 1):
            raise self._fail("page", self.page, "a power of two in [1, 256]")
        if self.reduce not in REDUCES:
            raise self._fail("reduce", self.reduce, f"one of {', '.join(REDUCES)}")


def page_count(n_q: int, n_k: int, p: PageTopkParams) -> tuple[int, int, int] | None:
    """(pages in the cache, first forced page, pages kept) or None when the call runs exact attention."""
    if p.budget >= n_k:
        return None
    n_pages = -(-n_k // p.page)
    first_forced = max(0, n_k - n_q) // p.page
    keep = min(n_pages, max(p.budget // p.page, n_pages - first_forced))
    return None if keep >= n_pages else (n_pages, first_forced, keep)


def _scores_torch(q: Tensor, kmax: Tensor, kmin: Tensor, reduce: str) -> Tensor:
    """u = relu(q) . kmax + min(q, 0) . kmin (the same bound: q_d > 0 takes the max, else the min), fp32,
    reduced over each group's query rows: (B, H_kv, n_pages)."""
    b, h, n_q, d = q.shape
    h_kv = kmax.shape[1]
    qg = q.float().reshape(b, h_kv, (h // h_kv) * n_q, d)
    pos = qg.clamp(min=0)
    u = pos @ kmax.float().transpose(-1, -2) + (qg - pos) @ kmin.float().transpose(-1, -2)
    return u.amax(2) if reduce == "max" else u.mean(2)


def _top_pages(scores: Tensor, first_forced: int, keep: int, real: Tensor | None = None) -> Tensor:
    if real is not None:  # pages of padding only: never chosen over a real one
        scores = scores.masked_fill(~real[:, None, :], float("-inf"))
    scores[..., first_forced:] = float("inf")
    return torch.topk(scores, keep, dim=-1, sorted=False).indices.to(torch.int32)


def _checked_state(state: Any) -> PageSummary | None:
    if state is not None and not isinstance(state, PageSummary):
        raise InputError(
            f"page_topk: state must be the PageSummary of an earlier step or None, got {type(state).__name__}"
        )
    return state


def _state(state: Any, k: Tensor, p: PageTopkParams, key_mask: Tensor | None) -> PageSummary:
    try:
        return summarize(k, p.page, _checked_state(state), key_mask)
    except InputError:  # (already says so; an InputError is a ValueError too)
        raise
    except ValueError as e:
        raise InputError(f"page_topk: {e}") from None


def _fast_select(
    q: Tensor, k: Tensor, p: PageTopkParams, state: Any, key_mask: Tensor | None, counts: tuple[int, int, int],
    mode: tuple[str, bool] = ("fused", False),
) -> tuple[Tensor, PageSummary]:  # fmt: skip
    """The GPU path: one launch of the fused selection kernel, which also recomputes the summaries of the
    pages this step appended to (a decode step: the last page); longer updates (a first call, a chunk of
    many tokens) go through :func:`summarize` first."""
    from attnlab.kernels.decode.op import MAX_FUSED_UPDATE, page_select

    n_pages, first_forced, keep = counts
    prev = _checked_state(state)
    if prev is not None:
        prev.select_counter()  # made once and handed on (a CUDA graph replays with the same counters)
    if prev is None or n_pages - prev.tokens // p.page > MAX_FUSED_UPDATE:
        summary, first = _state(prev, k, p, key_mask), n_pages
    else:
        try:
            summary, first = advance(k, p.page, prev)
        except ValueError as e:
            raise InputError(f"page_topk: {e}") from None
    index, _ = page_select(
        q, k, summary.kmax, summary.kmin, summary.select_counter(), p.page, keep, first_forced, first,
        p.reduce == "max", key_mask, dot=mode[1], rank=mode[0],
    )  # fmt: skip
    return index, summary


def select(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any, fast: bool
) -> tuple[Selection | None, PageSummary]:
    """The pages of this step (module docstring) and the updated page summary. ``fast``: the fused Triton
    selection kernel (summary update of the step's pages, bounds, top pages in one launch, no host
    synchronisation) or another :func:`fast_select_mode` (``SMALL_SELECT`` up to ``FUSED_MAX_SCORES``
    scores, ``LARGE_SELECT`` above); else the summary in PyTorch, the matmul form of the bound and ``torch.topk``."""
    p: PageTopkParams = call.params  # type: ignore[assignment]
    key_mask = extra.get("key_mask")
    counts = page_count(q.shape[2], k.shape[2], p)
    if counts is None:
        return None, _state(state, k, p, key_mask)
    rows = (q.shape[1] // k.shape[1]) * q.shape[2]
    mode = (
        fast_select_mode(k.shape[0] * k.shape[1] * counts[0])
        if fast and rows <= FAST_SELECT_MAX_ROWS
        else None
    )
    if mode is not None:
        index, summary = _fast_select(q, k, p, state, key_mask, counts, mode)
        return Selection(index, p.page, counter=summary.merge_counter()), summary
    summary = _state(state, k, p, key_mask)
    n_pages, first_forced, keep = counts
    if fast:  # the split path (LARGE_SELECT None)
        from attnlab.kernels.decode.op import page_scores

        scores = page_scores(q, summary.kmax, summary.kmin, n_pages, p.reduce == "max")
    else:
        scores = _scores_torch(q, *summary.valid(), p.reduce)
    index = _top_pages(scores, first_forced, keep, summary.real_pages(key_mask))
    return Selection(index, p.page), summary


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: PageTopkParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, PageSummary]:
    """Quest page selection from scratch (module docstring): page min/max of the whole cache and the
    elementwise bound ``sum_d max(q_d kmax_d, q_d kmin_d)`` in fp32, group reduce, top pages (query pages
    forced; padding left out of the summaries, pages of padding only never chosen), then causal softmax
    attention over their real tokens (fp32 when ``upcast``). The incoming state is ignored (the reference
    recomputes everything); returns (out, the page summary of k)."""
    require_causal("page_topk", causal)
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    new_state = summarize(k, params.page, None, key_mask)
    counts = page_count(n_q, n_k, params)
    if counts is None:
        return attend_reference(q, k, v, None, scale=scale, upcast=upcast, key_mask=key_mask), new_state
    n_pages, first_forced, keep = counts
    real = torch.ones(b, n_k, dtype=torch.bool, device=k.device) if key_mask is None else key_mask > 0
    real = torch.nn.functional.pad(real, (0, n_pages * params.page - n_k))  # past the end: not real
    keys = torch.nn.functional.pad(k.float(), (0, 0, 0, n_pages * params.page - n_k))
    keys = keys.view(b, h_kv, n_pages, params.page, d)
    real_tok = real.view(b, 1, n_pages, params.page, 1)
    kmax = keys.masked_fill(~real_tok, float("-inf")).amax(3)
    kmin = keys.masked_fill(~real_tok, float("inf")).amin(3)
    qr = q.float().reshape(b, h_kv, 1, (h // h_kv) * n_q, d)
    u = torch.maximum(qr * kmax[:, :, :, None], qr * kmin[:, :, :, None]).sum(-1)  # (B, H_kv, P, rows)
    score = u.amax(-1) if params.reduce == "max" else u.mean(-1)
    idx = _top_pages(score, first_forced, keep, real.view(b, n_pages, params.page).any(-1))
    sel = Selection(idx, params.page)
    out = selection_reference(q, k, v, sel, scale=scale, upcast=upcast, key_mask=key_mask)
    return out, new_state


def _bench(n: int) -> list[dict[str, int]]:
    return [{"budget": 4096}, {"budget": 1024}]


SPEC = MethodSpec(
    name="page_topk",
    family="decode",
    paper="Quest (Tang et al., 2024)",
    summary="decode: per-page key min/max summaries (kept up to date), top pages by upper-bound score",
    param_class=PageTopkParams,
    reference=reference,
    backends=(triton_decode(select), torch_decode(select)),
    patterns=CAUSAL_PATTERNS,
    test_params=({"budget": 32, "page": 4}, {"budget": 24, "page": 8, "reduce": "mean"}),
    bench_params=_bench,
    inputs=(KEY_MASK,),
    stateful=True,
)
