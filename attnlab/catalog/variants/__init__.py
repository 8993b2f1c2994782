"""Softmax variants (family ``dense``): a per-score transform, a normaliser or an output transform.

Each method is one module, imported below, whose ``SPEC`` is listed in :data:`SPECS`; the shared
conventions are in :mod:`attnlab.catalog.variants._common`.

Importing this package registers them (the registry parity suite passes each method's tensor inputs,
drawn by their declared samplers).
"""
# isort: skip_file

from attnlab.registry import register

from attnlab.catalog.variants import softcap
from attnlab.catalog.variants import alibi
from attnlab.catalog.variants import bias
from attnlab.catalog.variants import sink
from attnlab.catalog.variants import softplus
from attnlab.catalog.variants import selective
from attnlab.catalog.variants import gated
from attnlab.catalog.variants import affine_scaled
from attnlab.catalog.variants import lowrank_bias

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
    lowrank_bias.SPEC,
)

for _spec in SPECS:
    register(_spec)

__all__ = [
    "SPECS",
    "affine_scaled",
    "alibi",
    "bias",
    "gated",
    "lowrank_bias",
    "selective",
    "sink",
    "softcap",
    "softplus",
]
