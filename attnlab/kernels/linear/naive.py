"""The chunked parallel forms in plain PyTorch: the Triton kernels' naive twins, and the executors of the
``torch_chunk`` backend (any device, autograd for the backward).

Exact (no approximation, no factoring of exp(G) and exp(-G) across a chunk, which overflows under strong
decay): every pairwise decay is ``exp(G_i - G_j)`` with the exponent masked to -inf above the diagonal
before the exp. Math in float32 whatever the input dtype; outputs and states are float32.

Shapes: q, k (B, H, N, K) (kv heads already expanded to H); v (B, H, N, V); g None or (B, H, N, K)
natural-log decays; beta (B, H, N); state (B, H, K, V). Within a chunk of C tokens starting from state S,
with G the chunk-local inclusive cumsum of g (G_i = g_1 + ... + g_i):

- gated linear (GLA; lightning and linear are special cases)::

      o_i   = scale * [ (q_i * exp(G_i)) S + sum_{j<=i} (sum_d q_id k_jd exp(G_id - G_jd)) v_j ]
      S_new = exp(G_C) * S + sum_j (k_j * exp(G_C - G_j)) v_j^T

- gated delta rule (WY/UT form): A_ij = beta_i sum_d k_id k_jd exp(G_id - G_jd) for j < i, then
  ``U = (I + A)^-1 (beta V - beta (K * exp(G)) S)`` (the u_t of the recurrence, all at once) and::

      o_i   = scale * [ (q_i * exp(G_i)) S + sum_{j<=i} (sum_d q_id k_jd exp(G_id - G_jd)) u_j ]
      S_new = exp(G_C) * S + sum_j (k_j * exp(G_C - G_j)) u_j^T

Gate floor (every chunked path, PyTorch and Triton, forward and backward): the log-gates are taken in
float32 and raised to at least ``GATE_FLOOR`` before their chunk-local cumsum (:func:`floor_gate`). A gate
below it decays by exp(g) = 0 in float32 exactly as the floor does, so the result is unchanged; without
it a cumsum of very negative gates (float32's min, or about -5.4e36 per token at chunk 64, or a float64
gate below float32's range) overflows to -inf and G_i - G_j = -inf - (-inf) is NaN, and gates of
1e30-ish magnitude erase the small ones summed after them. The gradient at a floored gate is 0 (the
recurrence's own gradient there is exp(g) times a finite value: 0 in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: The epsilon of the delta rule's q/k L2 normalisation (fla's ``l2norm``): x / sqrt(sum x^2 + L2_EPS).
L2_EPS = 1e-6


#: The floor of the log-gates on every chunked path (see the module docstring): exp(-128) = 2.6e-56 is 0
#: in float32 (below half the smallest subnormal, exp(-103.97)), so a gate below it changes nothing. Near
#: that bound on purpose: the differences G_i - G_j between the tokens after floored gates are rounded at
#: the cumsum's magnitude (at most 64 x 128 = 8192, where a float32 ulp is 1e-3, as for finite gates of
#: -128; a floor of -1e4 would make it 0.06).
GATE_FLOOR = -128.0


def floor_gate(g: Tensor) -> Tensor:
    """g in float32, raised to at least ``GATE_FLOOR`` (-inf too, from a float64 gate out of float32's
    range); NaN stays NaN. Differentiable: the gradient is 0 where g was floored (as is the recurrence's,
    exp(g) being 0 there in float32), g's own elsewhere."""
    return g.float().clamp(min=GATE_FLOOR)


def l2norm(x: Tensor) -> Tensor:
    """x / sqrt(sum_d x^2 + 1e-6) over the last dim, in float32 (the recurrent step kernel does the same
    in-kernel)."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def _pad(t: Tensor | None, n_pad: int) -> Tensor | None:
    """Zero-pad dim 2 by ``n_pad`` tokens (k = v = 0 and g = 0 leave the state unchanged)."""
    if t is None or n_pad == 0:
        return t
    pad = [0, 0] * (t.dim() - 3) + [0, n_pad]
    return F.pad(t, pad)


def _pair_decay(G: Tensor, inclusive: bool) -> Tensor:
    """exp(G_i - G_j) of shape (..., C, C, K), 0 where j > i (and where j == i unless ``inclusive``)."""
    c = G.shape[-2]
    diff = G[..., :, None, :] - G[..., None, :, :]
    keep = torch.ones(c, c, dtype=torch.bool, device=G.device).tril(0 if inclusive else -1)
    return torch.exp(diff.masked_fill(~keep[:, :, None], float("-inf")))


def gla_chunk_naive(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float, state: Tensor | None, chunk: int
) -> tuple[Tensor, Tensor]:
    """The gated linear recurrence by chunks of ``chunk`` tokens: (o (B, H, N, V), S_N (B, H, K, V)) fp32."""
    b, h, n, kd = q.shape
    vd = v.shape[-1]
    n_pad = -n % chunk
    qf, kf, vf = (_pad(t.float(), n_pad) for t in (q, k, v))
    gf = None if g is None else _pad(floor_gate(g).expand(b, h, n, kd), n_pad)
    assert qf is not None and kf is not None and vf is not None
    s = q.new_zeros(b, h, kd, vd, dtype=torch.float32) if state is None else state.float()
    outs = []
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    for c0 in range(0, n + n_pad, chunk):
        qc, kc, vc = qf[:, :, c0 : c0 + chunk], kf[:, :, c0 : c0 + chunk], vf[:, :, c0 : c0 + chunk]
        if gf is None:
            a = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
            o = qc @ s + a @ vc
            s = s + kc.transpose(-1, -2) @ vc
        else:
            G = gf[:, :, c0 : c0 + chunk].cumsum(2)
            a = torch.einsum("bhik,bhjk,bhijk->bhij", qc, kc, _pair_decay(G, inclusive=True))
            o = (qc * torch.exp(G)) @ s + a @ vc
            last = G[:, :, -1:]
            s = torch.exp(last[:, :, 0, :, None]) * s + (kc * torch.exp(last - G)).transpose(-1, -2) @ vc
        outs.append(scale * o)
    return torch.cat(outs, 2)[:, :, :n], s


def delta_chunk_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    scale: float,
    state: Tensor | None,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule by chunks (WY/UT form): (o (B, H, N, V), S_N (B, H, K, V)) fp32."""
    b, h, n, kd = q.shape
    vd = v.shape[-1]
    n_pad = -n % chunk
    qf, kf, vf = (_pad(t.float(), n_pad) for t in (q, k, v))
    bf = _pad(beta.float()[..., None], n_pad)
    gf = None if g is None else _pad(floor_gate(g).expand(b, h, n, kd), n_pad)
    assert qf is not None and kf is not None and vf is not None and bf is not None
    s = q.new_zeros(b, h, kd, vd, dtype=torch.float32) if state is None else state.float()
    eye = torch.eye(chunk, device=q.device)
    outs = []
    for c0 in range(0, n + n_pad, chunk):
        sl = slice(c0, c0 + chunk)
        qc, kc, vc, bc = qf[:, :, sl], kf[:, :, sl], vf[:, :, sl], bf[:, :, sl]
        G = torch.zeros_like(kc) if gf is None else gf[:, :, sl].cumsum(2)
        akk = bc * torch.einsum("bhik,bhjk,bhijk->bhij", kc, kc, _pair_decay(G, inclusive=False))
        rhs = bc * vc - (bc * kc * torch.exp(G)) @ s
        u = torch.linalg.solve_triangular(eye + akk, rhs, upper=False, unitriangular=True)
        aqk = torch.einsum("bhik,bhjk,bhijk->bhij", qc, kc, _pair_decay(G, inclusive=True))
        outs.append(scale * ((qc * torch.exp(G)) @ s + aqk @ u))
        last = G[:, :, -1:]
        s = torch.exp(last[:, :, 0, :, None]) * s + (kc * torch.exp(last - G)).transpose(-1, -2) @ u
    return torch.cat(outs, 2)[:, :, :n], s
