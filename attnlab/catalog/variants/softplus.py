"""``softplus``: Length-Scaled Softplus Attention (LSSA), softplus weights with l1 normalisation.

"Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models" (Gao,
Spratling, Gionfrida; arXiv 2501.13428, ICML 2026) reads softmax as a positivity map followed by l1
normalisation and replaces ``exp`` by ``softplus`` on length-scaled cosine logits::

    A_ij = softplus(s_ij) / sum_j' softplus(s_ij'),   s_ij = lambda_i * t * cos(q_i, k_j)
    lambda_i = log(D) * log(n_i)        (natural logs; 1 with ``length_scale=False``)
    cos(q_i, k_j) = q_i . k_j / (|q_i| |k_j|)   (q and k L2-normalised per row, ``qk_norm=True``)

``n_i`` is the number of keys row ``i`` attends: ``p_i + 1`` when causal (``p_i = i + N_k - N_q``,
bottom-right; the paper's ``N`` matrix has row ``i`` (1-based) filled with ``i``), ``N_k`` otherwise;
``D`` is the head dim. There is no ``1/sqrt(D)`` in the paper (the cosine is bounded by 1 and the
length scale sets the temperature): attnlab's ``scale`` acts as a relative temperature
``t = scale * sqrt(D)``, so the default scale ``1/sqrt(D)`` gives ``t = 1``, the paper's logits exactly.
With ``qk_norm=False`` the cosine is replaced by the plain logit ``scale * q . k`` (``t`` dropped):
``length_scale=False, qk_norm=False`` is plain softplus attention with l1 normalisation. Masked entries
weigh 0; a row with no key is 0.

Sources for the convention (the authors' code, github.com/iminfine/freeatten or /freeattn, could not be
retrieved here): the paper's method as summarised by paper notes of the ICML version (``Q_i <- Q_i /
|Q_i|, K_i <- K_i / |K_i|``; ``A = Softplus((log d * log N) . QK^T) . M'`` with ``N`` the L x L matrix
whose row ``i`` is filled with ``i``; ``A_i <- A_i / |A_i|_1``), and the third-party reimplementation
On-Point-RND/transformer-architecture-generalization, ``models/lssa.py`` at commit
f8c318be58d6265a8bba60665048bf65af8c0b2e (``lssa_attention``:
``F.normalize`` of q and k, ``scores = log(head_dim) * log(n) * q @ k^T`` with ``n = 1..L`` per row and
``torch.log``, softplus, causal mask, l1 normalisation with eps 1e-8), which agree. attnlab before this
change used ``log(n_i) / log(D)`` on ``scale * q . k`` (an unsourced reading of the abstract): dropped.

LSSAR's re-weighting stage is the option ``reweight=p`` (reference and eager only). The FlexAttention
path passes ``log softplus`` as its score, so that its softmax is exactly the l1 normalisation of the
softplus weights.

Backends: ``triton`` (attnlab's score-transform kernel with its softplus transform, forward and backward;
q and k are L2-normalised before it (on CUDA, ``FUSED_NORM_DEVICES``, by a one-pass Triton kernel with its own backward, :mod:`attnlab.kernels.score_transform.l2norm`) and ``lambda_i * t`` is the kernel's per-query
temperature), ``flex`` (the same normalised q, k; the score_mod multiplies by ``lambda_i * t``),
``eager``. The kernel keeps no running maximum: softplus grows linearly, computed as ``max(y, 0) +
log(1 + e^-|y|)`` it never overflows, and the row sum of N_k weights stays in fp32 range for any logit
below ~1e38 / N_k (exp would overflow at 88). The reference and eager sum and normalise the weights in fp32
too (a float16 sum overflows at N_k * lambda t > 65504, e.g. N = 4096 at the default scale).

No log-sum-exp: the weights are l1-normalised softplus values, not a softmax, so ``return_lse=True`` is
refused on every backend (the kernel's internal "lse", the log of the l1 normaliser, stays internal).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.backends.eager import EAGER
from attnlab.catalog.variants._common import VariantFlexBackend, allowed, logits, softmax_rows, weigh
from attnlab.catalog.variants._triton import KernelArgs, Transform, TritonScoreBackend
from attnlab.core import Call, MethodSpec
from attnlab.errors import InputError
from attnlab.kernels.flex import ScoreMod
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS

#: LSSAR's shift O_i is 0 on the rows of the first SHIFT_FROM positions and 1 after (see :func:`reweigh`)
SHIFT_FROM = 3


@dataclass(frozen=True)
class SoftplusParams(Params):
    """``length_scale``: multiply the logits by ``lambda_i = log(D) * log(n_i)`` (default True, LSSA);
    ``qk_norm``: logits from the cosine of L2-normalised q and k times ``t = scale * sqrt(D)`` (default
    True, the paper), else ``scale * q . k``; both False give plain softplus attention with l1
    normalisation. ``reweight``: the power ``p`` of LSSAR's re-weighting stage (:func:`reweigh`; 0 to
    64, default 0: off; the sources use 3 and 15); causal calls only."""

    method = "softplus"
    length_scale: bool = True
    qk_norm: bool = True
    reweight: int = 0

    def validate(self) -> None:
        self.check_bool("length_scale")
        self.check_bool("qk_norm")
        self.check_int("reweight", minimum=0, maximum=64)


#: F.normalize's eps (the reimplementation's): a zero q or k row has cosine 0 with everything
NORM_EPS = 1e-12


def row_lengths(n_q: int, n_k: int, causal: bool, device: torch.device) -> Tensor:
    """``n_i``: the number of keys each query row may attend, int64 (N_q,)."""
    if not causal:
        return torch.full((n_q,), n_k, dtype=torch.int64, device=device)
    return (torch.arange(n_q, device=device) + (n_k - n_q) + 1).clamp(0, n_k)


def _log_d(head_dim: int) -> float:
    if head_dim < 2:
        raise InputError(
            f"method 'softplus': the length scale log(D) * log(n) needs head dim D >= 2 (log(1) = 0 makes "
            f"every weight equal), got D={head_dim}"
        )
    return math.log(head_dim)


def normalise_qk(q: Tensor, k: Tensor, params: SoftplusParams, scale: float) -> tuple[Tensor, Tensor, float]:
    """``(q', k', scale')`` the logits ``scale' * q' . k'`` are made of: with ``qk_norm``, q and k
    L2-normalised over D (computed in fp32, returned in their dtype) and ``scale' = scale * sqrt(D)``
    (``t``, 1 at the default scale); else the inputs unchanged."""
    if not params.qk_norm:
        return q, k, scale
    qn = F.normalize(q.float(), dim=-1, eps=NORM_EPS).to(q.dtype)
    kn = F.normalize(k.float(), dim=-1, eps=NORM_EPS).to(k.dtype)
    return qn, kn, scale * math.sqrt(q.shape[-1])


def length_scale(n_q: int, n_k: int, causal: bool, head_dim: int, device: torch.device) -> Tensor:
    """``lambda_i = log(D) * log(n_i)`` per query row, fp32 (1, 1, N_q) (rows with no key: 0)."""
    n = row_lengths(n_q, n_k, causal, device).clamp(min=1).to(torch.float32)
    return (torch.log(n) * _log_d(head_dim))[None, None]


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: SoftplusParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """``O_i = sum_j softplus(s_ij) v_j / sum_j softplus(s_ij)`` over the allowed keys (``j <= i + N_k -
    N_q`` when causal), ``s_ij = lambda_i * scale * sqrt(D) * cos(q_i, k_j)`` with ``lambda_i = log(D) *
    log(n_i)`` and ``n_i`` the row's allowed keys (the module docstring gives the options and sources).
    A row with no key is 0."""
    n_q, n_k = q.shape[2], k.shape[2]
    qn, kn, t = normalise_qk(q.float() if upcast else q, k.float() if upcast else k, params, scale)
    s = logits(qn, kn, t, upcast)
    if params.length_scale:
        s = s * length_scale(n_q, n_k, causal, q.shape[-1], q.device)[0, 0, :, None].to(s.dtype)
    w = F.softplus(s)
    mask = allowed(n_q, n_k, causal, q.device)
    if mask is not None:
        w = w * mask
    # the row sum and the normalisation in fp32 (a float16 row of N weights ~ lambda t each passes 65504 at
    # N = 4096, lambda = 35: w / inf would be all zeros), the weights back in the compute dtype
    w32 = w.float()
    total = w32.sum(dim=-1, keepdim=True)
    a = (w32 / torch.where(total > 0, total, torch.ones_like(total))).to(w.dtype)
    if params.reweight:
        a = reweigh(a, mask, n_q, n_k, causal, params.reweight)
    return weigh(a, v, upcast).to(q.dtype)


def reweigh(a: Tensor, mask: Tensor | None, n_q: int, n_k: int, causal: bool, p: int) -> Tensor:
    """LSSAR's re-weighting of the l1-normalised weights ``a`` (B, H, N_q, N_k)::

        R_ij = relu(a_ij * n_i - O_i) ** p,   A'_ij = R_ij / sum_j' R_ij'   (a row of zeros stays 0)

    ``n_i`` the keys row ``i`` attends (``p_i + 1``, ``p_i = i + N_k - N_q``), ``O_i = 0`` for the rows at
    positions ``p_i < SHIFT_FROM`` (3) and 1 after. Computed as a masked softmax of ``p * log(a n - O)``
    over the entries where ``a n > O`` (``(a n)^p`` reaches ``N^p``, 2^225 at 32K and p=15: it would
    overflow fp32). Entries below the shift get weight 0 (and no gradient).

    Source: not the authors' code (none was found). The formula is the one of the third-party
    reimplementation On-Point-RND/transformer-architecture-generalization, ``models/lssar.py`` at commit
    6d3fc68cecd68356d2db1705e3d7e6a4a3621bd2 (``relu(attention * n - offset).pow(p)`` then the l1
    normalisation, ``offset`` 1 with its first 3 rows 0, ``n`` = 1..L, p = 15 by default), which agrees with
    a paper summary's description (``A <- ReLU^p(A * N - O)``, O all ones with its first 3 rows 0, p in {3,
    15}). Both are causal; so is this (non-causal calls are refused: the shift's rows are positions)."""
    if not causal:
        raise InputError(
            f"method 'softplus': reweight={p} (LSSAR's re-weighting) is defined for causal attention only "
            "(its shift O_i depends on the query position); got causal=False: expected causal=True or "
            "reweight=0"
        )
    dev = a.device
    n = row_lengths(n_q, n_k, True, dev).to(a.dtype)
    pos = torch.arange(n_q, device=dev) + (n_k - n_q)
    shift = (pos >= SHIFT_FROM).to(a.dtype)
    z = a * n[:, None] - shift[:, None]
    keep = z > 0
    if mask is not None:
        keep = keep & mask
    return softmax_rows(p * torch.log(z.clamp(min=torch.finfo(z.dtype).tiny)), keep)


def log_softplus(y: Tensor) -> Tensor:
    """``log(softplus(y))``, finite (with finite gradients) for every finite y."""
    mid = torch.log(torch.log1p(torch.exp(y.clamp(-20.0, 20.0))))
    return torch.where(y > 20.0, torch.log(y.clamp(min=20.0)), torch.where(y < -20.0, y, mid))


def _temperature(call: Call) -> float:
    """The constant factor the backends multiply the (normalised) logits by besides ``scale``:
    ``sqrt(D)`` with ``qk_norm`` (so that ``scale * sqrt(D)`` is ``t``), else 1."""
    assert isinstance(call.params, SoftplusParams)
    return math.sqrt(call.problem.head_dim) if call.params.qk_norm else 1.0


def _score(call: Call, extra: Mapping[str, Tensor]) -> ScoreMod:
    """FlexAttention's score (q and k already normalised by :class:`_Flex`): ``log softplus(score *
    lambda_i * sqrt(D))`` (``score = scale * q . k``; no ``sqrt(D)`` without ``qk_norm``)."""
    assert isinstance(call.params, SoftplusParams)
    p = call.problem
    dev = p.device
    log_d = torch.tensor(_log_d(p.head_dim) if call.params.length_scale else 0.0, device=dev)
    temp = torch.tensor(_temperature(call), device=dev)
    offset = torch.tensor(p.n_k - p.n_q + 1, dtype=torch.int32, device=dev)
    n_k = torch.tensor(p.n_k, dtype=torch.int32, device=dev)
    causal = torch.tensor(p.causal, device=dev)
    scaled = torch.tensor(call.params.length_scale, device=dev)

    def lssa(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        n = torch.where(causal, (q_idx + offset).clamp(min=1), n_k)
        n = torch.where(n < n_k, n, n_k)
        lam = torch.where(scaled, torch.log(n.to(torch.float32)) * log_d, 1.0)
        return log_softplus(score * (lam * temp))

    return lssa


def _kernel_args(q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> KernelArgs:
    """The kernel's softplus transform; ``lambda_i * sqrt(D)`` (LSSA's length scale times the cosine's
    temperature factor) is its per-query temperature (made once per call signature)."""
    assert isinstance(call.params, SoftplusParams)
    t = _temperature(call)
    if not call.params.length_scale and t == 1.0:
        return KernelArgs(softplus=True)
    lam = call.memo.get("softplus_lambda")
    if lam is None:
        p = call.problem
        if call.params.length_scale:
            lam = length_scale(p.n_q, p.n_k, p.causal, p.head_dim, q.device) * t
        else:
            lam = torch.full((1, 1, p.n_q), t, dtype=torch.float32, device=q.device)
        if not torch.compiler.is_compiling():
            call.memo["softplus_lambda"] = lam
    return KernelArgs(softplus=True, temp=lam)


#: devices where the backends L2-normalise q and k with the one-pass Triton kernel
#: (:mod:`attnlab.kernels.score_transform.l2norm`; tests add "cpu" under TRITON_INTERPRET=1)
#: CUDA since checked and timed on the H100 (s4: softplus 8K causal fwd 0.44x -> 0.63x of cuDNN); ``()``:
#: the PyTorch normalisation everywhere.
FUSED_NORM_DEVICES: tuple[str, ...] = ("cuda",)


def _fused_norm(x: Tensor) -> bool:
    if x.device.type not in FUSED_NORM_DEVICES or torch.compiler.is_compiling():
        return False
    from attnlab.kernels.triton_utils import interpreting, triton_refusal

    return not triton_refusal(x.device, interpreting())


def _normalised(q: Tensor, k: Tensor, call: Call) -> tuple[Tensor, Tensor]:
    """The backends' q and k: L2-normalised with ``qk_norm`` (one Triton pass each on a GPU, else
    :func:`normalise_qk`'s PyTorch form; the same fp32 math), else unchanged."""
    assert isinstance(call.params, SoftplusParams)
    if call.params.qk_norm and _fused_norm(q):
        from attnlab.kernels.score_transform.l2norm import l2_normalize

        return l2_normalize(q, NORM_EPS), l2_normalize(k, NORM_EPS)
    qn, kn, _ = normalise_qk(q, k, call.params, call.scale)
    return qn, kn


def _no_reweight(backend: str, params: Params) -> list[str]:
    if isinstance(params, SoftplusParams) and params.reweight:
        return [
            f"{backend} has no re-weighting stage (reweight={params.reweight}): it needs each row's l1 "
            "normaliser before a second pass; backend='eager' runs it"
        ]
    return []


class _Triton(TritonScoreBackend):
    def __init__(self, transform: Transform) -> None:
        super().__init__(transform, lse=False)  # no log-sum-exp (module docstring)

    def param_refusals(self, params: Params) -> list[str]:
        return _no_reweight("the Triton kernel", params)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        qn, kn = _normalised(q, k, call)
        return super().run(qn, kn, v, call, extra)


class _Flex(VariantFlexBackend):
    def param_refusals(self, params: Params) -> list[str]:
        return _no_reweight("FlexAttention", params)

    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        qn, kn = _normalised(q, k, call)
        return super().run(qn, kn, v, call, extra)


SPEC = MethodSpec(
    name="softplus",
    family="dense",
    paper="Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models "
    "(Gao, Spratling, Gionfrida; arXiv 2501.13428, ICML 2026): LSSA, log(d) log(N) on the cosine of "
    "L2-normalised q, k; the re-weighting stage (LSSAR) as the option reweight=p; both cross-checked "
    "against a third-party reimplementation (the authors' code was not found)",
    summary="softplus(log(D) log(n_i) cos(q, k)) weights, l1-normalised per row (LSSA)",
    param_class=SoftplusParams,
    reference=reference,
    backends=(_Triton(_kernel_args), _Flex(_score), EAGER),
    patterns=ALL_PATTERNS,
    test_params=({}, {"length_scale": False, "qk_norm": False}),
    bench_params=lambda n: [{}],
    softmax_normalized=False,  # l1-normalised softplus weights: no log-sum-exp
)
