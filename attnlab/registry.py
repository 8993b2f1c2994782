"""The registry: one :class:`~attnlab.core.MethodSpec` per method. Tests, benchmark, CLI and docs all
iterate it.

Adding a method is one file under ``attnlab/catalog/<family>/`` that builds a MethodSpec and calls
:func:`register`, plus one import line in ``attnlab/catalog/__init__.py``. The test suite fails when a
registered method lacks a reference, parity-test parameters or benchmark parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from attnlab.core import FAMILIES, MethodSpec
from attnlab.errors import UnknownMethodError, did_you_mean

_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; its name must be new. Returns the spec so a module can write ``SPEC = register(...)``."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    if spec.family not in FAMILIES:
        raise ValueError(f"method {spec.name!r}: family {spec.family!r} is not one of {FAMILIES}")
    if spec.param_class.method != spec.name:
        raise ValueError(f"method {spec.name!r}: its params class says method={spec.param_class.method!r}")
    _REGISTRY[spec.name] = spec
    return spec


@contextlib.contextmanager
def registered(spec: MethodSpec) -> Iterator[MethodSpec]:
    """Register ``spec`` for the duration of a ``with`` block (tests, experiments), then remove it. A spec
    that is already registered (this very object: e.g. a catalog method) stays as it is."""
    if _REGISTRY.get(spec.name) is spec:
        yield spec
        return
    register(spec)
    try:
        yield spec
    finally:
        _REGISTRY.pop(spec.name, None)


def register_missing(specs: Iterable[MethodSpec]) -> list[str]:
    """Register each of ``specs`` whose name is not registered yet (a family's package calls it at import,
    and again for code that removed its methods); returns the names registered now."""
    done = []
    for spec in specs:
        if spec.name not in _REGISTRY:
            register(spec)
            done.append(spec.name)
    return done


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
