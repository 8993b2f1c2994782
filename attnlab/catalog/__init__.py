"""Every registered method: importing this package registers them, in this order.

One module per method under its family. The first methods are listed here; the newer families list their
modules in their own package (``attnlab/catalog/<family>/__init__.py``), imported at the end.
"""
# isort: skip_file
# (registration order is the order of `attnlab list` and of the README's support matrix)

from attnlab.catalog.dense import softmax
from attnlab.catalog.dense import sigmoid
from attnlab.catalog.static import sliding_window
from attnlab.catalog.static import streaming
from attnlab.catalog.static import dilated
from attnlab.catalog.static import block_local
from attnlab.catalog import structured
from attnlab.catalog import variants
from attnlab.catalog import dynamic
from attnlab.catalog import linear
from attnlab.catalog import decode

__all__ = [
    "block_local",
    "decode",
    "dilated",
    "dynamic",
    "linear",
    "sigmoid",
    "sliding_window",
    "softmax",
    "streaming",
    "structured",
    "variants",
]
