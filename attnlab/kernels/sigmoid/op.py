"""Launchers, autotune configs and the ``torch.library`` custom ops of the FlashSigmoid kernels.

``sigmoid_attention(q, k, v, scale, bias, causal)`` is differentiable and opaque to ``torch.compile``
(``attnlab::sigmoid_fwd`` / ``attnlab::sigmoid_bwd`` with fake-tensor rules), so a compiled model calls
the Triton kernels without a graph break. Importing this module registers those two ops.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from attnlab.kernels.sigmoid.bwd import sigmoid_bwd_dkdv_kernel, sigmoid_bwd_dq_kernel
from attnlab.kernels.sigmoid.fwd import sigmoid_fwd_kernel
from attnlab.kernels.triton_utils import (
    descriptor_scratch,
    fp32_tiles,
    head_block,
    interpreting,
    tma_copyable,
)

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernels then take CPU tensors only).
IMPORTED_INTERPRETED = interpreting()
#: The forward moves tiles with tensor descriptors (TMA) where it can (sm_90+ GPUs, the interpreter, D <= 128);
#: False forces masked pointer loads everywhere.
USE_TMA = True


#: Forward candidates (BLOCK_M, BLOCK_N, warps, stages, SPLIT, WS). On the H100 (bf16, D=128, 8K-32K;
#: benchmarks/sigmoid_tuning.py, results in benchmarks/results/): (128, 64, 4, 2) won 17 plain tile configs;
#: the split query tile (SPLIT=2) and warp specialization (WS, non-causal) then ran 3-15% faster than it,
#: 0.93-1.1x of cuDNN. The small ones are for where those do not fit or win (fp32, D=256, short sequences).
FWD_SHAPES = [
    (128, 64, 4, 2, 2, False),
    (128, 64, 4, 2, 1, True),
    (128, 64, 4, 2, 1, False),
    (128, 32, 4, 3, 2, False),
    (128, 32, 4, 3, 1, False),
    (64, 64, 4, 3, 1, False),
    (64, 32, 4, 2, 1, False),
    (32, 32, 8, 2, 1, False),  # float32 on a GPU (triton_utils.FP32_SHAPE)
]


def _configs(kind: str) -> list[triton.Config]:
    """Autotune candidates (one small config under the interpreter)."""
    if kind == "fwd":
        fwd_shapes = [(16, 16, 1, 1, 1, False)] if IMPORTED_INTERPRETED else FWD_SHAPES
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SPLIT": split, "WS": ws}, num_warps=w, num_stages=s)
            for m, n, w, s, split, ws in fwd_shapes
        ]
    if IMPORTED_INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if kind == "dkdv":
        shapes = [
            (64, 128, 8, 3),
            (32, 128, 4, 3),
            (64, 64, 4, 3),
            (64, 128, 8, 2),
            (32, 64, 4, 4),
            (128, 128, 8, 2),
            (32, 32, 8, 2),  # float32 on a GPU (triton_utils.FP32_SHAPE)
        ]
    else:  # dq
        shapes = [
            (128, 64, 8, 3),
            (64, 64, 4, 3),
            (128, 32, 4, 3),
            (128, 64, 8, 2),
            (64, 128, 8, 3),
            (128, 128, 8, 2),
            (32, 32, 8, 2),  # float32 on a GPU (triton_utils.FP32_SHAPE)
        ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _even(args: dict) -> dict:
    """Whether the tiles divide the lengths (no bounds masks needed). The forward's tensor-descriptor path
    (TMA) bounds-checks in the copy engine and ignores the flags: they are pinned there, so a new length
    compiles nothing new (with ``do_not_specialize`` on the lengths, see fwd.py)."""
    tma = bool(args.get("TMA"))
    return {
        "EVEN_M": tma or args["N_Q"] % args["BLOCK_M"] == 0,
        "EVEN_N": tma or args["N_K"] % args["BLOCK_N"] == 0,
        "EVEN_D": args["HEAD_D"] == args["BLOCK_D"],
    }


_KEY = ["HEAD_D", "CAUSAL", "DOT_PREC", "N_BUCKET", "GROUP"]  # + "TMA" for the forward (Triton >= 3.9
# rejects keys that are not arguments of the kernel)
_EVEN = {
    "EVEN_M": lambda a: _even(a)["EVEN_M"],
    "EVEN_N": lambda a: _even(a)["EVEN_N"],
    "EVEN_D": lambda a: _even(a)["EVEN_D"],
}


#: The Triton release the Hopper-only schedules were compiled, checked and measured with (H100, 3.6.0).
#: Warp specialization is experimental in Triton and its pass has failed to compile other loops: on other
#: releases those schedules are not offered and the autotuner chooses among the rest.
MEASURED_TRITON = "3.6."


def _on_hopper(args: dict) -> bool:
    """A Hopper GPU (sm_90) under the Triton release the Hopper schedules were measured with."""
    q = args.get("Q")
    return (
        isinstance(q, Tensor)
        and q.is_cuda
        and torch.cuda.get_device_capability(q.device)[0] == 9
        and triton.__version__.startswith(MEASURED_TRITON)
    )


def _warp_specialization_allowed(args: dict) -> bool:
    """Triton's warp specialization of the key loop compiles on Hopper only with descriptors built in the
    kernel (TMA) and without the causal diagonal loop (Triton 3.6's pass fails on it); it was measured and
    checked there (sm_90, 16-bit inputs)."""
    return (
        bool(args.get("TMA"))
        and not args.get("CAUSAL")
        and args.get("DOT_PREC") != "ieee"
        and _on_hopper(args)
    )


#: The forward schedule per mask where it was measured: Hopper, 16-bit inputs, tensor descriptors, head
#: dim 128, both sequence lengths at least 8K (H100, 8K-64K self-attention; at 4K causal it was 30% slower
#: than the autotuner's pick). In interleaved rounds against cuDNN it beat the plain 128 x 64 tile at every
#: length in two runs (non-causal: 0.92-1.1x of cuDNN against 0.82-0.99x; causal: 0.93-1.03x against
#: 0.90-0.94x), while Triton's autotuner, which times configs one after another as the clock ramps, kept
#: picking the plain tile. There the autotuner gets only this one; elsewhere it chooses from FWD_SHAPES.
MEASURED_FWD = {False: (128, 64, 4, 2, 1, True), True: (128, 64, 4, 2, 2, False)}  # causal -> shape


def _shape_of(c: triton.Config) -> tuple:
    kw = c.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], c.num_warps, c.num_stages, kw.get("SPLIT", 1), kw.get("WS", False))


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The measured schedule where it was measured (MEASURED_FWD); drop warp-specialized configs where
    they are not allowed (above). fp32 products run on FMA units with every tile in registers, and larger
    tiles spill: in fp32 only :data:`attnlab.kernels.triton_utils.FP32_SHAPE`."""
    args = {**named_args, **kwargs}
    measured_regime = args.get("TMA") and args.get("BLOCK_D") == 128 and args.get("DOT_PREC") != "ieee"
    if measured_regime and args.get("N_BUCKET") == LONG_BUCKET and _on_hopper(args):
        measured = [c for c in configs if _shape_of(c) == MEASURED_FWD[bool(args.get("CAUSAL"))]]
        if measured:
            return measured
    if not _warp_specialization_allowed(args):
        configs = [c for c in configs if not c.kwargs.get("WS")]
        if not configs:
            raise ValueError(
                "every forward config is warp-specialized, and warp specialization is not allowed here"
            )
    if args.get("DOT_PREC") != "ieee":
        return configs
    return fp32_tiles(configs)


def _prune_bwd(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The backward's candidates; in fp32 only :data:`attnlab.kernels.triton_utils.FP32_SHAPE` (see :func:`_prune`)."""
    args = {**named_args, **kwargs}
    return fp32_tiles(configs) if args.get("DOT_PREC") == "ieee" else configs


def _variants(kernel, kind: str):  # type: ignore[no-untyped-def]
    """(autotuned, fixed first-config, fixed float32) launchers of one kernel. The fixed ones hold one
    config each and no key, so they never benchmark (Triton 3.6's autotuner times even a single pruned
    config); the float32 one is :data:`attnlab.kernels.triton_utils.FP32_SHAPE` (float32 on a GPU)."""
    configs = _configs(kind)
    key = [*_KEY, "TMA"] if kind == "fwd" else _KEY
    prune = _prune if kind == "fwd" else _prune_bwd
    tuned = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(
        triton.heuristics(_EVEN)(kernel)
    )
    fixed = triton.autotune(configs[:1], key=[])(triton.heuristics(_EVEN)(kernel))
    fixed_fp32 = triton.autotune(fp32_tiles(configs)[:1], key=[])(triton.heuristics(_EVEN)(kernel))
    return tuned, fixed, fixed_fp32


_FWD = _variants(sigmoid_fwd_kernel, "fwd")
_FWD_ANY = triton.heuristics(_EVEN)(sigmoid_fwd_kernel)  # launched with an explicit config
_DKDV = _variants(sigmoid_bwd_dkdv_kernel, "dkdv")
_DQ = _variants(sigmoid_bwd_dq_kernel, "dq")


def _pick(variants, q: Tensor):  # type: ignore[no-untyped-def]
    """The autotuned launcher (``attnlab.settings.autotune``), else the fixed one for q's dtype."""
    from attnlab.settings import settings

    if settings.autotune:
        return variants[0]
    return variants[2] if q.is_cuda and q.dtype == torch.float32 else variants[1]


def _flags(q: Tensor) -> dict:
    return {
        "FAST": q.is_cuda and q.dtype != torch.float32,
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        "UPCAST": IMPORTED_INTERPRETED and q.dtype == torch.bfloat16,
    }


#: The autotuning bucket of problems whose query and key lengths are both at least 8192.
LONG_BUCKET = 16384


def _bucket(n_q: int, n_k: int) -> int:
    """Autotuning key for length: the longer side's next power of two up to 8192, and LONG_BUCKET when both
    sides are at least 8192 (so a 2K x 8K cross-attention or a one-token decode is not tuned as a long one)."""
    if min(n_q, n_k) >= 8192:
        return LONG_BUCKET
    return min(triton.next_power_of_2(max(n_q, n_k)), 8192)


def _last_contiguous(*ts: Tensor) -> list[Tensor]:
    """The tensors with a unit last stride (copied where needed), after checking that the kernels' 32-bit
    row offsets cover each head's matrix (batch and head offsets are 64-bit)."""
    for t in ts:
        span = (t.shape[2] - 1) * t.stride(2) + t.shape[3]
        if span >= 2**31:
            raise ValueError(
                f"one head's (N, D) = ({t.shape[2]}, {t.shape[3]}) matrix with row stride {t.stride(2)} spans "
                f"{span:,} elements; the Triton sigmoid kernels address at most 2^31 - 1 within a head: pass a "
                "contiguous (B, H, N, D) tensor (row stride D), split the sequence, or use backend='flex'"
            )
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _tma_ready(*ts: Tensor) -> bool:
    """Whether the kernels move these tensors' tiles by tensor descriptors (TMA): allowed (``USE_TMA``) and
    possible (:func:`attnlab.kernels.triton_utils.tma_copyable`)."""
    return USE_TMA and tma_copyable(*ts, interpreted=IMPORTED_INTERPRETED)


def sigmoid_fwd_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: float,
    causal: bool,
    config: triton.Config | None = None,
) -> Tensor:
    """O = (sigmoid(scale * Q K^T + bias) * M) V. q (B, H, N_q, D), k/v (B, H_kv, N_k, D), D <= 256;
    M is 1 everywhere, or j <= i + N_k - N_q when causal. Returns (B, H, N_q, D) in q's dtype.

    ``config``, a ``triton.Config`` of BLOCK_M, BLOCK_N, SPLIT, WS, warps and stages, bypasses the
    autotuner (tests, benchmarks)."""
    q, k, v = _last_contiguous(q, k, v)
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    tma = _tma_ready(q, k, v, o)
    if config is None:
        kernel, meta = _pick(_FWD, q), {}
    else:
        kernel, meta = _FWD_ANY, config.all_kwargs()
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)
    with descriptor_scratch(q.device):
        kernel[grid](
            q, k, v, o,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            h, h // h_kv, n_q, n_k, n_k - n_q, d, scale, bias,
            BLOCK_D=head_block(d), CAUSAL=causal, N_BUCKET=_bucket(n_q, n_k), TMA=tma,
            **_flags(q), **meta,
        )  # fmt: skip
    return o


def sigmoid_bwd_launch(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, bias: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dQ, dK, dV) of :func:`sigmoid_fwd_launch` given dO (B, H, N_q, D): dV = P^T dO,
    dS = P (1 - P) (dO V^T), dQ = scale dS K, dK = scale dS^T Q; dK/dV summed over each GQA group."""
    do, q, k, v = _last_contiguous(do, q, k, v)
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(BLOCK_D=head_block(d), CAUSAL=causal, N_BUCKET=_bucket(n_q, n_k), **_flags(q))
    grid_kv = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), b * h_kv)
    _pick(_DKDV, q)[grid_kv](
        q, k, v, do, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        h_kv, h // h_kv, n_q, n_k, n_k - n_q, d, scale, bias, **common,
    )  # fmt: skip
    grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)
    _pick(_DQ, q)[grid_q](
        q, k, v, do, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        h, h // h_kv, n_q, n_k, n_k - n_q, d, scale, bias, **common,
    )  # fmt: skip
    return dq, dk, dv


@torch.library.custom_op("attnlab::sigmoid_fwd", mutates_args=())
def sigmoid_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: float, causal: bool) -> Tensor:
    return sigmoid_fwd_launch(q, k, v, scale, bias, causal)


@sigmoid_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: float, causal: bool) -> Tensor:
    return torch.empty_like(_last_contiguous(q)[0])  # the strides the launcher's output has


@torch.library.custom_op("attnlab::sigmoid_bwd", mutates_args=())
def sigmoid_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, bias: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return sigmoid_bwd_launch(do, q, k, v, scale, bias, causal)


@sigmoid_bwd.register_fake
def _(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, bias: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = (torch.empty_like(t) for t in _last_contiguous(q, k, v))
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, scale, bias, causal = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (scale, bias, causal)


def _backward(ctx, do: Tensor):  # type: ignore[no-untyped-def]
    q, k, v = ctx.saved_tensors
    dq, dk, dv = sigmoid_bwd(do, q, k, v, *ctx.args)
    return dq, dk, dv, None, None, None


sigmoid_fwd.register_autograd(_backward, setup_context=_setup_context)


def sigmoid_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: float, causal: bool) -> Tensor:
    """Sigmoid attention through the Triton kernels: (B, H, N_q, D) -> (B, H, N_q, D), differentiable."""
    return sigmoid_fwd(q, k, v, float(scale), float(bias), bool(causal))
