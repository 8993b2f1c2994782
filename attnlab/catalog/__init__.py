"""Every registered method: importing this package registers them, in this order.

One module per method under its family; adding a method is one file plus one line here.
"""

# isort: off  (registration order is the order of `attnlab list`)
from attnlab.catalog.dense import sigmoid, softmax
from attnlab.catalog.static import block_local, dilated, sliding_window, streaming

# isort: on

__all__ = ["block_local", "dilated", "sigmoid", "sliding_window", "softmax", "streaming"]
