"""Linear and gated-recurrent attention executors: chunked forms (plain PyTorch in ``naive.py``, Triton in
``chunk.py``) and a recurrent decode step, with the state carried in and out.

- ``naive.py``: the chunked parallel forms in PyTorch (exact, fp32): the kernels' twins and the CPU path.
- ``chunk.py``: the chunk-parallel Triton kernels (three stages: local chunk states, a scan over them,
  per-chunk outputs) of the gated linear recurrence (GLA; lightning and linear are special cases) and the
  WY/UT form of the gated delta rule, and their backwards; ``fwd.py``: tile helpers and the recurrent
  step kernel (decode).
- ``op.py``: launchers and ``torch.library`` custom ops with fake tensors and autograd.
Import ``attnlab.kernels.linear.op`` lazily: it registers the custom ops.
"""
