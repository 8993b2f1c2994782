"""Packed sequences (varlen): the chunk-aligned layout (every sequence starts a new chunk) and the chunked
forms over it, :func:`gla_chunk_varlen` and :func:`delta_chunk_varlen` (the sequential kernels restart at
every sequence). ``op.FUSED_L2NORM`` and ``op.l2norm`` are read from op at each call (op imports this
module)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from attnlab.kernels.linear.launch import _check, _needs_grad, _scalar_gate


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
    fused = qk_l2norm and (op.FUSED_L2NORM if fused_l2norm is None else fused_l2norm)
    if qk_l2norm and not fused:
        q, k = op.l2norm(q).to(q.dtype), op.l2norm(k).to(k.dtype)
    gd = _delta_gate(g, 1, h, n, dk)
    qa, ka, va = (_pack(t, rows, aligned) for t in (q, k, v))
    ba = _pack(beta.expand(1, h, n), rows, aligned)
    ga = None if gd is None else _pack(gd, rows, aligned)
    grad = _needs_grad(q, k, v, beta, g, state)
    o, ht, *_ = delta_chunk_fwd(
        qa, ka, va, ba, ga, state, float(scale), int(chunk), grad, seq_chunks, fused
    )  # fmt: skip
    return o.index_select(2, rows), ht


# Imported last: op imports this module, and this module reads op (and the launchers op imports) only at
# call time, so that any of them may be imported first.
from attnlab.kernels.linear import op  # noqa: E402
from attnlab.kernels.linear.custom_ops import delta_chunk_fwd, gla_chunk_fwd  # noqa: E402
from attnlab.kernels.linear.launch_delta import _delta_gate  # noqa: E402
from attnlab.kernels.linear.launch_gla import _gla_gate  # noqa: E402
