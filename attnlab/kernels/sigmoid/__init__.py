"""FlashSigmoid in Triton: sigmoid attention O = (sigmoid(scale * Q K^T + b) * M) V, forward and backward.

Sigmoid weights need no row max and no normaliser, so the forward is one pass with no rescaling and
saves nothing but the inputs; the backward recomputes P:
    dV = P^T dO;  dP = dO V^T;  dS = P (1 - P) dP;  dQ = scale dS K;  dK = scale dS^T Q.
Files: ``fwd.py``/``bwd.py`` (Triton), ``naive.py`` (same math in PyTorch), ``op.py`` (launch + custom op).
Import :func:`attnlab.kernels.sigmoid.op.sigmoid_attention` (lazily: it registers the custom ops).
"""
