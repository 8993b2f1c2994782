"""The block-sparse executor: FlashAttention over a sparsity plan's tiles and token columns (fwd + bwd).

``fwd.py`` / ``bwd.py``: the Triton kernels; ``naive.py``: the same pairs as dense masked attention;
``op.py``: launchers and custom ops. The tables come from :func:`attnlab.plans.executor.executor_tables`.
"""
