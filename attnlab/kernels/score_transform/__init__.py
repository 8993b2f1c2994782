"""Score-transform softmax attention in Triton: one forward kernel whose per-score transform and
normaliser are compile-time choices (``SOFTCAP``: Gemma 2's ``cap * tanh(s / cap)``; ``HAS_BIAS``: an
additive (B, H, N_q, N_k) bias read through broadcast strides; ``HAS_SINK``: a per-head sink logit that
joins the normaliser, gpt-oss style), returning the output and the log-sum-exp of the transformed logits.

Files: ``fwd.py`` (Triton), ``naive.py`` (the same math in PyTorch), ``op.py`` (launch + custom op).
Import :func:`attnlab.kernels.score_transform.op.score_transform_fwd` lazily (it registers a custom op).
Forward only: there is no backward kernel yet.
"""
