"""The ``flex`` backend: FlexAttention running the call's sparsity plan as a BlockMask.

Softmax methods pass their plan; methods whose weights are not softmax-normalised (sigmoid) pass a
``score_mod`` giving log-weights and set ``unnormalized``: FlexAttention then returns
``O' = sum_j w_ij v_j / sum_j w_ij`` and ``lse_i = log sum_j w_ij``, and ``O = O' * exp(lse)`` recovers
``sum_j w_ij v_j`` exactly (rows with no allowed key: lse = -inf, O = 0).

What a call needs besides the tensors (its plan's BlockMask, the score_mod's captured values) is made once
per call signature and kept in ``call.memo``, so a repeated call does no host work beyond the launch.

Packed sequences (``cu_seqlens``, :meth:`FlexBackend.run_varlen`): one FlexAttention call over the packed
tokens (batch 1, T_q queries, T_k keys). Its mask is "same sequence" (a sequence id per packed token) AND
the method's own mask_mod evaluated at the pair's *local* positions: query ``i`` of a sequence of N_q
queries and N_k keys sits at ``p = i + N_k - N_q`` (bottom-right per sequence, the API's convention for
cross shapes), key ``j`` at its index in its sequence. Small int32 tables on q's device hold the sequence
id and the local position of every packed token. The BlockMask comes from each sequence's own static plan
joined block-diagonally (:func:`attnlab.plans.executor.varlen_plan`: tiles, never an N x N tensor). A
score_mod is evaluated at local positions too (ALiBi's distance is within the sequence), or at packed
indices where it reads a tensor input by token (those inputs are packed along their token axes like q).

Which methods take packed calls is decided per method (:data:`VARLEN`, each entry checked against the
method's mask factory, score_mod and output transform); any other method's packed call is refused with
the reason, so dispatch runs its sequences one by one (never a silently wrong result).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.core import MethodSpec
from attnlab.kernels import flex as flex_exec
from attnlab.masks import MaskContext, MaskMod, causal_mask
from attnlab.plans import Plan, causal_plan, static_plan
from attnlab.plans.executor import varlen_plan
from attnlab.plans.static import BLOCK

ScoreModFactory = Callable[[Call], flex_exec.ScoreMod]

#: How a score_mod is evaluated over packed sequences: at local positions (it depends on positions only
#: through the bottom-right query position ``p`` and the key index ``j``, e.g. ALiBi's ``|p - j|``) ...
LOCAL = "local"
#: ... or at packed token indices (it reads tensor inputs by token, which are packed like q and k).
PACKED = "packed"

#: The methods whose FlexAttention form runs packed sequences in one launch, each checked by hand:
#: how its score_mod is evaluated (``None``: it has none, or one that reads no position or token). Masks
#: listed here depend on positions only through ``p`` (``q_idx + ctx.offset``) and ``j`` and on the lengths
#: only through the ``n_q + n_k`` cap of their constants (tests/test_flex_varlen.py checks each against
#: the method's own dense mask at several lengths). Not listed, hence refused: neighborhood, multi_axis,
#: radial (a grid or frame sized by the sequence length), strided_heads (its own per-head plan),
#: affine_scaled (the output transform averages v over the whole call), softplus (LSSA's length scale reads
#: N_k; q and k are normalised in its own ``run``), sigmoid (the default bias ``-ln N_k`` reads N_k), sink
#: (not yet checked on a GPU: its Flex form needs the lse, which CPU Flex cannot return), lowrank_bias and
#: every method without a Flex backend.
VARLEN: dict[str, str | None] = {
    "softmax": None,
    "sliding_window": None,
    "streaming": None,
    "dilated": None,
    "block_local": None,
    "power": None,
    "doc_blocks": None,
    "alibi": LOCAL,  # slopes per head (H,); the penalty reads p - j
    "softcap": LOCAL,  # the optional window reads p - j
    "bias": PACKED,  # bias[b, h, q, k], packed (1|B, H|1, T_q|1, T_k|1)
    "selective": PACKED,  # temperature[b, h, q], packed along N_q
    "gated": None,  # the gate (output transform) is elementwise per packed query row
}

#: Smallest length of the per-token tables (they are padded to a power of two >= the packed totals).
MIN_TABLE = 128


def table_size(total: int) -> int:
    """The length of the per-token tables of a packing of ``total`` tokens: the next power of two, at
    least :data:`MIN_TABLE` (a multiple of FlexAttention's 128-token tiles, so every index its kernel
    evaluates is inside). Totals in one size share the compiled kernel."""
    return max(MIN_TABLE, 1 << max(0, total - 1).bit_length())


class FlexBackend(Backend):
    name = "flex"
    summary = "FlexAttention (compiled; the plan's BlockMask built once per shape and parameters)"
    #: an output transform after FlexAttention (see :class:`attnlab.catalog.variants._common.VariantFlexBackend`)
    finish: Any = None

    def __init__(self, score_mod: ScoreModFactory | None = None, unnormalized: bool = False) -> None:
        self.score_mod = score_mod
        self.unnormalized = unnormalized
        self.caps = Capabilities(
            min_head_dim=16,
            lse=not unnormalized,
            plan_kinds=frozenset({"static"}),
            varlen=True,
            # compiled CPU FlexAttention cannot return the lse the unnormalised form needs
            where="GPU" if unnormalized else "GPU; CPU forward only",
        )

    def reasons(self, call: Call) -> list[str]:
        p = call.problem
        out = []
        if p.device.type == "cpu":
            if p.requires_grad:
                out.append(
                    "FlexAttention has no backward on CPU (PyTorch raises NotImplementedError); use CUDA"
                )
            if self.unnormalized:
                out.append(
                    "compiled FlexAttention on CPU cannot return the log-sum-exp this method's flex form needs"
                )
            if call.want_lse:
                out.append("compiled FlexAttention on CPU cannot return the log-sum-exp")
            if p.dtype == torch.float16:
                out.append("compiled FlexAttention on CPU does not take float16; use bfloat16 or float32")
        if call.packing is not None:
            out += self.varlen_refusals(call.spec)
        return out

    def varlen_refusals(self, spec: MethodSpec) -> list[str]:
        """Why this backend cannot run ``spec``'s packed sequences in one launch (empty: it can)."""
        if spec.name not in VARLEN:
            return [
                f"method {spec.name!r} is not checked for packed sequences on FlexAttention (its mask, "
                "score_mod or output transform may read the sequence length or the whole call); its "
                "sequences run one by one"
            ]
        if type(self)._plan is not FlexBackend._plan:
            return [
                f"this flex backend of {spec.name!r} runs a plan of its own, not checked for packed sequences"
            ]
        return []

    def _plan(self, call: Call) -> Plan | None:
        """The plan FlexAttention runs: the method's, or the causal one for dense causal calls."""
        p = call.problem
        if call.spec.mask is not None:
            return static_plan(call.spec, call.params, p.n_q, p.n_k, p.causal, p.device)
        return causal_plan(p.n_q, p.n_k, p.device) if p.causal else None

    def _score_mod(self, call: Call, extra: Mapping[str, Tensor]) -> flex_exec.ScoreMod | None:
        """The call's score_mod (None: plain scores); subclasses build theirs from ``extra`` too."""
        return self.score_mod(call) if self.score_mod else None

    def _kwargs(self, q: Tensor, k: Tensor, call: Call) -> dict[str, Any]:
        kwargs: dict[str, Any] | None = call.memo.get("flex_kwargs")
        if kwargs is None:
            p = call.problem
            plan = self._plan(call)
            kwargs = {
                "block_mask": plan.block_mask() if plan is not None else None,
                "score_mod": self.score_mod(call) if self.score_mod else None,
                "scale": call.scale,
                "options": flex_exec.flex_options(p.n_q, p.n_k, p.group > 1, p.device),
            }
            if not torch.compiler.is_compiling():
                call.memo["flex_kwargs"] = kwargs
        return kwargs

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        if self.unnormalized:
            out, lse = flex_exec.flex_run(q, k, v, **self._kwargs(q, k, call), return_lse=True)
            assert lse is not None
            return (out.float() * torch.exp(lse.float())[..., None]).to(q.dtype)
        return flex_exec.flex_run(q, k, v, **self._kwargs(q, k, call))[0]

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        out, lse = flex_exec.flex_run(q, k, v, **self._kwargs(q, k, call), return_lse=True)
        assert lse is not None
        return out, lse.float()

    # -- packed sequences ---------------------------------------------------------------------------
    def varlen_plans(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> list[Any]:
        """Each sequence's static plan in its own coordinates (the method's mask at the sequence's
        lengths, 128 x 128 tiles); None for an empty sequence or a dense method."""
        pk = call.packing
        assert pk is not None, "varlen_plans needs a packed call"
        p, spec = call.problem, call.spec
        plans: list[Any] = []
        for s in range(pk.count):
            n_q, n_k = pk.lengths(s)
            empty = n_q == 0 or n_k == 0
            plans.append(
                None
                if empty or spec.mask is None
                else static_plan(spec, call.params, n_q, n_k, p.causal, p.device)
            )
        return plans

    def _varlen_setup(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> dict[str, Any]:
        """What a packing needs beside the tensors, made once per packing (``call.memo``): the BlockMask
        (the sequences' plans joined block-diagonally, its token rule :func:`_packed_mask`), the per-token
        tables, the options, and the call a LOCAL score_mod is built from."""
        memo: dict[str, Any] | None = call.memo.get("flex_varlen")
        if memo is not None:
            return memo
        pk = call.packing
        assert pk is not None
        p, dev = call.problem, q.device
        size = table_size(max(pk.cu_q[-1], pk.cu_k[-1]))
        tables = tuple(_static(t.to(dev)) for t in _token_tables(pk.cu_q, pk.cu_k, size))
        # one key frame for every sequence: offset 0 (the query tables hold p), constants capped at 2 x size
        ctx = MaskContext(size, size, p.causal, dev)
        # a dense method's rule is causal_mask whether causal or not (its flag is a captured tensor), so
        # causal and non-causal packings share the compiled kernel
        factory = call.spec.mask if call.spec.mask is not None else causal_mask
        mask_mod = _packed_mask(factory(call.params, ctx), *tables)
        plan = varlen_plan(
            list(pk.cu_q), list(pk.cu_k), self.varlen_plans(q, k, call, extra), p.causal, BLOCK, dev
        )
        block_mask = replace(plan, mask_mod=mask_mod, _memo={}).block_mask()
        local = replace(call, problem=replace(p, batch=1, n_q=size, n_k=size), packing=None, memo={})
        memo = {
            "block_mask": block_mask,
            "options": flex_exec.flex_options(pk.cu_q[-1], pk.cu_k[-1], p.group > 1, dev),
            "tables": tables,
            "local_call": local,
        }
        if not torch.compiler.is_compiling():
            call.memo["flex_varlen"] = memo
        return memo

    def _varlen_score_mod(
        self, call: Call, extra: Mapping[str, Tensor], setup: dict[str, Any]
    ) -> flex_exec.ScoreMod | None:
        """The method's score_mod over the packed tokens (see :data:`VARLEN`)."""
        mode = VARLEN.get(call.spec.name)
        if mode != LOCAL:  # PACKED (token-indexed inputs, packed like q) or position-free
            return self._score_mod(call, extra)
        inner = self._score_mod(setup["local_call"], extra)
        if inner is None:
            return None
        _, _, pos_q, pos_k = setup["tables"]

        def local_score(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return inner(score, b, h, pos_q[q_idx], pos_k[kv_idx])

        return local_score

    def run_varlen(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        """Packed sequences in one FlexAttention call (see the module docstring): (out (1, H, T_q, D_v),
        lse (1, H, T_q) float32 or None). Rows without a key (an empty key sequence, or the mask) give 0
        (lse -inf).

        Compilation: the kernel is the one compiled FlexAttention (``dynamic=True``); the per-token tables
        it captures are padded to :func:`table_size` of the packed totals, so a new packing or new lengths
        within one size reuse the compiled kernel. A total past the size compiles once more for the new
        size (on a CPU the tables are static-shaped, as PyTorch's CPU template needs; on a GPU it may then
        mark their sizes dynamic)."""
        p = call.problem
        want_lse = call.want_lse or self.unnormalized  # (a finish that needs it: unnormalized)
        t_q, t_k = q.shape[2], k.shape[2]
        if t_q == 0 or t_k == 0:  # no query, or no key anywhere: zero rows, lse -inf
            zeros = q.new_zeros((1, p.heads, t_q, p.v_dim))
            no_key = torch.full((1, p.heads, t_q), float("-inf"), device=q.device)
            if self.finish is not None:
                zeros = self.finish(zeros, no_key, q, k, v, call, extra)
            return zeros, no_key if call.want_lse else None
        setup = self._varlen_setup(q, k, call, extra)
        out, lse = flex_exec.flex_run(
            q, k, v,
            block_mask=setup["block_mask"],
            score_mod=self._varlen_score_mod(call, extra, setup),
            scale=call.scale,
            options=setup["options"],
            return_lse=want_lse,
        )  # fmt: skip
        if self.finish is not None:
            out = self.finish(out, lse, q, k, v, call, extra)
        elif self.unnormalized:
            assert lse is not None
            out = (out.float() * torch.exp(lse.float())[..., None]).to(q.dtype)
        return out, (lse.float() if call.want_lse and lse is not None else None)


def _token_tables(cu_q: tuple[int, ...], cu_k: tuple[int, ...], size: int) -> tuple[Tensor, ...]:
    """(seg_q, seg_k, pos_q, pos_k), int32 (``size``,) on the host: each packed query's and key's sequence
    (padding: -1 for queries, -2 for keys, which never match), each query's bottom-right position
    ``p = i + N_k - N_q`` in its sequence, each key's index in its sequence."""
    starts_q, starts_k = torch.tensor(cu_q), torch.tensor(cu_k)
    n_q, n_k = starts_q.diff(), starts_k.diff()
    ids = torch.arange(len(cu_q) - 1)
    t_q, t_k = cu_q[-1], cu_k[-1]
    seg_q = torch.full((size,), -1, dtype=torch.int32)
    seg_k = torch.full((size,), -2, dtype=torch.int32)
    pos_q = torch.zeros(size, dtype=torch.int32)
    pos_k = torch.zeros(size, dtype=torch.int32)
    seg_q[:t_q] = ids.repeat_interleave(n_q)
    seg_k[:t_k] = ids.repeat_interleave(n_k)
    pos_q[:t_q] = torch.arange(t_q) - (starts_q[:-1] - (n_k - n_q)).repeat_interleave(n_q)
    pos_k[:t_k] = torch.arange(t_k) - starts_k[:-1].repeat_interleave(n_k)
    return seg_q, seg_k, pos_q, pos_k


def _static(t: Tensor) -> Tensor:
    """``t`` as a mask_mod should capture it. On a CPU, a static-shaped alias: PyTorch's CPU FlexAttention
    template (torch 2.13) emits C++ that does not compile once dynamic shapes make a captured tensor's size
    symbolic (as :func:`attnlab.catalog.variants._common.captured` notes)."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return t
    alias = t.view(t.shape)
    torch._dynamo.mark_static(alias)
    return alias


def _packed_mask(inner: MaskMod, seg_q: Tensor, seg_k: Tensor, pos_q: Tensor, pos_k: Tensor) -> MaskMod:
    """The token rule of a packing: same sequence, and ``inner`` (the method's mask in one key frame of
    offset 0) at the pair's local positions (query: ``p``, key: ``j``)."""

    def packed(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (seg_q[q_idx] == seg_k[kv_idx]) & inner(b, h, pos_q[q_idx], pos_k[kv_idx])

    return packed


FLEX = FlexBackend()
