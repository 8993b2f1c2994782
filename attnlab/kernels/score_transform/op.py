"""Launchers, autotune configs and ``torch.library`` custom ops of the score-transform kernels.

``score_transform_fwd(q, k, v, bias, sinks, slopes, u, vf, temp, scale, cap, causal, softplus=False) -> (out,
lse)`` runs the
Triton forward (``attnlab::score_transform_fwd``) and is differentiable in q, k, v, the sink logits and the
low-rank bias factors u, vf through the backward kernels (``attnlab::score_transform_bwd``), both with
fake-tensor rules so ``torch.compile`` traces through them. Also differentiable in the ALiBi slopes and the per-query temperature ``temp``, and through the
returned lse (the ``triton`` backend's ``return_lse``: its gradient joins Delta, see ``bwd.py``). Not
differentiable: a dense bias (its gradient would be an N_q x N_k tensor; asking for it raises). The low-rank
factors run in fp32 whatever q's dtype (their gradients come back in the factors' dtypes).

The forward's schedules are the FlashSigmoid kernel's (attnlab/kernels/sigmoid/op.py): tensor descriptors
(TMA) on Hopper, a split query tile, warp specialization; where a schedule was measured on the H100 in
interleaved rounds it is pinned (``MEASURED_FWD`` / ``MEASURED_BWD``), elsewhere Triton's autotuner picks
from the candidate lists. Measured speed (H100, bf16, D=128, H=32, 8K-32K): forward 0.54-0.84x of cuDNN
plain softmax, forward+backward 0.48-0.69x (benchmarks/results/h100-2026-11-23/variants/NOTES.md); the
softplus transform at 56ab39e (exact libdevice log2): forward 0.37-0.39x, forward+backward 0.32-0.33x (8K/32K
causal; 3.6-3.8x / 6.1-6.3x faster than Flex; benchmarks/results/h100-2026-11-23-s2/variants/NOTES.md); its
FAST form (lg2.approx, b94794b) is not timed.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
from torch import Tensor

from attnlab.kernels.score_transform.bwd import score_transform_bwd_dkdv_kernel, score_transform_bwd_dq_kernel
from attnlab.kernels.score_transform.fwd import score_transform_fwd_kernel
from attnlab.kernels.triton_utils import (
    descriptor_scratch,
    fp32_tiles,
    head_block,
    interpreting,
    tma_copyable,
)

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernel then takes CPU tensors only).
IMPORTED_INTERPRETED = interpreting()
#: The forward moves tiles with tensor descriptors (TMA) where it can (sm_90+, the interpreter, D <= 128).
USE_TMA = True
#: The largest low-rank bias rank the kernels take (the factors' tiles live in registers).
MAX_RANK = 64
LOG2E = 1.4426950408889634

#: Forward candidates (BLOCK_M, BLOCK_N, warps, stages, SPLIT, WS): the FlashSigmoid kernel's measured
#: schedules first, then the wider tiles of Triton's Hopper attention tutorial, then small ones (fp32, D=256).
FWD_SHAPES = [
    (128, 64, 4, 2, 1, False),
    (128, 64, 4, 2, 2, False),
    (128, 64, 4, 2, 1, True),
    (128, 128, 8, 3, 1, False),
    (128, 64, 8, 3, 1, False),
    (128, 128, 8, 2, 2, False),
    (64, 64, 4, 3, 1, False),
    (64, 32, 4, 2, 1, False),
    (32, 32, 8, 2, 1, False),  # float32 on a GPU (triton_utils.FP32_SHAPE)
]
#: Whether the autotuner may pick the warp-specialized forward (the WS candidate). Off: on the H100 under
#: Triton 3.6 it returns a right output with a wrong log-sum-exp (off by 6.5-9.1 at every non-causal shape
#: tried, 257 x 257 D=64 to 4096 x 4096 D=128; the running maximum is lost while acc and l stay
#: consistent), so every gradient through it is wrong (``attnlab verify --device cuda`` at 5e7f2db:
#: sink/triton non-causal 257 x 257 bf16; benchmarks/results/h100-2026-11-25-s19/verify/), and it does not
#: compile causal; it was measured 3% slower than the split tile anyway.
FWD_WARP_SPECIALIZE = False
#: Backward candidates (BLOCK_M, BLOCK_N, warps, stages) of the dK/dV kernel and of the dQ kernel.
DKDV_SHAPES = [
    (64, 128, 8, 3),
    (32, 128, 4, 3),
    (64, 64, 4, 3),
    (128, 128, 8, 2),
    (32, 64, 4, 4),
    (32, 32, 4, 2),
    (32, 32, 8, 2),  # float32 on a GPU (triton_utils.FP32_SHAPE)
]
DQ_SHAPES = [
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
    (128, 128, 8, 2),
    (64, 128, 8, 3),
    (32, 32, 4, 2),
    (32, 32, 8, 2),  # float32 on a GPU (triton_utils.FP32_SHAPE)
]

#: The Triton release the Hopper schedules were measured with (H100, 3.6.0); elsewhere the autotuner picks.
MEASURED_TRITON = "3.6."
#: Pinned schedules where they were measured (Hopper, Triton 3.6, 16-bit inputs, D=128, both lengths >=
#: 8192): causal -> forward shape. H100, softcap, 16K, interleaved with cuDNN (benchmarks/variants_bench.py
#: --pin-from-probe at 15628b1; benchmarks/results/h100-2026-11-23/variants/): the split 128 x 64 tile ran
#: 9.48 ms non-causal (plain 9.77, warp-specialized 10.10, 128 x 128 x 8 warps 10.62; cuDNN 6.48) and 5.09 ms
#: causal (plain 5.14, 128 x 128 5.54; cuDNN 3.44). The benchmark's every row ran with these pins.
MEASURED_FWD: dict[bool, tuple] = {False: (128, 64, 4, 2, 2, False), True: (128, 64, 4, 2, 2, False)}
#: causal -> (dK/dV shape, dQ shape) where measured (as MEASURED_FWD): (64, 128, 8, 3) | (128, 64, 8, 3)
#: took 39.3 / 19.4 ms (non-causal / causal) against 48.0 / 28.4 for 64 x 64 tiles and 74.2 / 56.1 for
#: (32, 128, 4, 3) | (128, 32, 4, 3) (cuDNN's whole forward + backward: 25.2 / 12.9 ms).
MEASURED_BWD: dict[bool, tuple[tuple, tuple]] = {
    False: ((64, 128, 8, 3), (128, 64, 8, 3)),
    True: ((64, 128, 8, 3), (128, 64, 8, 3)),
}
#: The autotuning bucket of problems whose query and key lengths are both at least 8192.
LONG_BUCKET = 16384


def _bucket(n_q: int, n_k: int) -> int:
    """Autotuning key for length: the longer side's next power of two up to 8192, LONG_BUCKET when both
    sides are at least 8192."""
    if min(n_q, n_k) >= 8192:
        return LONG_BUCKET
    return min(triton.next_power_of_2(max(n_q, n_k)), 8192)


def _on_hopper(args: dict) -> bool:
    q = args.get("Q")
    return (
        isinstance(q, Tensor)
        and q.is_cuda
        and torch.cuda.get_device_capability(q.device)[0] == 9
        and triton.__version__.startswith(MEASURED_TRITON)
    )


def _measured_regime(args: dict) -> bool:
    return (
        args.get("BLOCK_D") == 128
        and args.get("DOT_PREC") != "ieee"
        and args.get("N_BUCKET") == LONG_BUCKET
        and _on_hopper(args)
    )


def _fwd_config(shape: tuple) -> triton.Config:
    m, n, w, s, split, ws = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SPLIT": split, "WS": ws}, num_warps=w, num_stages=s)


def _bwd_config(shape: tuple) -> triton.Config:
    m, n, w, s = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _shape_of(c: triton.Config) -> tuple:
    kw = c.kwargs
    base = (kw["BLOCK_M"], kw["BLOCK_N"], c.num_warps, c.num_stages)
    return (*base, kw["SPLIT"], kw["WS"]) if "SPLIT" in kw else base


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The measured schedule where measured; warp specialization only with TMA, not causal, 16-bit, on
    Hopper under the measured Triton; fp32 only :data:`attnlab.kernels.triton_utils.FP32_SHAPE` (larger
    tiles spill), D > 128 and the heavy variants at most 128 x 64."""
    args = {**named_args, **kwargs}
    heavy = args.get("HAS_BIAS") or args.get("LOWRANK")
    no_ws = heavy or args.get(
        "TEMP"
    )  # Triton's warp-specialization pass fails on these loops (sm_90, offline)
    if args.get("TMA") and _measured_regime(args):
        want = MEASURED_FWD.get(bool(args.get("CAUSAL")))
        if want is not None and ((heavy and want[0] * want[1] > 128 * 64) or (no_ws and want[5])):
            # a bias tile read or the factors' product: 128 x 128 tiles then need more shared memory than
            # sm_90 has, and warp specialization fails to compile (compiled for sm_90 offline, Triton 3.9)
            want = FWD_SHAPES[0]
        picked = [c for c in configs if _shape_of(c) == want]
        if picked:
            return picked
    if not FWD_WARP_SPECIALIZE or no_ws:
        configs = [c for c in configs if not c.kwargs.get("WS")]
    ws_ok = args.get("TMA") and not args.get("CAUSAL") and args.get("DOT_PREC") != "ieee" and _on_hopper(args)
    if not ws_ok:
        configs = [c for c in configs if not c.kwargs.get("WS")]
    if args.get("DOT_PREC") == "ieee":
        return fp32_tiles(configs)
    if args.get("BLOCK_D", 0) > 128 or heavy:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64] or configs[
            -1:
        ]
    return configs


def _prune_bwd(kind: int):  # type: ignore[no-untyped-def]
    def prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        if _measured_regime(args):
            pinned = MEASURED_BWD.get(bool(args.get("CAUSAL")))
            picked = [c for c in configs if pinned is not None and _shape_of(c) == pinned[kind]]
            if picked:
                return picked
        if args.get("DOT_PREC") == "ieee":
            return fp32_tiles(configs)
        if args.get("BLOCK_D", 0) > 128:
            return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or configs[
                -1:
            ]
        return configs

    return prune


def _even(args: dict) -> dict:
    """Whether the tiles divide the lengths. Under TMA the copy engine bounds-checks the forward's query
    rows (EVEN_M pinned); EVEN_N is always the true divisibility: it also decides the key-bound mask."""
    return {
        "EVEN_M": bool(args.get("TMA")) or args["N_Q"] % args["BLOCK_M"] == 0,
        "EVEN_N": args["N_K"] % args["BLOCK_N"] == 0,
        "EVEN_D": args["HEAD_D"] == args["BLOCK_D"],
    }


_EVEN = {name: (lambda a, name=name: _even(a)[name]) for name in ("EVEN_M", "EVEN_N", "EVEN_D")}
_FLAG_KEYS = ["SOFTCAP", "HAS_BIAS", "ALIBI", "LOWRANK", "SOFTPLUS"]
_KEY = ["HEAD_D", "CAUSAL", "DOT_PREC", "N_BUCKET", "GROUP", "FAST", *_FLAG_KEYS]


def _interp_or(shapes: list[tuple], small: tuple, fwd: bool) -> list[triton.Config]:
    make = _fwd_config if fwd else _bwd_config
    return [make(small)] if IMPORTED_INTERPRETED else [make(s) for s in shapes]


_FWD = triton.autotune(
    _interp_or(FWD_SHAPES, (16, 16, 1, 1, 1, False), True),
    key=[*_KEY, "HAS_SINK", "TMA"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(triton.heuristics(_EVEN)(score_transform_fwd_kernel))
_FWD_ANY = triton.heuristics(_EVEN)(score_transform_fwd_kernel)  # launched with an explicit config
_DKDV = triton.autotune(
    _interp_or(DKDV_SHAPES, (16, 16, 1, 1), False),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune_bwd(0)},
)(triton.heuristics(_EVEN)(score_transform_bwd_dkdv_kernel))
_DKDV_ANY = triton.heuristics(_EVEN)(score_transform_bwd_dkdv_kernel)
_DQ = triton.autotune(
    _interp_or(DQ_SHAPES, (16, 16, 1, 1), False),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune_bwd(1)},
)(triton.heuristics(_EVEN)(score_transform_bwd_dq_kernel))
_DQ_ANY = triton.heuristics(_EVEN)(score_transform_bwd_dq_kernel)


def _autotuning() -> bool:
    """``attnlab.settings.autotune``: off, every launch takes each kernel's first candidate."""
    from attnlab.settings import settings

    return bool(settings.autotune)


#: devices on which the softplus transform evaluates ``log2(1 + 2^-|x|)`` by a polynomial (FAST bit 1, see
#: :func:`~attnlab.kernels.score_transform.common.softplus2`) instead of a second special-function op per
#: score; off until checked and timed on the H100 (``("cpu",)`` runs it in the interpreter for the tests)
SOFTPLUS_POLY_DEVICES: tuple[str, ...] = ()


def softplus_poly(q: Tensor, softplus: bool) -> bool:
    """Whether a softplus launch on ``q``'s device takes the polynomial (:data:`SOFTPLUS_POLY_DEVICES`,
    read when the forward runs; its backward gets the forward's answer, see ``_setup_context``)."""
    return bool(softplus) and q.device.type in SOFTPLUS_POLY_DEVICES


def _flags(q: Tensor, softplus: bool = False, poly: bool | None = None) -> dict:
    approx = int(q.is_cuda and q.dtype != torch.float32)
    use_poly = softplus_poly(q, softplus) if poly is None else bool(poly) and bool(softplus)
    return {
        "FAST": approx + (2 if use_poly else 0),
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        "UPCAST": IMPORTED_INTERPRETED and q.dtype == torch.bfloat16,
    }


def _last_contiguous(*ts: Tensor) -> list[Tensor]:
    for t in ts:
        span = (t.shape[2] - 1) * t.stride(2) + t.shape[3]
        if span >= 2**31:
            raise ValueError(
                f"one head's (N, D) = ({t.shape[2]}, {t.shape[3]}) matrix with row stride {t.stride(2)} spans "
                f"{span:,} elements; the score-transform kernels address at most 2^31 - 1 within a head: pass "
                "a contiguous (B, H, N, D) tensor, split the sequence, or use backend='flex'"
            )
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _extras(
    q: Tensor,
    n_k: int,
    bias: Tensor | None,
    sinks: Tensor | None,
    slopes: Tensor | None,
    u: Tensor | None,
    vf: Tensor | None,
    temp: Tensor | None = None,
) -> dict:
    """The kernels' tensor arguments and strides for the optional inputs (q stands in for absent ones)."""
    b, h, n_q, _ = q.shape
    if (u is None) != (vf is None):
        raise ValueError("a low-rank bias needs both factors u (.., N_q, r) and vf (.., N_k, r)")
    rank = 0 if u is None else u.shape[-1]
    if u is not None and vf is not None:
        if vf.shape[-1] != rank or not 1 <= rank <= MAX_RANK:
            raise ValueError(
                f"low-rank bias factors of ranks {rank} and {vf.shape[-1]}: expected one rank in [1, {MAX_RANK}]"
            )
        # fp32 whatever q's dtype (position-like factors lose whole logits in bf16; lowrank_tile)
        u = u.to(torch.float32).expand(b, h, n_q, rank)
        vf = vf.to(torch.float32).expand(b, h, n_k, rank)
        u, vf = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, vf))
    bias_t = None if bias is None else bias.expand(b, h, n_q, n_k)
    tau = None if temp is None else temp.expand(b, h, n_q)
    return {
        "BIAS": q if bias_t is None else bias_t,
        "SINKS": q if sinks is None else sinks.float().contiguous(),
        "SLOPES": q if slopes is None else slopes.float().contiguous(),
        "UF": q if u is None else u,
        "VF": q if vf is None else vf,
        "bias_strides": (0, 0, 0, 0) if bias_t is None else bias_t.stride(),
        "u_strides": (0, 0, 0) if u is None else u.stride()[:3],
        "vf_strides": (0, 0, 0) if vf is None else vf.stride()[:3],
        "TAU": q if tau is None else tau,
        "tau_strides": (0, 0, 0) if tau is None else tau.stride(),
        "R": rank,
        "BLOCK_R": max(16, triton.next_power_of_2(max(rank, 1))),
    }


def score_transform_fwd_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    block: tuple[int, int] | None = None,
    *,
    slopes: Tensor | None = None,
    u: Tensor | None = None,
    vf: Tensor | None = None,
    temp: Tensor | None = None,
    softplus: bool = False,
    config: triton.Config | None = None,
) -> tuple[Tensor, Tensor]:
    """See :func:`attnlab.kernels.score_transform.naive.score_transform_fwd_naive` for the math. q (B, H,
    N_q, D), k/v (B, H_kv, N_k, D), D <= 256; ``bias`` broadcastable to (B, H, N_q, N_k); ``sinks`` and
    ``slopes`` (H,); ``u`` (B or 1, H or 1, N_q or 1, r) and ``vf`` (B or 1, H or 1, N_k or 1, r), r <=
    MAX_RANK, the low-rank bias ``u @ vf^T`` (in fp32); ``temp`` broadcastable to (B, H, N_q), a per-query
    temperature multiplying the scores. ``softplus``: l1-normalised softplus weights instead of the
    softmax (see :func:`attnlab.kernels.score_transform.naive.score_transform_fwd_naive`; lse is then the
    log of the normaliser ``sum_j softplus(x_ij)``; no sinks). ``block`` = (BLOCK_M, BLOCK_N) or ``config``
    (a ``triton.Config`` of BLOCK_M, BLOCK_N, SPLIT, WS, warps, stages) bypasses the autotuner."""
    _check_softplus(softplus, sinks)
    q, k, v = _last_contiguous(q, k, v)
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    x = _extras(q, n_k, bias, sinks, slopes, u, vf, temp)
    if block is not None:
        config = triton.Config({"BLOCK_M": block[0], "BLOCK_N": block[1], "SPLIT": 1, "WS": False},
                               num_warps=1 if IMPORTED_INTERPRETED else 4, num_stages=1)  # fmt: skip
    if config is None and not _autotuning():
        config = _FWD.configs[0] if q.dtype != torch.float32 or not q.is_cuda else fp32_tiles(_FWD.configs)[0]
    if config is not None and config.kwargs.get("WS") and q.is_cuda and not FWD_WARP_SPECIALIZE:
        raise ValueError(
            "score-transform forward: the warp-specialized schedule (WS=True) returns a wrong log-sum-exp on "
            "this GPU under Triton 3.6 (FWD_WARP_SPECIALIZE is off); name another config"
        )
    kernel, meta = (_FWD, {}) if config is None else (_FWD_ANY, config.all_kwargs())
    tma = USE_TMA and tma_copyable(q, k, v, o, interpreted=IMPORTED_INTERPRETED)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)
    with descriptor_scratch(q.device):
        kernel[grid](
            q, k, v, o, lse, x["BIAS"], x["SINKS"], x["SLOPES"], x["UF"], x["VF"], x["TAU"],
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            *x["bias_strides"], *x["u_strides"], *x["vf_strides"], *x["tau_strides"],
            h, h // h_kv, n_q, n_k, n_k - n_q, d, x["R"], float(scale), float(cap) if cap > 0 else 1.0,
            _bucket(n_q, n_k),
            BLOCK_D=head_block(d), BLOCK_R=x["BLOCK_R"], CAUSAL=bool(causal), SOFTCAP=cap > 0,
            HAS_BIAS=bias is not None, HAS_SINK=sinks is not None, ALIBI=slopes is not None,
            LOWRANK=u is not None, TEMP=temp is not None, TMA=tma, SOFTPLUS=bool(softplus), **_flags(q, softplus), **meta,
        )  # fmt: skip
    return o, lse


def score_transform_bwd_launch(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    *,
    slopes: Tensor | None = None,
    u: Tensor | None = None,
    vf: Tensor | None = None,
    temp: Tensor | None = None,
    slopes_grad: bool = False,
    temp_grad: bool = False,
    softplus: bool = False,
    poly: bool | None = None,
    configs: tuple[triton.Config, triton.Config] | None = None,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dQ, dK, dV, dsinks, du, dvf, dslopes, dtemp) of :func:`score_transform_fwd_launch` given dO, its
    output and lse (see ``bwd.py`` for the formulas); dK/dV summed over each GQA group, du/dvf over the
    factors' broadcast dims, dslopes (H,) over the batch (only with ``slopes_grad``), dtemp over the
    temperature's broadcast dims (only with ``temp_grad``); None for an absent input.
    ``softplus``: the backward of the l1-normalised softplus forward (``lse`` its log-normaliser);
    ``poly``: whether that forward took the polynomial log (None: :func:`softplus_poly` now).
    ``configs`` (dK/dV's, dQ's) bypasses the autotuner. ``dlse`` (B, H, N_q): the gradient of the returned
    lse, None for none."""
    _check_softplus(softplus, sinks)
    do, q, k, v = _last_contiguous(do, q, k, v)
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    delta = (do.float() * out.float()).sum(-1)
    if dlse is not None:  # d lse_i / d x_ij = P_ij: the lse's gradient is Delta's, with the opposite sign
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse2 = torch.where(torch.isfinite(lse), lse * LOG2E, torch.full_like(lse, float("inf"))).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    x = _extras(q, n_k, bias, sinks, slopes, u, vf, temp)
    lowrank = u is not None
    du_buf = q.new_empty((b, h, n_q, x["BLOCK_R"]) if lowrank else (0,), dtype=torch.float32)
    alibi_grad = slopes is not None and slopes_grad
    temp_grad = temp is not None and temp_grad
    dtau_buf = q.new_empty((b, h, n_q) if temp_grad else (0,), dtype=torch.float32)
    dvf_buf = q.new_empty((b, h, n_k, x["BLOCK_R"]) if lowrank else (0,), dtype=torch.float32)
    common = dict(
        BLOCK_D=head_block(d), BLOCK_R=x["BLOCK_R"], CAUSAL=bool(causal), SOFTCAP=cap > 0,
        HAS_BIAS=bias is not None, ALIBI=slopes is not None, LOWRANK=lowrank, TEMP=temp is not None,
        SOFTPLUS=bool(softplus), **_flags(q, softplus, poly),
    )  # fmt: skip
    scalars = (
        n_q,
        n_k,
        n_k - n_q,
        d,
        x["R"],
        float(scale),
        float(cap) if cap > 0 else 1.0,
        _bucket(n_q, n_k),
    )
    dkdv: tuple[Any, dict] = (_DKDV, {})
    dqk: tuple[Any, dict] = (_DQ, {})
    if configs is None and not _autotuning():
        fp32 = q.dtype == torch.float32 and q.is_cuda  # (small tiles: see triton_utils.FP32_SHAPE)
        configs = (
            (fp32_tiles(_DKDV.configs)[0], fp32_tiles(_DQ.configs)[0])
            if fp32
            else (_DKDV.configs[0], _DQ.configs[0])
        )
    if configs is not None:
        dkdv, dqk = (_DKDV_ANY, configs[0].all_kwargs()), (_DQ_ANY, configs[1].all_kwargs())
    # one partial slope gradient per dQ program: as many rows as query blocks of the dQ config launched (the
    # autotuner's: its candidates' smallest BLOCK_M, the most blocks any of them launches)
    min_bm = (
        configs[1].kwargs["BLOCK_M"] if configs is not None else min(c.kwargs["BLOCK_M"] for c in _DQ.configs)
    )
    dsl_buf = q.new_zeros((triton.cdiv(n_q, min_bm), b * h) if alibi_grad else (0,), dtype=torch.float32)
    ins = (q, k, v, do, lse2, delta, x["BIAS"], x["SLOPES"], x["UF"], x["VF"], x["TAU"])
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    extra_strides = (*x["bias_strides"], *x["u_strides"], *x["vf_strides"], *x["tau_strides"])
    grid_kv = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), b * h_kv)
    dkdv[0][grid_kv](
        *ins, dk, dv, dvf_buf, *strides, *dk.stride()[:3], *dv.stride()[:3], *extra_strides,
        h, h_kv, h // h_kv, *scalars, **common, **dkdv[1],
    )  # fmt: skip
    grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)
    dqk[0][grid_q](
        *ins, dq, du_buf, dsl_buf, dtau_buf, *strides, *dq.stride()[:3], *extra_strides, h, h // h_kv, *scalars, **common,
        ALIBI_GRAD=alibi_grad, TEMP_GRAD=temp_grad, **dqk[1],
    )  # fmt: skip
    dsinks = du = dvf = dslopes = dtemp = None
    if temp is not None and temp_grad:
        dims = tuple(i for i in range(3) if temp.shape[-3 + i] == 1 and dtau_buf.shape[i] != 1)
        dtemp = (
            (dtau_buf.sum(dim=dims, keepdim=True) if dims else dtau_buf).reshape(temp.shape).to(temp.dtype)
        )
    if slopes is not None and alibi_grad:
        dslopes = dsl_buf.sum(0).view(b, h).sum(0).to(slopes.dtype)
    if sinks is not None:
        # the sink's weight exp(s_h - lse_i); NaN where both are -inf (s_h = -inf on a row with no key: the
        # sink has no weight) or +inf (s_h = +inf: the output is 0, so Delta is 0): 0 in both
        p_sink = torch.exp(sinks.float()[None, :, None] - lse).nan_to_num(nan=0.0)
        dsinks = -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
    if u is not None and vf is not None:
        r = u.shape[-1]
        du = _reduce_to(du_buf[..., :r], u.shape).to(u.dtype).contiguous()  # (a view of the padded buffer
        dvf = _reduce_to(dvf_buf[..., :r], vf.shape).to(vf.dtype).contiguous()  # otherwise; the fake's)
    return dq, dk, dv, dsinks, du, dvf, dslopes, dtemp


def _check_softplus(softplus: bool, sinks: Tensor | None) -> None:
    if softplus and sinks is not None:
        raise ValueError(
            "the softplus transform takes no sink logits (a sink joins a softmax normaliser); got sinks of "
            f"shape {tuple(sinks.shape)} with softplus=True: expected sinks=None"
        )


def _reduce_to(g: Tensor, shape: torch.Size) -> Tensor:
    """Sum a (B, H, N, r) gradient over the dims a factor of ``shape`` broadcast (size 1: the batch, the
    heads or the rows), so that it has the factor's shape (the fake rule's)."""
    dims = tuple(i for i in (0, 1, 2) if shape[i] == 1 and g.shape[i] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


@torch.library.custom_op("attnlab::score_transform_fwd", mutates_args=())
def score_transform_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    slopes: Tensor | None,
    u: Tensor | None,
    vf: Tensor | None,
    temp: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    return score_transform_fwd_launch(
        q, k, v, bias, sinks, scale, cap, causal, slopes=slopes, u=u, vf=vf, temp=temp, softplus=softplus
    )


@score_transform_fwd.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    slopes: Tensor | None,
    u: Tensor | None,
    vf: Tensor | None,
    temp: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(q if q.stride(-1) == 1 else q.contiguous())
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attnlab::score_transform_bwd", mutates_args=())
def score_transform_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    slopes: Tensor | None,
    u: Tensor | None,
    vf: Tensor | None,
    temp: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    slopes_grad: bool,
    temp_grad: bool,
    softplus: bool,
    poly: bool,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dsinks, du, dvf, dslopes, dtemp = score_transform_bwd_launch(
        do, q, k, v, out, lse, bias, sinks, scale, cap, causal, slopes=slopes, u=u, vf=vf, temp=temp,
        slopes_grad=slopes_grad, temp_grad=temp_grad, softplus=softplus, poly=poly, dlse=dlse,
    )  # fmt: skip
    return (
        dq,
        dk,
        dv,
        dsinks if dsinks is not None else q.new_zeros(q.shape[1], dtype=torch.float32),
        du if du is not None else q.new_empty(0),
        dvf if dvf is not None else q.new_empty(0),
        dslopes if dslopes is not None else q.new_empty(0),
        dtemp if dtemp is not None else q.new_empty(0),
    )


@score_transform_bwd.register_fake
def _(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    sinks: Tensor | None,
    slopes: Tensor | None,
    u: Tensor | None,
    vf: Tensor | None,
    temp: Tensor | None,
    scale: float,
    cap: float,
    causal: bool,
    slopes_grad: bool,
    temp_grad: bool,
    softplus: bool,
    poly: bool,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv = (torch.empty_like(t if t.stride(-1) == 1 else t.contiguous()) for t in (q, k, v))
    dsinks = q.new_empty(q.shape[1], dtype=sinks.dtype if sinks is not None else torch.float32)
    du = q.new_empty(0) if u is None else torch.empty_like(u)
    dvf = q.new_empty(0) if vf is None else torch.empty_like(vf)
    dslopes = torch.empty_like(slopes) if slopes is not None and slopes_grad else q.new_empty(0)
    dtemp = torch.empty_like(temp) if temp is not None and temp_grad else q.new_empty(0)
    return dq, dk, dv, dsinks, du, dvf, dslopes, dtemp


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, bias, sinks, slopes, u, vf, temp, scale, cap, causal = inputs[:12]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, sinks, slopes, u, vf, temp)
    ctx.args = (scale, cap, causal)
    ctx.softplus = bool(inputs[12]) if len(inputs) > 12 else False
    # the forward's choice of log (SOFTPLUS_POLY_DEVICES may change before the backward runs)
    ctx.poly = softplus_poly(q, ctx.softplus)


def _backward(ctx, do: Tensor, dlse: Tensor | None):  # type: ignore[no-untyped-def]
    q, k, v, out, lse, bias, sinks, slopes, u, vf, temp = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise NotImplementedError(
            "the score-transform Triton kernel has no gradient for the bias tensor (it would be N_q x N_k); "
            "use backend='flex' or 'eager' when it requires grad"
        )
    slopes_grad = bool(ctx.needs_input_grad[5])
    temp_grad = bool(ctx.needs_input_grad[8])
    dq, dk, dv, dsinks, du, dvf, dslopes, dtemp = score_transform_bwd(
        do,
        q,
        k,
        v,
        out,
        lse,
        bias,
        sinks,
        slopes,
        u,
        vf,
        temp,
        *ctx.args,
        slopes_grad,
        temp_grad,
        ctx.softplus,
        ctx.poly,
        dlse,
    )
    return (
        dq,
        dk,
        dv,
        None,
        dsinks if sinks is not None else None,
        dslopes if slopes_grad else None,
        du if u is not None else None,
        dvf if vf is not None else None,
        dtemp if temp_grad else None,
        None,
        None,
        None,
        None,
    )


score_transform_fwd.register_autograd(_backward, setup_context=_setup_context)
