"""``softplus``: Length-Scaled Softplus Attention (LSSA), softplus weights with l1 normalisation.

"Softplus Attention with Re-weighting" (Gao et al., 2025) reads softmax as a positivity map followed by
l1 normalisation and replaces ``exp`` by ``softplus``, with a length-dependent scale on the logits::

    A_ij = softplus(lambda_i * s_ij) / sum_j' softplus(lambda_i * s_ij'),   s = scale * q . k
    lambda_i = log(n_i) / log(D)    (``log_D n_i``; 1 with ``length_scale=False``)

where ``n_i`` is the number of keys row ``i`` may attend (N_k, or ``p_i + 1`` when causal with
``p_i = i + N_k - N_q``) and ``D`` the head dim: the scale grows with the log of the attended length,
keeping the attention entropy steady as sequences grow. Masked entries weigh 0; a row with no key is 0.

Our reading, from the paper's abstract and secondary summaries (its code was not available here): the
exact form of the scale (log base, row length vs. total length) is unverified: the two secondary sources
checked for the re-weighting (see :func:`reweigh`) both write the scale as ``log(D) * log(n_i)`` applied to
the cosine of L2-normalised q and k, not ``log_D n_i`` on ``scale * q . k`` as here (not changed: flagged
for a decision). LSSAR's re-weighting stage is the option ``reweight=p`` (reference and eager only). The FlexAttention path passes ``log softplus`` as its
score, so that its softmax is exactly the l1 normalisation of the softplus weights.

Backends: ``triton`` (attnlab's score-transform kernel with its softplus transform, forward and backward;
``lambda_i`` is the kernel's per-query temperature), ``flex``, ``eager``. The kernel keeps no running
maximum: softplus grows linearly, computed as ``max(y, 0) + log(1 + e^-|y|)`` it never overflows, and the
row sum of N_k weights stays in fp32 range for any logit below ~1e38 / N_k (exp would overflow at 88).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.backends.eager import EAGER
from attnlab.catalog.variants._common import VariantFlexBackend, allowed, logits, softmax_rows, weigh
from attnlab.catalog.variants._triton import KernelArgs, TritonScoreBackend
from attnlab.core import Call, MethodSpec
from attnlab.errors import InputError
from attnlab.kernels.flex import ScoreMod
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS

#: LSSAR's shift O_i is 0 on the rows of the first SHIFT_FROM positions and 1 after (see :func:`reweigh`)
SHIFT_FROM = 3


@dataclass(frozen=True)
class SoftplusParams(Params):
    """``length_scale``: multiply the logits by ``log(n_i) / log(D)`` (default True, LSSA); False gives
    plain softplus attention with l1 normalisation. ``reweight``: the power ``p`` of LSSAR's re-weighting
    stage (:func:`reweigh`; 0 to 64, default 0: off; the sources use 3 and 15); causal calls only."""

    method = "softplus"
    length_scale: bool = True
    reweight: int = 0

    def validate(self) -> None:
        self.check_bool("length_scale")
        self.check_int("reweight", minimum=0, maximum=64)


def row_lengths(n_q: int, n_k: int, causal: bool, device: torch.device) -> Tensor:
    """``n_i``: the number of keys each query row may attend, int64 (N_q,)."""
    if not causal:
        return torch.full((n_q,), n_k, dtype=torch.int64, device=device)
    return (torch.arange(n_q, device=device) + (n_k - n_q) + 1).clamp(0, n_k)


def _inv_log_d(head_dim: int) -> float:
    if head_dim < 2:
        raise InputError(
            f"method 'softplus': the length scale log(n) / log(D) needs head dim D >= 2, got D={head_dim}"
        )
    return 1.0 / math.log(head_dim)


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
    """``O_i = sum_j softplus(lambda_i s_ij) v_j / sum_j softplus(lambda_i s_ij)`` over the allowed keys
    (``j <= i + N_k - N_q`` when causal), ``s = scale * q . k``, ``lambda_i = log(n_i) / log(D)`` with
    ``n_i`` the row's allowed keys (1 when ``length_scale`` is False). A row with no key is 0."""
    n_q, n_k = q.shape[2], k.shape[2]
    s = logits(q, k, scale, upcast)
    if params.length_scale:
        n = row_lengths(n_q, n_k, causal, q.device).clamp(min=1).to(s.dtype)
        s = s * (torch.log(n) * _inv_log_d(q.shape[-1]))[:, None]
    w = F.softplus(s)
    mask = allowed(n_q, n_k, causal, q.device)
    if mask is not None:
        w = w * mask
    total = w.sum(dim=-1, keepdim=True)
    a = w / torch.where(total > 0, total, torch.ones_like(total))
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


def _score(call: Call, extra: Mapping[str, Tensor]) -> ScoreMod:
    assert isinstance(call.params, SoftplusParams)
    p = call.problem
    dev = p.device
    inv = torch.tensor(_inv_log_d(p.head_dim) if call.params.length_scale else 0.0, device=dev)
    offset = torch.tensor(p.n_k - p.n_q + 1, dtype=torch.int32, device=dev)
    n_k = torch.tensor(p.n_k, dtype=torch.int32, device=dev)
    causal = torch.tensor(p.causal, device=dev)
    scaled = torch.tensor(call.params.length_scale, device=dev)

    def lssa(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        n = torch.where(causal, (q_idx + offset).clamp(min=1), n_k)
        n = torch.where(n < n_k, n, n_k)
        lam = torch.where(scaled, torch.log(n.to(torch.float32)) * inv, 1.0)
        return log_softplus(score * lam)

    return lssa


def length_scale(n_q: int, n_k: int, causal: bool, head_dim: int, device: torch.device) -> Tensor:
    """``lambda_i = log(n_i) / log(D)`` per query row, fp32 (1, 1, N_q) (rows with no key: 0)."""
    n = row_lengths(n_q, n_k, causal, device).clamp(min=1).to(torch.float32)
    return (torch.log(n) * _inv_log_d(head_dim))[None, None]


def _kernel_args(q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> KernelArgs:
    """The kernel's softplus transform; LSSA's length scale is its per-query temperature (made once per
    call signature)."""
    assert isinstance(call.params, SoftplusParams)
    if not call.params.length_scale:
        return KernelArgs(softplus=True)
    lam = call.memo.get("softplus_lambda")
    if lam is None:
        p = call.problem
        lam = length_scale(p.n_q, p.n_k, p.causal, p.head_dim, q.device)
        if not torch.compiler.is_compiling():
            call.memo["softplus_lambda"] = lam
    return KernelArgs(softplus=True, temp=lam)


def _no_reweight(backend: str) -> Callable[[Call], list[str]]:
    def why(call: Call) -> list[str]:
        p = call.params
        if isinstance(p, SoftplusParams) and p.reweight:
            return [
                f"{backend} has no re-weighting stage (reweight={p.reweight}): it needs each row's l1 "
                "normaliser before a second pass; backend='eager' runs it"
            ]
        return []

    return why


class _Triton(TritonScoreBackend):
    def reasons(self, call: Call) -> list[str]:
        return super().reasons(call) + _no_reweight("the Triton kernel")(call)


class _Flex(VariantFlexBackend):
    def reasons(self, call: Call) -> list[str]:
        return super().reasons(call) + _no_reweight("FlexAttention")(call)


SPEC = MethodSpec(
    name="softplus",
    family="dense",
    paper="Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models "
    "(Gao et al., 2025): LSSA; the re-weighting stage (LSSAR) as the option reweight=p, formula from a "
    "third-party reimplementation (the authors' code was not found)",
    summary="softplus(log_D(n_i) * scale*qk) weights, l1-normalised per row (LSSA)",
    param_class=SoftplusParams,
    reference=reference,
    backends=(_Triton(_kernel_args), _Flex(_score), EAGER),
    patterns=ALL_PATTERNS,
    test_params=({}, {"length_scale": False}),
    bench_params=lambda n: [{}],
    softmax_normalized=False,  # l1-normalised softplus weights: no log-sum-exp
)
