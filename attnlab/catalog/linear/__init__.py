"""Linear and gated-recurrent attention (family ``linear``): a recurrence, its chunked executor, state in/out.

Each method is one module, imported below; each defines its ``SPEC``; importing this package registers
them. A call returns a :class:`~attnlab.core.Result` whose ``state`` can be passed back as ``state=``
(prefill, then decode). Their tensor inputs (gates, beta, decays) declare samplers of valid values, which
the registry parity suite and the benchmark draw from.
"""
# isort: skip_file

from attnlab.catalog.linear import linear
from attnlab.catalog.linear import lightning
from attnlab.catalog.linear import gla
from attnlab.catalog.linear import gated_delta
from attnlab.catalog.linear import based

from attnlab.core import MethodSpec
from attnlab.registry import register_missing

SPECS: tuple[MethodSpec, ...] = (linear.SPEC, lightning.SPEC, gla.SPEC, gated_delta.SPEC, based.SPEC)


register_missing(SPECS)


def register_methods() -> list[str]:
    """Register the linear methods not yet registered (importing this package registers them; this is kept
    for code that removed them). Returns the names registered now."""
    return register_missing(SPECS)


__all__ = ["SPECS", "based", "gated_delta", "gla", "lightning", "linear", "register_methods"]
