"""Every registered method: importing this package registers them, in this order.

One module per method under its family; adding a method is one file plus one line here.
"""

# isort: off  (registration order is the order of `attnlab list`)
from attnlab.catalog.dense import softmax, sigmoid
from attnlab.catalog.static import sliding_window, streaming, dilated, block_local

# isort: on

__all__ = ["block_local", "dilated", "sigmoid", "sliding_window", "softmax", "streaming"]
