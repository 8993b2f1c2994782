"""Linear and gated-recurrent attention executors: chunked forms (plain PyTorch in ``naive.py``, Triton in
``fwd.py``/``bwd.py``) and a recurrent decode step, with the state carried in and out.

- ``naive.py``: the chunked parallel forms in PyTorch (exact, fp32): the kernels' twins and the CPU path.
- ``fwd.py``/``bwd.py``: Triton kernels of the gated linear recurrence (GLA; lightning and linear are
  special cases) by chunks, and the recurrent step kernels.
- ``op.py``: launchers and ``torch.library`` custom ops with fake tensors and autograd.
Import ``attnlab.kernels.linear.op`` lazily: it registers the custom ops.
"""
