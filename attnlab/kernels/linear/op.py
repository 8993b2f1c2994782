"""Launchers and ``torch.library`` custom ops of the linear-family Triton kernels.

- :func:`gla_chunk` ``(q, k, v, g, scale, state, chunk) -> (o, state)`` (the signature of the naive twin): the
  gated linear recurrence by chunks (``attnlab::gla_chunk_fwd`` / ``attnlab::gla_chunk_bwd``): the chunk
  states by one sequential pass (``GLA_H_PASS``; else per-chunk local states and a scan over them), the
  intra-chunk scores and per-chunk outputs in parallel (``chunk.py``); the backward's state gradient by
  one reverse sequential pass (``GLA_BWD_H_PASS``; else local states and a reverse scan), then under
  per-channel gates every per-chunk gradient (dq, dk, dv, dg) by one kernel (``GLA_BWD_FUSED``; else
  two kernels and the gate cumsum's backward), under gates shared by the channels dq/dk/dv per chunk.
  Differentiable in q, k, v, g and the initial state. A gate shared by all channels (lightning's
  per-head decay, linear's none, a (B, H, N, 1) gate) runs the scalar-gate kernels (64-row score tiles);
  per-channel gates (gla) make the
  intra-chunk scores by log2(chunk) split dots per chunk (``GLA_INTRA_V2``; else in 16-row sub-blocks). A
  short call without gradients (decode, N <= ``DECODE_MAX``) runs the recurrent step kernel instead
  (``attnlab::linear_step``).
- :func:`delta_chunk` ``(q, k, v, beta, g, scale, state, chunk) -> (o, state)``: the gated delta rule
  (``attnlab::delta_chunk_fwd`` / ``attnlab::delta_chunk_bwd``). Forward in the chunked WY/UT form
  (``chunk.py``: per-chunk T = (I + A_kk)^-1, W, U0 in parallel, by 16-row blocks (``WY_BLOCKWISE``); one
  sequential pass over the chunk states; per-chunk outputs in parallel). Backward chunked too: one reverse
  sequential pass over the chunk states (dH, dU), every chunk's gradients in parallel from the saved S,
  U, T (64-row tiles under a gate shared by the channels: Gated DeltaNet's per-head gate, plain
  DeltaNet), and under per-channel gates (KDA-style) the intra-chunk score backwards per 16-row
  sub-block. Differentiable in q, k, v, beta, g and the initial state.
- :func:`linear_step`: the recurrent step kernel of the gated linear recurrence and of the gated delta
  rule (forward only; a few tokens against a carried state), its launch resolved once per signature of
  its inputs (:func:`step_plan`).

The log-decays enter the gated linear recurrence's chunk kernels as their chunk-local cumsum: per-channel
gates (gla) as g itself, the op making the cumsum inside and its backward carrying dG back to g (one
Triton launch each, ``GLA_FUSED_GLUE``); gates shared by the channels (and per-channel ones with the flag
off) as the cumsum made here in PyTorch, so autograd carries dG back to g (and to lightning's per-head
decays). A/B switches of the gated linear forward: ``GLA_FUSED_GLUE``, ``GLA_H_PASS``, ``GLA_H_COMPACT``,
``GLA_INTRA_V2`` (all False: the previous forward); of its backward: ``GLA_BWD_FUSED``,
``GLA_BWD_H_PASS``, ``GLA_SKIP_ZERO_GRADS`` (all False: the previous backward). The delta rule's op takes g
itself and makes the cumsum inside (one Triton launch, ``DELTA_FUSED_GLUE``), its backward carrying dG back
to g. A/B switches of the delta forward (module flags, read at each call):
``WY_BLOCKWISE`` (the UT transform by 16-row blocks, else row by row), ``WY_INV_PREC``, ``DELTA_INTRA_V2``
(per-channel gates' intra-chunk scores by split dots, forward and backward),
``DELTA_FUSED_GLUE`` (gate cumsum and beta without PyTorch copies); both flags False is the previous
forward. Importing this module registers the ops.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from triton.runtime.errors import OutOfResources

from attnlab.kernels.linear.chunk import (
    chunk_bwd_scalar_kernel,
    chunk_local_state_kernel,
    chunk_out_kernel,
    chunk_scan_kernel,
    delta_bwd_chunk_channel_kernel,
    delta_bwd_chunk_kernel,
    delta_bwd_dh_kernel,
    delta_h_kernel,
    delta_h_v2_kernel,
    delta_wy_block_kernel,
    delta_wy_kernel,
    gate_cumsum_bwd_kernel,
    gate_cumsum_kernel,
    gla_bwd_chunk_kernel,
    gla_bwd_inter_kernel,
    gla_bwd_sub_kernel,
    gla_h_kernel,
    intra_scores_kernel,
    intra_scores_v2_kernel,
    score_bwd_kernel,
)
from attnlab.kernels.linear.fwd import l2norm_bwd_kernel, l2norm_fwd_kernel, recurrent_step_kernel
from attnlab.kernels.linear.limits import kernel_refusals
from attnlab.kernels.linear.naive import L2_EPS, l2norm
from attnlab.kernels.triton_utils import head_block, interpreting, next_power_of_2

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernels then take CPU tensors only).
IMPORTED_INTERPRETED = interpreting()
#: Calls of at most this many tokens without gradients run the recurrent step kernel.
DECODE_MAX = 8
SUB = 16  # rows of a sub-block (tl.dot's minimum)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) (``triton.cdiv`` is a constexpr function: a few microseconds a call on the host)."""
    return -(-a // b)


def _blocks(dk: int, dv: int) -> tuple[int, int, int, int]:
    """(BK, BKS, BV of the forward / state kernels, BV of the chunk backward). BKS = 16 channels per
    slice of the exact in-sub-block products (16 x 16 x 16 float32: 16 KiB of shared memory each)."""
    bk = head_block(dk)
    bv = head_block(dv)
    return bk, 16, min(bv, 64), bv


def _prec(q: Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _upcast(q: Tensor) -> bool:
    """Dots in float32 where Triton's CPU interpreter would get bfloat16 ones wrong."""
    return IMPORTED_INTERPRETED and q.dtype == torch.bfloat16


def _check(q: Tensor, k: Tensor, v: Tensor, chunk: int) -> None:
    why = kernel_refusals(chunk, q.shape[-1], v.shape[-1])
    if why:
        raise ValueError("; ".join(why))
    if not (q.shape == k.shape and q.shape[:3] == v.shape[:3]):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q, k (B, H, N, K), v (B, H, N, V)"
        )


def chunk_cumsum(
    g: Tensor | None, b: int, h: int, n: int, dk: int, chunk: int, device: torch.device
) -> Tensor:
    """The chunk-local inclusive cumsum of g, float32 (B, H, NP, K), zero-padded to whole chunks (zeros
    without g)."""
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    if g is None:
        return torch.zeros(b, h, np_, dk, dtype=torch.float32, device=device)
    gp = F.pad(g.float().expand(b, h, n, dk), (0, 0, 0, np_ - n))
    return gp.view(b, h, n_chunks, chunk, dk).cumsum(3).view(b, h, np_, dk)


def chunk_cumsum_scalar(g: Tensor | None, b: int, h: int, n: int, chunk: int, device: torch.device) -> Tensor:
    """The chunk-local inclusive cumsum of a gate with one value per token (g broadcastable to (B, H, N)),
    float32 (B, H, NP), zero-padded to whole chunks (zeros without g)."""
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    if g is None:
        return torch.zeros(b, h, np_, dtype=torch.float32, device=device)
    gp = F.pad(g.float().expand(b, h, n), (0, np_ - n))
    return gp.view(b, h, n_chunks, chunk).cumsum(3).view(b, h, np_)


def _scalar_gate(g: Tensor | None, b: int, h: int, n: int, dk: int) -> tuple[bool, Tensor | None]:
    """(whether g holds one value per token, shared by every channel; g as (B, H, N) then, else as
    (B, H, N, K)). A gate broadcast over the channels (stride 0, or a last dim of 1) is scalar."""
    if g is None:
        return True, None
    gx = g.expand(b, h, n, dk)
    if gx.shape[-1] == 1 or gx.stride(-1) == 0:
        return True, gx[..., 0]
    return False, gx


def _gate_code(gc: Tensor) -> int:
    """GATE of the chunk kernels: 2 for per-channel cumsums (B, H, NP, K), 1 for one per token (B, H, NP)."""
    return 2 if gc.dim() == 4 else 1


#: Launch options (num_warps, num_stages) per kernel, overriding the defaults written at each launch:
#: for tuning runs (``benchmarks/linear_bench.py --sweep``); empty in normal use.
LAUNCH_OVERRIDES: dict[str, dict[str, int]] = {}


def _cfg(name: str, **defaults: int) -> dict[str, int]:
    """The launch options of kernel ``name``: ``defaults`` updated by ``LAUNCH_OVERRIDES[name]``."""
    over = LAUNCH_OVERRIDES.get(name)
    return {**defaults, **over} if over else defaults


#: The per-channel-gate (gla) backward in two kernels: the state terms (do S^T, v dH^T, k dH) per whole
#: chunk in 64-row tiles (``gla_bwd_inter_kernel``: S and dH read once per chunk, not once per 16-row
#: sub-block), then ``gla_bwd_sub_kernel`` without them (no S / dH tiles in its registers). Costs three
#: float32 (B, H, NP, K|V) buffers written and read. On by default since checked on the H100 (forward,
#: final state and every gradient against the fp32 recurrence at 1x32x8192 bf16) and timed there: fwd+bwd
#: 0.95x (8K) and 0.91x (32K) of the one-kernel backward's time (``benchmarks/linear_bench.py
#: --gla-split-ab``, benchmarks/results/h100-2026-11-23-s4/linear). False: the one-kernel backward.
GLA_BWD_SPLIT = True

#: Tile of the chunk-state scan (stage 2): small, for many programs (each walks every chunk).
SCAN_BK = 32
SCAN_BV = 32

# A/B switches of the gated linear forward (module flags, read at each call; all False is the previous
# forward exactly). For A/B timing in one process: set one before a call (a backward follows what its
# forward did, whatever the flags are by then).

#: Per-channel gates (gla): the chunk-local cumsum of g by one launch of ``gate_cumsum_kernel`` inside the
#: op (g read in its own dtype, the zero padding written by the kernel; the cumsum kept for the
#: backward), and the backward's dG carried back to g by one launch of ``gate_cumsum_bwd_kernel`` (the
#: chunk-end term folded in, dg written in g's dtype). False: PyTorch's pad (a copy of g), cumsum and,
#: in the backward, autograd's reverse cumsum, outside the op.
GLA_FUSED_GLUE = True
#: The forward's chunk states by one sequential pass (``gla_h_kernel``: one program per (key tile, value
#: tile, batch * head), a tensor-core dot per chunk into the register state) instead of stages 1 and 2
#: (``chunk_local_state_kernel`` writes every chunk's M, ``chunk_scan_kernel`` reads it back). Per-channel
#: gates and gates shared by the channels (lightning, linear) alike.
GLA_H_PASS = True
#: With ``GLA_H_PASS`` and without ``save`` (no backward), 16-bit inputs: the chunk-start states written
#: in the inputs' dtype (half the bytes written and read by ``chunk_out_kernel``, which rounds them to that
#: dtype for its dot anyway). With ``save`` they stay float32 (the backward reads them).
GLA_H_COMPACT = True
#: Per-channel gates: the intra-chunk scores by ``intra_scores_v2_kernel`` (one program per chunk, log2(chunk)
#: tensor-core dots split at a row inside every pair of half-blocks: no element-by-element 16 x 16 x 16
#: diagonal products, a quarter of the exps) instead of ``intra_scores_kernel``.
GLA_INTRA_V2 = True
# A/B switches of the gated linear backward (module flags; all False is the previous backward exactly).
# ``GLA_SKIP_ZERO_GRADS`` is read by the forward (which sets up the backward), the others by the backward.

#: Per-channel gates (gla): every per-chunk gradient (dq, dk, dv, and dg: the chunk-end term and, with
#: ``GLA_FUSED_GLUE``, the reverse cumsum to g folded in) by one launch of ``gla_bwd_chunk_kernel`` per
#: (chunk, batch * head): dA = scale do v^T made once per chunk, the intra-chunk sums by the forward's
#: log2(chunk) split dots (no 16-row sub-blocks re-reading their neighbours, no element-by-element
#: diagonal loops), S and dH read once, and the chunk-end term from them (the state-gradient scan no longer
#: reads the forward's states for it, and ``gate_cumsum_bwd_kernel`` is not launched). False:
#: ``gla_bwd_inter_kernel`` / ``gla_bwd_sub_kernel`` (``GLA_BWD_SPLIT``) and ``gate_cumsum_bwd_kernel``.
GLA_BWD_FUSED = True
#: With ``GLA_BWD_FUSED``: the state's gradient at every chunk end by one reverse sequential pass
#: (``gla_h_kernel`` with ``REVERSE``: no M buffer written and read back) instead of stages 1 and 2
#: (``chunk_local_state_kernel``, ``chunk_scan_kernel``). (Without ``GLA_BWD_FUSED``, and under gates
#: shared by the channels, the scan also makes the chunk-end term: stages 1 and 2 run.)
GLA_BWD_H_PASS = True
#: The forward op's autograd context does not materialise zero gradients for the outputs that the loss
#: does not use (``ctx.set_materialize_grads(False)``): the saved chunk states, scores and gate cumsum
#: (returned by the op for the backward; 470 MB of zeros filled per backward at 1x32x8192, D = 128) and
#: an unused final state. False: PyTorch's default (zero tensors made and passed to the backward).
GLA_SKIP_ZERO_GRADS = True
#: Key channels per slice of ``gla_bwd_chunk_kernel`` (dv accumulates over the slices), and whether its
#: log2(chunk) levels are unrolled (16-bit inputs only: the unrolled levels keep their masked dA / dA^T in
#: shared memory, 2 x log2(chunk) x chunk^2 x 2 bytes). Compiled for sm_90 (Triton 3.9, bf16, chunk 64,
#: K = V = 128, 8 warps): 16 unrolled issues ~22K instructions per warp and chunk (spills: 132 per
#: slice, 127 KB shared); 32 unrolled ~19K (288 spills per slice, 221 KB); 32 in a loop ~29K (134;
#: 90 KB); 16 in a loop ~38K (37; 62 KB). On the H100 (Triton 3.6, 57f5974) 32 unrolled needs 237568 bytes
#: of shared memory, over the 232448 available: it does not launch there; 16 (the default) is the one timed.
GLA_BWD_BKS = 16
GLA_BWD_UNROLL = True
#: Key rows and value columns per program of ``gla_h_kernel`` (K = V = 128: 2 x 4 tiles per head).
GLA_H_BK = 64
GLA_H_BV = 32
#: Channels per slice of ``intra_scores_v2_kernel``'s dots.
GLA_INTRA_BKS = 32


def chunk_states(
    x: Tensor, y: Tensor, gc: Tensor, init: Tensor | None, scale: float, chunk: int, backward: bool,
    fwd_states: tuple[Tensor, Tensor] | None = None, seq_chunks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """Stages 1 and 2: (the state at every chunk start (B, H, chunks, K, V), the final state, None) for
    x = k, y = v; with ``backward``, x = q, y = do, init = the final state's gradient: (the state's
    gradient at every chunk end, the initial state's gradient, and with ``fwd_states`` = (the forward's
    states at the chunk starts, its final state) sum_v S_end * dS_end (B, H, chunks, K)). float32. With
    ``seq_chunks`` (varlen, B = 1: the chunk offsets of the packed sequences), the scan restarts at every
    sequence, and init / the final state are per sequence (S, H, K, V)."""
    b, h, n, dk = x.shape
    dv = y.shape[-1]
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    gate = _gate_code(gc)
    buf = torch.empty(b, h, n_chunks, dk, dv, dtype=torch.float32, device=x.device)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    final = torch.empty(n_seq, h, dk, dv, dtype=torch.float32, device=x.device)
    bk, bv = min(head_block(dk), 64), min(head_block(dv), 64)
    nkb = cdiv(dk, bk)
    chunk_local_state_kernel[(nkb * cdiv(dv, bv), n_chunks, b * h)](
        x, y, gc, buf, n, np_, dk, dv, nkb, float(scale),
        BACKWARD=backward, GATE=gate, BT=chunk, BK=bk, BV=bv, DOT_PREC=_prec(x), UPCAST=_upcast(x),
        **_cfg("local_state", num_warps=4),
    )  # fmt: skip
    init_c = init.float().contiguous() if init is not None else final
    sk, sv = min(head_block(dk), SCAN_BK), min(head_block(dv), SCAN_BV)
    nkb, nvb = cdiv(dk, sk), cdiv(dv, sv)
    tail = None
    if fwd_states is not None:
        tail = torch.empty(nvb, b, h, n_chunks, dk, dtype=torch.float32, device=x.device)
    hs_f, ht_f = fwd_states if fwd_states is not None else (buf, final)
    chunk_scan_kernel[(nkb * nvb, n_seq * h)](
        buf, gc, init_c, final, hs_f, ht_f, tail if tail is not None else final,
        seq_chunks if seq_chunks is not None else final, n, np_, dk, dv, nkb, b * h,
        REVERSE=backward, HAS_INIT=init is not None, GATE=gate, HAS_TAIL=tail is not None,
        VARLEN=seq_chunks is not None,
        BT=chunk, BK=sk, BV=sv, **_cfg("scan", num_warps=4, num_stages=2),
    )  # fmt: skip
    return buf, final, (tail.sum(0) if tail is not None else None)


def intra_scores(
    x: Tensor, k: Tensor, gc: Tensor, beta: Tensor | None, chunk: int, strict: bool, v2: bool = False,
    f32_operands: bool = False,
) -> Tensor:  # fmt: skip
    """The intra-chunk scores of per-channel gates (B, H, NP, chunk) float32: row t, column j of t's
    chunk: (beta_t) sum_d x_td k_jd exp(G_td - G_jd) for j <= t (j < t when ``strict``), else 0. ``v2``:
    by ``intra_scores_v2_kernel`` (``GLA_INTRA_V2``, ``DELTA_INTRA_V2``), its dot operands in float32 (dots
    in ``_prec``: tf32 for 16-bit inputs) with ``f32_operands``, else in x's dtype; without ``v2`` by
    ``intra_scores_kernel`` (16-row sub-blocks, the diagonal ones exact in float32)."""
    b, h, n, dk = x.shape
    np_ = gc.shape[2]
    a = torch.empty(b, h, np_, chunk, dtype=torch.float32, device=x.device)
    if v2:
        bk = head_block(dk)
        intra_scores_v2_kernel[(np_ // chunk, b * h)](
            x, k, gc, a, n, np_, dk, BT=chunk, LBT=chunk.bit_length() - 1, BK=bk, BKS=min(bk, GLA_INTRA_BKS),
            DOT_PREC=_prec(x), UPCAST=_upcast(x) or f32_operands, STRICT=strict, HAS_BETA=beta is not None,
            BETA=beta, **_cfg("intra_v2", num_warps=8, num_stages=1),
        )  # fmt: skip
        return a
    intra_scores_kernel[(np_ // SUB, b * h)](
        x, k, gc, beta if beta is not None else a, a, n, np_, dk,
        STRICT=strict, HAS_BETA=beta is not None, BT=chunk, BS=SUB, BK=head_block(dk), BKS=16,
        DOT_PREC=_prec(x), UPCAST=_upcast(x), **_cfg("intra", num_warps=4),
    )  # fmt: skip
    return a


def chunk_output(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, hs: Tensor, a: Tensor | None, scale: float, chunk: int
) -> Tensor:
    """Stage 3: o (B, H, N, V) in q's dtype from the states at the chunk starts ``hs`` and, for
    per-channel gates, the intra-chunk scores ``a``. v may have NP rows (the delta rule's U)."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    n_chunks = cdiv(n, chunk)
    bv = min(head_block(dv), 64)
    o = torch.empty(b, h, n, dv, dtype=q.dtype, device=q.device)
    chunk_out_kernel[(cdiv(dv, bv), n_chunks, b * h)](
        q, k, v, gc, hs, a if a is not None else hs, o, n, v.shape[2], gc.shape[2], dk, dv, float(scale),
        GATE=_gate_code(gc), BT=chunk, BK=head_block(dk), BV=bv, DOT_PREC=_prec(q), UPCAST=_upcast(q),
        **_cfg("out", num_warps=4),
    )  # fmt: skip
    return o


def gla_h(
    k: Tensor, v: Tensor, gc: Tensor, h0: Tensor | None, chunk: int, save: bool, seq_chunks: Tensor | None
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The forward's chunk states by one sequential pass (``gla_h_kernel``, ``GLA_H_PASS``): (the states
    at the chunk starts (B, H, chunks, K, V), the final state (B, H, K, V) or per sequence with
    ``seq_chunks`` (varlen, as ``chunk_states``) float32). The chunk-start states are float32 with
    ``save``, else in k's dtype for 16-bit inputs (``GLA_H_COMPACT``)."""
    b, h, n, dk = k.shape
    dv = v.shape[-1]
    n_chunks = cdiv(n, chunk)
    f32, dev = torch.float32, k.device
    low = k.dtype in (torch.bfloat16, torch.float16)
    sdt = k.dtype if GLA_H_COMPACT and low and not save else f32
    hs = torch.empty(b, h, n_chunks, dk, dv, dtype=sdt, device=dev)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    ht = torch.empty(n_seq, h, dk, dv, dtype=f32, device=dev)
    bk, bv = min(head_block(dk), GLA_H_BK), min(head_block(dv), GLA_H_BV)
    nkb = cdiv(dk, bk)
    gla_h_kernel[(nkb * cdiv(dv, bv), n_seq * h)](
        k, v, gc, h0.float().contiguous() if h0 is not None else ht, hs, ht,
        seq_chunks if seq_chunks is not None else ht, n, gc.shape[2], dk, dv, nkb, b * h, 1.0,
        GATE=_gate_code(gc), HAS_H0=h0 is not None, VARLEN=seq_chunks is not None, BT=chunk, BK=bk, BV=bv,
        LOWP=low and not IMPORTED_INTERPRETED, DOT_PREC=_prec(k), **_cfg("gla_h", num_warps=4, num_stages=2),
    )  # fmt: skip
    return hs, ht


def gla_dh(
    q: Tensor, do: Tensor, gc: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The backward's state gradient by one reverse sequential pass (``gla_h_kernel`` with ``REVERSE``,
    ``GLA_BWD_H_PASS``): (the gradient at every chunk end (B, H, chunks, K, V), the initial state's
    gradient (B, H, K, V) or per sequence with ``seq_chunks``), float32; ``chunk_states(..., backward=True)``
    without its chunk-end term. ``dht``: the final state's gradient (None: zero)."""
    b, h, n, dk = q.shape
    dv = do.shape[-1]
    n_chunks = cdiv(n, chunk)
    f32, dev = torch.float32, q.device
    dhs = torch.empty(b, h, n_chunks, dk, dv, dtype=f32, device=dev)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    dh0 = torch.empty(n_seq, h, dk, dv, dtype=f32, device=dev)
    bk, bv = min(head_block(dk), GLA_H_BK), min(head_block(dv), GLA_H_BV)
    nkb = cdiv(dk, bk)
    low = q.dtype in (torch.bfloat16, torch.float16)
    gla_h_kernel[(nkb * cdiv(dv, bv), n_seq * h)](
        q, do, gc, dht.float().contiguous() if dht is not None else dh0, dhs, dh0,
        seq_chunks if seq_chunks is not None else dh0, n, gc.shape[2], dk, dv, nkb, b * h, float(scale),
        GATE=_gate_code(gc), HAS_H0=dht is not None, VARLEN=seq_chunks is not None, BT=chunk, BK=bk, BV=bv,
        LOWP=low and not IMPORTED_INTERPRETED, DOT_PREC=_prec(q), REVERSE=True,
        **_cfg("gla_dh", num_warps=4, num_stages=2),
    )  # fmt: skip
    return dhs, dh0


def gla_fwd_launch(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, h0: Tensor | None, scale: float, chunk: int, save: bool,
    seq_chunks: Tensor | None = None, raw_gate: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(o (B, H, N, V) in q's dtype, final state (B, H, K, V) fp32, and for the backward (empty without
    ``save``): the states at the chunk starts (B, H, chunks, K, V) fp32, the intra-chunk scores of
    per-channel gates (B, H, NP, chunk) fp32 (kept for the backward, which would otherwise recompute them;
    empty under a gate shared by the channels), and with ``raw_gate`` the chunk-local cumsum made here
    (B, H, NP, K) fp32 (empty otherwise)). gc: the chunk-local cumsum of the log-decays, (B, H, NP, K) per
    channel or (B, H, NP) one per token (``chunk_cumsum*``); with ``raw_gate``, the per-channel log-decays
    g (B, H, N, K) themselves, any float dtype (their cumsum made by ``gate_cumsum``: ``GLA_FUSED_GLUE``).
    The forward's stages follow ``GLA_H_PASS``, ``GLA_H_COMPACT`` and ``GLA_INTRA_V2``."""
    _check(q, k, v, chunk)
    q, k, v, gc = (t.contiguous() for t in (q, k, v, gc))
    if raw_gate:
        gc = gate_cumsum(gc, chunk)
    if GLA_H_PASS:
        hs, ht = gla_h(k, v, gc, h0, chunk, save, seq_chunks)
    else:
        hs, ht, _ = chunk_states(k, v, gc, h0, 1.0, chunk, backward=False, seq_chunks=seq_chunks)
    a = intra_scores(q, k, gc, None, chunk, strict=False, v2=GLA_INTRA_V2) if gc.dim() == 4 else None
    o = chunk_output(q, k, v, gc, hs, a, scale, chunk)

    def empty() -> Tensor:  # (a fresh one each: a custom op's outputs must not alias)
        return ht.new_empty(0)

    if not save:
        return o, ht, empty(), empty(), empty()
    return o, ht, hs, (a if a is not None else empty()), (gc if raw_gate else empty())


def gla_bwd_launch(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, hs: Tensor, ht: Tensor, do: Tensor, dht: Tensor | None,
    scale: float, chunk: int, seq_chunks: Tensor | None = None, a: Tensor | None = None,
    g_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv in the inputs' dtypes, dgc (gc's shape, fp32: the gradient of the chunk-local cumsum),
    dh0 fp32); hs, ht: the forward's states at the chunk starts and its final state; ``a``: the forward's
    intra-chunk scores under per-channel gates (None or empty: recomputed here). ``g_dtype`` (per-channel
    gates whose cumsum the forward made from g, ``raw_gate``): the fourth result is instead dg, the
    gradient of g itself (B, H, N, K) in ``g_dtype`` (``gate_cumsum_bwd_kernel``)."""
    q, k, v, gc, do = (t.contiguous() for t in (q, k, v, gc, do))
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    n_chunks = cdiv(n, chunk)
    if GLA_BWD_FUSED and gc.dim() == 4:
        try:
            return _gla_bwd_fused(q, k, v, gc, hs, do, dht, scale, chunk, seq_chunks, a, g_dtype)
        except OutOfResources:  # a GPU with less shared memory per block than the fused kernel takes (bf16,
            pass  # K = V = 128: 124 KiB; e.g. sm_89's 99 KiB): the previous kernels below, the same results
    dhs, dh0, tail = chunk_states(
        q, do, gc, dht, scale, chunk, backward=True, fwd_states=(hs, ht), seq_chunks=seq_chunks
    )
    assert tail is not None
    dq, dkk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dgc = torch.empty_like(gc)
    if gc.dim() == 3:
        chunk_bwd_scalar_kernel[(n_chunks, b * h)](
            q, k, v, gc, do, hs, dhs, dq, dkk, dvv, dgc, n, gc.shape[2], dk, dv, float(scale),
            BT=chunk, BK=head_block(dk), BV=head_block(dv), DOT_PREC=_prec(q), UPCAST=_upcast(q),
            **_cfg("bwd_scalar", num_warps=8),
        )  # fmt: skip
        dgc.view(b, h, n_chunks, chunk)[:, :, :, -1] += tail.sum(-1)  # the chunk-end term
    else:
        if a is None or a.numel() == 0:  # (the forward's scores, recomputed)
            a = intra_scores(q, k, gc, None, chunk, strict=False, v2=GLA_INTRA_V2)
        np_ = gc.shape[2]
        parts: dict[str, Tensor] = {}
        if GLA_BWD_SPLIT:  # the state terms per whole chunk first (S, dH read once per chunk)
            f32 = torch.float32
            parts = {
                "PQ": torch.empty(b, h, np_, dk, dtype=f32, device=q.device),
                "PK": torch.empty(b, h, np_, dk, dtype=f32, device=q.device),
                "PV": torch.empty(b, h, np_, dv, dtype=f32, device=q.device),
            }
            gla_bwd_inter_kernel[(n_chunks, b * h)](
                k, v, gc, do, hs, dhs, parts["PQ"], parts["PK"], parts["PV"], n, np_, dk, dv,
                BT=chunk, BK=head_block(dk), BV=head_block(dv), DOT_PREC=_prec(q), UPCAST=_upcast(q),
                **_cfg("gla_bwd_inter", num_warps=8),
            )  # fmt: skip
        gla_bwd_sub_kernel[(np_ // SUB, b * h)](
            q, k, v, gc, do, hs, dhs, a, dq, dkk, dvv, dgc, n, np_, dk, dv, float(scale),
            BT=chunk, BS=SUB, BK=head_block(dk), BV=head_block(dv), DOT_PREC=_prec(q), UPCAST=_upcast(q),
            SPLIT=GLA_BWD_SPLIT, **parts, **_cfg("gla_bwd_sub", num_warps=4),
        )  # fmt: skip
        if g_dtype is not None:  # dg through the cumsum, the chunk-end term folded in
            dg = torch.empty(b, h, n, dk, dtype=g_dtype, device=q.device)
            bd = min(head_block(dk), 64)
            gate_cumsum_bwd_kernel[(n_chunks, b * h, cdiv(dk, bd))](
                dgc, tail, dg, n, np_, dk, BT=chunk, BD=bd, **_cfg("cumsum_bwd", num_warps=4)
            )
            return dq, dkk, dvv, dg, dh0
        dgc.view(b, h, n_chunks, chunk, dk)[:, :, :, -1] += tail
    return dq, dkk, dvv, dgc, dh0


def _gla_bwd_fused(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, hs: Tensor, do: Tensor, dht: Tensor | None, scale: float,
    chunk: int, seq_chunks: Tensor | None, a: Tensor | None, g_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``gla_bwd_launch`` under per-channel gates with ``GLA_BWD_FUSED``: the state gradient (one reverse
    pass with ``GLA_BWD_H_PASS``, else stages 1 and 2 without the chunk-end term), then one launch of
    ``gla_bwd_chunk_kernel`` for dq, dk, dv and dg (of g itself with ``g_dtype``, else of gc)."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    n_chunks = cdiv(n, chunk)
    np_ = gc.shape[2]
    if GLA_BWD_H_PASS:
        dhs, dh0 = gla_dh(q, do, gc, dht, scale, chunk, seq_chunks)
    else:
        dhs, dh0, _ = chunk_states(q, do, gc, dht, scale, chunk, backward=True, seq_chunks=seq_chunks)
    if a is None or a.numel() == 0:  # (the forward's scores, recomputed)
        a = intra_scores(q, k, gc, None, chunk, strict=False, v2=GLA_INTRA_V2)
    dq, dkk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    raw = g_dtype is not None
    dg = torch.empty(b, h, n, dk, dtype=g_dtype, device=q.device) if raw else torch.empty_like(gc)
    unroll = GLA_BWD_UNROLL and (q.element_size() == 2 or IMPORTED_INTERPRETED)
    gla_bwd_chunk_kernel[(n_chunks, b * h)](
        q, k, v, gc, do, hs, dhs, a, dq, dkk, dvv, dg, n, np_, dk, dv, float(scale),
        RAW_G=raw, BT=chunk, LBT=chunk.bit_length() - 1, BKS=min(head_block(dk), GLA_BWD_BKS),
        BV=head_block(dv), UNROLL=unroll, DOT_PREC=_prec(q), UPCAST=_upcast(q),
        **_cfg("gla_bwd_chunk", num_warps=8),
    )  # fmt: skip
    return dq, dkk, dvv, dg, dh0


@torch.library.custom_op("attnlab::gla_chunk_fwd", mutates_args=())
def gla_chunk_fwd(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, h0: Tensor | None, scale: float, chunk: int, save: bool,
    seq_chunks: Tensor | None = None, raw_gate: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(o, final state, then what the backward takes: chunk-start states, intra-chunk scores, with
    ``raw_gate`` the gate cumsum; see ``gla_fwd_launch``). ``raw_gate``: gc is the per-channel g itself
    (its gradient is then that of g)."""
    return gla_fwd_launch(q, k, v, gc, h0, scale, chunk, save, seq_chunks, raw_gate)


@gla_chunk_fwd.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, h0: Tensor | None, scale: float, chunk: int, save: bool,
    seq_chunks: Tensor | None = None, raw_gate: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    n_chunks = (n + chunk - 1) // chunk
    f32 = torch.float32
    o = q.new_empty(b, h, n, dv)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    ht = q.new_empty(n_seq, h, dk, dv, dtype=f32)
    hs = q.new_empty((b, h, n_chunks, dk, dv) if save else (0,), dtype=f32)
    scores = save and gc.dim() == 4
    a = q.new_empty((b, h, n_chunks * chunk, chunk) if scores else (0,), dtype=f32)
    gcs = q.new_empty((b, h, n_chunks * chunk, dk) if save and raw_gate else (0,), dtype=f32)
    return o, ht, hs, a, gcs


@torch.library.custom_op("attnlab::gla_chunk_bwd", mutates_args=())
def gla_chunk_bwd(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, hs: Tensor, ht: Tensor, do: Tensor, dht: Tensor | None,
    scale: float, chunk: int, seq_chunks: Tensor | None = None, a: Tensor | None = None,
    g_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv in the inputs' dtypes, dgc (gc's shape) fp32, dh0 fp32). ``a``: the forward's
    intra-chunk scores (None or empty: recomputed). ``g_dtype``: dg (B, H, N, K) of the raw gate in that
    dtype in place of dgc (see ``gla_bwd_launch``)."""
    return gla_bwd_launch(q, k, v, gc, hs, ht, do, dht, scale, chunk, seq_chunks, a, g_dtype)


@gla_chunk_bwd.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, gc: Tensor, hs: Tensor, ht: Tensor, do: Tensor, dht: Tensor | None,
    scale: float, chunk: int, seq_chunks: Tensor | None = None, a: Tensor | None = None,
    g_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    dg = torch.empty_like(gc) if g_dtype is None else q.new_empty(q.shape, dtype=g_dtype)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, torch.empty_like(ht)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, gc, h0, scale, chunk, save, seq_chunks, raw_gate = inputs
    _, ht, hs, a, gcs = output
    if not save:
        raise RuntimeError(
            "attnlab::gla_chunk_fwd ran without saving its chunk states (save=False): no backward"
        )
    ctx.save_for_backward(q, k, v, gcs if raw_gate else gc, hs, ht, a)  # (raw_gate: the cumsum made)
    ctx.args = (scale, chunk, seq_chunks)
    ctx.g_dtype = gc.dtype if raw_gate else None
    ctx.has_h0 = h0 is not None
    if GLA_SKIP_ZERO_GRADS:  # (None, not zeros, for the outputs the loss does not use)
        ctx.set_materialize_grads(False)


def _backward(ctx, do: Tensor | None, dht: Tensor | None, *_unused: Tensor | None):  # type: ignore[no-untyped-def]
    q, k, v, gc, hs, ht, a = ctx.saved_tensors
    if do is None:  # (GLA_SKIP_ZERO_GRADS: the output unused, only the final state)
        do = q.new_zeros(v.shape)  # (o: q's dtype, v's shape)
    dq, dk, dv, dgc, dh0 = gla_chunk_bwd(q, k, v, gc, hs, ht, do, dht, *ctx.args, a, ctx.g_dtype)
    return dq, dk, dv, dgc, (dh0 if ctx.has_h0 else None), None, None, None, None, None


gla_chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, scale: float,
    qk_l2norm: bool, bad: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The recurrent step kernel (:func:`linear_step_op`'s contract): through the custom op inside
    ``torch.compile`` (no graph break), else the launch itself. The op has no autograd, so eager calls
    lose nothing by skipping the custom op's dispatch (its autograd, ADInplaceOrView and redispatch
    layers: most of a decode step's host time, as for ``attnlab::decode_select``). Any tracing (a
    dispatch mode such as FakeTensorMode or ``make_fx``, fake or meta tensors) also takes the op: a
    direct launch cannot run on tensors without data."""
    if (
        torch.compiler.is_compiling()
        or type(q) is not Tensor
        or q.device.type == "meta"
        or torch.utils._python_dispatch._get_current_dispatch_mode() is not None
    ):
        return linear_step_op(q, k, v, g, beta, h0, scale, qk_l2norm, bad)  # type: ignore[no-any-return]
    return _step_launch(q, k, v, g, beta, h0, scale, qk_l2norm, bad)


@torch.library.custom_op("attnlab::linear_step", mutates_args=("bad",))
def linear_step_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, scale: float,
    qk_l2norm: bool, bad: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The recurrent step kernel: (o (B, H, N, V), final state fp32). g log-decays: None; (B, H, N) one
    per token (shared by the channels); or broadcastable to (B, H, N, K): per channel, or one per token
    when its last dim is 1 or broadcast (``_scalar_gate``). ``beta`` (broadcastable to (B, H, N)) selects
    the gated delta rule (None: the gated linear recurrence); ``qk_l2norm``: q and k L2-normalised in the
    kernel (fp32, ``naive.l2norm``'s formula). ``bad``: int32 (``step_programs(q, v)``,), written with
    the kernel's range check of the gates and beta (per program, how many values it read out of range:
    g NaN, > 0 or -inf; beta not finite), read by the host after the launch instead of reductions before
    it; None: no check (and no allocation). No backward. ``qk_l2norm`` and ``bad`` have no defaults on
    purpose: torch before 2.13 drops a trailing argument equal to its default when it boxes the call,
    and then its version bump of the mutated ``bad`` indexes past the end (IndexError on the H100's
    torch 2.11)."""
    return _step_launch(q, k, v, g, beta, h0, scale, qk_l2norm, bad)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """The step kernel's launch for one signature of its inputs (:func:`step_plan`), resolved once: the
    grid, the runtime sizes (N, K, V) and the constexprs, the shapes of o and the final state, and which
    of g, beta and h0 the kernel may read as they are (``*_ready``: their memory already holds what
    ``expand(...).contiguous()`` / ``float().contiguous()`` would give: a call makes no view of them)."""

    grid: tuple[int, int]
    sizes: tuple[int, int, int]
    out_shape: tuple[int, int, int, int]
    state_shape: tuple[int, int, int, int]
    consts: dict[str, int | bool]
    g_ready: bool
    beta_ready: bool
    h0_ready: bool


#: Step plans by signature (``_step_key``), cleared when full: a decode loop repeats one signature.
_STEP_PLANS: dict[tuple[object, ...], StepPlan] = {}
STEP_PLANS_MAX = 256


def _step_gate(g: Tensor, b: int, h: int, n: int, dk: int) -> tuple[bool, Tensor]:
    """(whether g holds one value per token, g as the step kernel reads it, contiguous: (B, H, N) then,
    else (B, H, N, K)). A 3-D g is one per token; a 4-D one as ``_scalar_gate`` says."""
    if g.dim() == 3:
        return True, g.expand(b, h, n).contiguous()
    scalar, gx = _scalar_gate(g, b, h, n, dk)
    assert gx is not None
    return scalar, gx.contiguous()


def _reads_as_is(given: Tensor | None, made: Tensor | None) -> bool:
    """Whether the kernel reading ``given`` reads what it would read in ``made`` (``made``, contiguous, was
    made from it without a copy: the same first element and dtype). Never for an empty tensor (its data
    pointer tells nothing)."""
    if given is None or made is None or given.numel() == 0:
        return False
    return made.data_ptr() == given.data_ptr() and made.dtype == given.dtype


def _step_key(
    q: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, qk_l2norm: bool,
    check: bool,
) -> tuple[object, ...]:  # fmt: skip
    """What a :class:`StepPlan` depends on (k has q's shape): shapes, the strides of g, beta and h0 (the
    copies they need), h0's dtype, q's dtype and device, the flags."""
    return (
        q.shape, q.dtype, q.device, v.shape,
        None if g is None else g.shape, None if g is None else g.stride(),
        None if beta is None else beta.shape, None if beta is None else beta.stride(),
        None if h0 is None else h0.shape, None if h0 is None else h0.stride(),
        None if h0 is None else h0.dtype, qk_l2norm, check,
    )  # fmt: skip


def step_plan(
    q: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, qk_l2norm: bool,
    check: bool,
) -> StepPlan:  # fmt: skip
    """The :class:`StepPlan` of these inputs (``linear_step_op``'s arguments; ``check``: ``bad`` given),
    made on the first call of a signature and kept (``STEP_PLANS_MAX`` of them)."""
    key = _step_key(q, v, g, beta, h0, qk_l2norm, check)
    plan = _STEP_PLANS.get(key)
    if plan is None:
        plan = _make_step_plan(q, v, g, beta, h0, qk_l2norm, check)
        if len(_STEP_PLANS) >= STEP_PLANS_MAX:
            _STEP_PLANS.clear()
        _STEP_PLANS[key] = plan
    return plan


def _make_step_plan(
    q: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, qk_l2norm: bool,
    check: bool,
) -> StepPlan:  # fmt: skip
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    bk, _, bv, _ = _blocks(dk, dv)
    g_scalar, gc = (False, None) if g is None else _step_gate(g, b, h, n, dk)
    return StepPlan(
        grid=(cdiv(dv, bv), b * h),
        sizes=(n, dk, dv),
        out_shape=(b, h, n, dv),
        state_shape=(b, h, dk, dv),
        consts={
            "HAS_G": g is not None,
            "HAS_H0": h0 is not None,
            "DELTA": beta is not None,
            "BK": bk,
            "BV": bv,
            "G_SCALAR": g_scalar,
            "L2NORM": qk_l2norm,
            "CHECK": check,
            "num_warps": 4,
        },
        g_ready=_reads_as_is(g, gc),
        beta_ready=beta is not None and _reads_as_is(beta, beta.expand(b, h, n).contiguous()),
        h0_ready=h0 is not None and _reads_as_is(h0, h0.float().contiguous()),
    )


def _step_launch(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, scale: float,
    qk_l2norm: bool, bad: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    p = step_plan(q, v, g, beta, h0, qk_l2norm, bad is not None)
    n, dk, dv = p.sizes
    o = q.new_empty(p.out_shape)
    ht = q.new_empty(p.state_shape, dtype=torch.float32)
    b, h = p.out_shape[0], p.out_shape[1]
    gc = ht if g is None else g if p.g_ready else _step_gate(g, b, h, n, dk)[1]
    bc = ht if beta is None else beta if p.beta_ready else beta.expand(b, h, n).contiguous()
    h0c = ht if h0 is None else h0 if p.h0_ready else h0.float().contiguous()
    recurrent_step_kernel[p.grid](
        q.contiguous(), k.contiguous(), v.contiguous(), gc, bc, h0c, o, ht, ht if bad is None else bad,
        n, dk, dv, float(scale), **p.consts,
    )  # fmt: skip
    return o, ht


@linear_step_op.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, scale: float,
    qk_l2norm: bool, bad: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    b, h, n, dk = q.shape
    return q.new_empty(b, h, n, v.shape[-1]), q.new_empty(b, h, dk, v.shape[-1], dtype=torch.float32)


def step_programs(q: Tensor, v: Tensor) -> int:
    """The step kernel's programs (value blocks x batch x heads): the length of ``linear_step``'s ``bad``."""
    b, h, _, dk = q.shape
    dv = v.shape[-1]
    return cdiv(dv, _blocks(dk, dv)[2]) * b * h


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def takes_step(n: int, *ts: Tensor | None) -> bool:
    """Whether :func:`gla_chunk` / :func:`delta_chunk` on ``n`` tokens with inputs ``ts`` (q, k, v, gates,
    state: any that may need gradients) runs the recurrent step kernel (decode) rather than the chunks."""
    return n <= DECODE_MAX and not _needs_grad(*ts)


def _step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, h0: Tensor | None, scale: float,
    qk_l2norm: bool, on_bad_gates: Callable[[], None] | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The step kernel (g and beta as :func:`linear_step_op` takes them: as the caller passed them, no
    view made here); with ``on_bad_gates`` its in-kernel range check on: when the counts it returns
    (one device-to-host read, no reduction launched) show a bad value, ``on_bad_gates()`` is called to
    raise the caller's detailed error (a ValueError here if it returns)."""
    if on_bad_gates is None:
        return linear_step(q, k, v, g, beta, h0, scale, qk_l2norm, None)
    bad = q.new_empty((step_programs(q, v),), dtype=torch.int32)
    o, ht = linear_step(q, k, v, g, beta, h0, scale, qk_l2norm, bad)
    counts = bad.tolist()
    if any(counts):
        on_bad_gates()
        raise ValueError(f"the step kernel counted {sum(counts)} gate / beta value(s) out of range")
    return o, ht


def gla_chunk(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float, state: Tensor | None, chunk: int,
    on_bad_gates: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The gated linear recurrence ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``
    through the Triton kernels: q, k (B, H, N, K), v (B, H, N, V), g None or broadcastable to
    (B, H, N, K), state None or (B, H, K, V). Returns (o in q's dtype, final state float32);
    differentiable in q, k, v, g and state. Short calls without gradients take the step kernel
    (:func:`takes_step`); ``on_bad_gates`` (used by the step kernel only) turns its range check of g on
    and is called to raise when it finds a bad value (see ``_step``)."""
    b, h, n, dk = q.shape
    grad = _needs_grad(q, k, v, g, state)
    if n <= DECODE_MAX and not grad:
        _check(q, k, v, chunk)
        return _step(q, k, v, g, None, state, float(scale), False, on_bad_gates)
    gc, raw = _gla_gate(g, b, h, n, dk, chunk, q.device)
    o, ht, *_ = gla_chunk_fwd(q, k, v, gc, state, float(scale), int(chunk), grad, None, raw)
    return o, ht


def _gla_gate(
    g: Tensor | None, b: int, h: int, n: int, dk: int, chunk: int, device: torch.device
) -> tuple[Tensor, bool]:
    """What ``gla_chunk_fwd`` takes for gate g: (gc, raw_gate). One gate per token (lightning's per-head
    decays, linear's none; the scalar-gate kernels, 64-row score tiles): its chunk-local cumsum (B, H, NP)
    by PyTorch. Per channel: g (B, H, N, K) as it is, its cumsum made in the op (``GLA_FUSED_GLUE``), or
    the cumsum (B, H, NP, K) by PyTorch."""
    scalar, gx = _scalar_gate(g, b, h, n, dk)
    if scalar:
        return chunk_cumsum_scalar(gx, b, h, n, chunk, device), False
    assert gx is not None
    if GLA_FUSED_GLUE:
        return gx, True
    return chunk_cumsum(gx, b, h, n, dk, chunk, device), False


#: Value columns per program of the delta-rule kernels (the state's columns evolve independently).
DELTA_BV = 32

#: The delta rule's forward sequential pass by ``delta_h_v2_kernel``: the state as 64-row register tiles
#: (K = 128: two), W's 64-column slices dotted against them and accumulated, k^T (and per-channel gates'
#: G^T) loaded transposed (no transpose in registers; under a per-head gate the row decays folded into U_c
#: once for all tiles), 16-bit dot operands with float32 accumulation for 16-bit inputs
#: (``DELTA_H_LOWP``), and without ``save`` (no backward) the chunk-start states and U written in the
#: inputs' dtype for the output kernel (``DELTA_H_COMPACT``). False: ``delta_h_kernel`` (one (K, BV)
#: float32 tile, tf32 dots, U in place). For A/B timing in one process: set it before a call.
DELTA_H_V2 = True
#: Dot operands of ``delta_h_v2_kernel`` in the inputs' 16-bit dtype (W, S, U_c rounded to it, as
#: fla-core's kernel does; float32 accumulation) for bf16 / fp16 inputs. False: float32 operands in
#: ``_prec`` (tf32). (Float32 inputs and Triton's CPU interpreter always take float32 operands.)
DELTA_H_LOWP = True
#: Without ``save``: ``delta_h_v2_kernel`` writes the chunk-start states and U in the inputs' dtype (half
#: the bytes written there and read by ``chunk_out_kernel``, which rounds them to that dtype for its dots
#: anyway) into fresh buffers (U0 left as is). With ``save`` both stay float32 (the backward reads them).
DELTA_H_COMPACT = True
#: Value columns per program and key rows per state tile of ``delta_h_v2_kernel``.
DELTA_H_BV = 32
DELTA_H_BKT = 64


def _delta_gate(g: Tensor | None, b: int, h: int, n: int, dk: int) -> Tensor | None:
    """The delta kernels' gate: None, (B, H, N, 1) for a gate shared by the channels (the scalar-gate
    kernels, chunked backward), else (B, H, N, K) per channel."""
    scalar, gx = _scalar_gate(g, b, h, n, dk)
    if gx is None:
        return None
    return gx[..., None] if scalar else gx


def _delta_scalar(g: Tensor | None) -> bool:
    return g is None or g.shape[-1] == 1


#: The gated delta rule's q/k L2 normalisation (``qk_l2norm``) fused into the chunk kernels: one Triton
#: launch normalises q and k (the chunk kernels then take the normalised rows, which the backward keeps in
#: place of the raw q, k, with the reciprocal norms), and the backward applies the norm's Jacobian inside
#: its per-chunk kernel (per-head gate) or in one launch that also casts the float32 gradients (per-channel
#: gate). False: the old path, a PyTorch normalisation in float32 under autograd before the chunk op (kept
#: for A/B timing: ``benchmarks/linear_bench.py --l2norm-ab``). On by default since checked on the H100
#: (output, state and every gradient against the fp32 recurrence at 1x32x8192 bf16, equal errors to the
#: old path) and timed there: gated_delta fwd 0.79-0.89x, fwd+bwd 0.81-0.82x, KDA 0.87-0.90x of the old
#: path's time (benchmarks/results/h100-2026-11-23-s4/linear).
FUSED_L2NORM = True
#: Rows per program of the L2-normalisation kernels.
L2_ROWS = 16

#: The delta rule's UT transform (T = (I + A_kk)^-1, W, U0 per chunk) by 16-row blocks
#: (``delta_wy_block_kernel``): A_kk's blocks by tensor-core dots, the four diagonal 16 x 16 blocks inverted
#: by 16-step forward substitution in one loop, the blocks below them by block forward substitution
#: (dots in ``WY_INV_PREC``), W and U0 by dots per block. False: ``delta_wy_kernel`` (one 64 x 64 tile,
#: 63 sequential row steps over the whole tile). For A/B timing in one process: set it before a call
#: (forward only; the backward reads the saved T either way).
WY_BLOCKWISE = True
#: Dot precision of the block forward substitution's 16 x 16 products (T_ab = -T_aa sum A_am T_mb):
#: "ieee" (float32 FMAs: T as accurate as the row-by-row substitution's), or "tf32" / "tf32x3" (tensor
#: cores: fla-core's fused kernel takes tf32) for A/B timing.
WY_INV_PREC = "ieee"
#: Channels per slice of the blockwise kernel's k k^T dots (every warp holds a 16-row dot operand whole)
#: and columns per step of its W / U0 products.
WY_BKS = 32
WY_COLS = 64
#: The delta rule's gate cumsum (forward and backward) by one launch of ``gate_cumsum_kernel`` (g read in
#: its own dtype, the zero padding written by the kernel) and beta read by the kernels in its own dtype,
#: instead of PyTorch's pad, cumsum and float copies (three to four launches). False: the PyTorch glue (for
#: A/B timing; forward and backward must agree: flip it between calls, not between a forward and its
#: backward). With ``WY_BLOCKWISE`` False too, the forward is the previous one exactly.
DELTA_FUSED_GLUE = True
#: Per-channel gates (KDA): the delta rule's intra-chunk scores (the forward's beta-scaled strict k k^T and
#: q k^T, the backward's recomputed q k^T and strict k k^T) by ``intra_scores_v2_kernel`` (a chunk per
#: program, log2(chunk) split dots: gla's ``GLA_INTRA_V2`` kernel, with STRICT and beta) instead of
#: ``intra_scores_kernel`` (16-row sub-blocks, the diagonal ones element by element: 4 launches, 2.63 ms
#: of KDA's 13.45 ms forward + backward at 1x32x8192 on the H100, profile_fwd_bwd_cc89e2a). False: the
#: sub-block kernel. ``DELTA_INTRA_V2_F32``: its dot operands in float32 (tf32 dots for 16-bit inputs: the
#: scores near the diagonal feed the UT transform's inverse, which the sub-block kernel makes exactly in
#: float32), else in the inputs' dtype (as gla's).
DELTA_INTRA_V2 = True
DELTA_INTRA_V2_F32 = True
#: Chunks per program of ``gate_cumsum_kernel`` for one gate per token.
CUMSUM_CHUNKS = 16


def gate_cumsum(g: Tensor, chunk: int) -> Tensor:
    """The chunk-local inclusive cumsum of log-decays in one launch (``gate_cumsum_kernel``), float32,
    zero-padded to whole chunks: g (B, H, N) one per token -> (B, H, NP), or (B, H, N, K) per channel ->
    (B, H, NP, K); g in any float dtype (read as it is when contiguous)."""
    g = g.contiguous()
    b, h, n = g.shape[:3]
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    if g.dim() == 4:
        dk = g.shape[3]
        gc = torch.empty(b, h, np_, dk, dtype=torch.float32, device=g.device)
        bd = min(head_block(dk), 64)
        grid: tuple[int, ...] = (n_chunks, b * h, cdiv(dk, bd))
        consts = {"PER_CHANNEL": True, "BR": 1, "BD": bd}
    else:
        dk = 1
        gc = torch.empty(b, h, np_, dtype=torch.float32, device=g.device)
        grid = (cdiv(n_chunks, CUMSUM_CHUNKS), b * h)
        consts = {"PER_CHANNEL": False, "BR": CUMSUM_CHUNKS, "BD": 1}
    if n_chunks:
        gate_cumsum_kernel[grid](g, gc, n, np_, dk, BT=chunk, **consts, **_cfg("cumsum", num_warps=4))
    return gc


def _delta_cumsum(
    g: Tensor | None, b: int, h: int, n: int, dk: int, chunk: int, device: torch.device
) -> Tensor:
    """The delta kernels' gate cumsum (``chunk_cumsum*``'s layout): (B, H, NP) for None or a (B, H, N, 1)
    gate, (B, H, NP, K) per channel; by ``gate_cumsum`` with ``DELTA_FUSED_GLUE``."""
    scalar = _delta_scalar(g)
    if g is not None and DELTA_FUSED_GLUE:
        return gate_cumsum(g.expand(b, h, n, 1)[..., 0] if scalar else g.expand(b, h, n, dk), chunk)
    if scalar:
        return chunk_cumsum_scalar(None if g is None else g[..., 0], b, h, n, chunk, device)
    return chunk_cumsum(g, b, h, n, dk, chunk, device)


def _delta_beta(beta: Tensor, b: int, h: int, n: int) -> Tensor:
    """beta as the delta kernels read it, (B, H, N) contiguous: in its own dtype with
    ``DELTA_FUSED_GLUE`` (the kernels load it as float32), else a float32 copy."""
    if DELTA_FUSED_GLUE:
        return beta.expand(b, h, n).contiguous()
    return beta.float().expand(b, h, n).contiguous()


def l2norm_qk(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k (B, H, N, K) L2-normalised over K in one launch: (q^, k^ in their dtypes, rstd_q, rstd_k
    (B, H, N) float32), x^ = x / sqrt(sum x^2 + ``L2_EPS``) computed in float32 (``naive.l2norm``)."""
    q, k = q.contiguous(), k.contiguous()
    b, h, n, dk = q.shape
    qn, kn = torch.empty_like(q), torch.empty_like(k)
    rq = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    rk = torch.empty_like(rq)
    rows = b * h * n
    if rows:
        l2norm_fwd_kernel[(cdiv(rows, L2_ROWS), 2)](
            q, qn, rq, k, kn, rk, rows, dk, EPS=L2_EPS, BR=L2_ROWS, BD=next_power_of_2(dk),
            RTNE_BF16=IMPORTED_INTERPRETED and q.dtype == torch.bfloat16,
            **_cfg("l2norm_fwd", num_warps=4),
        )  # fmt: skip
    return qn, kn, rq, rk


def l2norm_qk_bwd(
    qn: Tensor, kn: Tensor, rq: Tensor, rk: Tensor, dqn: Tensor, dkn: Tensor, dtype_q: torch.dtype,
    dtype_k: torch.dtype,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The gradients of the raw q, k (B, H, N, K) from those of the normalised rows ``dqn``, ``dkn``
    ((B, H, NP, K), NP >= N rows, any float dtype), in one launch: dx = rstd (dx^ - x^ sum(x^ dx^))."""
    b, h, n, dk = qn.shape
    assert dqn.shape == dkn.shape and dqn.is_contiguous() and dkn.is_contiguous()
    dq = torch.empty(b, h, n, dk, dtype=dtype_q, device=qn.device)
    dkk = torch.empty(b, h, n, dk, dtype=dtype_k, device=qn.device)
    if n:
        l2norm_bwd_kernel[(cdiv(n, L2_ROWS), b * h, 2)](
            qn, rq, dqn, dq, kn, rk, dkn, dkk, n, dqn.shape[2], dk, BR=L2_ROWS,
            BD=next_power_of_2(dk), **_cfg("l2norm_bwd", num_warps=4),
        )  # fmt: skip
    return dq, dkk


def delta_fwd_launch(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None, scale: float,
    chunk: int, save: bool, seq_chunks: Tensor | None = None, qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(o in q's dtype, final state fp32, and for the backward (empty without ``save``): the states at the
    chunk starts, W (B, H, NP, K), U (B, H, NP, V) and T (B, H, NP, chunk), fp32, and with ``qk_l2norm``
    q^, k^ (the normalised q, k in their dtypes) and their reciprocal norms (B, H, N) fp32 (empty
    otherwise)): the WY/UT chunked form (see ``chunk.py``). g: None, (B, H, N, 1) one log-decay per
    token, or (B, H, N, K) per channel. ``seq_chunks``: varlen (see ``chunk_states``). ``qk_l2norm``: q
    and k are L2-normalised first, by one launch of ``l2norm_fwd_kernel``."""
    _check(q, k, v, chunk)
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    q, k, v = (t.contiguous() for t in (q, k, v))
    rq = rk = None
    if qk_l2norm:
        q, k, rq, rk = l2norm_qk(q, k)
    bc = _delta_beta(beta, b, h, n)
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    scalar = _delta_scalar(g)
    gc = _delta_cumsum(g, b, h, n, dk, chunk, q.device)
    f32, dev = torch.float32, q.device
    akk = aqk = None
    if not scalar:
        v2, wide = DELTA_INTRA_V2, DELTA_INTRA_V2_F32
        akk = intra_scores(k, k, gc, bc, chunk, strict=True, v2=v2, f32_operands=wide)
        aqk = intra_scores(q, k, gc, None, chunk, strict=False, v2=v2, f32_operands=wide)
    w = torch.empty(b, h, np_, dk, dtype=f32, device=dev)
    u = torch.empty(b, h, np_, dv, dtype=f32, device=dev)
    save_t = save
    t = torch.empty((b, h, np_, chunk) if save_t else (0,), dtype=f32, device=dev)
    prec = _prec(q)
    bk, bv = head_block(dk), head_block(dv)
    if WY_BLOCKWISE:
        delta_wy_block_kernel[(n_chunks, b * h)](
            k, v, gc, bc, akk if akk is not None else w, w, u, t if save_t else w, n, np_, dk, dv,
            GATE=_gate_code(gc), SAVE_T=save_t, BT=chunk, BS=SUB, BK=bk, BV=bv, BKS=min(bk, WY_BKS),
            BCK=min(bk, WY_COLS), BCV=min(bv, WY_COLS), DOT_PREC=prec, INV_PREC=WY_INV_PREC,
            UPCAST=_upcast(k), **_cfg("delta_wy_block", num_warps=4),
        )  # fmt: skip
    else:
        delta_wy_kernel[(n_chunks, b * h)](
            k, v, gc, bc, akk if akk is not None else w, w, u, t if save_t else w, n, np_, dk, dv,
            GATE=_gate_code(gc), SAVE_T=save_t, BT=chunk, BK=bk, BV=bv, DOT_PREC=prec,
            **_cfg("delta_wy", num_warps=8),
        )  # fmt: skip
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    ht = torch.empty(n_seq, h, dk, dv, dtype=f32, device=dev)
    h0c = h0.float().contiguous() if h0 is not None else ht
    seq = seq_chunks if seq_chunks is not None else ht
    if DELTA_H_V2:
        hs, u_out = delta_h_v2(k, w, u, gc, h0c if h0 is not None else None, ht, seq_chunks, save, chunk)
    else:
        hs = torch.empty(b, h, n_chunks, dk, dv, dtype=f32, device=dev)
        u_out = u
        bv = min(head_block(dv), DELTA_BV)
        delta_h_kernel[(cdiv(dv, bv), n_seq * h)](
            k, w, u, gc, h0c, hs, ht, seq, n, np_, dk, dv, b * h,
            GATE=_gate_code(gc), HAS_H0=h0 is not None, VARLEN=seq_chunks is not None, BT=chunk,
            BK=head_block(dk), BV=bv, DOT_PREC=prec,
            **_cfg("delta_h", num_warps=4, num_stages=2),
        )  # fmt: skip
    o = chunk_output(q, k, u_out, gc, hs, aqk, scale, chunk)

    def empty() -> Tensor:  # (a fresh one each: a custom op's outputs must not alias)
        return hs.new_empty(0)

    if not save:
        return o, ht, empty(), empty(), empty(), empty(), empty(), empty(), empty(), empty()
    if rq is None or rk is None:
        return o, ht, hs, w, u, t, empty(), empty(), empty(), empty()
    return o, ht, hs, w, u, t, q, k, rq, rk


def delta_h_v2(
    k: Tensor, w: Tensor, u: Tensor, gc: Tensor, h0: Tensor | None, ht: Tensor, seq_chunks: Tensor | None,
    save: bool, chunk: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The delta rule's forward sequential pass by ``delta_h_v2_kernel``: (the states at the chunk starts
    (B, H, chunks, K, V), U (B, H, NP, V)), the final state written to ``ht`` (h0 float32 or None;
    ``seq_chunks``: varlen, as ``chunk_states``). With ``save`` (or ``DELTA_H_COMPACT``
    off) both float32, U written over U0 (``u``); else both in k's dtype, fresh."""
    b, h, n, dk = k.shape
    dv = u.shape[-1]
    n_chunks = cdiv(n, chunk)
    compact = DELTA_H_COMPACT and not save
    sdt = k.dtype if compact else torch.float32
    hs = torch.empty(b, h, n_chunks, dk, dv, dtype=sdt, device=k.device)
    u_out = torch.empty(u.shape, dtype=sdt, device=k.device) if compact else u
    bk = head_block(dk)
    bkt = min(bk, DELTA_H_BKT)
    nkt = cdiv(bk, bkt)
    assert nkt <= 4, f"delta_h_v2_kernel holds at most 4 state tiles (K={dk}, DELTA_H_BKT={DELTA_H_BKT})"
    bv = min(head_block(dv), DELTA_H_BV)
    lowp = DELTA_H_LOWP and k.dtype in (torch.bfloat16, torch.float16) and not IMPORTED_INTERPRETED
    delta_h_v2_kernel[(cdiv(dv, bv), ht.shape[0] * h)](
        k, w, u, u_out, gc, h0 if h0 is not None else ht, hs, ht, seq_chunks if seq_chunks is not None else ht,
        n, w.shape[2], dk, dv, b * h,
        GATE=_gate_code(gc), HAS_H0=h0 is not None, VARLEN=seq_chunks is not None, BT=chunk,
        BKT=bkt, NKT=nkt, BV=bv, LOWP=lowp, DOT_PREC=_prec(k),
        **_cfg("delta_h_v2", num_warps=4, num_stages=2),
    )  # fmt: skip
    return hs, u_out


@contextlib.contextmanager
def _shared_memory_hint(q: Tensor) -> Iterator[None]:
    """Turn Triton's launch-time shared-memory refusal of the delta backward's per-chunk kernels into an
    error saying what to change. Their dot operands are in the input dtype: compiled for sm_90 at
    K = V = 128 they take 112 KiB in bf16 but 320 KiB in float32 (over the H100's 227 KiB)."""
    try:
        yield
    except OutOfResources as e:
        raise ValueError(
            f"the gated delta rule's chunked backward does not fit this GPU's shared memory for "
            f"{str(q.dtype).replace('torch.', '')} inputs with head dims ({q.shape[-1]}): {e}. Pass bf16 or "
            "fp16 q, k, v (the state and the accumulation stay float32), or head dims <= 64 in float32"
        ) from e


def delta_bwd_scalar_launch(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, hs: Tensor, w: Tensor, u: Tensor,
    t: Tensor, do: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None = None,
    rq: Tensor | None = None, rk: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:  # fmt: skip
    """The chunked backward of the delta rule under a gate shared by the channels (or none): (dq, dk, dv in
    the inputs' dtypes, dbeta, dg (B, H, N, 1) or None, dh0 float32). A reverse sequential pass over the chunk states (dH,
    dU), then every chunk's gradients in parallel (``chunk.py``). With ``rq``, ``rk`` (the fused L2
    norm): q, k are the normalised rows, these their reciprocal norms, and dq, dk are returned for the
    raw q, k (the norm's Jacobian applied in ``delta_bwd_chunk_kernel``)."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    bc = beta.float().expand(b, h, n).contiguous()
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    gc = _delta_cumsum(g, b, h, n, dk, chunk, q.device)  # (the forward's)
    f32, dev = torch.float32, q.device
    prec = _prec(q)
    dhs = torch.empty(b, h, n_chunks, dk, dv, dtype=f32, device=dev)
    du = torch.empty(b, h, np_, dv, dtype=f32, device=dev)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    dh0 = torch.empty(n_seq, h, dk, dv, dtype=f32, device=dev)
    dht_c = dht.float().contiguous() if dht is not None else dh0
    bv = min(head_block(dv), DELTA_BV)
    delta_bwd_dh_kernel[(cdiv(dv, bv), n_seq * h)](
        q, k, do, gc, w, dh0, dht_c, dhs, du, dh0, seq_chunks if seq_chunks is not None else dh0,
        n, np_, dk, dv, b * h, float(scale),
        HAS_DHT=dht is not None, VARLEN=seq_chunks is not None, GATE=1, BT=chunk, BK=head_block(dk), BV=bv, DOT_PREC=prec, **_cfg("delta_bwd_dh", num_warps=4, num_stages=2),
    )  # fmt: skip
    dq, dkk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    db = torch.empty(b, h, n, dtype=f32, device=dev)
    dgc = torch.empty(b, h, np_, dtype=f32, device=dev)
    with _shared_memory_hint(q):
        delta_bwd_chunk_kernel[(n_chunks, b * h)](
            q, k, v, bc, gc, do, hs, dhs, u, du, t, dq, dkk, dvv, db, dgc,
            rq if rq is not None else db, rk if rk is not None else db, n, np_, dk, dv, float(scale),
            BT=chunk, BK=head_block(dk), BV=head_block(dv), DOT_PREC=prec, UPCAST=_upcast(q),
            L2NORM=rq is not None, **_cfg("delta_bwd_chunk", num_warps=8),
        )  # fmt: skip
    dg = None
    if g is not None:  # through the chunk-local cumsum: a reverse cumsum within each chunk
        dg = dgc.view(b, h, n_chunks, chunk).flip(-1).cumsum(-1).flip(-1).reshape(b, h, np_)[:, :, :n, None]
    return dq, dkk, dvv, db, dg, dh0


def delta_bwd_channel_launch(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, hs: Tensor, w: Tensor, u: Tensor, t: Tensor,
    do: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None = None,
    rq: Tensor | None = None, rk: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The chunked backward of the delta rule under per-channel gates (KDA-style): (dq, dk, dv in the
    inputs' dtypes, dbeta, dg (B, H, N, K), dh0 float32). The reverse sequential pass (dH, dU), every
    chunk's state / UT-transform gradients in parallel, then the two intra-chunk score backwards (q k^T
    and the strict k k^T) per 16-row sub-block (``chunk.py``). With ``rq``, ``rk`` (the fused L2 norm: q,
    k are the normalised rows), dq and dk are returned for the raw q, k: the norm's Jacobian is applied
    by the launch that casts the float32 gradients to the inputs' dtypes (``l2norm_bwd_kernel``)."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    bc = beta.float().expand(b, h, n).contiguous()
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    gc = _delta_cumsum(g, b, h, n, dk, chunk, q.device)  # (the forward's)
    f32, dev = torch.float32, q.device
    prec = _prec(q)
    v2, wide = DELTA_INTRA_V2, DELTA_INTRA_V2_F32
    aqk = intra_scores(q, k, gc, None, chunk, strict=False, v2=v2, f32_operands=wide)
    bkk = intra_scores(k, k, gc, None, chunk, strict=True, v2=v2, f32_operands=wide)
    dhs = torch.empty(b, h, n_chunks, dk, dv, dtype=f32, device=dev)
    du = torch.empty(b, h, np_, dv, dtype=f32, device=dev)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    dh0 = torch.empty(n_seq, h, dk, dv, dtype=f32, device=dev)
    dht_c = dht.float().contiguous() if dht is not None else dh0
    bv = min(head_block(dv), DELTA_BV)
    delta_bwd_dh_kernel[(cdiv(dv, bv), n_seq * h)](
        q,
        k,
        do,
        gc,
        w,
        aqk,
        dht_c,
        dhs,
        du,
        dh0,
        seq_chunks if seq_chunks is not None else dh0,
        n,
        np_,
        dk,
        dv,
        b * h,
        float(scale),
        HAS_DHT=dht is not None,
        VARLEN=seq_chunks is not None,
        GATE=2,
        BT=chunk,
        BK=head_block(dk),
        BV=bv,
        DOT_PREC=prec,
        **_cfg("delta_bwd_dh_channel", num_warps=4, num_stages=1),
    )  # fmt: skip  (num_stages=1: 57 KiB of shared memory for sm_90 at K=128, not 189 KiB)
    dq = torch.empty(b, h, np_, dk, dtype=f32, device=dev)
    dkk = torch.empty(b, h, np_, dk, dtype=f32, device=dev)
    dgc = torch.empty(b, h, np_, dk, dtype=f32, device=dev)
    dvv = torch.empty_like(v)
    db = torch.empty(b, h, n, dtype=f32, device=dev)
    daqk = torch.empty(b, h, np_, chunk, dtype=f32, device=dev)
    dbkk = torch.empty(b, h, np_, chunk, dtype=f32, device=dev)
    with _shared_memory_hint(q):
        delta_bwd_chunk_channel_kernel[(n_chunks, b * h)](
            q, k, v, bc, gc, do, hs, dhs, u, du, t, bkk, dq, dkk, dvv, db, dgc, daqk, dbkk,
            n, np_, dk, dv, float(scale),
            BT=chunk, BK=head_block(dk), BV=head_block(dv), DOT_PREC=prec, UPCAST=_upcast(q), **_cfg("delta_bwd_channel", num_warps=8),
        )  # fmt: skip
    for x, dp, dx, dy, same in ((q, daqk, dq, dkk, False), (k, dbkk, dkk, dkk, True)):
        score_bwd_kernel[(np_ // SUB, b * h)](
            x, k, gc, dp, dx, dy, dgc, n, np_, dk,
            SAME_OUT=same, BT=chunk, BS=SUB, BK=head_block(dk), DOT_PREC=prec, UPCAST=_upcast(q), **_cfg("score_bwd", num_warps=4),
        )  # fmt: skip
    # through the chunk-local cumsum: a reverse cumsum within each chunk
    dg = dgc.view(b, h, n_chunks, chunk, dk).flip(3).cumsum(3).flip(3).reshape(b, h, np_, dk)[:, :, :n]
    if rq is not None and rk is not None:
        dq_raw, dk_raw = l2norm_qk_bwd(q, k, rq, rk, dq, dkk, q.dtype, k.dtype)
        return dq_raw, dk_raw, dvv, db, dg, dh0
    return dq[:, :, :n].to(q.dtype), dkk[:, :, :n].to(k.dtype), dvv, db, dg, dh0


@torch.library.custom_op("attnlab::delta_chunk_fwd", mutates_args=())
def delta_chunk_fwd(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None, scale: float,
    chunk: int, save: bool, seq_chunks: Tensor | None = None, qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(o, final state, then what the backward takes: chunk-start states, W, U, T, and with ``qk_l2norm``
    q^, k^, rstd_q, rstd_k; see ``delta_fwd_launch``). g: None, (B, H, N, 1) or (B, H, N, K).
    ``qk_l2norm``: q and k are L2-normalised in the op (its gradients are those of the raw q, k)."""
    return delta_fwd_launch(q, k, v, beta, g, h0, scale, chunk, save, seq_chunks, qk_l2norm)


@delta_chunk_fwd.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None, scale: float,
    chunk: int, save: bool, seq_chunks: Tensor | None = None, qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    n_chunks = (n + chunk - 1) // chunk
    np_ = n_chunks * chunk
    f32 = torch.float32
    o = q.new_empty(b, h, n, dv)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    ht = q.new_empty(n_seq, h, dk, dv, dtype=f32)
    hs = q.new_empty((b, h, n_chunks, dk, dv) if save else (0,), dtype=f32)
    wut = save
    w = q.new_empty((b, h, np_, dk) if wut else (0,), dtype=f32)
    u = q.new_empty((b, h, np_, dv) if wut else (0,), dtype=f32)
    t = q.new_empty((b, h, np_, chunk) if wut else (0,), dtype=f32)
    l2 = save and qk_l2norm
    qn = q.new_empty(q.shape if l2 else (0,))
    kn = k.new_empty(k.shape if l2 else (0,))
    rq = q.new_empty((b, h, n) if l2 else (0,), dtype=f32)
    rk = q.new_empty((b, h, n) if l2 else (0,), dtype=f32)
    return o, ht, hs, w, u, t, qn, kn, rq, rk


@torch.library.custom_op("attnlab::delta_chunk_bwd", mutates_args=())
def delta_chunk_bwd(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, hs: Tensor, w: Tensor, u: Tensor,
    t: Tensor, do: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None = None,
    rq: Tensor | None = None, rk: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv, dbeta in the inputs' dtypes, dg (fp32, g's shape; empty without g), dh0 fp32). A gate
    shared by the channels (or none) takes the 64-row chunked backward; per-channel gates add the
    intra-chunk score backwards by 16-row sub-blocks. ``rq``, ``rk`` (the fused L2 norm): q, k are the
    normalised rows and these their reciprocal norms; dq, dk are then those of the raw q, k."""
    if g is None or _delta_scalar(g):
        dq, dk, dv, db, dg, dh0 = delta_bwd_scalar_launch(
            q, k, v, beta, g, hs, w, u, t, do, dht, scale, chunk, seq_chunks, rq, rk
        )
    else:
        dq, dk, dv, db, dg, dh0 = delta_bwd_channel_launch(
            q, k, v, beta, g, hs, w, u, t, do, dht, scale, chunk, seq_chunks, rq, rk
        )
    dg_out = dg if dg is not None else q.new_empty(0, dtype=torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), db.to(beta.dtype), dg_out, dh0


@delta_chunk_bwd.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, hs: Tensor, w: Tensor, u: Tensor,
    t: Tensor, do: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None = None,
    rq: Tensor | None = None, rk: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    b, h, _, dk = q.shape
    dg = q.new_empty(tuple(g.shape) if g is not None else (0,), dtype=torch.float32)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    dh0 = q.new_empty(n_seq, h, dk, v.shape[-1], dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta), dg, dh0


def _delta_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, beta, g, h0, scale, chunk, save, seq_chunks, qk_l2norm = inputs
    if not save:
        raise RuntimeError(
            "attnlab::delta_chunk_fwd ran without saving its chunk states (save=False): no backward"
        )
    hs, w, u, t, qn, kn, rq, rk = output[2:]
    if qk_l2norm:  # the normalised rows replace the raw q, k (no copy of both is kept)
        ctx.save_for_backward(qn, kn, v, beta, g, hs, w, u, t, rq, rk)
    else:
        ctx.save_for_backward(q, k, v, beta, g, hs, w, u, t, None, None)
    ctx.args = (scale, chunk, seq_chunks)
    ctx.has = (g is not None, h0 is not None)


def _delta_backward(ctx, do, dht, *_unused):  # type: ignore[no-untyped-def]
    q, k, v, beta, g, hs, w, u, t, rq, rk = ctx.saved_tensors
    dq, dk, dv, db, dg, dh0 = delta_chunk_bwd(q, k, v, beta, g, hs, w, u, t, do, dht, *ctx.args, rq, rk)
    has_g, has_h0 = ctx.has
    return dq, dk, dv, db, (dg if has_g else None), (dh0 if has_h0 else None), None, None, None, None, None


delta_chunk_fwd.register_autograd(_delta_backward, setup_context=_delta_setup)


def delta_chunk(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, scale: float, state: Tensor | None,
    chunk: int, qk_l2norm: bool = False, fused_l2norm: bool | None = None,
    on_bad_gates: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The gated delta rule through the Triton kernels (the signature of the naive twin
    ``delta_chunk_naive``): q, k (B, H, N, K), v (B, H, N, V), beta (B, H, N), g None or broadcastable to
    (B, H, N, K), state None or (B, H, K, V). Returns (o in q's dtype, final state fp32), differentiable
    in q, k, v, beta, g and state. Short calls without gradients take the step kernel. ``qk_l2norm``: q
    and k are L2-normalised first (``naive.l2norm``'s formula, in float32): inside the step kernel for a
    short call, else in the chunk op (``fused_l2norm``, default ``FUSED_L2NORM``: one Triton launch, the
    normalised rows rounded to q's dtype for the chunk kernels, the Jacobian in the backward's kernels)
    or, with ``fused_l2norm=False``, in PyTorch under autograd (the old path, for A/B timing).
    ``on_bad_gates``: as :func:`gla_chunk`'s (g and beta checked in the step kernel)."""
    b, h, n, dk = q.shape
    grad = _needs_grad(q, k, v, beta, g, state)
    if n <= DECODE_MAX and not grad:
        _check(q, k, v, chunk)
        return _step(q, k, v, g, beta, state, float(scale), qk_l2norm, on_bad_gates)
    fused = qk_l2norm and (FUSED_L2NORM if fused_l2norm is None else fused_l2norm)
    if qk_l2norm and not fused:
        q, k = l2norm(q).to(q.dtype), l2norm(k).to(k.dtype)
    gd = _delta_gate(g, b, h, n, dk)
    o, ht, *_ = delta_chunk_fwd(
        q, k, v, beta.expand(b, h, n), gd, state, float(scale), int(chunk), grad, None, fused
    )
    return o, ht


# -- packed sequences (varlen) --


def varlen_layout(cu_seqlens: Tensor, total: int, chunk: int) -> tuple[Tensor, Tensor, int]:
    """The chunk-aligned layout of packed sequences: every sequence starts a new chunk (its last chunk
    zero-padded: k = v = 0, beta = 0 and a zero log-decay leave the state as it is). Returns (each token's
    row in the aligned layout (T,) int64, the chunk offsets of the sequences (S + 1,) int32, the aligned
    length). ``cu_seqlens``: (S + 1,) cumulative lengths, 0 first, ``total`` last, nondecreasing."""
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(
            f"cu_seqlens: expected a 1-D integer tensor of S + 1 >= 2 cumulative lengths, got shape "
            f"{tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
        )
    cu = [int(x) for x in cu_seqlens.tolist()]
    if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError(
            f"cu_seqlens {cu[:8]}{'...' if len(cu) > 8 else ''}: expected 0 first, the packed length "
            f"{total} last, nondecreasing"
        )
    lens = [b - a for a, b in itertools.pairwise(cu)]
    chunks = [0]
    for n in lens:
        chunks.append(chunks[-1] + -(-n // chunk))
    dev = cu_seqlens.device
    starts = torch.tensor(chunks[:-1], dtype=torch.int64) * chunk - torch.tensor(cu[:-1], dtype=torch.int64)
    rows = torch.arange(total, dtype=torch.int64) + starts.repeat_interleave(torch.tensor(lens))
    return rows.to(dev), torch.tensor(chunks, dtype=torch.int32, device=dev), chunks[-1] * chunk


def _pack(x: Tensor, rows: Tensor, aligned: int) -> Tensor:
    """x (1, H, T, ...) into the chunk-aligned layout (1, H, aligned, ...), zeros between sequences."""
    shape = (*x.shape[:2], aligned, *x.shape[3:])
    return x.new_zeros(shape).index_copy(2, rows, x)


def _check_varlen(q: Tensor, state: Tensor | None, n_seq: int, v_dim: int) -> None:
    if q.shape[0] != 1:
        raise ValueError(
            f"packed sequences (cu_seqlens) take a batch of 1: q (1, H, T, D), got {tuple(q.shape)}"
        )
    want = (n_seq, q.shape[1], q.shape[3], v_dim)
    if state is not None and tuple(state.shape) != want:
        raise ValueError(
            f"state {tuple(state.shape)}: expected one per sequence and head (S, H, K, V) = {want}"
        )


def gla_chunk_varlen(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float, state: Tensor | None, chunk: int,
    cu_seqlens: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`gla_chunk` over packed sequences: q, k (1, H, T, K), v (1, H, T, V), g None or broadcastable
    to (1, H, T, K), ``cu_seqlens`` (S + 1,) their cumulative lengths, state None or (S, H, K, V) (each
    sequence's initial state). Returns (o (1, H, T, V), final states (S, H, K, V) float32); each sequence
    runs alone from its own initial state (the scans restart at every sequence; chunks never straddle
    two). Differentiable as :func:`gla_chunk`."""
    _, h, n, dk = q.shape
    _check(q, k, v, chunk)
    rows, seq_chunks, aligned = varlen_layout(cu_seqlens, n, chunk)
    _check_varlen(q, state, seq_chunks.shape[0] - 1, v.shape[-1])
    scalar, gx = _scalar_gate(g, 1, h, n, dk)
    qa, ka, va = (_pack(t, rows, aligned) for t in (q, k, v))
    ga = None if gx is None else _pack(gx[..., None] if scalar else gx, rows, aligned)
    gc, raw = _gla_gate(ga, 1, h, aligned, dk, chunk, q.device)
    grad = _needs_grad(q, k, v, g, state)
    o, ht, *_ = gla_chunk_fwd(qa, ka, va, gc, state, float(scale), int(chunk), grad, seq_chunks, raw)
    return o.index_select(2, rows), ht


def delta_chunk_varlen(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, scale: float, state: Tensor | None,
    chunk: int, cu_seqlens: Tensor, qk_l2norm: bool = False, fused_l2norm: bool | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`delta_chunk` over packed sequences (shapes as :func:`gla_chunk_varlen`; beta (1, H, T)).
    Differentiable as :func:`delta_chunk`. ``qk_l2norm`` / ``fused_l2norm`` as in :func:`delta_chunk`
    (the normalisation is per row, so the fused launch runs on the packed rows unchanged; the chunk
    padding rows are zeros and stay zeros)."""
    _, h, n, dk = q.shape
    _check(q, k, v, chunk)
    rows, seq_chunks, aligned = varlen_layout(cu_seqlens, n, chunk)
    _check_varlen(q, state, seq_chunks.shape[0] - 1, v.shape[-1])
    fused = qk_l2norm and (FUSED_L2NORM if fused_l2norm is None else fused_l2norm)
    if qk_l2norm and not fused:
        q, k = l2norm(q).to(q.dtype), l2norm(k).to(k.dtype)
    gd = _delta_gate(g, 1, h, n, dk)
    qa, ka, va = (_pack(t, rows, aligned) for t in (q, k, v))
    ba = _pack(beta.expand(1, h, n), rows, aligned)
    ga = None if gd is None else _pack(gd, rows, aligned)
    grad = _needs_grad(q, k, v, beta, g, state)
    o, ht, *_ = delta_chunk_fwd(
        qa, ka, va, ba, ga, state, float(scale), int(chunk), grad, seq_chunks, fused
    )  # fmt: skip
    return o.index_select(2, rows), ht
