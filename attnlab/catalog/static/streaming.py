"""``streaming``: StreamingLLM's pattern — the first ``sinks`` tokens plus a sliding window.

::

    causal, sinks=1, window=2 (x = attends)
    q0: x . . . . .
    q1: x x . . . .
    q2: x x x . . .
    q3: x . x x . .
    q4: x . . x x .
    q5: x . . . x x

This is the attention pattern only (prefill). StreamingLLM's cache also re-indexes positions by cache
slot, which belongs to the model integration, not to the attention function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.static import MASK_BACKENDS
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.plans.blocks import BlockRule, TileGrid, register_block_rule
from attnlab.reference import masked_softmax_attention
from attnlab.registry import MethodSpec, register


@dataclass(frozen=True)
class StreamingParams(Params):
    """``sinks``: leading keys every query sees (>= 0, default 4, StreamingLLM's start_size);
    ``window``: keys of the local window, self included (>= 1, default 1024)."""

    method = "streaming"
    sinks: int = 4
    window: int = 1024

    def validate(self) -> None:
        self.check_int("sinks", minimum=0)
        self.check_int("window", minimum=1)


def mask(p: StreamingParams, ctx: MaskContext) -> MaskMod:
    # no |distance| or block index reaches n_q + n_k, so capping there keeps the mask and keeps huge
    # values inside the int32 range of ctx.const
    cap = ctx.n_q + ctx.n_k
    sinks = ctx.const(min(p.sinks, cap))
    window = ctx.const(min(p.window, cap))

    def streaming(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        d = ctx.distance(q_idx, kv_idx)
        return ctx.causal_ok(d) & ((kv_idx < sinks) | ((d < window) & (d > -window)))

    return streaming


def classify(p: StreamingParams, grid: TileGrid) -> tuple[Tensor, Tensor]:
    """(maybe, full) tiles of :func:`mask` (see :mod:`attnlab.plans.blocks`), by key block: one wholly
    among the sinks follows the causal rule alone, one wholly past them the window ``lo <= d <= window -
    1``; the block holding the sinks' end is bounded (maybe: causal allows a pair; full: the window covers
    it) and left to the token mask."""
    sinks, window = min(p.sinks, grid.cap), min(p.window, grid.cap)
    c_any, c_all = grid.causal_range()
    w_any, w_all = grid.d_range(0 if grid.causal else 1 - window, window - 1)
    maybe = torch.where(grid.k_first >= sinks, w_any, c_any)
    full = torch.where(grid.k_last < sinks, c_all, w_all)
    return maybe, full


def keys(p: StreamingParams, grid: TileGrid) -> tuple[Tensor, ...]:
    """Pattern keys: the diagonal offset and the key block's kind (among / past / across the sinks'
    end). Across the sinks' end, a tile whose causal and window terms are each constant (far from the
    diagonal: the mask is ``j < sinks`` or a constant) is keyed by those terms' values alone."""
    sinks, window = min(p.sinks, grid.cap), min(p.window, grid.cap)
    c_any, c_all = grid.causal_range()
    w_any, w_all = grid.d_range(0 if grid.causal else 1 - window, window - 1)
    kind = torch.where(grid.k_last < sinks, 0, torch.where(grid.k_first >= sinks, 1, 2))
    constant = (c_all | ~c_any) & (w_all | ~w_any) & (kind == 2)
    d0 = torch.where(constant, 0, grid.d0)
    kind = torch.where(constant, 3 + 2 * c_all.to(torch.int64) + w_all.to(torch.int64), kind)
    return d0, kind


register_block_rule(mask, BlockRule(classify, keys))


def index_mask(params: StreamingParams, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The (N_q, N_k) bool mask written as plain index arithmetic, independently of :func:`mask`.

    Query ``i`` sits at position ``pos = i + N_k - N_q``. It sees the sink keys ``0 .. sinks - 1`` and
    the local keys ``pos - window + 1 .. pos + window - 1`` (``window`` keys behind it, itself included,
    and ``window - 1`` ahead). When causal, every key after ``pos`` is removed, sinks included: a query
    at position 0 sees only key 0, and a query at a negative position (cross, N_q > N_k) sees nothing.
    """
    pos = torch.arange(n_q, dtype=torch.int64)[:, None] + (n_k - n_q)
    key = torch.arange(n_k, dtype=torch.int64)[None, :]
    sink = key < params.sinks
    local = (key >= pos - params.window + 1) & (key <= pos + params.window - 1)
    allowed = sink | local
    return allowed & (key <= pos) if causal else allowed


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: StreamingParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """Softmax attention restricted to keys ``j < sinks`` or ``|p - j| < window`` (``p = i + N_k - N_q``),
    and ``j <= p`` when causal: at most ``sinks + window`` keys per causal query."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, int]]:
    return [{"sinks": 4, "window": max(64, n // 32)}, {"sinks": 4, "window": max(64, n // 8)}]


SPEC = register(
    MethodSpec(
        name="streaming",
        family="static",
        paper="Efficient Streaming Language Models with Attention Sinks (Xiao et al., 2023)",
        summary="attention sinks (first tokens) + sliding window",
        param_class=StreamingParams,
        reference=reference,
        backends=MASK_BACKENDS,
        patterns=ALL_PATTERNS,
        mask=mask,
        index_mask=index_mask,
        test_params=({"sinks": 1, "window": 2}, {"sinks": 4, "window": 16}, {"sinks": 0, "window": 5}),
        bench_params=_bench,
    )
)
