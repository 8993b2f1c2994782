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

#: Each method with a log-sum-exp -> its ``reference_lse(q, k, v, params, *, causal, scale, upcast=True,
#: **tensor_inputs) -> (out, lse)``: the reference's output and the log of the method's own normaliser
#: (see attnlab.catalog.variants._common). softplus and affine_scaled have none.
LSE_REFERENCES = {
    "softcap": softcap.reference_lse,
    "alibi": alibi.reference_lse,
    "bias": bias.reference_lse,
    "sink": sink.reference_lse,
    "selective": selective.reference_lse,
    "gated": gated.reference_lse,
    "lowrank_bias": lowrank_bias.method_reference_lse,
}

__all__ = [
    "LSE_REFERENCES",
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
