"""``nsa`` (Native Sparse Attention, Yuan et al., DeepSeek, ACL 2025), training-free: three causal
softmax branches over the same q, k, v, combined per query and head by gates given as inputs::

    O = g_cmp * O_cmp + g_slc * O_slc + g_swa * O_swa          (gates (B, H, N_q), default 1/3 each)

Positions are bottom-right aligned (query ``t`` at ``p = t + N_k - N_q``); ``bs`` = ``block``; all in
fp32 in the reference.

- **Compressed tokens** (mean pooling, no learned MLP): ``K_cmp[c] = mean(k[c bs : (c+1) bs])``, likewise
  ``V_cmp`` (blocks of ``bs`` keys, stride ``bs``: no overlap). Query ``p`` attends the *complete* blocks
  wholly in its past, ``(c + 1) bs - 1 <= p``: ``P_cmp = softmax_c(scale * q . K_cmp[c])``,
  ``O_cmp = sum_c P_cmp[c] V_cmp[c]``; a query with no complete block (``p < bs - 1``) gets zeros.
- **Selection** (one set per kv head, shared by its G query heads): importance
  ``I[p, c] = sum over the G heads of P_cmp[p, c]``; the key blocks ``c <= p // bs`` are candidates;
  the ``local`` most recent ones (``p // bs - m``, m < local) and, with ``sink``, block 0 are forced;
  the ``topn`` candidates of highest importance (forced first) are kept. ``O_slc`` is softmax attention
  over the keys ``j <= p`` of the kept blocks. ``granularity``:

  * ``"token"``: every query row has its own set (the paper's and fla's selection, exact); the plan's
    partial tiles carry each row's own blocks, so the executor's tables grow with the number of
    distinct row patterns: meant for short sequences and tests;
  * ``"block"`` (default): one set per query block of ``bs`` rows, from the importance summed over the
    block's rows; the forced blocks are the union of its rows' (the candidates ``c <= last // bs``, the
    local ones ``first // bs - local < c``, ``first`` / ``last`` its first / last position with a key),
    so every row keeps its own block even when the query block straddles two key blocks (N_k - N_q not a
    multiple of bs: chunked prefill after a cached prefix); ``topn`` counts them as its last row's, and
    the one more block a straddling query block forces comes on top (``topn + 1`` blocks, the same
    ``topn - local - sink`` by importance). The plan is whole tiles (causal rule on the diagonal), which
    the executor runs at tile cost. This is the form the fast path is meant for; it differs from the
    paper's per-token choice (a row may see blocks its own importance would not pick).

- **Sliding window**: ``O_swa`` is softmax attention over the ``window`` keys ``p - window < j <= p``
  (self included; fla's ``window_size=w`` = FlashAttention ``window_size=(w - 1, 0)`` = ``window=w``
  here); ``window=0`` drops the branch (fla's convention).

Checked against the official code of the fla-org reimplementation (fla-org/native-sparse-attention,
``native_sparse_attention/ops/naive.py``: ``compression`` (mean pooling, blocks of ``block_size``),
``naive_nsa_compression`` (visible iff ``c <= (t - bs + 1) // bs``, empty rows 0, the current block's
importance set to 1 per head then summed over the group, ``topk(S)``, indices past ``t // bs`` dropped),
``naive_nsa`` (selected blocks with ``i <= t``, the window ``t - w + 1 .. t``, outputs times gates);
``ops/parallel.py``: ``parallel_nsa`` (``o = o_slc g_slc + o_cmp g_cmp + o_swa g_swa``,
``block_counts`` 16, ``block_size`` 64, ``NC = (t + 1) // BS`` complete blocks in the compressed kernel,
the top-k kernel forcing ``t // BS``)). Not reproduced: the paper's learned compression MLP with
intra-block position encoding and overlapping blocks (l = 32, stride 16, selection blocks 64, whose
importance is remapped between the two blockings); here compression, stride and selection share one
block size (as in fla). The gates are not computed here (the paper's MLP + sigmoid of the hidden
state): pass them, or get the equal-weight default 1/3.

Defaults: ``block`` 64 (fla's ``block_size``; the paper's selection block), ``topn`` 16 (paper n and fla's
``block_counts``), ``window`` 512 (paper w), ``local`` 1 and ``sink`` False (fla; the paper's 27B model
forces 1 initial and 2 local blocks: ``sink=True, local=2``), ``granularity`` "block" (attnlab's: the
executor's fast form; "token" is the paper's). Causal only (NSA is a decoder's attention).

Fast path (backend ``block_sparse``): the compressed branch and the importance in one pass over query
chunks (no N x N tensor; memory O(chunk x N / bs)): scores, softmax and importance in fp32 (so a bf16
call picks the blocks its fp32 reference picks), the weighted sum of block means in the input dtype with
fp32 accumulation; the selected branch on the block-sparse executor with the selection's plan, the window
branch on the executor with ``sliding_window``'s static plan, combined in fp32. The backward flows
through all three (the selection itself has no gradient; the compressed pass keeps its fp32 weights for
the backward, B x H x N_q x N_k / bs x 4 bytes). ``return_plan`` gives the selected branch's plan.

Cost (H100, ``benchmarks/results/h100-2026-11-23/dynamic``): the fp32 compressed scores are O(N^2 / bs)
work without tensor cores and dominate the call (0.44x cuDNN at 32K, 0.55x at 64K with the defaults, at
b65f02b: before the weighted sum moved to the input dtype).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.block_sparse import CPU_TILE, TILE
from attnlab.catalog.dynamic._tiles import BLOCKS, geometry, span_extra, tiles_plan, top_entries
from attnlab.core import Backend, Call, Capabilities, MethodSpec, TensorInput
from attnlab.errors import InputError, ParamError
from attnlab.kernels.triton_utils import triton_refusal
from attnlab.params import Params
from attnlab.patterns import Pattern
from attnlab.plans import Plan
from attnlab.reference import masked_softmax_attention

#: fp32 compressed-score elements (B x H x rows x blocks) evaluated at once.
CHUNK_ELEMENTS = 1 << 25
GATES = ("g_cmp", "g_slc", "g_swa")


@dataclass(frozen=True)
class NsaParams(Params):
    """``block``: compression block = stride = selection block, one of 16, 32, 64, 128, 256 (default 64).
    ``topn``: key blocks kept per query (per query block with ``granularity="block"``), forced ones
    included (>= local + sink; default 16; a query block straddling two key blocks forces, and keeps, one
    more). ``window``: sliding-window keys, self included (>= 0; 0 = no
    window branch; default 512). ``local``: most recent key blocks always kept (>= 1; default 1, the
    current block). ``sink``: always keep key block 0 (default False). ``granularity``: "block" (one
    selection per query block, default) or "token" (per query row, the paper's)."""

    method = "nsa"
    block: int = 64
    topn: int = 16
    window: int = 512
    local: int = 1
    sink: bool = False
    granularity: str = "block"

    def validate(self) -> None:
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"nsa: block={self.block!r}; the executor takes tiles of {BLOCKS}")
        self.check_int("topn", minimum=1)
        self.check_int("window", minimum=0)
        self.check_int("local", minimum=1)
        self.check_bool("sink")
        if self.topn < self.local + int(self.sink):
            raise ParamError(
                f"nsa: topn={self.topn} is below the forced blocks (local={self.local} + sink={self.sink}); "
                "raise topn or force fewer blocks"
            )
        if self.granularity not in ("block", "token"):
            raise ParamError(f"nsa: granularity={self.granularity!r}; expected 'block' or 'token'")


def _check(q: Tensor, k: Tensor, causal: bool) -> None:
    if not causal:
        raise ParamError("nsa is a causal (decoder) attention; call it with causal=True")
    if q.shape[1] % k.shape[1]:
        raise InputError(f"nsa: H={q.shape[1]} query heads must be a multiple of H_kv={k.shape[1]}")


def compress(x: Tensor, bs: int) -> Tensor:
    """Mean of x (B, H, N, D) over its complete blocks of ``bs`` rows -> (B, H, N // bs, D) fp32
    (differentiable; the incomplete tail block is never visible to a causal query)."""
    b, h, n, d = x.shape
    nc = n // bs
    return x[:, :, : nc * bs].float().view(b, h, nc, bs, d).mean(3)


def _visible_blocks(pos: Tensor, n_cmp: int, bs: int) -> Tensor:
    """bool (R, NC): complete blocks wholly in the past of positions ``pos`` (R,)."""
    c = torch.arange(n_cmp, device=pos.device)
    return (c[None, :] + 1) * bs - 1 <= pos[:, None]


def _cmp_probs(qc: Tensor, kc: Tensor, pos: Tensor, bs: int, scale: float) -> Tensor:
    """P_cmp (B, H_kv, G, R, NC) fp32 for the query rows ``qc`` (B, H, R, D) at positions ``pos``;
    rows with no complete block are 0."""
    b, h, r, d = qc.shape
    hk = kc.shape[1]
    s = (qc.float().view(b, hk, h // hk, r, d) @ kc[:, :, None].transpose(-1, -2)) * scale
    vis = _visible_blocks(pos, kc.shape[2], bs)
    s = s.masked_fill(~vis, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def _rank(imp: Tensor, pos_first: Tensor, pos_last: Tensor, params: NsaParams, nkb: int) -> Tensor:
    """bool (..., R, NKB): the kept blocks of rows (or query blocks) whose first / last position is
    ``pos_first`` / ``pos_last`` (R,) (equal for a row), from their importance ``imp`` (..., R, NC). The
    forced blocks are the union of the rows' (see the module docstring); ``topn`` counts those of the last
    position, a query block's one more (its first row's own block, when it straddles two) comes on top."""
    dev = imp.device
    imp = torch.nn.functional.pad(imp, (0, nkb - imp.shape[-1]))
    c = torch.arange(nkb, device=dev)[None, :]
    cur = torch.div(pos_last, params.block, rounding_mode="floor")[:, None]  # (R, 1); < 0: no key
    first = torch.div(pos_first.clamp_min(0), params.block, rounding_mode="floor")[:, None]
    cand = (c <= cur) & (pos_last[:, None] >= 0)
    forced = (c > first - params.local) & cand
    counted = (c > cur - params.local) & cand
    if params.sink:
        forced |= (c == 0) & cand
        counted |= (c == 0) & cand
    score = imp.masked_fill(~cand, float("-inf")).masked_fill(forced, float("inf"))
    return top_entries(score, params.topn, span_extra(forced, counted))


def _chunk_rows(b: int, h: int, n_cmp: int, n_q: int, bs: int) -> int:
    rows = max(1, CHUNK_ELEMENTS // max(1, b * h * max(1, n_cmp)))
    return min(n_q, max(bs, rows // bs * bs))


def scan(
    q: Tensor, k: Tensor, v: Tensor | None, params: NsaParams, *, scale: float
) -> tuple[Tensor | None, Tensor]:
    """One pass over query chunks: (O_cmp (B, H, N_q, D_v) fp32 (weights times block means in v's dtype,
    fp32 accumulation), or None without ``v``; the selection,
    bool (B, H_kv, N_q, NKB) for ``granularity="token"``, (B, H_kv, NQB, NKB) for ``"block"``)."""
    bs = params.block
    b, h, n_q, _ = q.shape
    hk, n_k = k.shape[1], k.shape[2]
    kc = compress(k, bs)
    vc = None if v is None else compress(v, bs)
    nkb = -(-n_k // bs)
    nqb = -(-n_q // bs)
    offset = n_k - n_q
    token = params.granularity == "token"
    sel = torch.zeros(b, hk, n_q if token else nqb, nkb, dtype=torch.bool, device=q.device)
    out = None if v is None else torch.zeros(b, h, n_q, v.shape[-1], dtype=torch.float32, device=q.device)
    vdt = torch.float32 if v is None or v.dtype == torch.float32 else v.dtype
    step = _chunk_rows(b, h, kc.shape[2], n_q, bs)
    for r0 in range(0, n_q, step):
        r1 = min(n_q, r0 + step)
        pos = torch.arange(r0, r1, device=q.device) + offset
        p = _cmp_probs(q[:, :, r0:r1], kc, pos, bs, scale)  # (B, H_kv, G, R, NC)
        if out is not None and vc is not None:
            # the weights by the block means in the input dtype (fp32 accumulation), as the reference's
            # low-precision run does: only the selection needs fp32 scores
            out[:, :, r0:r1] = (p.to(vdt) @ vc[:, :, None].to(vdt)).view(b, h, r1 - r0, -1).float()
        imp = p.detach().sum(2)  # (B, H_kv, R, NC)
        if token:
            sel[:, :, r0:r1] = _rank(imp, pos, pos, params, nkb)
            continue
        i0, i1 = r0 // bs, -(-r1 // bs)
        rows = torch.nn.functional.pad(imp, (0, 0, 0, i1 * bs - r1)).view(b, hk, i1 - i0, bs, -1).sum(3)
        blocks = torch.arange(i0, i1, device=q.device)
        last = torch.clamp((blocks + 1) * bs, max=n_q) - 1 + offset
        sel[:, :, i0:i1] = _rank(rows, blocks * bs + offset, last, params, nkb)
    return out, sel


def _row_rule(sel: Tensor, n_q: int, bs: int, offset: int):  # type: ignore[no-untyped-def]
    """mask_mod: key block of ``kv_idx`` selected by row ``q_idx`` (sel (B, H, N_q, NKB)), and causal."""
    nkb = sel.shape[-1]

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qi = q_idx.long().clamp(0, n_q - 1)
        kb = torch.div(kv_idx.long(), bs, rounding_mode="floor").clamp(0, nkb - 1)
        return sel[b.long(), h.long(), qi, kb] & (kv_idx <= q_idx + offset)

    return mask_mod


def selection_plan(q: Tensor, k: Tensor, sel: Tensor, params: NsaParams) -> Plan:
    """The selected branch's plan (B, H, NQB, NKB) in ``block`` tiles from :func:`scan`'s selection."""
    bs, h, hk = params.block, q.shape[1], k.shape[1]
    n_q, n_k = q.shape[2], k.shape[2]
    geo = geometry(n_q, n_k, bs, q.device)
    if params.granularity == "block":
        return tiles_plan(sel.repeat_interleave(h // hk, dim=1), geo, True)
    b = sel.shape[0]
    pad = geo.nqb * bs - n_q
    rows = torch.nn.functional.pad(sel, (0, 0, 0, pad)).view(b, hk, geo.nqb, bs, geo.nkb).any(3)
    tiles = (rows & geo.allowed(True)).repeat_interleave(h // hk, dim=1)
    rule = _row_rule(sel.repeat_interleave(h // hk, dim=1), n_q, bs, geo.offset)
    return Plan(n_q, n_k, True, bs, bs, torch.zeros_like(tiles), tiles, rule, kind="dynamic")


def estimate_selection(q: Tensor, k: Tensor, params: NsaParams, *, causal: bool, scale: float) -> Plan:
    """The selected branch's plan for q (B, H, N_q, D), k (B, H_kv, N_k, D) (fp32 estimate)."""
    _check(q, k, causal)
    _, sel = scan(q, k, None, params, scale=scale)
    return selection_plan(q, k, sel, params)


def gates(q: Tensor, inputs: Mapping[str, Tensor | None]) -> list[Tensor]:
    """The three gates (B|1, H|1, N_q|1, 1) fp32 in the order cmp, slc, swa; an absent gate is 1/3."""
    out = []
    for name in GATES:
        g = inputs.get(name)
        out.append(
            torch.full((1, 1, 1, 1), 1.0 / 3.0, device=q.device) if g is None else g.float()[..., None]
        )
    return out


def window_mask(n_q: int, n_k: int, window: int, device: torch.device) -> Tensor:
    """bool (N_q, N_k): ``p - window < j <= p`` (p = t + N_k - N_q)."""
    p = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, device=device)[None, :]
    return (j <= p) & (j > p - window)


def reference_given(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: NsaParams,
    selected: Tensor,
    *,
    scale: float,
    upcast: bool = True,
    **gate_inputs: Tensor | None,
) -> Tensor:
    """NSA over a given selected-branch token mask ``selected`` (bool, broadcastable to (B, H, N_q, N_k),
    e.g. a plan's ``dense_mask()``): the three branches of the module docstring, dense, combined by the
    gates (absent: 1/3). fp32 when ``upcast``, else in the input dtype (the compressed keys too)."""
    bs, h = params.block, q.shape[1]
    n_q, n_k = q.shape[2], k.shape[2]
    dt = torch.float32 if upcast else q.dtype
    kc = compress(k, bs).to(dt).repeat_interleave(h // k.shape[1], dim=1)
    vc = compress(v, bs).to(dt).repeat_interleave(h // k.shape[1], dim=1)
    pos = torch.arange(n_q, device=q.device) + (n_k - n_q)
    s = (q.to(dt) @ kc.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~_visible_blocks(pos, kc.shape[2], bs), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o_cmp = (p.to(dt) @ vc).float()
    o_slc = masked_softmax_attention(q, k, v, scale=scale, mask=selected, upcast=upcast).float()
    o_swa = torch.zeros_like(o_cmp)
    if params.window > 0:
        m = window_mask(n_q, n_k, params.window, q.device)
        o_swa = masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast).float()
    g_cmp, g_slc, g_swa = gates(q, gate_inputs)
    return (g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa).to(q.dtype)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: NsaParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    g_cmp: Tensor | None = None,
    g_slc: Tensor | None = None,
    g_swa: Tensor | None = None,
) -> Tensor:
    """NSA (module docstring): the selection estimated in fp32, then :func:`reference_given`."""
    plan = estimate_selection(q, k, params, causal=causal, scale=scale)
    return reference_given(q, k, v, params, plan.dense_mask(), scale=scale, upcast=upcast,
                           g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa)  # fmt: skip


_OP_MODULE = "attnlab.kernels.block_sparse.op"


class NsaBackend(Backend):
    """The three branches on the block-sparse executor (selected, window) and one fp32 pass (compressed)."""

    name = "block_sparse"
    triton = True
    summary = "compressed branch in fp32 chunks; selected and window branches on the block-sparse executor"
    caps = Capabilities(
        min_head_dim=16,
        max_head_dim=256,
        same_v_dim=True,
        patterns=frozenset({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS}),
        where="GPU; CPU via Triton's interpreter",
    )

    def reasons(self, call: Call) -> list[str]:
        import sys

        mod = sys.modules.get(_OP_MODULE)
        why = triton_refusal(call.problem.device, None if mod is None else bool(mod.IMPORTED_INTERPRETED))
        return [why] if why else []

    def plan(self, q: Tensor, k: Tensor, call: Call) -> Any:
        """The selected branch's plan."""
        assert isinstance(call.params, NsaParams)
        return estimate_selection(q, k, call.params, causal=call.problem.causal, scale=call.scale)

    def _window_tables(self, call: Call) -> tuple[Tensor, ...]:
        tables = call.memo.get("nsa_window")
        if tables is None:
            from attnlab.plans import static_plan
            from attnlab.plans.executor import executor_tables
            from attnlab.registry import get

            p = call.problem
            spec = get("sliding_window")
            block = CPU_TILE if p.device.type == "cpu" else TILE
            plan = static_plan(spec, spec.make_params({"window": call.params.window}),  # type: ignore[attr-defined]
                               p.n_q, p.n_k, True, p.device, block)  # fmt: skip
            tables = executor_tables(plan).as_args()
            call.memo["nsa_window"] = tables
        return tables  # type: ignore[no-any-return]

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        params = call.params
        assert isinstance(params, NsaParams)
        _check(q, k, call.problem.causal)
        o_cmp, sel = scan(q, k, v, params, scale=call.scale)
        assert o_cmp is not None
        window = self._window_tables(call) if params.window > 0 else None
        return combine(q, k, v, o_cmp, selection_plan(q, k, sel, params), window, call.scale, extra)


def combine(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o_cmp: Tensor,
    plan: Plan,
    window_tables: tuple[Tensor, ...] | None,
    scale: float,
    gate_inputs: Mapping[str, Tensor | None],
) -> Tensor:
    """The fast path's output from the compressed branch ``o_cmp`` (fp32, :func:`scan`), the selected
    branch's ``plan`` and the window plan's executor tables (None: no window branch), run on the
    block-sparse executor and combined by the gates in fp32."""
    from attnlab.kernels.block_sparse.op import block_sparse_attention
    from attnlab.plans.executor import executor_tables

    o_slc, _ = block_sparse_attention(q, k, v, executor_tables(plan).as_args(), scale, True)
    g_cmp, g_slc, g_swa = gates(q, gate_inputs)
    out = g_cmp * o_cmp + g_slc * o_slc.float()
    if window_tables is not None:
        o_swa, _ = block_sparse_attention(q, k, v, window_tables, scale, True)
        out = out + g_swa * o_swa.float()
    elif g_swa.requires_grad:  # no window branch: the gate's gradient is 0, as in the reference
        out = out + 0.0 * g_swa
    return out.to(q.dtype)


def _gate_sample(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator)


def _gate(name: str, branch: str) -> TensorInput:
    return TensorInput(name, ("B", "H", "N_q"), f"gate of the {branch} branch (e.g. a sigmoid output); "
                       "absent: 1/3", required=False, broadcast=True, sample=_gate_sample)  # fmt: skip


def _bench(n: int) -> list[dict[str, int | str]]:
    """The defaults (16 blocks of 64 and a 512 window), then twice the blocks."""
    return [{}, {"topn": 32}]


SPEC = MethodSpec(
    name="nsa",
    family="dynamic",
    paper="Native Sparse Attention (Yuan et al., ACL 2025); fla-org/native-sparse-attention",
    summary="gated sum of compressed-block (mean-pooled), top-n selected-block and sliding-window "
    "attention (training-free; gates given)",
    param_class=NsaParams,
    reference=reference,
    backends=(NsaBackend(),),
    patterns=frozenset({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS}),
    inputs=(_gate("g_cmp", "compressed"), _gate("g_slc", "selected"), _gate("g_swa", "sliding-window")),
    test_params=(
        {"block": 16, "topn": 2, "window": 8},
        {"block": 16, "topn": 3, "window": 0, "local": 2, "sink": True, "granularity": "token"},
    ),
    bench_params=_bench,
    softmax_normalized=False,  # a gated sum of three softmax outputs: no single log-sum-exp
)
