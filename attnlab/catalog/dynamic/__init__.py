"""Dynamic sparse prefill (family ``dynamic``): an estimator ``q, k -> plan`` plus the block-sparse executor.

Importing this package registers its methods; each method is one module, imported below.
"""
# isort: skip_file

from attnlab.catalog.dynamic import block_topk
from attnlab.catalog.dynamic import vertical_slash

__all__ = ["block_topk", "vertical_slash"]
