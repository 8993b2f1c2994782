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


def gate_cumsum_kg(g: Tensor, k: Tensor, chunk: int, kg_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`gate_cumsum` of per-channel log-decays g (B, H, N, K) and, from the same launch
    (``gate_cumsum_kernel``'s HAS_KG), the decayed keys KG = k exp(G_C - G) (B, H, NP, K) in ``kg_dtype``
    (G_C the chunk's last cumsum row; zero rows past N): the delta rule's forward pass reads them
    (``op.DELTA_H_KG``)."""
    g, k = g.contiguous(), k.contiguous()
    b, h, n, dk = g.shape
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    gc = torch.empty(b, h, np_, dk, dtype=torch.float32, device=g.device)
    kg = torch.empty(b, h, np_, dk, dtype=kg_dtype, device=g.device)
    bd = min(head_block(dk), 64)
    if n_chunks:
        op.gate_cumsum_kernel[(n_chunks, b * h, cdiv(dk, bd))](
            g, gc, n, np_, dk, BT=chunk, PER_CHANNEL=True, BR=1, BD=bd, K=k, KG=kg, HAS_KG=True,
            **_cfg("cumsum", num_warps=4),
        )  # fmt: skip
    return gc, kg


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


def intra_scores_pair(
    q: Tensor, k: Tensor, gc: Tensor, beta: Tensor | None, chunk: int, f32_operands: bool = False
) -> tuple[Tensor, Tensor]:
    """The delta rule's two intra-chunk score products of per-channel gates in one launch of
    ``intra_scores_v2_kernel`` (PAIR; ``op.DELTA_INTRA_PAIR``): (``intra_scores(k, k, gc, beta, chunk,
    strict=True, v2=True, f32_operands)``, ``intra_scores(q, k, gc, None, chunk, strict=False, v2=True,
    f32_operands)``), k, the gates and the exps loaded and made once for both."""
    b, h, n, dk = k.shape
    np_ = gc.shape[2]
    akk = torch.empty(b, h, np_, chunk, dtype=torch.float32, device=k.device)
    aqk = torch.empty_like(akk)
    bk = head_block(dk)
    op.intra_scores_v2_kernel[(np_ // chunk, b * h)](
        k, k, gc, akk, n, np_, dk, BT=chunk, LBT=chunk.bit_length() - 1, BK=bk,
        BKS=min(bk, op.GLA_INTRA_BKS), DOT_PREC=_prec(k), UPCAST=_upcast(k) or f32_operands,
        STRICT=True, HAS_BETA=beta is not None, BETA=beta, Q2=q, A2=aqk, PAIR=True,
        **_cfg("intra_v2_pair", num_warps=8, num_stages=1),
    )  # fmt: skip
    return akk, aqk


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


#: ``score_bwd_v2_kernel``'s channels per slice (at most the head dim's block) and whether its levels are
#: unrolled, for 16-bit inputs (compiled for sm_90 by Triton 3.6 at chunk 64, K = 128, 8 warps: 255
#: registers, 120 B of stack, 112 KiB of shared memory; with ``upcast`` 88 B, 224 KiB) and for float32
#: ones (ieee dots: unrolled or 64 channels wide they spill KiBs; 164 registers, no stack, 32 KiB):
#: module settings until op.py holds them.
SCORE_BWD_BKS = 64
SCORE_BWD_UNROLL = True
SCORE_BWD_BKS_F32 = 32
SCORE_BWD_UNROLL_F32 = False


def score_bwd_v2(
    x: Tensor, y: Tensor, gc: Tensor, dp: Tensor, dx: Tensor, dy: Tensor, dgc: Tensor, *, same_out: bool,
    chunk: int, prec: str, upcast: bool,
) -> None:  # fmt: skip
    """The backward of the per-channel decayed intra-chunk scores P_tj = sum_d x_td y_jd exp(G_td - G_jd)
    (j <= t within a chunk) by ``score_bwd_v2_kernel`` (a chunk per program, log2(chunk) split levels),
    added into the float32 buffers ``dx``, ``dy``, ``dgc`` (B, H, NP, K) as ``score_bwd_kernel``'s launches
    in ``delta_bwd_channel_launch`` add: dx_t += sum_{j<=t} dP_tj y_j e^(G_t - G_j), dy_j += sum_{t>=j}
    dP_tj x_t e^(G_t - G_j), dgc += x * (the dx part) - y * (the dy part). x, y (B, H, N, K) contiguous
    (any float dtype); gc (B, H, NP, K) float32, the chunk-local gate cumsum (NP = N rounded up to whole
    chunks); dp (B, H, NP, chunk) float32, used on and below the diagonal only. ``same_out``: x and y are
    one tensor (k) and dx, dy one buffer. ``prec``: the dots' input precision (``_prec(x)``); ``upcast``:
    float32 dot operands (``_upcast(x)``: bf16 in the interpreter; on a GPU, with 16-bit inputs, tf32 dots
    more accurate than the sub-block kernel, and slower: see the kernel's docstring). Measured on an H100
    (B=1, H=32, N=8192, the two launches of the delta backward): bf16, K = 128: chunk 64 1.41 ms against
    the sub-block kernel's 3.18 (``upcast`` 2.21), chunk 32 1.62 / 3.05, chunk 16 1.15 / 1.97; K = 64,
    chunk 64 0.76 / 1.59. float32 inputs (ieee dots, done by FMAs, and the split levels' dots do about 12x
    the triangle's work): 3.90 ms against 2.97, slower."""
    b, h, n, dk = x.shape
    np_ = gc.shape[2]
    assert np_ % chunk == 0 and dp.shape[-2:] == (np_, chunk) and dx.shape == dy.shape == dgc.shape
    assert all(t.is_contiguous() for t in (x, y, gc, dp, dx, dy, dgc))
    assert not same_out or (x.data_ptr() == y.data_ptr() and dx.data_ptr() == dy.data_ptr())
    if np_ == 0 or b * h == 0:
        return
    wide = x.dtype == torch.float32
    bks = min(head_block(dk), SCORE_BWD_BKS_F32 if wide else SCORE_BWD_BKS)
    kernel = getattr(op, "score_bwd_v2_kernel", score_bwd_v2_kernel)
    kernel[(np_ // chunk, b * h)](
        x, y, gc, dp, dx, dy, dgc, n, np_, dk,
        SAME_OUT=same_out, BT=chunk, LBT=chunk.bit_length() - 1, BKS=bks,
        UNROLL=SCORE_BWD_UNROLL_F32 if wide else SCORE_BWD_UNROLL, DOT_PREC=prec, UPCAST=upcast,
        **_cfg("score_bwd_v2", num_warps=8, num_stages=1),
    )  # fmt: skip


# Imported last: op imports this module, and this module reads op (and the launchers op imports) only at
# call time, so that any of them may be imported first.
from attnlab.kernels.linear import op  # noqa: E402
from attnlab.kernels.linear.chunk_scores import score_bwd_v2_kernel  # noqa: E402
