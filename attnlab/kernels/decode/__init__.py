"""Decode over selected cache entries: split-K attention of a few queries (all heads of a KV group in one
program, so the group reads each K/V tile once) over index lists of pages or tokens, and Quest page scores.

``fwd.py``: the Triton kernels; ``naive.py``: the same math in PyTorch; ``op.py``: launchers and custom ops.
Import :func:`attnlab.kernels.decode.op.decode_attention` lazily (it registers the custom ops).
"""
