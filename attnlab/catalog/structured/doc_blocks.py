"""``doc_blocks``: dense inside each document, sparse across them (BlockRank's in-context ranking mask).

``boundaries`` cuts the key positions into segments: segment 0 is ``[0, b_1)`` (the prompt prefix), the
documents are ``[b_1, b_2), ...``, and the last segment ``[b_m, N_k)`` is the query. A token attends to
its own segment, to the prefix (``prefix_global``), and the last segment attends to everything
(``last_sees_all``). A query row ``i`` belongs to the segment of its position ``p = i + N_k - N_q``
(positions below 0 count as the prefix); causal calls also need ``j <= p``::

    boundaries=(2, 4, 6), N=8, not causal (P prefix, D1 D2 documents, Q query; x = attends)
          P P D1D1D2D2Q Q
    q0 P: x x . . . . . .
    q1 P: x x . . . . . .
    q2 D1 x x x x . . . .
    q3 D1 x x x x . . . .
    q4 D2 x x . . x x . .
    q5 D2 x x . . x x . .
    q6 Q: x x x x x x x x
    q7 Q: x x x x x x x x

With ``prefix_global=False`` the prefix is one more document; with ``last_sees_all=False`` the last
segment is one too. ``boundaries=()`` is one segment: dense attention. Boundaries at or past N_k leave
empty segments (a shorter sequence simply has fewer documents).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.static import MASK_BACKENDS
from attnlab.core import MethodSpec
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.reference import masked_softmax_attention


@dataclass(frozen=True)
class DocBlocksParams(Params):
    """``boundaries``: the positions where the 2nd, 3rd, ... segments start (strictly increasing ints
    >= 1; default ``()``, one segment); ``prefix_global``: every token also sees segment 0 (default
    True); ``last_sees_all``: the last segment sees every key (default True)."""

    method = "doc_blocks"
    boundaries: tuple[int, ...] = ()
    prefix_global: bool = True
    last_sees_all: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.boundaries, list):
            object.__setattr__(self, "boundaries", tuple(self.boundaries))
        super().__post_init__()

    def validate(self) -> None:
        b = self.boundaries
        ok = isinstance(b, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in b)
        if not ok or any(x < 1 for x in b) or any(x >= y for x, y in itertools.pairwise(b)):
            raise self._fail("boundaries", b, "a tuple of strictly increasing ints >= 1 (segment starts)")
        self.check_bool("prefix_global")
        self.check_bool("last_sees_all")


def mask(p: DocBlocksParams, ctx: MaskContext) -> MaskMod:
    cap = ctx.n_q + ctx.n_k  # boundaries past every position act alike; keeps int32 consts in range
    starts = [ctx.const(min(x, cap)) for x in p.boundaries]
    last = ctx.const(len(p.boundaries))
    prefix = ctx.const(int(p.prefix_global))
    sees_all = ctx.const(int(p.last_sees_all))

    def segment(x: Tensor) -> Tensor:
        seg = torch.zeros_like(x)
        for s in starts:
            seg = seg + (x >= s).to(x.dtype)
        return seg

    def doc_blocks(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pos = q_idx + ctx.offset
        sq, sk = segment(pos), segment(kv_idx)
        seen = (sq == sk) | ((sk == 0) & (prefix == 1)) | ((sq == last) & (sees_all == 1))
        return ctx.causal_ok(pos - kv_idx) & seen

    return doc_blocks


def index_mask(params: DocBlocksParams, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The (N_q, N_k) bool mask filled segment by segment with slices, independently of :func:`mask`:
    segment ``s`` holds key columns ``[e_s, e_{s+1})`` and query rows whose position ``i + N_k - N_q``
    lies there (rows at negative positions join segment 0); causal calls keep ``j <= i + N_k - N_q``."""
    off = n_k - n_q
    edges = [0, *params.boundaries]
    last = len(params.boundaries)
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    for s, start in enumerate(edges):
        end = edges[s + 1] if s < last else n_k + n_q  # past every position
        rows = slice(0 if s == 0 else max(start - off, 0), max(end - off, 0))  # slices stop at N_q
        out[rows, start:end] = True  # its own segment
        if params.prefix_global:
            out[rows, 0 : edges[1] if last else n_k] = True
        if params.last_sees_all and s == last:
            out[rows, :] = True
    if causal:
        out &= torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=off)
    return out


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: DocBlocksParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """Softmax attention where query position ``p`` sees key ``j`` when both lie in the same segment of
    ``boundaries``, or ``j`` is in segment 0 (``prefix_global``), or ``p`` is in the last segment
    (``last_sees_all``); ``p = i + N_k - N_q``, and ``j <= p`` when causal."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, object]]:
    # a prefix of n/32 tokens, documents of n/16 tokens, a query of n/32 tokens
    doc = max(2, n // 16)
    first = max(1, n // 32)
    starts = tuple(range(first, n - first, doc))
    return [{"boundaries": (*starts, n - first)}]


SPEC = MethodSpec(
    name="doc_blocks",
    family="static",
    paper="Scalable In-context Ranking with Generative Models (BlockRank; Gupta et al., 2025)",
    summary="dense inside each document segment, the prefix seen by all, the last segment sees all",
    param_class=DocBlocksParams,
    reference=reference,
    backends=MASK_BACKENDS,
    patterns=ALL_PATTERNS,
    mask=mask,
    index_mask=index_mask,
    test_params=(
        {"boundaries": (5, 30, 31, 60)},
        {"boundaries": (40, 90, 120), "prefix_global": False, "last_sees_all": False},
    ),
    bench_params=_bench,
)
