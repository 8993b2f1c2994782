"""Score-transform softmax attention in Triton: forward and backward kernels whose per-score transform and
normaliser are compile-time choices (``SOFTCAP``: Gemma 2's ``cap * tanh(s / cap)``; ``HAS_BIAS``: an
additive (B, H, N_q, N_k) bias read through broadcast strides; ``ALIBI``: ``-m_h |i + N_k - N_q - j|``
from per-head slopes; ``LOWRANK``: FlashBias's low-rank bias ``U V^T`` computed per tile from its factors;
``HAS_SINK``: a per-head sink logit that joins the normaliser, gpt-oss style; ``SOFTPLUS``: l1-normalised
softplus weights instead of the softmax, no running maximum), returning the output and
the log-sum-exp of the transformed logits. Gradients for q, k, v, the sink logits and the low-rank
factors.

Files: ``common.py`` (the transformed logit), ``fwd.py`` / ``bwd.py`` (Triton), ``naive.py`` (the same math
in PyTorch), ``op.py`` (launch, schedules, custom ops). Import
:func:`attnlab.kernels.score_transform.op.score_transform_fwd` lazily (it registers custom ops).
"""
