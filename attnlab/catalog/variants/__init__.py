"""Softmax variants (family ``dense``): a per-score transform, a normaliser or an output transform.

Each method is one module, imported below, whose ``SPEC`` is listed in :data:`SPECS`; the shared
conventions are in :mod:`attnlab.catalog.variants._common`.

Not registered yet: registering a method changes the README's support matrix (a shared file) in the same
commit, and the registry's parity suite cannot pass tensor inputs (bias, sinks, gate, ...) yet. Until
then ``tests/test_variants.py`` registers each method for the duration of a test
(:func:`attnlab.registry.registered`); registering them all is ``for spec in SPECS: register(spec)`` here.
"""
# isort: skip_file

from attnlab.catalog.variants import softcap
from attnlab.catalog.variants import alibi
from attnlab.catalog.variants import bias
from attnlab.catalog.variants import sink
from attnlab.catalog.variants import softplus
from attnlab.catalog.variants import selective
from attnlab.catalog.variants import gated
from attnlab.catalog.variants import affine_scaled

#: The package's methods, in registration order.
SPECS = (
    softcap.SPEC,
    alibi.SPEC,
    bias.SPEC,
    sink.SPEC,
    softplus.SPEC,
    selective.SPEC,
    gated.SPEC,
    affine_scaled.SPEC,
)

__all__ = ["SPECS", "affine_scaled", "alibi", "bias", "gated", "selective", "sink", "softcap", "softplus"]
