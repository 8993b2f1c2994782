"""Dynamic sparse prefill (family ``dynamic``): an estimator ``q, k -> plan`` plus the block-sparse executor.

Importing this package registers its methods; each method is one module, imported below (``block_topk``
and ``vertical_slash`` register themselves; the others define ``SPEC``, registered here in this order).
"""
# isort: skip_file

from attnlab.catalog.dynamic import block_topk
from attnlab.catalog.dynamic import vertical_slash
from attnlab.catalog.dynamic import flexprefill
from attnlab.catalog.dynamic import indexer_topk
from attnlab.catalog.dynamic import token_sparse
from attnlab.catalog.dynamic import hip
from attnlab.catalog.dynamic import dhsa
from attnlab.catalog.dynamic import bilevel_routing
from attnlab.catalog.dynamic import nsa
from attnlab.catalog.dynamic import seer  # noqa: F401  (registers itself)
from attnlab.registry import register

for _module in (flexprefill, indexer_topk, token_sparse, hip, dhsa, bilevel_routing, nsa):
    register(_module.SPEC)

__all__ = [
    "bilevel_routing",
    "block_topk",
    "dhsa",
    "flexprefill",
    "hip",
    "indexer_topk",
    "nsa",
    "token_sparse",
    "vertical_slash",
]
