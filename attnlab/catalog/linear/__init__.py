"""Linear and gated-recurrent attention (family ``linear``): a recurrence, its chunked executor, state in/out.

Each method is one module, imported below; each defines its ``SPEC``. They are NOT registered at import
yet: the registry-driven parity check (``attnlab.testing.check_parity``, used by ``tests/test_parity.py``
and ``attnlab verify``) and the benchmark do not handle stateful methods (a stateful call returns a
``Result``, the reference returns ``(out, state)``) nor methods with required tensor inputs, so
registering them would break those suites. Until they do, :func:`register_methods` registers them for a
session (``attnlab.catalog.linear.register_methods()``), and ``tests/test_linear*.py`` run each under
``attnlab.registry.registered``.
"""
# isort: skip_file

from attnlab.catalog.linear import linear
from attnlab.catalog.linear import lightning
from attnlab.catalog.linear import gla
from attnlab.catalog.linear import gated_delta
from attnlab.catalog.linear import based

from attnlab.core import MethodSpec
from attnlab.registry import methods, register

SPECS: tuple[MethodSpec, ...] = (linear.SPEC, lightning.SPEC, gla.SPEC, gated_delta.SPEC, based.SPEC)


def register_methods() -> list[str]:
    """Register the linear methods not yet registered (an explicit call; nothing registers at import).
    Returns the names registered now."""
    done = []
    for spec in SPECS:
        if spec.name not in methods():
            register(spec)
            done.append(spec.name)
    return done


__all__ = ["SPECS", "based", "gated_delta", "gla", "lightning", "linear", "register_methods"]
