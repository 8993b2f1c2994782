"""``dilated``: a sliding window with holes — every ``dilation``-th position, ``window`` keys per side.

::

    causal, window=3, dilation=2 (x = attends)
    q0: x . . . . . .
    q1: . x . . . . .
    q2: x . x . . . .
    q3: . x . x . . .
    q4: x . x . x . .
    q5: . x . x . x .
    q6: . . x . x . x

Longformer's dilated sliding window. attention-gym's ``generate_dilated_sliding_window(W, r)`` (non-causal,
``|q - kv| <= W`` and ``|q - kv| % r == 0``) equals ``window = W // r + 1`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attnlab.catalog.static import MASK_BACKENDS
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.reference import masked_softmax_attention
from attnlab.registry import MethodSpec, register


@dataclass(frozen=True)
class DilatedParams(Params):
    """``window``: keys per side, self included (>= 1, default 512); ``dilation``: stride between them
    (>= 1, default 2; 1 is ``sliding_window``). The window spans ``(window - 1) * dilation + 1`` positions."""

    method = "dilated"
    window: int = 512
    dilation: int = 2

    def validate(self) -> None:
        self.check_int("window", minimum=1)
        self.check_int("dilation", minimum=1)


def mask(p: DilatedParams, ctx: MaskContext) -> MaskMod:
    dilation = ctx.const(p.dilation)
    span = ctx.const(p.window * p.dilation)

    def dilated(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        d = ctx.distance(q_idx, kv_idx)
        return ctx.causal_ok(d) & (d < span) & (d > -span) & (d % dilation == 0)

    return dilated


def reference(
    q: Tensor, k: Tensor, v: Tensor, params: DilatedParams, *, causal: bool, scale: float, upcast: bool = True
) -> Tensor:
    """Softmax attention restricted to ``p - j = m * dilation`` for ``|m| < window``
    (``p = i + N_k - N_q``; ``m >= 0`` when causal)."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, int]]:
    return [{"window": max(32, n // 64), "dilation": 2}, {"window": max(32, n // 16), "dilation": 2}]


SPEC = register(
    MethodSpec(
        name="dilated",
        family="static",
        paper="Longformer: The Long-Document Transformer (Beltagy et al., 2020), dilated sliding window",
        summary="sliding window over every `dilation`-th position",
        params=DilatedParams,
        reference=reference,
        backends=MASK_BACKENDS,
        patterns=ALL_PATTERNS,
        mask=mask,
        test_params=(
            {"window": 4, "dilation": 2},
            {"window": 3, "dilation": 3},
            {"window": 50, "dilation": 1},
        ),
        bench_params=_bench,
    )
)
