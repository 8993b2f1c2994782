"""``hip`` (HiP attention, Lee et al., ICLR 2025): per query block, an approximate top-k of the key blocks
found by a hierarchical (tree) search instead of scoring every block: O(N log N) estimation.

Estimator, per batch, query head and query block ``i`` (fp32; ``bs`` = ``block``, K = ceil(mask_k / bs)
key blocks to find; positions bottom-right aligned, query ``r`` at ``r + N_k - N_q``)::

    always kept: the sink blocks [0, ceil(sink / bs)) and the window blocks, i.e. the blocks holding the
      positions [first(i) - window + 1, last(i)] (so the query block's own, diagonal block always)
    candidates: every other key block (causal: those before the window), in order, c = 0 .. C-1
    C <= K: keep every candidate
    else: K nodes (start, size) split the candidates evenly (start_m = floor(C m / K)); while a node is
      larger than one block:
        each node splits into halves [s, s + size // 2) and [s + size // 2, s + size)
        a half's score = max of q . k over the scoring queries (rows stride_q - 1, 2 stride_q - 1, ... of
          the block) and the ``sample_k`` keys in the middle of its representative block (its centre
          block, s + size // 2)
        keep the K best halves
      the K final one-block nodes are kept

Attention is exact softmax attention over the kept blocks' pairs (causal: the causal rule inside the
tiles that straddle the diagonal). Each search step scores 2K blocks per query block and there are
ceil(log2(C / K)) steps: O(N_q / bs * K * log(N_k / (K bs)) * (bs / stride_q) * sample_k * D) per head.
Non-causal calls use the same rule with the candidates on both sides of the window (the official
non-causal mode puts every query at the end of the keys instead).

Checked against the official code (DeepAuto-AI/hip-attention @fea42c7, ICLR-2025 HiP =
``src/hip_attn/v1_1/attention2_draft_prefetch.py``): ``HiPAttentionArgs`` (defaults mask_k 512,
block_size_q 64, block_stride_q 2, block_size_k 2, sliding_window_size 256, sink_token_size 16, sample
"center", branch "half"), ``masking_iteration_draft_cuda_initialize`` (candidates [sink, pos - window),
all taken when they fit in mask_k, else mask_k / block_size_k nodes evenly over the range),
``masking_iteration_draft_cuda_dup_and_score`` (children [s, s + g // 2) and [s + g // 2, s + g), a
child of size 0 is dropped, representative s + size // 2 ("center"), scoring rows idx * stride +
stride - 1), ``..._calc_score`` (raw q . k, "max" over the scoring rows and the representative's keys,
keys inside a row's window masked), the argsort keeping mask_k / block_size_k children, the loop "while
max_group_size > 1", and the attention kernel's causal window (keys with distance < window). The v1.0
prototype (``v1_0/attention1.py``, ``mask``) is a different, per-query multi-scale search.
Deliberate differences: the tree's leaves are executor tiles of ``block`` keys (the official leaves are
``block_size_k`` = 2 keys, which a block-sparse executor cannot run), so ``mask_k`` is rounded up to
blocks and the sink and the window to whole blocks, and a node is represented by ``sample_k`` keys in the
middle of its centre block (the official one by the ``block_size_k`` keys of its centre leaf); the
initial nodes are not aligned to power-of-two starts; batch > 1 and GQA are per (batch, query head) plans without repeating k.

Defaults: ``mask_k`` 512, ``block`` 64, ``stride_q`` 2, ``sample_k`` 2 (block_size_k), ``window`` 256,
``sink`` 16 (the v1.1 defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.sdpa import SdpaMaskBackend
from attnlab.catalog.dynamic._tiles import BLOCKS, Geometry, geometry, plan_reference, tiles_plan
from attnlab.core import MethodSpec
from attnlab.errors import ParamError
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.plans import Plan


@dataclass(frozen=True)
class HipParams(Params):
    """``mask_k``: key tokens the tree search keeps per query block, rounded up to blocks (>= 1; default
    512). ``block``: tile size (query block and search leaf), one of 16, 32, 64, 128, 256 (default 64).
    ``stride_q``: every stride_q-th query of a block scores (1 <= stride_q <= block; default 2).
    ``sample_k``: keys in the middle of a representative block that score (1 <= sample_k <= block;
    default 2; ``block``: the whole block). ``window``: tokens of local window always kept, own position
    included, rounded out to blocks (>= 1; default 256). ``sink``: first tokens always kept, rounded up
    to blocks (>= 0; default 16)."""

    method = "hip"
    mask_k: int = 512
    block: int = 64
    stride_q: int = 2
    sample_k: int = 2
    window: int = 256
    sink: int = 16

    def validate(self) -> None:
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"hip: block={self.block!r}; the executor takes tiles of {BLOCKS}")
        self.check_int("mask_k", minimum=1)
        self.check_int("stride_q", minimum=1, maximum=self.block)
        self.check_int("sample_k", minimum=1, maximum=self.block)
        self.check_int("window", minimum=1)
        self.check_int("sink", minimum=0)


@dataclass(frozen=True)
class _Candidates:
    """Per query block: the candidate blocks c = 0 .. count-1 are ``first + c`` below ``before`` and
    ``after + (c - before)`` from there (the blocks on each side of the window)."""

    first: int  # the first candidate block (after the sinks)
    before: Tensor  # (NQB,) candidates before the window
    after: Tensor  # (NQB,) the first block after the window
    count: Tensor  # (NQB,)

    def block_of(self, c: Tensor) -> Tensor:
        """The key block of candidate index c (..., NQB, M)."""
        before = self.before[:, None]
        return torch.where(c < before, self.first + c, self.after[:, None] + (c - before))


def _forced_and_candidates(geo: Geometry, params: HipParams, causal: bool) -> tuple[Tensor, _Candidates]:
    """(bool (NQB, NKB): sink and window blocks; the candidate blocks of each query block)."""
    bs, dev = geo.block, geo.q_first.device
    n_sink = min(-(-params.sink // bs), geo.nkb)
    local = geo.local()
    win = torch.clamp(geo.q_first - params.window + 1, 0, geo.n_k - 1) // bs  # the window's first block
    win = torch.minimum(win, local)
    j = torch.arange(geo.nkb, device=dev)[None, :]
    forced = (j < n_sink) | ((j >= win[:, None]) & (j <= local[:, None]))
    before = torch.clamp(win - n_sink, min=0)
    after = torch.clamp(local + 1, min=n_sink)
    n_after = torch.zeros_like(after) if causal else torch.clamp(geo.nkb - after, min=0)
    return forced, _Candidates(n_sink, before, after, before + n_after)


def _scoring_rows(geo: Geometry, stride: int) -> Tensor:
    """long (NQB, R): rows stride - 1, 2 stride - 1, ... of each query block (clamped into the block)."""
    bs, dev = geo.block, geo.q_first.device
    m = torch.arange(-(-bs // stride), device=dev)
    first = torch.arange(geo.nqb, device=dev) * bs
    last = torch.clamp(first + bs, max=geo.n_q) - 1
    return torch.minimum(first[:, None] + m[None, :] * stride + stride - 1, last[:, None])


#: Elements of the gathered keys and of the score tensor per step of :func:`_block_scores` (memory bound).
CHUNK_ELEMENTS = 1 << 26


def _block_scores(q_rows: Tensor, k: Tensor, blocks: Tensor, block: int, sample: int) -> Tensor:
    """max over the scoring rows and the ``sample`` keys at the middle of each listed key block of q . k.

    q_rows (B, Hkv, G, NQB, R, D) and k (B, Hkv, N_k, D) fp32, blocks (B, Hkv, G, NQB, M) long ->
    (B, Hkv, G, NQB, M) fp32. Query blocks are taken in chunks so that no step holds more than
    CHUNK_ELEMENTS gathered keys or scores."""
    b, hkv, g, nqb, m = blocks.shape
    n_k, d = k.shape[2], k.shape[3]
    r = q_rows.shape[-2]
    real = torch.clamp(n_k - blocks * block, max=block)  # keys of each block inside the matrix
    first = blocks * block + torch.clamp((real - sample) // 2, min=0)
    idx = first[..., None] + torch.arange(sample, device=k.device)  # (..., M, S)
    valid = idx < blocks[..., None] * block + real[..., None]
    idx = idx.clamp(max=n_k - 1)
    step = max(1, CHUNK_ELEMENTS // max(1, b * hkv * g * m * sample * max(d, r)))
    out = []
    for lo in range(0, nqb, step):
        part = idx[:, :, :, lo : lo + step]
        nq = part.shape[3]
        flat = part.reshape(b, hkv, g * nq * m * sample)
        keys = torch.gather(k, 2, flat[..., None].expand(-1, -1, -1, d)).view(b, hkv, g, nq, m, sample, d)
        s = torch.einsum("bhgqrd,bhgqmsd->bhgqmrs", q_rows[:, :, :, lo : lo + step], keys).amax(dim=-2)
        s = s.masked_fill(~valid[:, :, :, lo : lo + step], float("-inf"))
        out.append(s.amax(dim=-1))
    return torch.cat(out, dim=3)


def search(q: Tensor, k: Tensor, params: HipParams, *, causal: bool) -> Tensor:
    """bool (B, H, NQB, NKB): the blocks the tree search keeps for q (B, H, N_q, D), k (B, H_kv, N_k, D)
    (the candidates only; sink and window blocks excluded). See the module docstring."""
    b, h, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g = h // hkv
    bs = params.block
    geo = geometry(n_q, n_k, bs, q.device)
    _, cand = _forced_and_candidates(geo, params, causal)
    kk = -(-params.mask_k // bs)
    dev = q.device
    # the initial nodes, per query block: the candidates themselves (C <= K) or K even groups
    m = torch.arange(kk, device=dev)
    count = cand.count[:, None]
    fits = count <= kk
    start = torch.where(fits, m, torch.div(count * m, kk, rounding_mode="floor"))
    nxt = torch.where(fits, m + 1, torch.div(count * (m + 1), kk, rounding_mode="floor"))
    size = torch.where(fits, (m < count).long(), nxt - start)
    start = start.expand(b, hkv, g, -1, -1).contiguous()
    size = size.expand(b, hkv, g, -1, -1).contiguous()
    rows = _scoring_rows(geo, params.stride_q)
    q_rows = q.detach().float()[:, :, rows].view(b, hkv, g, geo.nqb, rows.shape[1], d)
    kf = k.detach().float()
    while bool((size > 1).any()):
        half = size // 2
        c_start = torch.stack((start, start + half), -1).flatten(-2)
        c_size = torch.stack((half, size - half), -1).flatten(-2)
        rep = cand.block_of(c_start + c_size // 2).clamp(0, geo.nkb - 1)
        score = _block_scores(q_rows, kf, rep, bs, params.sample_k)
        score = score.masked_fill(c_size == 0, float("-inf"))
        top = torch.topk(score, kk, dim=-1).indices
        start, size = torch.gather(c_start, -1, top), torch.gather(c_size, -1, top)
    keep = torch.zeros(b, hkv, g, geo.nqb, geo.nkb + 1, dtype=torch.bool, device=dev)
    blocks = torch.where(size > 0, cand.block_of(start).clamp(0, geo.nkb - 1), geo.nkb)
    keep.scatter_(-1, blocks, True)
    return keep[..., : geo.nkb].reshape(b, h, geo.nqb, geo.nkb)


def estimate(q: Tensor, k: Tensor, params: HipParams, *, causal: bool, scale: float) -> Plan:
    """The plan of ``params`` for q (B, H, N_q, D), k (B, H_kv, N_k, D) (see the module docstring;
    ``scale`` does not change the ranking)."""
    geo = geometry(q.shape[2], k.shape[2], params.block, q.device)
    forced, _ = _forced_and_candidates(geo, params, causal)
    return tiles_plan(search(q, k, params, causal=causal) | forced, geo, causal)


reference = plan_reference(estimate)


def _bench(n: int) -> list[dict[str, int]]:
    """Searched blocks sized like block_topk's budgets (1/16 and 1/8 of the key blocks, the diagonal
    block counted, no sink: about 1/8 and 1/4 of the causal tiles), then the paper's defaults."""
    blocks = -(-n // 128)
    return [
        {"block": 128, "sink": 0, "window": 1, "mask_k": 128 * max(1, blocks // 16 - 1)},
        {"block": 128, "sink": 0, "window": 1, "mask_k": 128 * max(1, blocks // 8 - 1)},
        {},
    ]


SPEC = MethodSpec(
    name="hip",
    family="dynamic",
    paper="HiP Attention (Lee et al., ICLR 2025)",
    summary="per query block, top-k key blocks by a hierarchical halving search scored by each half's "
    "centre block (max q . k), plus sink and window blocks",
    param_class=HipParams,
    reference=reference,
    backends=(BLOCK_SPARSE, SdpaMaskBackend()),
    patterns=ALL_PATTERNS,
    estimate=estimate,
    test_params=(
        {"block": 16, "mask_k": 16, "window": 16, "sink": 16},
        {"block": 16, "mask_k": 16, "window": 1, "sink": 0, "stride_q": 1, "sample_k": 4},
    ),
    bench_params=_bench,
)
