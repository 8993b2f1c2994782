"""Every registered method: importing this package registers them, in this order.

One module per method under its family; adding a method is one file plus one line here.
"""
# isort: skip_file
# (registration order is the order of `attnlab list` and of the README's support matrix)

from attnlab.catalog.dense import softmax
from attnlab.catalog.dense import sigmoid
from attnlab.catalog.static import sliding_window
from attnlab.catalog.static import streaming
from attnlab.catalog.static import dilated
from attnlab.catalog.static import block_local

__all__ = ["block_local", "dilated", "sigmoid", "sliding_window", "softmax", "streaming"]
