"""``sliding_window``: each query attends to the ``window`` nearest positions behind it, itself included.

Convention (attnlab counts keys, self included)::

    causal, window=3 (x = attends)       non-causal, window=2
    q0: x . . . .                        q0: x x . . .
    q1: x x . . .                        q1: x x x . .
    q2: x x x . .                        q2: . x x x .
    q3: . x x x .                        q3: . . x x x
    q4: . . x x x                        q4: . . . x x

Converting from other libraries' window W: attention-gym ``generate_sliding_window(W)`` and Mistral's
reference mean ``window=W+1`` here; Hugging Face ``sliding_window=W`` and gpt-oss mean ``window=W``;
FlashAttention ``window_size=(left, 0)`` means ``window=left+1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.static import MASK_BACKENDS
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.plans.blocks import BlockRule, TileGrid, diagonal_keys, register_block_rule
from attnlab.reference import masked_softmax_attention
from attnlab.registry import MethodSpec, register


@dataclass(frozen=True)
class SlidingWindowParams(Params):
    """``window``: keys per query on the causal side, self included (>= 1). Default 1024."""

    method = "sliding_window"
    window: int = 1024

    def validate(self) -> None:
        self.check_int("window", minimum=1)


def mask(p: SlidingWindowParams, ctx: MaskContext) -> MaskMod:
    # no |distance| or block index reaches n_q + n_k, so capping there keeps the mask and keeps huge
    # values inside the int32 range of ctx.const
    cap = ctx.n_q + ctx.n_k
    window = ctx.const(min(p.window, cap))

    def sliding_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        d = ctx.distance(q_idx, kv_idx)
        return ctx.causal_ok(d) & (d < window) & (d > -window)

    return sliding_window


def classify(p: SlidingWindowParams, grid: TileGrid) -> tuple[Tensor, Tensor]:
    """(maybe, full) tiles of :func:`mask` (see :mod:`attnlab.plans.blocks`): the mask is
    ``lo <= d <= window - 1`` (``lo = 0`` when causal, else ``1 - window``), exact from a tile's ``d``
    range; a tile's token mask depends only on its diagonal offset (the pattern key)."""
    window = min(p.window, grid.cap)
    return grid.d_range(0 if grid.causal else 1 - window, window - 1)


register_block_rule(mask, BlockRule(classify, diagonal_keys))


def index_mask(params: SlidingWindowParams, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The (N_q, N_k) bool mask written as plain index arithmetic, independently of :func:`mask`.

    Query ``i`` sits at position ``pos = i + N_k - N_q``. It sees the ``window`` keys ``pos - window + 1``
    to ``pos`` (itself and the ``window - 1`` positions behind it) and, when not causal, also the
    ``window - 1`` keys after it, up to ``pos + window - 1``. Keys outside ``0 .. N_k - 1`` do not exist.
    """
    pos = torch.arange(n_q, dtype=torch.int64)[:, None] + (n_k - n_q)
    key = torch.arange(n_k, dtype=torch.int64)[None, :]
    first = pos - params.window + 1
    last = pos if causal else pos + params.window - 1
    return (key >= first) & (key <= last)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: SlidingWindowParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """Softmax attention restricted to ``|p - j| < window`` (and ``j <= p`` when causal), where
    ``p = i + N_k - N_q`` is query i's position: ``window`` keys when causal (fewer near the start),
    ``2 * window - 1`` when not."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, int]]:
    """Windows of n/32 and n/8 keys (at least 64 each), tightest first; one set where both clamp to 64
    (n < 520), so the benchmark never times the same configuration twice."""
    windows = dict.fromkeys((max(64, n // 32), max(64, n // 8)))  # distinct, in order
    return [{"window": w} for w in windows]


SPEC = register(
    MethodSpec(
        name="sliding_window",
        family="static",
        paper="Longformer: The Long-Document Transformer (Beltagy et al., 2020); Mistral 7B",
        summary="local attention to the `window` nearest keys (self included)",
        param_class=SlidingWindowParams,
        reference=reference,
        backends=MASK_BACKENDS,
        patterns=ALL_PATTERNS,
        mask=mask,
        index_mask=index_mask,
        test_params=({"window": 1}, {"window": 3}, {"window": 40}, {"window": 100000}),
        bench_params=_bench,
    )
)
