"""``indexer_topk``: DeepSeek-V3.2-style token-level top-k (DSA's lightning indexer), with HISA's
block-then-token search as an option. Every query attends the ``topk`` keys its indexer scores highest.

Index score of query t and key s, per batch and kv head (fp32)::

    I[t, s] = sum_h w[t, h] * relu(qI[t, h] . kI[s])

With learned indexer tensors (:func:`index_scores`' ``index_q`` (B, H_I, N_q, d_I), ``index_k``
(B, 1 or H_kv, N_k, d_I), ``index_w`` (B, H_I, N_q)) this is DSA's score. Without them (what a call
through ``attnlab.attention`` uses today, see below) the scorer is derived from q and k: the indexer
heads are the G query heads sharing a kv head, ``w = 1/G``, and ``qI = q P``, ``kI = k P`` with ``P``
a fixed Gaussian projection (D, ``index_dim``) / sqrt(index_dim) drawn from ``seed`` (a low-dimensional
sketch of q . k; ``index_dim=0`` scores with q and k themselves). A positive factor on all weights
(DSA's ``n_heads^-0.5 * d^-0.5``) does not change the selection and is left out.

Selection (``search``):

- ``"token"`` (DSA): the ``topk`` highest-scoring keys each query may see (causal: ``j <= p``, bottom-right
  positions); all of them when fewer are visible.
- ``"hisa"`` (HISA): stage 1 scores key blocks of ``hisa_block`` tokens with the block-mean index key,
  keeps the first and the last visible block (+inf) and the ``hisa_blocks`` best; stage 2 takes the
  ``topk`` best visible tokens inside them. ``hisa_blocks * hisa_block >= topk`` is required (HISA's
  m·B >= k: fewer candidate keys than ``topk`` would leave a query short of its budget). When
  ``hisa_blocks * hisa_block`` covers the visible keys it equals ``"token"``; :func:`selection_iou`
  reports the overlap of the two.

One selection is shared by the query heads of a kv head (DSA: one index set for all heads). The plan
(``granularity``): ``"token"`` visits, per query block of ``block`` rows, the tiles holding a selected key
of one of its rows, as partial tiles whose token rule is each query's own selection (exact DSA); ``"block"``
visits, per query block, the ceil(topk / block) tiles holding the most of its rows' selected keys, whole
(every key of those tiles, causal rule on the diagonal): the same token budget at tile granularity, which
the executor runs at tile cost (a query may then miss some of its own selection, and see other keys).
Rows with no computed key give zeros.

Checked against the official code: DeepSeek-V3.2-Exp ``inference/model.py`` (``Indexer.forward``:
``weights_proj(x) * n_heads^-0.5 * q_scale * softmax_scale``, ``fp8_index`` = sum over heads of w x
relu(q . k) x k_scale, the causal mask added, ``topk(min(index_topk, end_pos))``; ``MLA.forward``
attends the selected set with the causal mask re-applied, so a query sees min(topk, visible) keys) and
tile-ai/tilelang ``examples/dsa_hisa/hisa.py`` (``hisa_indexer``: block-mean pooled keys, block scores
with the same weights, first / last valid block forced, ``topk(block_topk)`` blocks, token scores on
their tokens with -inf outside the query's range, ``topk(topk_tokens)``). Not reproduced: FP8
quantisation, the Hadamard rotation and RoPE of the learned indexer (those belong to the model that
produces ``index_q`` / ``index_k``).

Defaults: ``topk`` 2048 (DSA's ``index_topk``), ``hisa_block`` 128 and ``hisa_blocks`` 64 (HISA / sglang
``hisa_k_block_size`` / ``hisa_block_topk``); ``index_dim`` 32 and ``block`` 64 are attnlab's.

Cost: the estimator scores every (query, key) pair, O(N_q N_k (G d_I)) per kv head, in query chunks
(memory O(chunk x N_k)); DSA's own indexer is O(N^2) too (HISA's stage 2 is what makes it cheaper in a
fused kernel, not here). A ``"token"`` plan's executor tables hold one token pattern per distinct visited
tile (up to blocks^2 bytes each): exact, but meant for moderate lengths (the query heads of a kv head
share their tiles' ``pattern_ids``, so each tile's mask is evaluated once per kv head); ``"block"`` plans have causal
patterns only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.sdpa import SdpaMaskBackend
from attnlab.catalog.dynamic._tiles import BLOCKS, geometry, plan_reference, tiles_plan
from attnlab.core import MethodSpec
from attnlab.errors import InputError, ParamError
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.plans import Plan

#: Score elements (queries x keys) evaluated at once per (batch, kv head).
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class IndexerTopkParams(Params):
    """``topk``: keys per query (>= 1; default 2048). ``search``: "token" (DSA, default) or "hisa".
    ``hisa_block`` (>= 1, default 128) / ``hisa_blocks`` (>= 1, default 64): HISA's pooling block and the
    blocks stage 1 keeps; with ``search="hisa"``, ``hisa_blocks * hisa_block >= topk`` (HISA's m·B >= k).
    ``index_dim``: dimension of the derived scorer's projection (0 = q . k itself; default 32);
    ``seed``: its projection's seed (default 0). ``granularity``: "token" (each query's own
    keys, default) or "block" (whole tiles). ``block``: tile size, one of 16, 32, 64, 128, 256 (default
    64)."""

    method = "indexer_topk"
    topk: int = 2048
    search: str = "token"
    hisa_block: int = 128
    hisa_blocks: int = 64
    index_dim: int = 32
    seed: int = 0
    granularity: str = "token"
    block: int = 64

    def validate(self) -> None:
        self.check_int("topk", minimum=1)
        self.check_int("hisa_block", minimum=1)
        self.check_int("hisa_blocks", minimum=1)
        self.check_int("index_dim", minimum=0)
        self.check_int("seed", minimum=0)
        if self.search not in ("token", "hisa"):
            raise ParamError(f"indexer_topk: search={self.search!r}; expected 'token' (DSA) or 'hisa'")
        if self.search == "hisa":
            _check_hisa(self)
        if self.granularity not in ("token", "block"):
            raise ParamError(f"indexer_topk: granularity={self.granularity!r}; expected 'token' or 'block'")
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"indexer_topk: block={self.block!r}; the executor takes tiles of {BLOCKS}")


def _check_hisa(params: IndexerTopkParams) -> None:
    """HISA's m·B >= k: stage 1's ``hisa_blocks`` blocks of ``hisa_block`` keys must hold ``topk`` keys."""
    m, bs, k = params.hisa_blocks, params.hisa_block, params.topk
    if m * bs < k:
        raise ParamError(
            f"indexer_topk: search='hisa' with hisa_blocks={m} x hisa_block={bs} = {m * bs} candidate keys "
            f"< topk={k}: HISA needs m·B >= k (stage 1's blocks must hold the topk keys stage 2 takes, else "
            "a query gets fewer): raise hisa_blocks or hisa_block, or lower topk"
        )


def _projection(d: int, index_dim: int, seed: int, device: torch.device) -> Tensor | None:
    if index_dim == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, index_dim, generator=g) / index_dim**0.5).to(device)


def derived_indexer(q: Tensor, k: Tensor, params: IndexerTopkParams) -> tuple[Tensor, Tensor, Tensor]:
    """The parameter-free scorer's (index_q (B, H, N_q, d_I), index_k (B, H_kv, N_k, d_I), index_w
    (B, H, N_q)) in fp32: q and k through the seeded projection, weight 1/G per query head."""
    p = _projection(q.shape[-1], params.index_dim, params.seed, q.device)
    qi, ki = q.detach().float(), k.detach().float()
    if p is not None:
        qi, ki = qi @ p, ki @ p
    group = q.shape[1] // k.shape[1]
    w = torch.full(q.shape[:3], 1.0 / group, device=q.device)
    return qi, ki, w


def _check_indexer(index_q: Tensor, index_k: Tensor, index_w: Tensor, h_kv: int) -> None:
    if index_q.dim() != 4 or index_k.dim() != 4 or index_w.dim() != 3:
        raise InputError(
            f"indexer_topk: index_q must be (B, H_I, N_q, d_I), index_k (B, 1 or H_kv, N_k, d_I) and "
            f"index_w (B, H_I, N_q); got {tuple(index_q.shape)}, {tuple(index_k.shape)}, "
            f"{tuple(index_w.shape)}"
        )
    b, hi, n_q, d = index_q.shape
    if index_k.shape[0] != b or index_k.shape[-1] != d or index_w.shape != (b, hi, n_q):
        raise InputError(
            f"indexer_topk: index_q {tuple(index_q.shape)}, index_k {tuple(index_k.shape)} and index_w "
            f"{tuple(index_w.shape)} disagree (expected index_k (B, *, N_k, d_I), index_w (B, H_I, N_q))"
        )
    hk = index_k.shape[1]
    if hk not in (1, h_kv) or hi % hk:
        raise InputError(
            f"indexer_topk: index_k has {hk} heads; expected 1 (DSA's shared key) or H_kv={h_kv}, dividing "
            f"the H_I={hi} index heads"
        )


def index_scores(qi: Tensor, ki: Tensor, w: Tensor, rows: slice | None = None) -> Tensor:
    """I[t, s] = sum over the index heads of key head ``c`` (``H_I / H_k`` consecutive heads) of
    w[t, h] relu(qI[t, h] . kI[s]), fp32 -> (B, H_k, R, N_k) for the query rows ``rows`` (all: None)."""
    if rows is not None:
        qi, w = qi[:, :, rows], w[:, :, rows]
    b, hi, r, d = qi.shape
    hk = ki.shape[1]
    g = hi // hk
    dots = torch.relu(qi.float().view(b, hk, g, r, d) @ ki.float()[:, :, None].transpose(-1, -2))
    return (dots * w.float().view(b, hk, g, r, 1)).sum(2)


def _visible(n_q: int, n_k: int, rows: slice, causal: bool, device: torch.device) -> Tensor:
    """bool (R, N_k): keys each query row of ``rows`` may see."""
    t = torch.arange(n_q, device=device)[rows]
    if not causal:
        return torch.ones(t.shape[0], n_k, dtype=torch.bool, device=device)
    return torch.arange(n_k, device=device)[None, :] <= (t + n_k - n_q)[:, None]


def _pooled_keys(ki: Tensor, block: int) -> Tensor:
    b, h, n, d = ki.shape
    nb = -(-n // block)
    pad = nb * block - n
    sums = torch.nn.functional.pad(ki.float(), (0, 0, 0, pad)).view(b, h, nb, block, d).sum(3)
    counts = torch.full((nb,), float(block), device=ki.device)
    counts[-1] = block - pad
    return sums / counts[:, None]


def select(
    q: Tensor,
    k: Tensor,
    params: IndexerTopkParams,
    *,
    causal: bool,
    search: str | None = None,
    index_q: Tensor | None = None,
    index_k: Tensor | None = None,
    index_w: Tensor | None = None,
) -> Tensor:
    """The selected keys, long (B, H_k, N_q, K) with K = min(topk, N_k), ascending, ``N_k`` padding
    where fewer keys are visible; H_k = the index key heads (H_kv for the derived scorer). ``search``
    overrides ``params.search``; the indexer tensors, when given, replace the derived scorer."""
    search = params.search if search is None else search
    if search == "hisa":
        _check_hisa(params)
    given = [t is not None for t in (index_q, index_k, index_w)]
    if any(given) and not all(given):
        raise InputError("indexer_topk: give index_q, index_k and index_w together (or none of them)")
    if index_q is not None and index_k is not None and index_w is not None:
        _check_indexer(index_q, index_k, index_w, k.shape[1])
        qi, ki, w = index_q.detach(), index_k.detach(), index_w.detach()
    else:
        qi, ki, w = derived_indexer(q, k, params)
    b, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
    kk = min(params.topk, n_k)
    hk = ki.shape[1]
    out = torch.empty(b, hk, n_q, kk, dtype=torch.long, device=q.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, n_k * hk * b))
    pooled = _pooled_keys(ki, params.hisa_block) if search == "hisa" else None
    for r0 in range(0, n_q, chunk):
        rows = slice(r0, min(n_q, r0 + chunk))
        vis = _visible(n_q, n_k, rows, causal, q.device)  # (R, N_k)
        s = index_scores(qi, ki, w, rows).masked_fill(~vis, float("-inf"))
        if pooled is not None:
            s = s.masked_fill(~_hisa_candidates(qi, pooled, w, vis, params, rows), float("-inf"))
        top = torch.topk(s, kk, dim=-1)
        idx = torch.where(torch.isfinite(top.values), top.indices, n_k)
        out[:, :, rows] = torch.sort(idx, dim=-1).values
    return out


def _hisa_candidates(
    qi: Tensor, pooled: Tensor, w: Tensor, vis: Tensor, params: IndexerTopkParams, rows: slice
) -> Tensor:
    """bool (B, H_k, R, N_k): the tokens of the blocks HISA's stage 1 keeps for each query row."""
    bs, n_k = params.hisa_block, vis.shape[-1]
    nb = pooled.shape[2]
    blk_of = torch.arange(n_k, device=vis.device) // bs
    # a block is visible when one of its keys is; first and last visible blocks are forced
    vis_blk = torch.zeros(vis.shape[0], nb, device=vis.device).index_add_(1, blk_of, vis.float()) > 0
    j = torch.arange(nb, device=vis.device)
    first = torch.where(vis_blk, j, nb).amin(-1)
    last = torch.where(vis_blk, j, -1).amax(-1)
    forced = (j[None, :] == first[:, None]) | (j[None, :] == last[:, None])
    s = index_scores(qi, pooled, w, rows).masked_fill(~vis_blk, float("-inf"))
    s = s.masked_fill(forced & vis_blk, float("inf"))
    m = min(params.hisa_blocks, nb)
    top = torch.topk(s, m, dim=-1)
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
    return keep[..., blk_of]


def selection_iou(
    q: Tensor, k: Tensor, params: IndexerTopkParams, *, causal: bool = True, **indexer: Tensor
) -> Tensor:
    """Mean over query rows (with a visible key) of |DSA ∩ HISA| / |DSA ∪ HISA| of the two searches'
    selections -> (B, H_k). 1.0 where HISA's candidate blocks cover every visible key."""
    tensors = {name: indexer.get(name) for name in ("index_q", "index_k", "index_w")}
    dsa = select(q, k, params, causal=causal, search="token", **tensors)
    hisa = select(q, k, params, causal=causal, search="hisa", **tensors)
    n_k = k.shape[2]
    a = torch.zeros(*dsa.shape[:3], n_k + 1, dtype=torch.bool, device=q.device)
    a.scatter_(-1, dsa, True)
    bb = torch.zeros_like(a).scatter_(-1, hisa, True)
    a, bb = a[..., :n_k], bb[..., :n_k]
    inter, union = (a & bb).sum(-1).float(), (a | bb).sum(-1).float()
    rows = union > 0
    iou = torch.where(rows, inter / union.clamp_min(1), 0.0)
    return iou.sum(-1) / rows.sum(-1).clamp_min(1)


def _membership(sel: Tensor, n_k: int, group: int):  # type: ignore[no-untyped-def]
    """mask_mod: (b, h, q_idx, kv_idx) -> whether kv_idx is among query q_idx's selected keys, from
    ``sel`` (B, H_k, N_q, K) of :func:`select` (rows ascending, ``N_k`` padding); query head ``h`` reads
    its kv head ``h // group``'s selection. ``q_idx`` past the last row reads the last row; ``kv_idx`` is
    a member when the row holds it (so ``N_k`` is one of a padded row's, as the selection stores it).

    One 1-D search, no row gathered: row r = (b H_k + c) N_q + q_idx holds ``sel`` at the keys
    r (N_k + 1) + s, s in [0, N_k], an ascending sequence over all rows (``flat``; memory that of
    ``sel``); a pair is a member when its key r (N_k + 1) + kv_idx is found there. The temporaries have
    the broadcast index shape (no per-pair row of K keys); no data-dependent control flow, so vmap (how
    FlexAttention densifies a mask) and torch.compile trace it. (Inductor's CPU FlexAttention kernel
    cannot lower a search inside the mask subgraph, nor could it the former per-row search.)"""
    b_n, hk, n_q, kk = sel.shape
    n_k1 = n_k + 1
    rows = torch.arange(b_n * hk * n_q, device=sel.device)[:, None]
    flat = (rows * n_k1 + sel.reshape(-1, kk)).reshape(-1)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        row = (b.long() * hk + h.long() // group) * n_q + q_idx.long().clamp(0, n_q - 1)
        kv = kv_idx.long()
        key = row * n_k1 + kv
        pos = torch.searchsorted(flat, key).clamp(max=flat.shape[0] - 1)
        return (flat[pos] == key) & (kv >= 0) & (kv < n_k1)

    return mask_mod


def estimate(
    q: Tensor, k: Tensor, params: IndexerTopkParams, *, causal: bool, scale: float, **indexer: Tensor
) -> Plan:
    """The plan of ``params`` for q (B, H, N_q, D), k (B, H_kv, N_k, D) (see the module docstring);
    ``indexer``: optional learned ``index_q``, ``index_k``, ``index_w`` (see :func:`select`)."""
    b, h, n_q = q.shape[:3]
    n_k = k.shape[2]
    unknown = set(indexer) - {"index_q", "index_k", "index_w"}
    if unknown:
        raise InputError(f"indexer_topk: unknown indexer tensors {sorted(unknown)}; expected index_q, "
                         "index_k, index_w")  # fmt: skip
    sel = select(q, k, params, causal=causal, index_q=indexer.get("index_q"),
                 index_k=indexer.get("index_k"), index_w=indexer.get("index_w"))  # fmt: skip
    hk = sel.shape[1]
    geo = geometry(n_q, n_k, params.block, q.device)
    # per tile, how many (row, selected key) pairs of its query block it holds
    blk = torch.where(sel < n_k, sel // params.block, geo.nkb)  # (B, H_k, N_q, K)
    row_blk = torch.arange(n_q, device=q.device) // params.block
    flat = (row_blk[:, None] * (geo.nkb + 1) + blk).reshape(b, hk, -1)
    count = torch.zeros(b, hk, geo.nqb * (geo.nkb + 1), device=q.device)
    count.scatter_add_(-1, flat, torch.ones_like(flat, dtype=count.dtype))
    count = count.view(b, hk, geo.nqb, geo.nkb + 1)[..., : geo.nkb]
    if params.granularity == "block":
        # the ceil(topk / block) tiles holding most of the block's selections, whole
        m = min(geo.nkb, -(-params.topk // params.block))
        top = torch.topk(count, m, dim=-1)
        tiles = torch.zeros_like(count, dtype=torch.bool).scatter_(-1, top.indices, top.values > 0)
        return tiles_plan(tiles.repeat_interleave(h // hk, dim=1), geo, causal)
    tiles = (count > 0).repeat_interleave(h // hk, dim=1)
    return Plan(n_q, n_k, causal, params.block, params.block, torch.zeros_like(tiles), tiles,
                _membership(sel, n_k, h // hk), kind="dynamic",
                pattern_ids=_shared_ids(tiles, h // hk))  # fmt: skip


def _shared_ids(tiles: Tensor, group: int) -> Tensor | None:
    """The plan's ``pattern_ids``: the query heads of one kv head read one selection, so their tile
    (b, h, i, j) has the id of (b, h // group, i, j) (the executor then evaluates each once); -1 outside
    the partial tiles. None when there is nothing to share or the ids would not fit int32."""
    b, h, nqb, nkb = tiles.shape
    if group == 1 or b * (h // group) * nqb * nkb >= 2**31:
        return None
    kv_head = torch.arange(h, device=tiles.device) // group
    base = (torch.arange(b, device=tiles.device)[:, None] * (h // group) + kv_head[None, :]) * (nqb * nkb)
    local = torch.arange(nqb * nkb, device=tiles.device).view(nqb, nkb)
    ids = base[:, :, None, None] + local
    return torch.where(tiles, ids, -1).to(torch.int32)


reference = plan_reference(estimate)


def _bench(n: int) -> list[dict[str, int | str]]:
    """Token budgets near block_topk's densities (1/8 and 1/4 of the causal pairs), on whole tiles (the
    executor's fast form), and DSA's 2048 tokens per query."""
    return [
        {"topk": max(64, n // 16), "granularity": "block", "block": 128},
        {"topk": max(64, n // 8), "granularity": "block", "block": 128},
        {"topk": 2048, "granularity": "block", "block": 128},
    ]


SPEC = MethodSpec(
    name="indexer_topk",
    family="dynamic",
    paper="DeepSeek-V3.2 (DSA lightning indexer, 2025); HISA (2026)",
    summary="per query, the top-k keys of a lightning-indexer score sum_h w relu(qI . kI) (DSA), or its "
    "block-then-token search (HISA)",
    param_class=IndexerTopkParams,
    reference=reference,
    backends=(BLOCK_SPARSE, SdpaMaskBackend()),
    patterns=ALL_PATTERNS,
    estimate=estimate,
    test_params=(
        {"topk": 5, "block": 16, "index_dim": 8},
        {"topk": 7, "block": 16, "search": "hisa", "hisa_block": 8, "hisa_blocks": 2, "index_dim": 0},
        {"topk": 6, "block": 16, "granularity": "block"},
    ),
    bench_params=_bench,
)
