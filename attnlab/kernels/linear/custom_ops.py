"""The ``torch.library`` custom ops of the chunked forms, with fake tensors and autograd:
``attnlab::gla_chunk_fwd`` / ``attnlab::gla_chunk_bwd`` (the gated linear recurrence, ``launch_gla.py``)
and ``attnlab::delta_chunk_fwd`` / ``attnlab::delta_chunk_bwd`` (the gated delta rule,
``launch_delta.py``). Importing this module registers them (op imports it). ``op.GLA_SKIP_ZERO_GRADS`` is
read from op at each forward."""

from __future__ import annotations

import torch
from torch import Tensor


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
    hs_dt = gla_saved_dtype(k, gc) if save else f32  # (as gla_fwd_launch decides: op.GLA_SAVED_LOWP)
    hs = q.new_empty((b, h, n_chunks, dk, dv) if save else (0,), dtype=hs_dt)
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
    # contiguous, as the launcher's (it makes its inputs contiguous first; empty_like would keep a
    # transposed input's strides)
    dg = gc.new_empty(gc.shape) if g_dtype is None else q.new_empty(q.shape, dtype=g_dtype)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dg, torch.empty_like(ht)


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
    if op.GLA_SKIP_ZERO_GRADS:  # (None, not zeros, for the outputs the loss does not use)
        ctx.set_materialize_grads(False)


def _backward(ctx, do: Tensor | None, dht: Tensor | None, *_unused: Tensor | None):  # type: ignore[no-untyped-def]
    q, k, v, gc, hs, ht, a = ctx.saved_tensors
    if do is None:  # (GLA_SKIP_ZERO_GRADS: the output unused, only the final state)
        do = q.new_zeros(v.shape)  # (o: q's dtype, v's shape)
    dq, dk, dv, dgc, dh0 = gla_chunk_bwd(q, k, v, gc, hs, ht, do, dht, *ctx.args, a, ctx.g_dtype)
    return dq, dk, dv, dgc, (dh0 if ctx.has_h0 else None), None, None, None, None, None


gla_chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("attnlab::delta_chunk_fwd", mutates_args=())
def delta_chunk_fwd(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None, scale: float,
    chunk: int, save: bool, seq_chunks: Tensor | None = None, qk_l2norm: bool = False,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:  # fmt: skip
    """(o, final state, then what the backward takes: chunk-start states, W, U, T, with ``qk_l2norm``
    q^, k^, rstd_q, rstd_k, and under per-channel gates with ``op.DELTA_SAVE_SCORES`` the intra-chunk
    q k^T scores and the strict k k^T scores without beta; see ``delta_fwd_launch``). g: None,
    (B, H, N, 1) or (B, H, N, K). ``qk_l2norm``: q and k are L2-normalised in the op (its gradients are
    those of the raw q, k). The fake reads ``op.DELTA_SAVE_SCORES`` when traced, as the op when run."""
    return delta_fwd_launch(q, k, v, beta, g, h0, scale, chunk, save, seq_chunks, qk_l2norm)


@delta_chunk_fwd.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None, scale: float,
    chunk: int, save: bool, seq_chunks: Tensor | None = None, qk_l2norm: bool = False,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:  # fmt: skip
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    n_chunks = (n + chunk - 1) // chunk
    np_ = n_chunks * chunk
    f32 = torch.float32
    o = q.new_empty(b, h, n, dv)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    ht = q.new_empty(n_seq, h, dk, dv, dtype=f32)
    kdt = saved_dtype(k) if save else f32  # (as delta_fwd_launch decides: op.DELTA_SAVED_LOWP)
    hs = q.new_empty((b, h, n_chunks, dk, dv) if save else (0,), dtype=kdt)
    wut = save
    w = q.new_empty((b, h, np_, dk) if wut else (0,), dtype=kdt)
    u = q.new_empty((b, h, np_, dv) if wut else (0,), dtype=kdt)
    t = q.new_empty((b, h, np_, chunk) if wut else (0,), dtype=kdt)
    l2 = save and qk_l2norm
    qn = q.new_empty(q.shape if l2 else (0,))
    kn = k.new_empty(k.shape if l2 else (0,))
    rq = q.new_empty((b, h, n) if l2 else (0,), dtype=f32)
    rk = q.new_empty((b, h, n) if l2 else (0,), dtype=f32)
    kept = save and not _delta_scalar(g) and op.DELTA_SAVE_SCORES  # (as delta_fwd_launch decides)
    aqk = q.new_empty((b, h, np_, chunk) if kept else (0,), dtype=f32)
    bkk = q.new_empty((b, h, np_, chunk) if kept else (0,), dtype=f32)
    return o, ht, hs, w, u, t, qn, kn, rq, rk, aqk, bkk


@torch.library.custom_op("attnlab::delta_chunk_bwd", mutates_args=())
def delta_chunk_bwd(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, hs: Tensor, w: Tensor, u: Tensor,
    t: Tensor, do: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None = None,
    rq: Tensor | None = None, rk: Tensor | None = None, aqk: Tensor | None = None, bkk: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv, dbeta in the inputs' dtypes, dg (fp32, g's shape; empty without g), dh0 fp32). A gate
    shared by the channels (or none) takes the 64-row chunked backward; per-channel gates add the
    intra-chunk score backwards (by split levels or 16-row sub-blocks: ``delta_bwd_channel_launch``). ``rq``, ``rk`` (the fused L2 norm): q, k are the
    normalised rows and these their reciprocal norms; dq, dk are then those of the raw q, k. ``aqk``,
    ``bkk``: per-channel gates' intra-chunk scores kept by the forward (``op.DELTA_SAVE_SCORES``; None or
    empty: recomputed; a gate shared by the channels takes none)."""
    if g is None or _delta_scalar(g):
        dq, dk, dv, db, dg, dh0 = delta_bwd_scalar_launch(
            q, k, v, beta, g, hs, w, u, t, do, dht, scale, chunk, seq_chunks, rq, rk
        )
    else:
        dq, dk, dv, db, dg, dh0 = delta_bwd_channel_launch(
            q, k, v, beta, g, hs, w, u, t, do, dht, scale, chunk, seq_chunks, rq, rk, aqk, bkk
        )
    # contiguous, as the fake says (in float32 the chunk-padded buffers' slices would be views)
    dg_out = dg.contiguous() if dg is not None else q.new_empty(0, dtype=torch.float32)
    return (
        dq.to(q.dtype).contiguous(),
        dk.to(k.dtype).contiguous(),
        dv.to(v.dtype).contiguous(),
        db.to(beta.dtype).contiguous(),
        dg_out,
        dh0,
    )


@delta_chunk_bwd.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, hs: Tensor, w: Tensor, u: Tensor,
    t: Tensor, do: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None = None,
    rq: Tensor | None = None, rk: Tensor | None = None, aqk: Tensor | None = None, bkk: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    b, h, _, dk = q.shape
    dg = q.new_empty(tuple(g.shape) if g is not None else (0,), dtype=torch.float32)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    dh0 = q.new_empty(n_seq, h, dk, v.shape[-1], dtype=torch.float32)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        beta.new_empty(beta.shape),
        dg,
        dh0,
    )


def _delta_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, beta, g, h0, scale, chunk, save, seq_chunks, qk_l2norm = inputs
    if not save:
        raise RuntimeError(
            "attnlab::delta_chunk_fwd ran without saving its chunk states (save=False): no backward"
        )
    hs, w, u, t, qn, kn, rq, rk, aqk, bkk = output[2:]
    if aqk.dim() != 4 or bkk.dim() != 4:  # (not kept, (0,): DELTA_SAVE_SCORES off; recomputed)
        aqk = bkk = None
    if qk_l2norm:  # the normalised rows replace the raw q, k (no copy of both is kept)
        ctx.save_for_backward(qn, kn, v, beta, g, hs, w, u, t, rq, rk, aqk, bkk)
    else:
        ctx.save_for_backward(q, k, v, beta, g, hs, w, u, t, None, None, aqk, bkk)
    ctx.args = (scale, chunk, seq_chunks)
    ctx.has = (g is not None, h0 is not None)
    if op.DELTA_SKIP_ZERO_GRADS:  # (None, not zeros, for the outputs the loss does not use)
        ctx.set_materialize_grads(False)


def _delta_backward(ctx, do, dht, *_unused):  # type: ignore[no-untyped-def]
    q, k, v, beta, g, hs, w, u, t, rq, rk, aqk, bkk = ctx.saved_tensors
    if do is None:  # (DELTA_SKIP_ZERO_GRADS: the output unused, only the final state)
        do = q.new_zeros(v.shape)  # (o: q's dtype, v's shape)
    dq, dk, dv, db, dg, dh0 = delta_chunk_bwd(
        q, k, v, beta, g, hs, w, u, t, do, dht, *ctx.args, rq, rk, aqk, bkk
    )
    has_g, has_h0 = ctx.has
    return dq, dk, dv, db, (dg if has_g else None), (dh0 if has_h0 else None), None, None, None, None, None


delta_chunk_fwd.register_autograd(_delta_backward, setup_context=_delta_setup)


# Imported last: op imports this module, and this module reads op (and the launchers op imports) only at
# call time, so that any of them may be imported first.
from attnlab.kernels.linear import op  # noqa: E402
from attnlab.kernels.linear.launch_delta import (  # noqa: E402
    _delta_scalar,
    delta_bwd_channel_launch,
    delta_bwd_scalar_launch,
    delta_fwd_launch,
    saved_dtype,
)
from attnlab.kernels.linear.launch_gla import gla_bwd_launch, gla_fwd_launch, gla_saved_dtype  # noqa: E402
