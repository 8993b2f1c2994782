"""What a benchmark run times: the dense peers and the control row, every (method, parameters, pattern,
length, mode) from the registry, and each row's density."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend

import attnlab
from attnlab.backends.base import Backend
from attnlab.core import Call, Problem, default_scale
from attnlab.kernels.triton_utils import interpreting
from attnlab.params import Params
from attnlab.patterns import Pattern
from attnlab.plans import static_plan

PEERS_CUDA: dict[str, SDPBackend] = {
    "sdpa:cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa:flash": SDPBackend.FLASH_ATTENTION,
    "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION,
}
PEERS_CPU: dict[str, SDPBackend | None] = {"sdpa:default": None}
#: the control row: the baseline's dense math through attnlab (method, backend); in every group
CONTROL = ("softmax", "sdpa")


@dataclass(frozen=True)
class PlannedRow:
    method: str
    params: dict[str, Any]
    pattern: Pattern
    n: int
    mode: str
    #: only these backends (None: all of the method's)
    backends: tuple[str, ...] | None = None

    def backend_specs(self) -> list[Backend]:
        """The backends this row times: the method's (or the named ones), without Triton kernels while
        they run in Triton's CPU interpreter (TRITON_INTERPRET=1: a test aid whose times mean nothing)."""
        spec = attnlab.get(self.method)
        interp = interpreting()
        return [
            b
            for b in spec.backends
            if (self.backends is None or b.name in self.backends) and not (interp and b.triton)
        ]


def planned_rows(
    lengths: tuple[int, ...],
    methods: tuple[str, ...] | None,
    patterns: tuple[Pattern, ...] = (Pattern.CAUSAL_SELF,),
    modes: tuple[str, ...] = ("fwd",),
    budgets: str = "all",
) -> list[PlannedRow]:
    """Every (method, parameters, pattern, length, mode) a run will time, from the registry."""
    rows = []
    for name, spec in attnlab.methods().items():
        if methods is not None and name not in methods:
            continue
        for pattern in patterns:
            if pattern not in spec.patterns:
                continue
            for n in lengths:
                sets = spec.distinct_bench_params(n)
                for params in sets if budgets == "all" else sets[:1]:
                    for mode in modes:
                        rows.append(PlannedRow(name, dict(params), pattern, n, mode))
    return rows


def estimated_plan(
    spec: attnlab.MethodSpec,
    params: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    inputs: Mapping[str, torch.Tensor] | None = None,
    scale: float | None = None,
) -> Any:
    """A dynamic method's plan (:class:`attnlab.Plan`) for q (B, H, N_q, D), k (B, H_kv, N_k, D) through
    :meth:`MethodSpec.estimate_plan`, as its backends estimate it: the estimator gets the tensor inputs it
    declares in ``estimate_inputs`` (e.g. seer's gate weights ``w_q``, ``w_k``) from ``inputs``, the same
    tensors the call itself is given. ``scale``: the attention's (default 1 / sqrt(D))."""
    if spec.estimate is None:
        raise ValueError(f"method {spec.name!r} has no estimator (its plan_kind is {spec.plan_kind!r})")
    p = params if isinstance(params, Params) else spec.make_params(dict(params))
    problem = Problem(
        batch=q.shape[0], heads=q.shape[1], kv_heads=k.shape[1], n_q=q.shape[2], n_k=k.shape[2],
        head_dim=q.shape[3], v_dim=k.shape[3], causal=causal, dtype=q.dtype, device=q.device,
        requires_grad=False,
    )  # fmt: skip
    call = Call(spec, p, problem, default_scale(q.shape[-1], scale))
    return spec.estimate_plan(q, k, call, dict(inputs or {}))


def densities(
    spec: attnlab.MethodSpec,
    params: Any,
    n_q: int,
    n_k: int,
    causal: bool,
    device: torch.device,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    inputs: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """(token density, block density) of the method's sparsity plan (:class:`attnlab.Plan`): the share of
    the dense pattern's (query, key) pairs it computes, and of the dense pattern's tiles it visits (128 x
    128 for static plans, the method's own tiles for dynamic ones, estimated from ``q`` and ``k``, which
    they need, and the tensor inputs the estimator takes, from ``inputs``: :func:`estimated_plan`). 1.0 for
    dense methods (no plan)."""
    if spec.estimate is not None:
        if q is None or k is None:
            raise ValueError(f"method {spec.name!r} estimates its plan from q and k: pass them")
        plan = estimated_plan(spec, params, q, k, causal, inputs)
        return plan.density, plan.block_density
    if spec.mask is None:
        return 1.0, 1.0
    plan = static_plan(spec, params, n_q, n_k, causal, device)
    return plan.density, plan.block_density
