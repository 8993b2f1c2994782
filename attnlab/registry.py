"""The registry: one :class:`MethodSpec` per method. Tests, benchmark, CLI and docs all iterate it.

Adding a method is one file under ``attnlab/catalog/<family>/`` that builds a MethodSpec and calls
:func:`register`, plus one import line in ``attnlab/catalog/__init__.py``. The test suite fails when a
registered method lacks a reference, parity-test parameters or benchmark parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from attnlab.backends.base import Backend
from attnlab.errors import ParamError, UnknownMethodError, did_you_mean
from attnlab.masks import MaskContext, MaskFactory, block_layout, dense_pairs
from attnlab.params import Params
from attnlab.patterns import Pattern

FAMILIES = ("dense", "static", "dynamic", "decode", "linear")


class ReferenceFn(Protocol):
    """``reference(q, k, v, params, *, causal, scale, upcast=True) -> out``: the method's specification."""

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, params: Any, *, causal: bool, scale: float, upcast: bool = True
    ) -> Tensor: ...


@dataclass(frozen=True)
class MethodSpec:
    """Everything attnlab knows about one method.

    - ``reference``: plain PyTorch, fp32 by default; the specification every backend must match.
    - ``backends``: fast paths in priority order (the chooser takes the first that can run a call).
    - ``patterns``: which of the four CAB patterns the method defines.
    - ``mask``: for mask-defined methods, the factory of the token mask (see :mod:`attnlab.masks`).
    - ``test_params``: parameter sets the parity tests run (small values that make the mask bite).
    - ``bench_params(n)``: parameter sets the benchmark sweeps at length ``n`` (budgets, i.e. densities).
    """

    name: str
    family: str
    paper: str
    summary: str
    params: type[Params]
    reference: ReferenceFn
    backends: tuple[Backend, ...]
    patterns: frozenset[Pattern]
    test_params: tuple[Mapping[str, Any], ...]
    bench_params: Callable[[int], list[dict[str, Any]]]
    gqa: bool = True
    backward: bool = True
    mask: MaskFactory | None = None
    #: for mask-defined methods: the same mask written as plain index arithmetic over a dense (N_q, N_k)
    #: grid, independent of ``mask`` (``index_mask(params, n_q, n_k, causal) -> bool (N_q, N_k)``);
    #: tests check that the two agree
    index_mask: Callable[[Any, int, int, bool], Tensor] | None = None
    notes: str = ""
    url: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def make_params(self, kwargs: Mapping[str, Any]) -> Params:
        """Validated parameters from keyword arguments (defaults fill the rest)."""
        try:
            return self.params.from_kwargs(dict(kwargs))
        except TypeError as e:  # e.g. a positional-only mistake inside the dataclass
            raise ParamError(f"method {self.name!r}: {e}") from None

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        names = [b.name for b in self.backends]
        raise ParamError(
            f"method {self.name!r} has no backend {name!r}.{did_you_mean(name, names)} "
            f"Its backends are: {', '.join(names)} (and 'reference')"
        )

    def density(
        self, params: Params, n_q: int, n_k: int, causal: bool, device: torch.device | str = "cpu"
    ) -> float:
        """Share of the dense pattern's (query, key) pairs this method computes (1.0 for dense methods)."""
        if self.mask is None:
            return 1.0
        ctx = MaskContext(n_q, n_k, causal, device)
        layout = block_layout(self.mask(params, ctx), n_q, n_k, device)
        return layout.allowed / max(1, dense_pairs(n_q, n_k, causal))


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; its name must be new. Returns the spec so a module can write ``SPEC = register(...)``."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    if spec.family not in FAMILIES:
        raise ValueError(f"method {spec.name!r}: family {spec.family!r} is not one of {FAMILIES}")
    if spec.params.method != spec.name:
        raise ValueError(f"method {spec.name!r}: its params class says method={spec.params.method!r}")
    _REGISTRY[spec.name] = spec
    return spec


def methods() -> dict[str, MethodSpec]:
    """All registered methods, by name, in registration order."""
    return dict(_REGISTRY)


def get(name: str) -> MethodSpec:
    """One method's spec; an unknown name gets the closest registered name as a suggestion."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown attention method {name!r}.{did_you_mean(str(name), _REGISTRY)} "
            f"Registered methods: {', '.join(_REGISTRY)} (see `attnlab list`)"
        )
    return _REGISTRY[name]
