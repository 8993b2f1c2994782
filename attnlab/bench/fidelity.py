"""Fidelity: how close a method is to dense softmax attention on the same inputs (a measurement).

Per (workload layer, head, method parameters, pattern), with ``O`` the method's output, ``O_dense`` dense
softmax attention's and ``O_uniform`` the output of uniform weights over the keys the dense pattern allows
(the mean of V over all keys; causal: over keys ``j <= i``), each norm the Frobenius norm over the head's
(batch, queries, value dim):

- ``out_err_vs_uniform = ||O - O_dense|| / ||O_uniform - O_dense||``: the error as a share of the error of
  the attention that knows nothing (0: exact; 1: no better than averaging V). Comparable across workloads,
  layers and heads, whatever the scale of V and however peaked the dense attention is;
- ``out_rel_err = ||O - O_dense|| / ||O_dense||`` (the older measure; it depends on V's scale and mean);
- ``mass_recall``: the share of dense attention mass on the pairs the method computes, averaged over query
  rows; NULL ("n/a") for a method that computes no subset of softmax attention (sigmoid: no softmax mass),
  1.0 for dense softmax (it computes every pair), from the mask for mask-defined methods;
- ``density`` / ``block_density``: as in the efficiency rows (:func:`attnlab.bench.planning.densities`),
  at the same length and budgets, so fidelity rows pair with speed rows;
- ``model_causal``: whether the workload's model was causal (False for the MiniLM encoder: its causal
  rows apply a causal mask to Q/K of a bidirectional model); NULL for random inputs.

Computed in float32 with each method's default backend on this device. Dense softmax (error 0, recall 1)
is always among the rows, as the control.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

import attnlab
from attnlab.bench.calls import output_of, required_inputs
from attnlab.bench.planning import densities, estimated_plan
from attnlab.bench.workloads import Workload, serves
from attnlab.errors import BackendError
from attnlab.masks import MaskContext, causal_mask, dense_mask
from attnlab.patterns import Pattern
from attnlab.plans import static_plan
from attnlab.reference import masked_softmax_attention


def _causal(n_q: int, n_k: int, device: torch.device) -> Tensor:
    return dense_mask(causal_mask(None, MaskContext(n_q, n_k, True, device)), n_q, n_k, device)


def _dense_probs(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~_causal(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.softmax(s, dim=-1)


def uniform_output(v: Tensor, n_q: int, causal: bool) -> Tensor:
    """(B, H, N_q, D_v): uniform weights over the keys the dense pattern allows (bottom-right causal)."""
    n_k = v.shape[2]
    if not causal:
        return v.mean(dim=2, keepdim=True).expand(-1, -1, n_q, -1)
    csum = v.cumsum(dim=2)
    last = torch.arange(n_q, device=v.device) + (n_k - n_q)  # the last key each query may see
    counts = (last + 1).clamp_min(1).to(v.dtype)[:, None]
    out = csum[:, :, last.clamp_min(0)] / counts
    return torch.where((last >= 0)[:, None], out, torch.zeros_like(out))


def _head_norms(x: Tensor) -> Tensor:
    """Frobenius norm per head over (batch, queries, dim): (H,)."""
    return x.flatten(2).norm(dim=-1).pow(2).sum(0).sqrt()


def has_recall(spec: attnlab.MethodSpec) -> bool:
    """Whether attention-mass recall means something for the method: it computes softmax attention over a
    set of pairs (a plan). Mask-defined methods do; dense softmax does (every pair); sigmoid does not."""
    return spec.plan_kind is not None or spec.name == "softmax"


def mass_recall(
    spec: attnlab.MethodSpec, params: Any, probs: Tensor, causal: bool, plan: Any = None
) -> list[float] | None:
    """Per head: the dense attention mass on the pairs the method computes, mean over query rows;
    None when the method has no recall (:func:`has_recall`). Dynamic methods pass the ``plan`` they
    estimated from the layer's q and k."""
    if not has_recall(spec):
        return None
    if plan is None and spec.mask is None:  # dense softmax: every pair the dense pattern allows
        return probs.sum(-1).mean(dim=(0, 2)).tolist()
    n_q, n_k = probs.shape[-2:]
    if plan is None:
        plan = static_plan(spec, params, n_q, n_k, causal, probs.device)
    return plan.recall(probs).mean(0).tolist()


#: ``inputs(method, q, k, v) -> {name: tensor}``: the tensor inputs a fidelity row gives a method
InputsFn = Callable[[str, Tensor, Tensor, Tensor], dict[str, Tensor]]


def fidelity_rows(
    workload: Workload,
    methods: tuple[str, ...] | None,
    patterns: tuple[Pattern, ...],
    budgets: str,
    log: Callable[[str], None] = lambda s: None,
    inputs: InputsFn = required_inputs,
    skipped: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """The fidelity rows of ``workload`` (module docstring). ``inputs``: each method's tensor inputs
    (default: its required ones, valid random values, as the speed sweep draws them); the same tensors go
    to the call, the backend's description and the estimator whose plan gives the recall and density
    (:func:`attnlab.bench.planning.estimated_plan`: e.g. seer's gate weights). A method that no backend can
    run on this device (e.g. one whose only fast path is a Triton kernel, on a CPU without the
    interpreter) gives no rows: its name and the refusal go to ``skipped``, and the log says so."""
    for layer, q, k, v in workload.layers:
        n_q, n_k, d = q.shape[2], k.shape[2], q.shape[3]
        scale = d**-0.5
        for pattern in patterns:
            if pattern.cross or not serves(workload, pattern.causal):
                continue
            causal = pattern.causal
            probs = _dense_probs(q, k, causal, scale)
            mask = _causal(n_q, n_k, q.device) if causal else None
            dense_out = masked_softmax_attention(q, k, v, scale=scale, mask=mask)
            uniform_err = _head_norms(uniform_output(v, n_q, causal) - dense_out)
            dense_norm = _head_norms(dense_out)
            for name, spec in attnlab.methods().items():
                if methods is not None and name not in (*methods, "softmax"):  # softmax: the control row
                    continue
                if pattern not in spec.patterns:
                    continue
                sets = spec.distinct_bench_params(n_k)
                for params in sets if budgets == "all" else sets[:1]:
                    p = spec.make_params(params)
                    extra = inputs(name, q, k, v)  # tensor inputs (gates, beta, weights, ...)
                    kwargs: dict[str, Any] = {**params, **extra}
                    try:
                        out = output_of(
                            attnlab.attention(
                                q, k, v, method=name, causal=causal, check_finite=False, **kwargs
                            )
                        )
                    except BackendError as e:
                        reason = str(e).splitlines()[-1].strip(" -")
                        if skipped is not None:
                            skipped[name] = reason
                        log(f"fidelity: {name} skipped, the call was refused on {q.device.type}: {reason}")
                        continue
                    backend = attnlab.explain(q, k, v, method=name, causal=causal, **kwargs).backend
                    diff = _head_norms(out - dense_out)
                    rel = (diff / dense_norm.clamp_min(1e-30)).tolist()
                    vs_uniform = (diff / uniform_err.clamp_min(1e-30)).tolist()
                    plan = estimated_plan(spec, p, q, k, causal, extra, scale) if spec.estimate else None
                    recall = mass_recall(spec, p, probs, causal, plan)
                    if plan is not None:
                        density, block_density = plan.density, plan.block_density
                    else:
                        density, block_density = densities(spec, p, n_q, n_k, causal, q.device)
                    for h in range(q.shape[1]):
                        yield {
                            "workload": workload.name,
                            "layer": layer,
                            "head": h,
                            "method": name,
                            "params": json.dumps(params, sort_keys=True),
                            "backend": backend.name if backend else "",
                            "pattern": pattern.value,
                            "n": n_k,
                            "density": density,
                            "block_density": block_density,
                            "out_err_vs_uniform": vs_uniform[h],
                            "out_rel_err": rel[h],
                            "mass_recall": recall[h] if recall is not None else None,
                            "model_causal": workload.causal_model,
                        }
            log(f"fidelity {workload.name} {layer} {pattern.value} done")
