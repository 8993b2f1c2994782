"""Low-rank attention bias (FlashBias, Wu et al., 2025): ``softmax(scale * q . k + U V^T) V`` with the bias
given by its factors, never as an N_q x N_k tensor on the fast path.

``u`` (B or 1, H or 1, N_q, r) and ``vf`` (B or 1, H or 1, N_k, r) (size-1 batch/head dims broadcast) give
``bias_ij = u_i . vf_j`` for each (batch, head); it is added after ``scale``, unscaled, like the dense
``bias`` method's tensor. FlashBias's observation is that many biases (ALiBi-like decays, spatial distances
in vision and science models, AlphaFold's pair bias after projection) have low rank, so the kernel can
compute the bias tile as one more small matrix product (``r`` columns) beside ``q k^T`` instead of reading
an N x N tensor: the Triton kernel (:mod:`attnlab.kernels.score_transform`, ``LOWRANK``) does that, forward
and backward, with gradients for both factors (``dU = dX V_f``, ``dV_f = dX^T U``, dX the logits'
gradient), summed over broadcast dims. The FlashBias paper's Triton code (``thuml/FlashBias``,
``flash_bias/flash_bias_triton.py``, read for this) does the same math: ``qk * softmax_scale + q_bias
k_bias^T`` per tile, ``dq_bias = dS k_bias``, ``dk_bias = dS^T q_bias``; it keeps the factors in fp32, and
so does this kernel (the bias tile is an fp32 product at full precision: position-style factors, e.g. ALiBi
as ``u = [-m p_i, 1]``, ``vf = [1, m j]``, hold values of ``m N`` whose bf16 rounding made logit errors of
~2 at N = 600; du and dvf come back in the factors' dtypes), one backward kernel with optional dq atomics
(here: a dK/dV kernel and a dQ kernel, no atomics), and top-left causal alignment (here: bottom-right, as
every attnlab method).

Registered as ``lowrank_bias``: ``attnlab.attention(q, k, v, method="lowrank_bias", u=U, vf=Vf)``, the rank a
free size ``R`` of the two tensor inputs (they must agree: a rank of 1 does not broadcast, an InputError
names both). Backends: the Triton kernel (ranks up to ``MAX_RANK``; a call of a higher rank, which the
dispatcher cannot see when it picks the kernel, runs the eager path instead) and eager (the reference, bias
materialised). The log-sum-exp (``return_lse``): ``log sum_j exp(scale * q_i . k_j + u_i . vf_j)`` over the
allowed keys, -inf on a row with none. :func:`lowrank_bias_attention` is the same computation as a plain
function.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.catalog.variants._common import (
    VariantEagerBackend,
    allowed,
    logits,
    row_lse,
    softmax_attend,
)
from attnlab.catalog.variants._triton import KernelArgs, TritonScoreBackend
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.errors import BackendError, InputError
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS

#: Backends of :func:`lowrank_bias_attention`: the Triton kernel and the reference (eager, dense bias).
BACKENDS = ("triton", "reference")


def check_factors(q: Tensor, k: Tensor, u: Tensor, vf: Tensor) -> int:
    """Validate the factors against q (B, H, N_q, D) and k (B, H_kv, N_k, D); return the rank r. Raises
    InputError naming what was given and what was expected."""
    b, h, n_q = q.shape[0], q.shape[1], q.shape[2]
    n_k = k.shape[2]
    for name, t, n, rows in (("u", u, n_q, "N_q"), ("vf", vf, n_k, "N_k")):
        if not isinstance(t, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        ok = t.dim() == 4 and t.shape[0] in (1, b) and t.shape[1] in (1, h) and t.shape[2] == n
        if not ok:
            raise InputError(
                f"{name} has shape {tuple(t.shape)}; expected (B={b} or 1, H={h} or 1, {rows}={n}, r)"
            )
        if not t.dtype.is_floating_point:
            raise InputError(f"{name} has dtype {t.dtype}; expected a floating dtype")
        if t.device != q.device:
            raise InputError(f"{name} is on {t.device}, but q is on {q.device}")
    return check_ranks(u, vf)


def check_ranks(u: Tensor, vf: Tensor) -> int:
    """The rank r of the factors u (.., N_q, r) and vf (.., N_k, r); InputError unless both have it."""
    if u.shape[-1] != vf.shape[-1] or u.shape[-1] < 1:
        raise InputError(
            f"u has rank {u.shape[-1]} and vf rank {vf.shape[-1]}; expected the same rank r >= 1 (last dim) for "
            f"both factors (u {tuple(u.shape)}, vf {tuple(vf.shape)}; a rank of 1 does not broadcast)"
        )
    return int(u.shape[-1])


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    vf: Tensor,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """``O = softmax_j(scale * q_i . k_j + u_i . vf_j) V`` over the allowed keys (``j <= i + N_k - N_q``
    when causal), the bias materialised densely (fp32 when ``upcast``, else q's dtype); a row with no key
    is 0. Differentiable in every input."""
    s = _scores(q, k, u, vf, scale, upcast)
    return softmax_attend(s, allowed(q.shape[2], k.shape[2], causal, q.device), v, q.dtype, upcast)


def reference_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    vf: Tensor,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """(:func:`reference`'s output, ``lse_i = log sum_j exp(scale * q_i . k_j + u_i . vf_j)`` over the
    allowed keys, float32 (B, H, N_q), -inf on a row with no key)."""
    s = _scores(q, k, u, vf, scale, upcast)
    mask = allowed(q.shape[2], k.shape[2], causal, q.device)
    return softmax_attend(s, mask, v, q.dtype, upcast), row_lse(s, mask)


def _scores(q: Tensor, k: Tensor, u: Tensor, vf: Tensor, scale: float, upcast: bool) -> Tensor:
    check_ranks(u, vf)
    s = logits(q, k, scale, upcast)
    return s + torch.matmul(u.to(s.dtype), vf.to(s.dtype).transpose(-1, -2))


def lowrank_bias_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    vf: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "triton",
) -> Tensor:
    """Attention with the low-rank bias ``u @ vf^T`` (see the module doc): q (B, H, N_q, D), k/v (B, H_kv,
    N_k, D), GQA when H_kv divides H, causal bottom-right. ``backend="triton"`` (CUDA, or CPU under
    TRITON_INTERPRET=1; rank <= 64, D <= 256; the factors in fp32) computes the bias tile in the kernel;
    ``"reference"`` materialises it. Differentiable in q, k, v, u and vf."""
    from attnlab.inputs import validate

    problem = validate(q, k, v, causal=causal, scale=scale)
    rank = check_factors(q, k, u, vf)
    sc = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if backend == "reference":
        return reference(q, k, v, u, vf, causal=causal, scale=sc)
    if backend != "triton":
        raise InputError(f"backend {backend!r}; expected one of {BACKENDS}")
    from attnlab.kernels.score_transform.op import MAX_RANK, score_transform_fwd

    if rank > MAX_RANK:
        raise InputError(
            f"rank {rank}: the Triton kernel takes ranks up to {MAX_RANK}; use backend='reference'"
        )
    if problem.v_dim != problem.head_dim:
        raise InputError(
            f"v's head dim {problem.v_dim} differs from q's {problem.head_dim}; the kernel needs them equal"
        )
    out, _ = score_transform_fwd(q, k, v, None, None, None, u, vf, None, sc, 0.0, causal)
    return out


@dataclass(frozen=True)
class LowRankBiasParams(Params):
    """No parameters: the bias is given by the tensor inputs ``u`` (B, H, N_q, R) and ``vf`` (B, H, N_k, R)."""

    method = "lowrank_bias"


def method_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: LowRankBiasParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    u: Tensor | None = None,
    vf: Tensor | None = None,
) -> Tensor:
    """The registered method's reference: :func:`reference` with the factors as keyword inputs."""
    if u is None or vf is None:
        raise InputError("lowrank_bias needs both factors u and vf")
    return reference(q, k, v, u, vf, causal=causal, scale=scale, upcast=upcast)


def method_reference_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: LowRankBiasParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    u: Tensor | None = None,
    vf: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The registered method's (output, lse): :func:`reference_lse` with the factors as keyword inputs."""
    if u is None or vf is None:
        raise InputError("lowrank_bias needs both factors u and vf")
    return reference_lse(q, k, v, u, vf, causal=causal, scale=scale, upcast=upcast)


def _kernel_args(q: Tensor, call: Call, extra: Mapping[str, Tensor]) -> KernelArgs:
    u, vf = extra["u"], extra["vf"]
    check_ranks(u, vf)
    return KernelArgs(u=u, vf=vf)


_EAGER = VariantEagerBackend(method_reference_lse)


class _LowRankTriton(TritonScoreBackend):
    """The kernel; a call whose rank exceeds its ``MAX_RANK`` runs on the eager path instead. The rank is a
    size of the tensor inputs, which the dispatcher does not see when it picks a backend (its refusals read
    the call's shapes only), so on CUDA a rank-65 call lands here: it runs (dense, O(N^2) memory) rather than
    failing, unless eager refuses it too (then a BackendError gives both reasons)."""

    def launch(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        from attnlab.kernels.score_transform.op import MAX_RANK

        u, vf = extra["u"], extra["vf"]
        rank = check_ranks(u, vf)
        if rank <= MAX_RANK:
            return super().launch(q, k, v, call, extra)
        why = _EAGER.refusals(call)
        if why:
            raise BackendError(
                f"backend 'triton' takes ranks up to {MAX_RANK}, got rank {rank}, and its fallback, eager, "
                f"cannot run the call either: {'; '.join(why)}"
            )
        return _EAGER.run_lse(q, k, v, call, extra)


SPEC = MethodSpec(
    name="lowrank_bias",
    family="dense",
    paper="FlashBias (Wu et al., 2025): low-rank attention bias computed in the kernel",
    summary="softmax(scale*qk + u vf^T) with the bias given by rank-R factors, never materialised (Triton)",
    param_class=LowRankBiasParams,
    reference=method_reference,
    backends=(_LowRankTriton(_kernel_args), _EAGER),
    patterns=ALL_PATTERNS,
    inputs=(
        TensorInput("u", ("B", "H", "N_q", "R"), "query-side factor of the bias", broadcast=True),
        TensorInput("vf", ("B", "H", "N_k", "R"), "key-side factor of the bias", broadcast=True),
    ),
    test_params=({},),
    bench_params=lambda n: [{}],
    # softmax-normalised over its biased logits: its lse is method_reference_lse's (the reference backend's
    # too), not the plain one of scale * q . k
    softmax_normalized=False,
    reference_lse=method_reference_lse,
)
