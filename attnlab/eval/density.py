"""How much attention a method computes inside a causal LM: its density per phase at one context length.

- *prefill density*: the share of the causal (query, key) pairs of an ``n``-token prefill the method
  computes (1.0 for dense methods and for methods that do not run in prefill). Static methods: their mask
  (:func:`attnlab.bench.planning.densities`, independent of the inputs). Dynamic methods: their estimate on
  Q/K captured from the model (:mod:`attnlab.organisms.capture`) on held-out text, averaged over layers.
- *decode density*: the share of the ``n`` cached keys one decode step attends (1.0 for dense methods and
  for methods that do not run in decode). Static methods: the last row of their mask (a (1, n) causal
  plan). Decode methods: their budget rule (a budget >= the cached keys keeps every key): ``min(budget,
  n) / n`` per layer and KV head; ``retrieval_heads_kv`` keeps every key of its ``heads``; ``tidal`` keeps
  every key on its ``full`` and ``select`` layers (see :func:`tidal_roles`). This counts the keys the
  attention reads, not the tokens a method's scoring pass touches.
- NaN where attnlab cannot count it: a sparse method with neither a static plan nor an estimate
  (``strided_heads``, whose mask differs per head; ``nsa``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from attnlab.core import MethodSpec


@contextlib.contextmanager
def _dense_limit(elements: int) -> Iterator[None]:
    """``attnlab.settings.max_dense_elements`` raised to at least ``elements`` inside the block."""
    from attnlab.settings import settings

    old = settings.max_dense_elements
    if elements > old:
        settings.max_dense_elements = elements
    try:
        yield
    finally:
        if settings.max_dense_elements != old:
            settings.max_dense_elements = old


def tidal_roles(num_layers: int) -> dict[int, str]:
    """The per-layer roles ``attnlab eval`` gives ``tidal`` (TidalDecode's schedule scaled down): with 4 or
    more layers, layer 0 ``full``, layer 1 ``select`` and the rest ``reuse``; with fewer, layer 0
    ``select`` and the rest ``reuse`` (every layer ``reuse`` would never select and run exact attention)."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: expected >= 1")
    first = ["full", "select"] if num_layers >= 4 else ["select"]
    return {i: (first[i] if i < len(first) else "reuse") for i in range(num_layers)}


def prefill_density(
    spec: MethodSpec,
    params: Mapping[str, Any],
    n: int,
    qk: Sequence[tuple[torch.Tensor, torch.Tensor, float]] | None,
    device: torch.device,
    inputs: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> float:
    """The method's prefill density at ``n`` tokens (see the module docstring). ``qk``: per layer
    (q (1, H, N, D), k (1, H_kv, N, D), scale) captured from the model, needed by dynamic methods only.
    ``inputs``: per layer (aligned with ``qk``), the tensor inputs the method's estimator takes (its
    ``estimate_inputs``, e.g. seer's gate weights ``w_q``, ``w_k``: the plan is estimated through
    :meth:`MethodSpec.estimate_plan` as its backends estimate it); None: none."""
    from attnlab.bench.planning import densities, estimated_plan
    from attnlab.hf.plan import phases_of

    if "prefill" not in phases_of(spec) or spec.family == "dense":
        return 1.0
    p = spec.make_params(dict(params))
    if spec.estimate is not None:
        if not qk:
            raise ValueError(f"method {spec.name!r} estimates its plan from q and k: captured Q/K are needed")
        if inputs is not None and len(inputs) != len(qk):
            raise ValueError(
                f"prefill_density of {spec.name!r}: {len(inputs)} sets of tensor inputs for {len(qk)} layers "
                "of captured Q/K; expected one per layer"
            )
        vals = []
        for i, (q, k, scale) in enumerate(qk):
            q_, k_ = q[:, :, :n].to(device), k[:, :, :n].to(device)
            extra = {name: t.to(device) for name, t in (inputs[i] if inputs is not None else {}).items()}
            # counting a plan's pairs may build its (H, N, N) bool mask: allowed here past the dense limit
            with _dense_limit(q_.shape[0] * q_.shape[1] * n * n):
                vals.append(float(estimated_plan(spec, p, q_, k_, True, extra, scale).density))
        return sum(vals) / len(vals)
    if spec.mask is None:  # a sparse method without a plan attnlab can count (e.g. per-head masks)
        return math.nan
    return float(densities(spec, p, n, n, True, device)[0])


def decode_density(
    spec: MethodSpec, params: Mapping[str, Any], n: int, num_layers: int, kv_heads: int, device: torch.device
) -> float:
    """The share of ``n`` cached keys one decode step attends, averaged over layers and KV heads (see the
    module docstring)."""
    from attnlab.bench.planning import densities
    from attnlab.hf.plan import phases_of

    if "decode" not in phases_of(spec) or spec.family == "dense":
        return 1.0
    p = spec.make_params(dict(params))
    if spec.family != "decode":
        if spec.mask is None:
            return math.nan
        return float(densities(spec, p, 1, n, True, device)[0])
    budget = getattr(p, "budget", None)
    if budget is None:
        raise ValueError(
            f"decode method {spec.name!r} has no 'budget' parameter: its density is not known here"
        )
    part = min(int(budget), n) / n
    if spec.name == "retrieval_heads_kv":
        full = len({h for h in getattr(p, "heads", ()) if h < kv_heads})
        return (full + (kv_heads - full) * part) / kv_heads
    if spec.name == "tidal":
        roles = tidal_roles(num_layers)
        return sum(1.0 if r != "reuse" else part for r in roles.values()) / num_layers
    return part
