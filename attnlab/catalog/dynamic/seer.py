"""``seer`` (SeerAttention, Gao et al., 2024), training-free use: a learned block gate, given as weights,
picks the key blocks of each query block; attention is exact softmax attention over those blocks.

Gate (per batch, query head and query block ``i``; key block ``j``; fp32 whatever the input dtype, so a
bf16 call and its fp32 reference choose the same blocks)::

    qf[i] = avg of q over query block i                          (D)        the paper's "Qavg"
    kf[j] = [max | min | avg] of k over key block j               (3, D)     its "Kmaxminavg"
    gq[i] = qf[i] @ w_q[h]                    (w_q (H, D, D_gate))
    gk[j] = sum_p kf[j, p] @ w_k[h_kv, p]     (w_k (H_kv, 3, D, D_gate): the official (H_kv, 3 D, D_gate)
                                               weight viewed as (H_kv, 3, D, D_gate), order max, min, avg)
    prob[i, :] = softmax_j(gq[i] . gk[j] / sqrt(D_gate))  over the allowed key blocks (causal: block j
                                               starts at or before query block i's last position)
    keep: with ``threshold`` > 0 the blocks with prob > threshold, else the ``topk`` most probable;
          always the local span: the key blocks holding one of query block i's positions (one block,
          or two when N_k - N_q is not a multiple of ``block``: causal cross-attention, e.g. chunked
          prefill after a cached prefix, where the block of its last position alone would leave its
          first rows without their own position).

The local span counts as one block of ``topk`` (the block of the query block's last position); a second
span block comes on top of it, so such a query block keeps ``topk + 1`` blocks and its gate still picks
``topk - 1``.

Blocks are pooled over their rows inside the matrix (a ragged last block over its real rows, as the
official ``avg_pool3d(ceil_mode=True)`` / ``max_pool3d`` do). Positions are bottom-right aligned
(query ``t`` at ``t + N_k - N_q``); causal tiles that straddle the diagonal are partial with the causal
rule. A query row with no allowed key (causal cross-attention, N_q > N_k) gets zeros.

Without weights (the defined default): a side whose weight is absent uses its **avg-pooled** vectors
unprojected (identity, so D_gate = D there): with neither weight the gate is ``softmax(avg q . avg k /
sqrt(D))``, i.e. ``block_topk``'s pooled score with a gate scale; a lone weight must then have
D_gate = D. GQA: ``w_k`` has one projection per kv head, shared by its group (the official two-linear
gate); the official single-linear variant (no q projection, a k projection per *query* head) is not taken.

Checked against the official code (microsoft/SeerAttention, ``seer_attn/attn_gate.py``: ``AttnGate``
pools with ``avg_pool3d`` / ``max_pool3d`` / ``min_pool3d`` over ``block_size`` rows with
``ceil_mode=True``, concatenates the k poolings in the order max, min, avg, projects with
``MultiHeadLinear`` (weight (heads, in, hidden)), scores ``q @ k^T / sqrt(hidden)`` under the block
causal mask, softmax; ``modules/common.py``: ``get_sparse_attn_mask_from_threshold`` keeps ``x >
threshold``, the top-k variant ``torch.topk`` then ``tril``). Not reproduced: the gate's RoPE on the
pooled vectors (the official gate runs on the pre-RoPE q/k with block positions; here the gate sees the
q, k you pass), ``last_block_dense`` and training (the distillation loss). Defaults: ``block`` 64
(``seerattn_gate_block_size``), ``topk`` 16, ``threshold`` 0 (top-k mode).

Backends: ``block_sparse`` (the estimated plan on the block-sparse executor, forward and backward) and
``eager`` (the plan's dense mask, softmax in the input dtype). The weights have no gradient here (the
selection is discrete). With ``return_plan``, the plan is the one the call executed (estimated once,
through the call's spec, which records it for that call alone; nothing is kept in the call's memo).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities, dense_size_reasons
from attnlab.catalog.dynamic._tiles import BLOCKS, geometry, span_extra, tiles_plan, top_entries
from attnlab.core import MethodSpec, TensorInput
from attnlab.errors import InputError, ParamError
from attnlab.kernels.triton_utils import triton_refusal
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS
from attnlab.plans import Plan
from attnlab.reference import masked_softmax_attention
from attnlab.registry import register

#: the key poolings the gate concatenates, in the official order ("Kmaxminavg")
K_POOLS = ("max", "min", "avg")


@dataclass(frozen=True)
class SeerParams(Params):
    """``block``: gate block = tile size, one of 16, 32, 64, 128, 256 (default 64, SeerAttention's).
    ``topk``: key blocks kept per query block, the local one included (>= 1; default 16), when
    ``threshold`` is 0. ``threshold``: in [0, 1); > 0 keeps every key block whose gate probability is above
    it (``topk`` then unused; the official threshold mode), 0 keeps the ``topk`` most probable (default 0).
    The local span (the key blocks holding the query block's positions) is always kept; it counts as one
    block of ``topk``, a second span block (N_k - N_q not a multiple of ``block``) comes on top."""

    method = "seer"
    block: int = 64
    topk: int = 16
    threshold: float = 0.0

    def validate(self) -> None:
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"seer: block={self.block!r}; the executor takes tiles of {BLOCKS}")
        self.check_int("topk", minimum=1)
        self.check_float("threshold")
        if not 0.0 <= float(self.threshold) < 1.0:
            raise ParamError(
                f"seer: threshold={self.threshold!r} must be in [0, 1) (a gate probability; 0 = keep topk)"
            )


def _pools(x: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """(max, min, avg) of x (B, H, N, D) over blocks of ``block`` rows, fp32 (B, H, NB, D) each; a ragged
    last block over its real rows. Max and min are exact in x's dtype; the mean accumulates in fp32 (no
    fp32 copy of x)."""
    b, h, n, d = x.shape
    nb = -(-n // block)
    pad = nb * block - n
    xd = x.detach()
    full = xd[:, :, : (nb - 1) * block].reshape(b, h, nb - 1, block, d)
    tail = xd[:, :, (nb - 1) * block :]  # the last block's real rows (block - pad of them)
    mx = torch.cat([full.amax(3), tail.amax(2, keepdim=True)], 2).float()
    mn = torch.cat([full.amin(3), tail.amin(2, keepdim=True)], 2).float()
    sums = torch.cat([full.sum(3, dtype=torch.float32), tail.sum(2, keepdim=True, dtype=torch.float32)], 2)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = block - pad
    return mx, mn, sums / counts[:, None]


def _check_weights(q: Tensor, k: Tensor, w_q: Tensor | None, w_k: Tensor | None) -> int:
    """D_gate of the weights after checking their shapes against q (B, H, N_q, D), k (B, H_kv, N_k, D)."""
    h, d, hk = q.shape[1], q.shape[-1], k.shape[1]
    gate = None
    if w_q is not None:
        if w_q.dim() != 3 or tuple(w_q.shape[:2]) != (h, d):
            raise InputError(
                f"seer: w_q has shape {tuple(w_q.shape)}; expected (H, D, D_gate) = ({h}, {d}, D_gate)"
            )
        gate = int(w_q.shape[2])
    if w_k is not None:
        if w_k.dim() != 4 or tuple(w_k.shape[:3]) != (hk, len(K_POOLS), d):
            raise InputError(
                f"seer: w_k has shape {tuple(w_k.shape)}; expected (H_kv, 3, D, D_gate) = ({hk}, 3, {d}, "
                "D_gate) (the official (H_kv, 3 D, D_gate) weight .view(H_kv, 3, D, D_gate); poolings max, min, avg)"
            )
        if gate is not None and int(w_k.shape[3]) != gate:
            raise InputError(
                f"seer: w_q gives D_gate = {gate}, w_k gives {int(w_k.shape[3])}; they must agree"
            )
        gate = int(w_k.shape[3])
    if gate is None:
        return d
    if (w_q is None or w_k is None) and gate != d:
        absent = "w_q" if w_q is None else "w_k"
        raise InputError(
            f"seer: {absent} is absent, so its side is the avg-pooled vectors (width D = {d}), but the other "
            f"weight projects to D_gate = {gate}: pass both weights, or a weight with D_gate = D"
        )
    return gate


def gate_probs(
    q: Tensor,
    k: Tensor,
    params: SeerParams,
    *,
    causal: bool,
    w_q: Tensor | None = None,
    w_k: Tensor | None = None,
) -> Tensor:
    """The gate's block probabilities (B, H, NQB, NKB) fp32 (module docstring); 0 on blocks a query block
    may not see, and all 0 for a query block that sees none."""
    if q.shape[1] % k.shape[1]:
        raise InputError(f"seer: H={q.shape[1]} query heads must be a multiple of H_kv={k.shape[1]}")
    gate = _check_weights(q, k, w_q, w_k)
    bs, h, hk = params.block, q.shape[1], k.shape[1]
    geo = geometry(q.shape[2], k.shape[2], bs, q.device)
    gq = _pools(q, bs)[2]
    if w_q is not None:
        gq = gq @ w_q.detach().float()[None]  # (B, H, NQB, D) @ (1, H, D, G)
    kmax, kmin, kavg = _pools(k, bs)
    if w_k is not None:
        wk = w_k.detach().float()[None]  # (1, H_kv, 3, D, G)
        gk = kmax @ wk[:, :, 0] + kmin @ wk[:, :, 1] + kavg @ wk[:, :, 2]
    else:
        gk = kavg
    gk = gk.repeat_interleave(h // hk, dim=1)
    s = (gq @ gk.transpose(-1, -2)) * gate**-0.5
    s = s.masked_fill(~geo.allowed(causal), float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def estimate(
    q: Tensor,
    k: Tensor,
    params: SeerParams,
    *,
    causal: bool,
    scale: float,
    w_q: Tensor | None = None,
    w_k: Tensor | None = None,
) -> Plan:
    """The plan (B, H, NQB, NKB) of the gate for q (B, H, N_q, D), k (B, H_kv, N_k, D) and the optional
    weights (module docstring). ``scale`` is the attention's; the gate's own is 1 / sqrt(D_gate)."""
    prob = gate_probs(q, k, params, causal=causal, w_q=w_q, w_k=w_k)
    geo = geometry(q.shape[2], k.shape[2], params.block, q.device)
    allowed = geo.allowed(causal)
    local = geo.local_span() & allowed
    if params.threshold > 0:
        keep = prob > params.threshold
    else:  # the local span ranks first; it counts as one block of topk (its second block on top)
        last = torch.zeros_like(local)
        last[torch.arange(geo.nqb, device=q.device), geo.local()] = True
        extra = span_extra(local, last & allowed)
        ranked = prob.masked_fill(~allowed, float("-inf")).masked_fill(local, 2.0)
        keep = top_entries(ranked, params.topk, extra)
    keep = (keep | local) & allowed
    return tiles_plan(keep, geo, causal)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: SeerParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    w_q: Tensor | None = None,
    w_k: Tensor | None = None,
) -> Tensor:
    """``O = softmax(scale * Q K^T + M) V`` with ``M = -inf`` outside the gate's plan (:func:`estimate`,
    dense from its token mask); fp32 when ``upcast``. Rows with no computed pair give zeros."""
    mask = estimate(q, k, params, causal=causal, scale=scale, w_q=w_q, w_k=w_k).dense_mask()
    return masked_softmax_attention(q, k, v, scale=scale, mask=mask, upcast=upcast)


def _estimated(q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Plan:
    """The gate's plan for this run, with its weights, through the call's spec: a call with ``return_plan``
    estimates through a recorder (``attnlab.api._recording``), which hands this very plan back. Nothing is
    kept in ``call.memo``: a cached call lives as long as its op, and a plan there (with its executor
    tables on the device) would outlive the run and be seen by another thread's call of the signature."""
    assert isinstance(call.params, SeerParams)
    plan: Plan = call.spec.estimate_plan(q, k, call, extra)
    return plan


_OP_MODULE = "attnlab.kernels.block_sparse.op"


class SeerBackend(Backend):
    """The gate's plan on the block-sparse executor (the estimator sees the weights)."""

    name = "block_sparse"
    triton = True
    summary = "the gate's block plan on attnlab's block-sparse Triton executor (fwd + bwd)"
    caps = Capabilities(
        min_head_dim=16,
        max_head_dim=256,
        same_v_dim=True,
        lse=True,
        plan_kinds=frozenset({"dynamic"}),
        where="GPU; CPU via Triton's interpreter",
    )

    def reasons(self, call: Call) -> list[str]:
        import sys

        mod = sys.modules.get(_OP_MODULE)
        why = triton_refusal(call.problem.device, None if mod is None else bool(mod.IMPORTED_INTERPRETED))
        return [why] if why else []

    def plan(self, q: Tensor, k: Tensor, call: Call) -> Any:
        return _estimated(q, k, call, {})  # the weightless gate's

    def plan_for(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Any:
        return _estimated(q, k, call, extra)

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        from attnlab.kernels.block_sparse.op import block_sparse_attention
        from attnlab.plans.executor import executor_tables

        tables = executor_tables(_estimated(q, k, call, extra)).as_args()
        out, lse = block_sparse_attention(q, k, v, tables, call.scale, call.problem.causal)
        return out, lse

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        return self.run_lse(q, k, v, call, extra)[0]


class SeerEagerBackend(Backend):
    """The gate's plan as a dense mask, softmax attention in the input dtype (plain PyTorch)."""

    name = "eager"
    summary = "the gate's plan as a dense mask, softmax in the input dtype (plain PyTorch, O(N^2) memory)"
    caps = Capabilities(plan_kinds=frozenset({"dynamic"}))

    def reasons(self, call: Call) -> list[str]:
        return dense_size_reasons(self.name, call, call.problem.dense_elements)

    def plan(self, q: Tensor, k: Tensor, call: Call) -> Any:
        return _estimated(q, k, call, {})  # the weightless gate's

    def plan_for(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Any:
        return _estimated(q, k, call, extra)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        mask = _estimated(q, k, call, extra).dense_mask()
        return masked_softmax_attention(q, k, v, scale=call.scale, mask=mask, upcast=False)


def _weight_sample(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """A random projection, scaled so the gate's scores stay O(1)."""
    return torch.randn(shape, generator=generator) * shape[-2] ** -0.5


def _bench(n: int) -> list[dict[str, int]]:
    blocks = -(-n // 64)
    return [{"topk": max(2, blocks // 16)}, {"topk": max(2, blocks // 8)}]


SPEC = register(
    MethodSpec(
        name="seer",
        family="dynamic",
        paper="SeerAttention (Gao et al., 2024); microsoft/SeerAttention",
        summary="a learned block gate (avg-pooled q, max/min/avg-pooled k through given weights) picks the "
        "key blocks: top-k or above a threshold, local block kept",
        param_class=SeerParams,
        reference=reference,
        backends=(SeerBackend(), SeerEagerBackend()),
        patterns=ALL_PATTERNS,
        estimate=estimate,
        estimate_inputs=("w_q", "w_k"),
        inputs=(
            TensorInput(
                "w_q",
                ("H", "D", "D_gate"),
                "the gate's query projection (absent: identity on the avg-pooled q)",
                required=False,
                sample=_weight_sample,
            ),
            TensorInput(
                "w_k",
                ("H_kv", 3, "D", "D_gate"),
                "the gate's key projection over the max, min, avg "
                "pooled k (absent: identity on the avg-pooled k)",
                required=False,
                sample=_weight_sample,
            ),
        ),
        test_params=({"block": 16, "topk": 2}, {"block": 16, "threshold": 0.2}),
        bench_params=_bench,
    )
)
