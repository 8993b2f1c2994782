"""What the softmax variants share: the reference's building blocks (plain PyTorch, dense), the Flex
backend that builds a variant's score_mod from the call and its tensor inputs, and the SDPA backend of the
output-transform variants (gated, affine_scaled).

Conventions of every variant: q (B, H, N_q, D), k (B, H_kv, N_k, D), v (B, H_kv, N_k, D_v); logits
``s_ij = scale * q_i . k_j`` (``scale`` defaults to ``1 / sqrt(D)``); causal calls allow ``j <= p_i`` with
``p_i = i + N_k - N_q`` (bottom-right); a row with no allowed key returns 0, never NaN.

The log-sum-exp (``return_lse=True``): the natural log of a row's normaliser, ``lse_i = log sum_j
exp(x_ij)`` over the allowed keys, ``x`` the method's *transformed* logits (soft-capped, biased, ...; sink:
the sink term ``exp(s_h)`` included), float32 (B, H, N_q), -inf on a row with no allowed key. Each method
whose weights are a softmax of its logits gives it: softcap, alibi, bias, sink, selective, lowrank_bias, and
gated (an output gate on plain softmax: plain softmax's lse). softplus (l1-normalised softplus weights) and
affine_scaled (weights ``alpha P + beta / n``, whose split outputs the lse alone cannot merge) have none.
Each such module has ``reference_lse(...) -> (out, lse)`` (the package's ``LSE_REFERENCES``); the ``eager``
backend (:class:`VariantEagerBackend`), the Triton kernel and FlexAttention (GPU) return it, and so does
the ``reference`` backend (attnlab/backends/eager.py), through the spec's ``MethodSpec.reference_lse``; the
parity harness checks every backend's lse against it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.base import Backend, Call, Capabilities
from attnlab.backends.eager import EagerBackend
from attnlab.backends.flex import FlexBackend
from attnlab.kernels import flex as flex_exec
from attnlab.kernels.heads import expand_kv
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.masks import causal_mask, mask_for
from attnlab.reference import scores

ScoreFactory = Callable[[Call, Mapping[str, Tensor]], "flex_exec.ScoreMod | None"]
#: ``finish(out, lse, q, k, v, call, extra) -> output``: an output transform after FlexAttention
Finish = Callable[[Tensor, "Tensor | None", Tensor, Tensor, Tensor, Call, Mapping[str, Tensor]], Tensor]
#: ``lse_map(lse, q, call, extra) -> lse``: FlexAttention's lse (of its scores) -> the method's
LseMap = Callable[[Tensor, Tensor, Call, Mapping[str, Tensor]], Tensor]
#: ``reference_lse(q, k, v, params, *, causal, scale, upcast=True, **tensor_inputs) -> (out, lse)``
LseReference = Callable[..., tuple[Tensor, Tensor]]


def allowed(n_q: int, n_k: int, causal: bool, device: Any) -> Tensor | None:
    """The (N_q, N_k) bool mask of a causal call (bottom-right), or None when every pair is allowed."""
    return mask_for(causal_mask, None, n_q, n_k, True, device) if causal else None


def logits(q: Tensor, k: Tensor, scale: float, upcast: bool) -> Tensor:
    """``scale * q @ k^T``, (B, H, N_q, N_k), fp32 when ``upcast`` (GQA heads expanded)."""
    return scores(q, k, scale, upcast)


def softmax_rows(s: Tensor, mask: Tensor | None) -> Tensor:
    """Row softmax over the allowed entries; a row with none is all zeros (no NaN, zero gradients)."""
    if mask is None:
        return torch.softmax(s, dim=-1)
    return safe_softmax(s.masked_fill(~mask, float("-inf")))


def safe_softmax(s: Tensor) -> Tensor:
    """Row softmax in which -inf entries weigh 0 and a row of only -inf is all zeros (no NaN, zero
    gradients), where ``torch.softmax`` gives NaN."""
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


def row_lse(s: Tensor, mask: Tensor | None) -> Tensor:
    """``log sum_j exp(s_ij)`` over the allowed entries (and those above -inf), float32 (B, H, N_q): -inf on
    a row with none, with zero gradients there (``torch.logsumexp`` gives NaN gradients on such rows); +inf
    where an entry is +inf."""
    s = s.float()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    top = s.amax(dim=-1, keepdim=True).detach()  # (lse does not depend on it: no gradient needed)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(s - top).sum(dim=-1)
    some = total > 0
    logged = top.squeeze(-1) + torch.log(torch.where(some, total, torch.ones_like(total)))
    return torch.where(some, logged, torch.full_like(total, float("-inf")))


def softmax_attend(s: Tensor, mask: Tensor | None, v: Tensor, dtype: torch.dtype, upcast: bool) -> Tensor:
    """``softmax_rows(s, mask) @ v`` in ``dtype`` (the references' last step)."""
    return weigh(softmax_rows(s, mask), v, upcast).to(dtype)


def weigh(p: Tensor, v: Tensor, upcast: bool) -> Tensor:
    """``p @ v`` with v's heads expanded to p's, in p's compute dtype."""
    ve = expand_kv(v, p.shape[1])
    return torch.matmul(p, ve.float() if upcast else ve.to(p.dtype))


def captured(t: Tensor) -> Tensor:
    """``t`` as a score_mod should capture it. On a CPU, a static-shaped alias: PyTorch's CPU
    FlexAttention template (torch 2.13) emits C++ that does not compile ("'cur_kvSplitSize5' was not
    declared") once automatic dynamic shapes make a captured tensor's sizes symbolic, which happens after
    a few compiles with other captured tensors. The alias keeps the caller's tensor unmarked."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return t
    alias = t.view(t.shape)
    torch._dynamo.mark_static(alias)
    return alias


def heads_index(t: Tensor, b: Tensor, h: Tensor) -> tuple[Any, Any]:
    """Indices into a broadcastable (B|1, H|1, ...) tensor: 0 along its size-1 dims."""
    return (b if t.shape[0] > 1 else 0), (h if t.shape[1] > 1 else 0)


class VariantFlexBackend(FlexBackend):
    """FlexAttention running a variant: the score_mod is built from the call *and* its tensor inputs
    (``score(call, extra)``; the base class's comes from the call only), and an optional ``finish``
    transforms the output (gates, sinks, affine weights). ``needs_lse``: ``finish`` needs FlexAttention's
    log-sum-exp, which compiled FlexAttention cannot return on a CPU (then GPU only).

    ``lse``: the backend returns the method's log-sum-exp (``return_lse``; GPU only, as every compiled
    FlexAttention lse): FlexAttention's, which is the log normaliser of the score_mod's logits, mapped by
    ``lse_map`` where the method's normaliser has more (a sink's term). Off for a score_mod that is not the
    method's logits (softplus's log-weights) or an output transform that changes the normaliser's meaning.

    A score_mod that depends on the call only is made once per call signature (``call.memo``).
    """

    def __init__(
        self,
        score: ScoreFactory | None = None,
        finish: Finish | None = None,
        *,
        needs_lse: bool = False,
        per_call: bool = False,
        lse: bool = False,
        lse_map: LseMap | None = None,
    ) -> None:
        super().__init__(score_mod=None, unnormalized=needs_lse)
        self.caps = replace(self.caps, lse=lse)  # see the module docstring
        self.score = score
        self.finish = finish
        self.needs_lse = needs_lse
        self.lse_map = lse_map
        self.per_call = per_call  # the score_mod reads the call's tensor inputs: made on every call

    def reasons(self, call: Call) -> list[str]:
        out = super().reasons(call)
        if self.finish is not None and call.problem.device.type == "cpu" and torch.compiler.is_compiling():
            out.append(
                "inside torch.compile on CPU, inductor's FlexAttention template cannot take the output "
                "transform after it (torch 2.13: epilogue_nodes unsupported); eager runs it, or use CUDA"
            )
        return out

    def _score_mod(self, call: Call, extra: Mapping[str, Tensor]) -> flex_exec.ScoreMod | None:
        if self.score is None:
            return None
        if self.per_call and extra:
            return self.score(call, extra)
        mod = call.memo.get("variant_score_mod")
        if mod is None:
            mod = self.score(call, extra)
            if not torch.compiler.is_compiling():
                call.memo["variant_score_mod"] = mod
        return mod  # type: ignore[no-any-return]

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        kwargs = {**self._kwargs(q, k, call), "score_mod": self._score_mod(call, extra)}
        out, lse = flex_exec.flex_run(q, k, v, **kwargs, return_lse=self.needs_lse)
        return out if self.finish is None else self.finish(out, lse, q, k, v, call, extra)

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(output, the method's lse): FlexAttention's lse of the score_mod's logits, through ``lse_map``."""
        kwargs = {**self._kwargs(q, k, call), "score_mod": self._score_mod(call, extra)}
        out, lse = flex_exec.flex_run(q, k, v, **kwargs, return_lse=True)
        assert lse is not None
        lse = lse.float()
        if self.finish is not None:
            out = self.finish(out, lse, q, k, v, call, extra)
        return out, lse if self.lse_map is None else self.lse_map(lse, q, call, extra)


class VariantEagerBackend(EagerBackend):
    """The ``eager`` backend (the method's reference at the input precision) that also returns the
    method's log-sum-exp: ``reference_lse(q, k, v, params, *, causal, scale, upcast=False, **inputs) ->
    (out, lse)`` (lse float32; see the module docstring). Without one it is plain eager (no lse)."""

    def __init__(self, reference_lse: LseReference | None = None) -> None:
        self.reference_lse = reference_lse
        self.caps = replace(EagerBackend.caps, lse=reference_lse is not None)

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        if self.reference_lse is None:
            return super().run_lse(q, k, v, call, extra)
        return self.reference_lse(
            q, k, v, call.params, causal=call.problem.causal, scale=call.scale, upcast=False, **extra
        )


class SdpaFinishBackend(Backend):
    """Plain softmax attention through torch SDPA (cuDNN first on Hopper, see
    :func:`attnlab.kernels.sdpa.sdpa_dense`), then a variant's output transform ``finish`` (a gate, an
    affine map of the weights): the variants whose transform acts on the attention output run at the
    speed of plain softmax. Differentiable through SDPA and the transform (gradients for q, k, v and the
    transform's tensor inputs). No log-sum-exp (the variant's output is not softmax attention's)."""

    name = "sdpa"
    summary = "torch SDPA softmax (cuDNN first on Hopper), then the variant's output transform"
    caps = Capabilities()

    def __init__(self, finish: Finish) -> None:
        self.finish = finish

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        out = sdpa_dense(q, k, v, causal=call.problem.causal, scale=call.scale)
        return self.finish(out, None, q, k, v, call, extra)


def sample_positive(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Uniform in [0.25, 1.25): a valid random slope or temperature (TensorInput.sample)."""
    return 0.25 + torch.rand(shape, generator=generator)
