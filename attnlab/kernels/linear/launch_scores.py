"""Launchers of the per-chunk kernels that the gated linear recurrence and the gated delta rule share
(``chunk_scores.py``): the gates' chunk-local cumsum in one launch, the intra-chunk scores of per-channel
gates, the per-chunk output (stage 3).

Switches, kernels and the helpers that tests replace are read as ``op.NAME`` at each call: op is the
namespace where tests and benchmarks set them (op imports this module; see its docstring).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.kernels.linear.launch import SUB, _cfg, _gate_code, _prec, _upcast, cdiv
from attnlab.kernels.triton_utils import head_block


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
        grid = (cdiv(n_chunks, op.CUMSUM_CHUNKS), b * h)
        consts = {"PER_CHANNEL": False, "BR": op.CUMSUM_CHUNKS, "BD": 1}
    if n_chunks:
        op.gate_cumsum_kernel[grid](g, gc, n, np_, dk, BT=chunk, **consts, **_cfg("cumsum", num_warps=4))
    return gc


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
        op.intra_scores_v2_kernel[(np_ // chunk, b * h)](
            x, k, gc, a, n, np_, dk, BT=chunk, LBT=chunk.bit_length() - 1, BK=bk,
            BKS=min(bk, op.GLA_INTRA_BKS), DOT_PREC=_prec(x), UPCAST=_upcast(x) or f32_operands,
            STRICT=strict, HAS_BETA=beta is not None, BETA=beta,
            **_cfg("intra_v2", num_warps=8, num_stages=1),
        )  # fmt: skip
        return a
    op.intra_scores_kernel[(np_ // SUB, b * h)](
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
    op.chunk_out_kernel[(cdiv(dv, bv), n_chunks, b * h)](
        q, k, v, gc, hs, a if a is not None else hs, o, n, v.shape[2], gc.shape[2], dk, dv, float(scale),
        GATE=_gate_code(gc), BT=chunk, BK=head_block(dk), BV=bv, DOT_PREC=_prec(q), UPCAST=_upcast(q),
        **_cfg("out", num_warps=4),
    )  # fmt: skip
    return o


# Imported last: op imports this module, and this module reads op (and the launchers op imports) only at
# call time, so that any of them may be imported first.
from attnlab.kernels.linear import op  # noqa: E402
