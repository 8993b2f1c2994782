"""``radial``: Radial Attention's static video mask, a spatial window that halves as frames grow apart.

Tokens are frames of ``frame`` tokens in order (token ``t``: frame ``t // frame``, spatial index
``t % frame``). For a query and a key ``r = |frame_q - frame_k|`` frames apart, the spatial reach is
``window >> floor(log2(max(r, 1)))``: ``window`` for the query's own and the adjacent frames, half of
it 2-3 frames away, a quarter 4-7 frames away, ..., nothing once it rounds down to 0. A pair is kept
when ``|spatial_q - spatial_k| < reach``: the compute density decays exponentially with temporal
distance, O(N log N) pairs in all (the paper's "spatiotemporal energy decay")::

    frame=4, window=4 (x = attends; | separates frames): reach 4, 4, 2, 2, 1, 1, 1, 1, 0 ...
    q0 (frame 0, s0): x x x x | x x x x | x x . . | x x . . | x . . .
    q5 (frame 1, s1): x x x x | x x x x | x x x x | x x x . | x x x .
                      r=1       r=0       r=1       r=2       r=3

This is our reading of the paper's rule (the spatial window halves each time the temporal distance
doubles), written from its description; the block-level details of its kernels (frame subsampling in
the outer bands, an attention sink) are not reproduced. A partial last frame is allowed. The call's
``causal=True`` keeps only keys ``j <= i``. Self-attention only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.static import EXECUTOR_FIRST
from attnlab.core import MethodSpec
from attnlab.errors import InputError
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import SELF_PATTERNS
from attnlab.reference import masked_softmax_attention


@dataclass(frozen=True)
class RadialParams(Params):
    """``frame``: tokens per frame (>= 1, default 1024); ``window``: spatial reach in tokens at temporal
    distance 0 and 1 (1 <= window <= frame; default None: ``frame``, whole adjacent frames)."""

    method = "radial"
    frame: int = 1024
    window: int | None = None

    def validate(self) -> None:
        self.check_int("frame", minimum=1)
        if self.window is not None:
            self.check_int("window", minimum=1)
            if self.window > self.frame:
                raise self._fail(
                    "window", self.window, f"at most frame={self.frame} (a window within a frame)"
                )

    @property
    def reach(self) -> int:
        return self.frame if self.window is None else self.window


def _check_self(n_q: int, n_k: int) -> None:
    if n_q != n_k:
        raise InputError(f"method 'radial' is video self-attention: expected N_q == N_k, got {n_q} and {n_k}")


def mask(p: RadialParams, ctx: MaskContext) -> MaskMod:
    _check_self(ctx.n_q, ctx.n_k)
    frame = ctx.const(min(p.frame, ctx.n_q + 1))
    window = ctx.const(min(p.reach, ctx.n_q + 1))

    def radial(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        r = (q_idx // frame - kv_idx // frame).abs().clamp(min=1)
        top = r  # the highest power of two <= r: smear the top bit down, keep it
        for shift in (1, 2, 4, 8, 16):
            top = top | (top >> shift)
        top = top - (top >> 1)
        near = (q_idx % frame - kv_idx % frame).abs() < window // top
        return ctx.causal_ok(ctx.distance(q_idx, kv_idx)) & near

    return radial


def index_mask(params: RadialParams, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The (N, N) bool mask filled frame pair by frame pair, independently of :func:`mask`: the reach
    starts at ``window`` and is halved each time the frame distance reaches the next power of two (2, 4,
    8, ...); inside a pair of frames the kept pairs are the band ``|s_q - s_k| < reach``."""
    _check_self(n_q, n_k)
    f, n = params.frame, n_q
    frames = -(-n // f)
    limit, halved = 2, params.reach  # frame distances below `limit` keep a reach of at least 1
    while halved // 2 > 0:
        halved, limit = halved // 2, limit * 2
    out = torch.zeros(n, n, dtype=torch.bool)
    for fq in range(frames):
        rows = torch.arange(fq * f, min((fq + 1) * f, n))
        for fk in range(max(0, fq - limit + 1), min(frames, fq + limit)):
            reach, doubling = params.reach, 2
            while doubling <= abs(fq - fk):
                reach, doubling = reach // 2, doubling * 2
            cols = torch.arange(fk * f, min((fk + 1) * f, n))
            band = ((rows - fq * f)[:, None] - (cols - fk * f)[None, :]).abs() < reach
            out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = band
    if causal:
        out &= torch.ones(n, n, dtype=torch.bool).tril()
    return out


def reference(
    q: Tensor, k: Tensor, v: Tensor, params: RadialParams, *, causal: bool, scale: float, upcast: bool = True
) -> Tensor:
    """Softmax attention over the keys ``j`` with ``|i % F - j % F| < window >> floor(log2(max(r, 1)))``,
    ``r = |i // F - j // F|`` frames apart (``F = frame``), and ``j <= i`` when causal."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, int]]:
    frame = max(8, n // 32)
    return [{"frame": frame}, {"frame": frame, "window": max(1, frame // 4)}]


SPEC = MethodSpec(
    name="radial",
    family="static",
    paper="Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation "
    "(Li et al., 2025)",
    summary="video frames: a spatial window that halves each time the frame distance doubles",
    param_class=RadialParams,
    reference=reference,
    # the executor first: 2.1-2.5x faster than FlexAttention at 16K on the H100, forward and forward +
    # backward, causal and not (6f912a0, benchmarks/results/h100-2026-11-24/structured/)
    backends=EXECUTOR_FIRST,
    patterns=SELF_PATTERNS,
    mask=mask,
    index_mask=index_mask,
    test_params=({"frame": 9, "window": 7}, {"frame": 13}),
    bench_params=_bench,
)
