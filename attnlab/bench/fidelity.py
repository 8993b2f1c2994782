"""Fidelity: how close a method is to dense softmax attention on the same inputs (a measurement).

Per (workload layer, head, method parameters, pattern):
- ``out_rel_err = ||O_method - O_dense||_F / ||O_dense||_F`` over the head's (batch, queries, dim);
- ``mass_recall``: the share of dense attention mass on the pairs the method computes, averaged over
  query rows (1.0 for dense methods: every pair is computed);
- ``density``: share of the dense pattern's pairs the method computes.
Computed in float32 with each method's default backend on this device.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import torch

import attnlab
from attnlab.bench.workloads import Workload
from attnlab.masks import MaskContext, causal_mask, dense_mask
from attnlab.patterns import Pattern
from attnlab.reference import masked_softmax_attention


def _dense_probs(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    n_q, n_k = q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        m = dense_mask(causal_mask(None, MaskContext(n_q, n_k, True, q.device)), n_q, n_k, q.device)
        s = s.masked_fill(~m, float("-inf"))
    return torch.softmax(s, dim=-1)


def fidelity_rows(
    workload: Workload,
    methods: tuple[str, ...] | None,
    patterns: tuple[Pattern, ...],
    budgets: str,
    log: Callable[[str], None] = lambda s: None,
) -> Iterator[dict[str, Any]]:
    for layer, q, k, v in workload.layers:
        n_q, n_k, d = q.shape[2], k.shape[2], q.shape[3]
        scale = d**-0.5
        for pattern in patterns:
            if pattern.cross:
                continue
            causal = pattern.causal
            probs = _dense_probs(q, k, causal, scale)
            mask = None
            if causal:
                mask = dense_mask(
                    causal_mask(None, MaskContext(n_q, n_k, True, q.device)), n_q, n_k, q.device
                )
            dense_out = masked_softmax_attention(q, k, v, scale=scale, mask=mask)
            for name, spec in attnlab.methods().items():
                if methods is not None and name not in methods:
                    continue
                sets = spec.bench_params(n_k)
                for params in sets if budgets == "all" else sets[:1]:
                    p = spec.make_params(params)
                    out = attnlab.attention(q, k, v, method=name, causal=causal, check_finite=False, **params)
                    backend = attnlab.explain(q, k, v, method=name, causal=causal, **params).backend
                    diff = (out - dense_out).flatten(2).norm(dim=-1).pow(2).sum(0).sqrt()
                    ref = dense_out.flatten(2).norm(dim=-1).pow(2).sum(0).sqrt()
                    rel = (diff / ref.clamp_min(1e-30)).tolist()
                    if spec.mask is not None:
                        m = dense_mask(
                            spec.mask(p, MaskContext(n_q, n_k, causal, q.device)), n_q, n_k, q.device
                        )
                        recall = (probs * m).sum(-1).mean(dim=(0, 2)).tolist()
                    else:
                        recall = [1.0] * q.shape[1]
                    density = spec.density(p, n_q, n_k, causal, q.device)
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
                            "out_rel_err": rel[h],
                            "mass_recall": recall[h],
                        }
            log(f"fidelity {workload.name} {layer} {pattern.value} done")
