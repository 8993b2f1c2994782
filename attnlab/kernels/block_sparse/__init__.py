"""The block-sparse executor: FlashAttention over a sparsity plan's tiles and token columns (fwd + bwd).

``fwd.py`` / ``bwd.py``: the Triton kernels; ``naive.py``: the same pairs as dense masked attention;
``op.py``: launchers and custom ops. The tables come from :func:`attnlab.plans.executor.executor_tables`.
"""

#: Width of the column tables that hold token columns, at least: 1-wide column tables mean "no columns", so
#: the kernels' launchers know from shapes alone, without reading the device, whether columns take part
#: (the tables' builder keeps its own copy, ``attnlab.plans.executor.COLUMNS_MIN_WIDTH``: plans may not import
#: kernels; a test holds the two equal).
COLUMNS_MIN_WIDTH = 2
