"""Executors shared by many methods. They take tensors and plans, never a method or the registry.

- :mod:`attnlab.kernels.sdpa`: dense softmax through PyTorch SDPA (fastest backend first).
- :mod:`attnlab.kernels.flex`: FlexAttention with cached BlockMasks and one compiled kernel per signature.
- :mod:`attnlab.kernels.sigmoid`: the Triton FlashSigmoid kernel (forward + backward) and its naive twin.

Kernel packages are imported lazily (on first use), so that importing attnlab compiles and registers
nothing, and so that ``TRITON_INTERPRET=1`` can still be set after ``import attnlab``.
"""
