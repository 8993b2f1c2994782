"""The linear family's Triton entry points, and the switchboard of their launchers.

- :func:`gla_chunk` ``(q, k, v, g, scale, state, chunk) -> (o, state)`` (the signature of the naive twin): the
  gated linear recurrence by chunks (``attnlab::gla_chunk_fwd`` / ``attnlab::gla_chunk_bwd``,
  ``custom_ops.py``; launchers in ``launch_gla.py``): the chunk states by one sequential pass
  (``GLA_H_PASS``; else per-chunk local states and a scan over them), the intra-chunk scores and per-chunk
  outputs in parallel; the backward's state gradient by one reverse sequential pass (``GLA_BWD_H_PASS``;
  else local states and a reverse scan), then under per-channel gates every per-chunk gradient (dq, dk, dv,
  dg) by one kernel (``GLA_BWD_FUSED``; else two kernels and the gate cumsum's backward), under gates
  shared by the channels dq/dk/dv per chunk. Differentiable in q, k, v, g and the initial state. A gate
  shared by all channels (lightning's per-head decay, linear's none, a (B, H, N, 1) gate) runs the
  scalar-gate kernels (64-row score tiles); per-channel gates (gla) make the intra-chunk scores by
  log2(chunk) split dots per chunk (``GLA_INTRA_V2``; else in 16-row sub-blocks). A short call without
  gradients (decode, N <= ``DECODE_MAX``) runs the recurrent step kernel instead (``attnlab::linear_step``).
- :func:`delta_chunk` ``(q, k, v, beta, g, scale, state, chunk) -> (o, state)``: the gated delta rule
  (``attnlab::delta_chunk_fwd`` / ``attnlab::delta_chunk_bwd``; launchers in ``launch_delta.py``). Forward
  in the chunked WY/UT form (per-chunk T = (I + A_kk)^-1, W, U0 in parallel, by 16-row blocks
  (``WY_BLOCKWISE``); one sequential pass over the chunk states; per-chunk outputs in parallel). Backward
  chunked too: one reverse sequential pass over the chunk states (dH, dU), every chunk's gradients in
  parallel from the saved S, U, T (64-row tiles under a gate shared by the channels: Gated DeltaNet's
  per-head gate, plain DeltaNet), and under per-channel gates (KDA-style) the intra-chunk score backwards
  per 16-row sub-block. Differentiable in q, k, v, beta, g and the initial state.
- :func:`linear_step`: the recurrent step kernel of the gated linear recurrence and of the gated delta
  rule (forward only; a few tokens against a carried state), its launch resolved once per signature of
  its inputs (:func:`step_plan`, ``step_plan.py``).
- :func:`gla_chunk_varlen`, :func:`delta_chunk_varlen` (``varlen.py``): the same over packed sequences.

The log-decays enter the gated linear recurrence's chunk kernels as their chunk-local cumsum: per-channel
gates (gla) as g itself, the op making the cumsum inside and its backward carrying dG back to g (one
Triton launch each, ``GLA_FUSED_GLUE``); gates shared by the channels (and per-channel ones with the flag
off) as the cumsum made in PyTorch, so autograd carries dG back to g (and to lightning's per-head
decays). A/B switches of the gated linear forward: ``GLA_FUSED_GLUE``, ``GLA_H_PASS``, ``GLA_H_COMPACT``,
``GLA_INTRA_V2`` (all False: the previous forward); of its backward: ``GLA_BWD_FUSED``,
``GLA_BWD_H_PASS``, ``GLA_SKIP_ZERO_GRADS`` (all False: the previous backward). The delta rule's op takes g
itself and makes the cumsum inside (one Triton launch, ``DELTA_FUSED_GLUE``), its backward carrying dG back
to g. A/B switches of the delta forward (module flags, read at each call):
``WY_BLOCKWISE`` (the UT transform by 16-row blocks, else row by row), ``WY_INV_PREC``, ``DELTA_INTRA_V2``
(per-channel gates' intra-chunk scores by split dots, forward and backward),
``DELTA_FUSED_GLUE`` (gate cumsum and beta without PyTorch copies); both flags False is the previous
forward.

The switchboard: the module flags below (A/B switches and tile sizes), the Triton kernels (imported here)
and the helpers that tests replace (``intra_scores``, ``chunk_cumsum``, ``l2norm``, ``linear_step``,
``linear_step_op``) are read from this module at each call, by its own code and by the launchers
(``launch_*.py``, ``custom_ops.py``, ``varlen.py``: ``op.NAME``), so that setting ``op.NAME`` (a test's
monkeypatch, a benchmark's A/B) takes effect everywhere. Those modules and op import each other: op
re-exports their functions, and they import op (and each other) at their end, reading it only at call
time, so that any of them may be imported first. Importing op imports Triton and registers the ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnlab.kernels.linear.chunk_delta_bwd import (
    delta_bwd_chunk_channel_kernel as delta_bwd_chunk_channel_kernel,
)
from attnlab.kernels.linear.chunk_delta_bwd import delta_bwd_chunk_kernel as delta_bwd_chunk_kernel
from attnlab.kernels.linear.chunk_delta_bwd_split import (
    delta_bwd_chunk_channel_split_kernel as delta_bwd_chunk_channel_split_kernel,
)
from attnlab.kernels.linear.chunk_delta_bwd_split import (
    delta_bwd_chunk_split_kernel as delta_bwd_chunk_split_kernel,
)
from attnlab.kernels.linear.chunk_delta_dh import delta_bwd_dh_v2_kernel as delta_bwd_dh_v2_kernel
from attnlab.kernels.linear.chunk_delta_dh import delta_bwd_du_local_kernel as delta_bwd_du_local_kernel
from attnlab.kernels.linear.chunk_delta_wy import delta_wy_block_kernel as delta_wy_block_kernel
from attnlab.kernels.linear.chunk_delta_wy import delta_wy_kernel as delta_wy_kernel
from attnlab.kernels.linear.chunk_gla_bwd import chunk_bwd_scalar_kernel as chunk_bwd_scalar_kernel
from attnlab.kernels.linear.chunk_gla_bwd import gla_bwd_chunk_kernel as gla_bwd_chunk_kernel
from attnlab.kernels.linear.chunk_gla_bwd import gla_bwd_inter_kernel as gla_bwd_inter_kernel
from attnlab.kernels.linear.chunk_gla_bwd import gla_bwd_sub_kernel as gla_bwd_sub_kernel
from attnlab.kernels.linear.chunk_gla_bwd_sliced import gla_bwd_sliced_kernel as gla_bwd_sliced_kernel
from attnlab.kernels.linear.chunk_scores import chunk_out_kernel as chunk_out_kernel
from attnlab.kernels.linear.chunk_scores import gate_cumsum_bwd_kernel as gate_cumsum_bwd_kernel
from attnlab.kernels.linear.chunk_scores import gate_cumsum_kernel as gate_cumsum_kernel
from attnlab.kernels.linear.chunk_scores import intra_scores_kernel as intra_scores_kernel
from attnlab.kernels.linear.chunk_scores import intra_scores_v2_kernel as intra_scores_v2_kernel
from attnlab.kernels.linear.chunk_scores import score_bwd_kernel as score_bwd_kernel
from attnlab.kernels.linear.chunk_scores import score_bwd_v2_kernel as score_bwd_v2_kernel
from attnlab.kernels.linear.chunk_state import chunk_local_state_kernel as chunk_local_state_kernel
from attnlab.kernels.linear.chunk_state import chunk_scan_kernel as chunk_scan_kernel
from attnlab.kernels.linear.chunk_state import delta_bwd_dh_kernel as delta_bwd_dh_kernel
from attnlab.kernels.linear.chunk_state import delta_h_kernel as delta_h_kernel
from attnlab.kernels.linear.chunk_state import delta_h_v2_kernel as delta_h_v2_kernel
from attnlab.kernels.linear.chunk_state import gla_h_kernel as gla_h_kernel
from attnlab.kernels.linear.custom_ops import delta_chunk_bwd as delta_chunk_bwd
from attnlab.kernels.linear.custom_ops import delta_chunk_fwd, gla_chunk_fwd
from attnlab.kernels.linear.custom_ops import gla_chunk_bwd as gla_chunk_bwd
from attnlab.kernels.linear.fwd import l2norm_bwd_kernel as l2norm_bwd_kernel
from attnlab.kernels.linear.fwd import l2norm_fwd_kernel as l2norm_fwd_kernel
from attnlab.kernels.linear.fwd import recurrent_step_kernel
from attnlab.kernels.linear.launch import IMPORTED_INTERPRETED as IMPORTED_INTERPRETED
from attnlab.kernels.linear.launch import LAUNCH_OVERRIDES as LAUNCH_OVERRIDES
from attnlab.kernels.linear.launch import _blocks as _blocks
from attnlab.kernels.linear.launch import _check, _needs_grad
from attnlab.kernels.linear.launch import _scalar_gate as _scalar_gate
from attnlab.kernels.linear.launch import _upcast as _upcast
from attnlab.kernels.linear.launch import chunk_cumsum as chunk_cumsum
from attnlab.kernels.linear.launch import chunk_cumsum_scalar as chunk_cumsum_scalar
from attnlab.kernels.linear.launch_delta import _delta_gate
from attnlab.kernels.linear.launch_delta import _shared_memory_hint as _shared_memory_hint
from attnlab.kernels.linear.launch_delta import delta_bwd_channel_launch as delta_bwd_channel_launch
from attnlab.kernels.linear.launch_delta import delta_bwd_scalar_launch as delta_bwd_scalar_launch
from attnlab.kernels.linear.launch_delta import delta_fwd_launch as delta_fwd_launch
from attnlab.kernels.linear.launch_delta import delta_h_v2 as delta_h_v2
from attnlab.kernels.linear.launch_delta import l2norm_qk as l2norm_qk
from attnlab.kernels.linear.launch_delta import l2norm_qk_bwd as l2norm_qk_bwd
from attnlab.kernels.linear.launch_gla import _gla_gate
from attnlab.kernels.linear.launch_gla import chunk_states as chunk_states
from attnlab.kernels.linear.launch_gla import gla_bwd_launch as gla_bwd_launch
from attnlab.kernels.linear.launch_gla import gla_dh as gla_dh
from attnlab.kernels.linear.launch_gla import gla_fwd_launch as gla_fwd_launch
from attnlab.kernels.linear.launch_gla import gla_h as gla_h
from attnlab.kernels.linear.launch_scores import chunk_output as chunk_output
from attnlab.kernels.linear.launch_scores import gate_cumsum as gate_cumsum
from attnlab.kernels.linear.launch_scores import gate_cumsum_kg as gate_cumsum_kg
from attnlab.kernels.linear.launch_scores import intra_scores as intra_scores
from attnlab.kernels.linear.launch_scores import intra_scores_pair as intra_scores_pair
from attnlab.kernels.linear.naive import l2norm
from attnlab.kernels.linear.step_plan import StepPlan, _make_step_plan, _step_gate, _step_key, step_programs
from attnlab.kernels.linear.varlen import delta_chunk_varlen as delta_chunk_varlen
from attnlab.kernels.linear.varlen import gla_chunk_varlen as gla_chunk_varlen
from attnlab.kernels.linear.varlen import varlen_layout as varlen_layout

#: Calls of at most this many tokens without gradients run the recurrent step kernel.
DECODE_MAX = 8


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
#: dtype for its dot anyway). With ``save`` their dtype is ``GLA_SAVED_LOWP``'s choice.
GLA_H_COMPACT = True
#: Per-channel gates (gla), 16-bit inputs, the one-pass states and fused backward (``GLA_H_PASS``,
#: ``GLA_BWD_FUSED``, ``GLA_BWD_H_PASS``): the chunk-start states kept for the backward and the backward's
#: state gradients dH stored in the inputs' dtype, as the delta rule's ``DELTA_SAVED_LOWP``
#: (``gla_bwd_chunk_kernel`` rounds both to it as dot operands; its chunk-end term sum_v S * dH takes the
#: rounded values). Read at each forward (the op's fake too); dH follows the kept states' dtype. On since
#: checked (1x32x8192, every gradient: dg's error 0.726 against 0.692, the bf16 recurrence's 7.9; the rest
#: equal) and timed on the H100: gla forward + backward 1.11x faster at 8K and 32K
#: (benchmarks/results/h100-2026-11-25-s22).
GLA_SAVED_LOWP = True
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
#: With ``GLA_BWD_FUSED``: ``gla_bwd_sliced_kernel`` instead of ``gla_bwd_chunk_kernel`` (the key channels'
#: slices as programs of their own, GLA_BWD_SLICED_BKS wide, and one program per chunk for dv; JOINT: dq's
#: and dk's level sums share their exps in one pass; 4 warps). gla forward + backward at 1x32x32768 on the
#: H100: 9.49 ms against 13.21 (benchmarks/results/h100-2026-11-25-s24, run 3). With
#: ``GLA_BWD_SLICED_VERIFIED_ONLY``, only where this schedule was checked on the H100 (``sliced_verified``
#: in launch_gla.py): other schedules of the same kernel made illegal memory accesses there (Triton 3.6:
#: 32 channels, 4 warps at K = 128; 16 channels in two passes, 4 warps at K = 64) or wrong dq and dg
#: (1 stage; 2 stages with 2 slices per program: NaN), so elsewhere the fused kernel runs.
GLA_BWD_SLICED = True
GLA_BWD_SLICED_BKS = 16
GLA_BWD_SLICED_JOINT = True
GLA_BWD_SLICED_UNROLL = False
GLA_BWD_SLICED_VERIFIED_ONLY = True
#: Key slices per program of ``gla_bwd_sliced_kernel`` (each program makes dA and dA^T once for its slices):
#: 8 (K = 128: one program for dq, dk and dg, one for dv, per chunk) 0.95x of 1's gla forward + backward at
#: 1x32x32768 on the H100 (benchmarks/results/h100-2026-11-25-s24, run 5; 2 and 4: 0.99x, 0.96x).
GLA_BWD_SLICED_SPP = 8
#: Key rows and value columns per program of ``gla_h_kernel`` (K = V = 128: 2 x 4 tiles per head).
GLA_H_BK = 64
GLA_H_BV = 32
#: Channels per slice of ``intra_scores_v2_kernel``'s dots.
GLA_INTRA_BKS = 32


#: Value columns per program of the delta-rule kernels (the state's columns evolve independently).
DELTA_BV = 32

#: The delta rule's forward sequential pass by ``delta_h_v2_kernel``: the state as 64-row register tiles
#: (K = 128: two), W's 64-column slices dotted against them and accumulated, k^T (and per-channel gates'
#: G^T) loaded transposed (no transpose in registers; under a per-head gate the row decays folded into U_c
#: once for all tiles), 16-bit dot operands with float32 accumulation for 16-bit inputs
#: (``DELTA_H_LOWP``), and without ``save`` (no backward) the chunk-start states and U written in the
#: inputs' dtype for the output kernel (``DELTA_H_COMPACT``; with ``save``: ``DELTA_SAVED_LOWP``'s choice). False: ``delta_h_kernel`` (one (K, BV)
#: float32 tile, tf32 dots, U in place). For A/B timing in one process: set it before a call.
DELTA_H_V2 = True
#: Dot operands of ``delta_h_v2_kernel`` in the inputs' 16-bit dtype (W, S, U_c rounded to it, as
#: fla-core's kernel does; float32 accumulation) for bf16 / fp16 inputs. False: float32 operands in
#: ``_prec`` (tf32). (Float32 inputs and Triton's CPU interpreter always take float32 operands.)
DELTA_H_LOWP = True
#: Without ``save``: ``delta_h_v2_kernel`` writes the chunk-start states and U in the inputs' dtype (half
#: the bytes written there and read by ``chunk_out_kernel``, which rounds them to that dtype for its dots
#: anyway): U over U0 when U0 has that dtype (``DELTA_U0_LOWP``), else into a fresh buffer. With ``save``: in ``DELTA_SAVED_LOWP``'s dtype (the backward reads them).
DELTA_H_COMPACT = True
#: Per-channel gates (KDA) with ``DELTA_H_V2`` and ``DELTA_FUSED_GLUE``: the gate cumsum's launch also writes
#: the decayed keys KG = k exp(G_C - G) (B, H, NP, K; in k's dtype for the 16-bit pass, else float32:
#: ``gate_cumsum_kg``), and ``delta_h_v2_kernel`` reads them (GATE 3) instead of k and G^T with an exp per
#: element in every value block's program (the decays rounded the same way: the same results). Costs k read
#: and KG written once (the forward's; KG is not kept). False: the previous launches. Checked (1x32x8192,
#: every gradient) and timed on the H100: KDA's forward 1.06x faster at 1x32x8192 and 1x32x32768,
#: forward + backward 1.02-1.04x (benchmarks/results/h100-2026-11-25-s24, run 1).
DELTA_H_KG = True
#: Value columns per program and key rows per state tile of ``delta_h_v2_kernel``.
DELTA_H_BV = 32
DELTA_H_BKT = 64


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
#: instead of PyTorch's pad, cumsum and float copies (three to four launches); per-channel gates'
#: backward takes dG back through the cumsum by one ``gate_cumsum_bwd_kernel`` launch (else a flip,
#: cumsum, flip). False: the PyTorch glue (for A/B timing; forward and backward must agree: flip it
#: between calls, not between a forward and its backward). With ``WY_BLOCKWISE`` False too, the forward is the previous one exactly.
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
#: With ``DELTA_INTRA_V2``: the forward's two score products (the strict k k^T and q k^T; the backward's when
#: it recomputes both) by one launch of ``intra_scores_v2_kernel`` (PAIR: ``intra_scores_pair``), which loads
#: k and the per-channel gates and makes the exps and k's side of every level's dot once for both. The same
#: products as two launches (A_kk's exactly as they were). False: two launches of ``intra_scores``. Off until
#: timed on the GPU.
DELTA_INTRA_PAIR = False
#: Value columns per step of the delta rule's per-chunk backward kernels (``delta_bwd_chunk_kernel``,
#: ``delta_bwd_chunk_channel_kernel``): 0 holds the whole (K, V) state and its gradient as one tile (the
#: previous kernels); a power of two below V loops over V in slices of this width, accumulating the
#: products summed over V (fewer live registers: sm_90, K = V = 128, bf16, 8 warps: 2.1 / 1.1 KB of
#: spills against 3.6 / 3.3 KB whole). 32 since checked and timed (benchmarks/results/h200-2026-11-25-s21).
DELTA_BWD_BVB = 32
#: With ``DELTA_BWD_BVB`` > 0, the scalar-gate per-chunk backward takes the transposed products it needs
#: (U do^T, dW^T, X_u dU^T, dT^T, dA^T) as transposes of the ones it makes (they are exactly those) instead
#: of making each by its own dot (3 fewer dots per value slice, 3 after the loop). On since checked
#: (1x32x8192, every gradient) and timed on the H100: gated_delta fwd+bwd 1.21x / 1.22x faster at 8K / 32K
#: (benchmarks/results/h100-2026-11-25-s21).
DELTA_BWD_TRANS = True
#: With ``DELTA_BWD_BVB`` > 0 and ``DELTA_BWD_TRANS``, the scalar-gate per-chunk backward makes its products
#: over V in two loops (``delta_bwd_chunk_split_kernel``: the output's and the state update's, then the UT
#: transform's, S read twice) instead of one, so that fewer accumulators are live at once (sm_90, K = V =
#: 128, bf16, 8 warps, Triton 3.6: 0.65 KB of spills with one loop, 0.24 KB with two and
#: ``DELTA_SAVED_LOWP``). On since checked (1x32x8192, every gradient: the one loop's errors) and timed on
#: the H100 with ``DELTA_SAVED_LOWP``: gated_delta forward + backward 1.21x / 1.25x faster at 8K / 32K than
#: with neither (benchmarks/results/h100-2026-11-25-s22).
DELTA_BWD_SPLIT = True
#: The same for per-channel gates (``delta_bwd_chunk_channel_split_kernel``; the partial dk and dG rows
#: stored between the loops and read back). Off until timed on the GPU.
DELTA_BWD_SPLIT_CHANNEL = False
#: The delta rule's backward sequential pass by ``delta_bwd_dh_v2_kernel``: the intra-chunk part of dU,
#: scale ((k q^T) * D^T) do, made for every chunk in parallel first (``delta_bwd_du_local_kernel``), so that
#: the reverse loop only adds (k exp(G_C - G)) dH and updates dH; q^T and W^T loaded transposed, loads
#: pipelined, 16-bit dot operands (dH and dU rounded to the inputs' dtype, float32 accumulation) for 16-bit
#: inputs (``DELTA_BWD_DH_LOWP``). False: ``delta_bwd_dh_kernel`` (everything in the loop, tf32 dots).
#: On since checked against the fp32 recurrence at 1x32x8192 (every gradient) and timed on an H200: with
#: ``DELTA_BWD_BVB`` 32, gated_delta forward+backward 1.60x / 1.71x faster at 8K / 32K, KDA 1.29x.
DELTA_BWD_DH_V2 = True
DELTA_BWD_DH_LOWP = True
#: Per-channel gates (KDA): the backward of the two intra-chunk score products (q k^T and the strict
#: k k^T) by ``score_bwd_v2_kernel`` (a chunk per program, split levels, as gla's fused backward) instead
#: of ``score_bwd_kernel`` (16-row sub-blocks, the diagonal ones row by row), for 16-bit inputs (float32
#: ones keep the sub-block kernel: ieee dots over the split levels' 64 x 64 tiles are slower there).
#: Measured by helper-100 on an H100 (1x32x8192, K = 128, chunk 64, bf16, both launches): 1.41 ms against
#: 3.18; its dot operands are in the inputs' dtype (the sub-block kernel made the pairs inside 16-row
#: blocks exactly), slice width and unrolling in ``launch_scores.SCORE_BWD_*``. On since checked in the
#: whole KDA backward (1x32x8192, every gradient, the 2x / 3x rule) and timed on the H100: KDA fwd+bwd
#: 1.26x / 1.28x faster at 8K / 32K (benchmarks/results/h100-2026-11-25-s21).
DELTA_SCORE_BWD_V2 = True
#: Per-channel gates (KDA), a forward that saves for a backward: the forward makes the strict k k^T scores
#: without beta (B) in place of the beta-scaled A_kk (the UT-transform kernel applies beta itself,
#: ``AKK_BETA`` False) and the op keeps B and the q k^T scores for the backward, which then recomputes
#: neither (``delta_bwd_channel_launch``'s ``aqk``, ``bkk``; about 0.66 ms of KDA's 7.05 ms forward +
#: backward at 1x32x8192, K = 128 on the H100). Memory: two more (B, H, NP, chunk) float32 tensors kept
#: from the forward to the backward. Read at each forward (the op's fake too: under torch.compile, set it
#: before compiling). On since checked (1x32x8192, every gradient: errors equal to the recomputing
#: path's) and timed on the H100: KDA forward + backward 1.09x / 1.13x faster at 8K / 32K
#: (benchmarks/results/h100-2026-11-25-s22). False: the previous launches exactly.
DELTA_SAVE_SCORES = True
#: 16-bit inputs with the 16-bit sequential passes (``DELTA_H_V2`` and ``DELTA_H_LOWP``,
#: ``DELTA_BWD_DH_V2`` and ``DELTA_BWD_DH_LOWP``): what the forward keeps for the backward (the
#: chunk-start states S, W, U, T) and the backward's state gradients dH are stored in the inputs' dtype
#: instead of float32. Every kernel that reads them rounds them to that dtype as dot operands anyway;
#: the one float32 use, sum_v S * dH (the gate gradient's chunk-end term), takes the rounded values.
#: Half the bytes written by the forward's passes and by the reverse pass, and read by the per-chunk
#: backward kernels; half the memory kept from the forward to the backward. Read at each forward (the
#: op's fake too) and, for dH, from W's dtype in the backward. False: float32, the previous launches.
#: On since checked (1x32x8192, every gradient: errors equal but dg's, 0.2235 against 0.2184 for
#: gated_delta, the bf16 recurrence's 1.14) and timed on the H100: gated_delta forward + backward 1.12x,
#: KDA 1.05x faster at 32K (benchmarks/results/h100-2026-11-25-s22).
DELTA_SAVED_LOWP = True
#: With ``DELTA_SAVED_LOWP``'s 16-bit W: the reverse pass's dU (its intra-chunk part, then the whole) stored
#: in that dtype too (the per-chunk backward and the pass take it only as dot operands; the intra-chunk part
#: is rounded once more before the pass adds the state term). On since checked (1x32x8192, every gradient:
#: dbeta's error 0.1256 against 0.1237, the bf16 recurrence's 0.43) and timed on the H100: gated_delta
#: forward + backward 1.02x, KDA 1.04x / 1.07x faster at 8K / 32K (benchmarks/results/h100-2026-11-25-s22).
DELTA_BWD_DU_LOWP = True
#: 16-bit inputs with the 16-bit forward pass (``DELTA_H_V2`` and ``DELTA_H_LOWP``): the UT transform
#: writes U0 = T (beta v) in the inputs' dtype instead of float32 (``delta_wy_block_kernel`` /
#: ``delta_wy_kernel`` round on store; ``delta_h_v2_kernel`` reads it into float32, subtracts W S and rounds
#: U = U0 - W S to that dtype for its dot and its store, as fla-core's kernels keep u in v's dtype), and the
#: pass writes U over U0 when the two dtypes agree. Half the bytes of U0 written and read. Forward only
#: (the backward reads the saved U). False: float32 U0 (the previous launches). On since checked (1x32x8192,
#: every gradient: gated_delta's final-state error 4.7e-3 against 3.6e-3, dg's 0.162 against 0.225; KDA's
#: state 5.3e-3 against 4.6e-3, dg's 0.032 against 0.030; the rest equal or within 2%) and timed on the H100
#: (benchmarks/results/h100-2026-11-25-s23, runs 1, 3 and 5): GPU time of gated_delta's forward + backward at
#: 1x32x32768 10.21 -> 10.06, 9.38 -> 9.26 and 9.41 -> 9.29 ms, KDA's 22.94 -> 22.63 and 22.79 -> 22.68;
#: forward 1.02-1.05x faster in run 5 at every shape. KDA's forward + backward at 32K as timed: 1.03x faster
#: in runs 1 and 3, 0.98x in run 5 (24.06 against 23.57 ms, about two IQRs).
DELTA_U0_LOWP = True
#: The delta rule's chunk op leaves the gradients of the outputs the loss does not use unmaterialised
#: (``set_materialize_grads(False)``, as ``GLA_SKIP_ZERO_GRADS``): its saved outputs (the chunk states,
#: W, U, T, the normalised q / k) got zero-filled gradients before (8 fills, 0.17 ms of gated_delta's 4.2
#: ms forward + backward at 1x32x8192 on an H200, profile in benchmarks/results/h200-2026-11-25-s21).
DELTA_SKIP_ZERO_GRADS = True
#: Chunks per program of ``gate_cumsum_kernel`` for one gate per token.
CUMSUM_CHUNKS = 16


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


#: Step plans by signature (``_step_key``), cleared when full: a decode loop repeats one signature.
_STEP_PLANS: dict[tuple[object, ...], StepPlan] = {}
STEP_PLANS_MAX = 256


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
