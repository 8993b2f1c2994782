"""Launchers of the gated delta rule's chunk kernels: the gate's cumsum and beta as the kernels read them,
the fused q/k L2 normalisation (``fwd.py``'s kernels), the forward in the chunked WY/UT form (per-chunk
T = (I + A_kk)^-1, W, U0 in parallel: ``chunk_delta_wy.py``; one sequential pass over the chunk states:
``chunk_state.py``; per-chunk outputs: ``launch_scores.py``), and the chunked backward (the reverse
sequential pass: ``chunk_delta_dh.py``, then every chunk's gradients: ``chunk_delta_bwd.py``; under
per-channel gates the intra-chunk score backwards by split levels, ``launch_scores.score_bwd_v2``, or by
16-row sub-blocks).

Switches, kernels and the helpers that tests replace are read as ``op.NAME`` at each call: op is the
namespace where tests and benchmarks set them (op imports this module; see its docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from triton.runtime.errors import OutOfResources

from attnlab.kernels.linear.launch import (
    IMPORTED_INTERPRETED,
    SUB,
    _cfg,
    _check,
    _gate_code,
    _prec,
    _scalar_gate,
    _upcast,
    cdiv,
    chunk_cumsum_scalar,
)
from attnlab.kernels.linear.naive import L2_EPS
from attnlab.kernels.triton_utils import head_block, next_power_of_2


def _delta_gate(g: Tensor | None, b: int, h: int, n: int, dk: int) -> Tensor | None:
    """The delta kernels' gate: None, (B, H, N, 1) for a gate shared by the channels (the scalar-gate
    kernels, chunked backward), else (B, H, N, K) per channel."""
    scalar, gx = _scalar_gate(g, b, h, n, dk)
    if gx is None:
        return None
    return gx[..., None] if scalar else gx


def _delta_scalar(g: Tensor | None) -> bool:
    return g is None or g.shape[-1] == 1


def saved_dtype(k: Tensor) -> torch.dtype:
    """The dtype of W and of what the forward keeps for the backward (chunk-start states, U, T): k's
    16-bit dtype with ``op.DELTA_SAVED_LOWP`` and the 16-bit sequential passes, else float32 (also for
    bf16 in Triton's CPU interpreter, whose dots then take float32 operands: ``_upcast``)."""
    lowp = (
        op.DELTA_SAVED_LOWP
        and not _upcast(k)
        and op.DELTA_H_V2
        and op.DELTA_H_LOWP
        and op.DELTA_BWD_DH_V2
        and op.DELTA_BWD_DH_LOWP
        and k.dtype in (torch.bfloat16, torch.float16)
    )
    return k.dtype if lowp else torch.float32


def u0_dtype(k: Tensor) -> torch.dtype:
    """The dtype of the UT transform's U0 = T (beta v): k's 16-bit dtype with ``op.DELTA_U0_LOWP`` and the
    16-bit forward pass (``DELTA_H_V2`` with ``_h_lowp``: it reads U0 into float32), else float32 (also in
    Triton's CPU interpreter, whose pass takes float32 operands)."""
    lowp = op.DELTA_U0_LOWP and op.DELTA_H_V2 and _h_lowp(k)
    return k.dtype if lowp else torch.float32


def _delta_cumsum(
    g: Tensor | None, b: int, h: int, n: int, dk: int, chunk: int, device: torch.device
) -> Tensor:
    """The delta kernels' gate cumsum (``chunk_cumsum*``'s layout): (B, H, NP) for None or a (B, H, N, 1)
    gate, (B, H, NP, K) per channel; by ``gate_cumsum`` with ``DELTA_FUSED_GLUE``."""
    scalar = _delta_scalar(g)
    if g is not None and op.DELTA_FUSED_GLUE:
        return gate_cumsum(g.expand(b, h, n, 1)[..., 0] if scalar else g.expand(b, h, n, dk), chunk)
    if scalar:
        return chunk_cumsum_scalar(None if g is None else g[..., 0], b, h, n, chunk, device)
    return op.chunk_cumsum(g, b, h, n, dk, chunk, device)


def _delta_beta(beta: Tensor, b: int, h: int, n: int) -> Tensor:
    """beta as the delta kernels read it, (B, H, N) contiguous: in its own dtype with
    ``DELTA_FUSED_GLUE`` (the kernels load it as float32), else a float32 copy."""
    if op.DELTA_FUSED_GLUE:
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
        op.l2norm_fwd_kernel[(cdiv(rows, op.L2_ROWS), 2)](
            q, qn, rq, k, kn, rk, rows, dk, EPS=L2_EPS, BR=op.L2_ROWS, BD=next_power_of_2(dk),
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
        op.l2norm_bwd_kernel[(cdiv(n, op.L2_ROWS), b * h, 2)](
            qn, rq, dqn, dq, kn, rk, dkn, dkk, n, dqn.shape[2], dk, BR=op.L2_ROWS,
            BD=next_power_of_2(dk), **_cfg("l2norm_bwd", num_warps=4),
        )  # fmt: skip
    return dq, dkk


def delta_fwd_launch(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, h0: Tensor | None, scale: float,
    chunk: int, save: bool, seq_chunks: Tensor | None = None, qk_l2norm: bool = False,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:  # fmt: skip
    """(o in q's dtype, final state fp32, and for the backward (empty without ``save``): the states at the
    chunk starts, W (B, H, NP, K), U (B, H, NP, V) and T (B, H, NP, chunk), in ``saved_dtype(k)``, with ``qk_l2norm``
    q^, k^ (the normalised q, k in their dtypes) and their reciprocal norms (B, H, N) fp32 (empty
    otherwise), and under per-channel gates with ``op.DELTA_SAVE_SCORES`` the intra-chunk q k^T scores and
    the strict k k^T scores without beta (B, H, NP, chunk) fp32 (``delta_bwd_channel_launch``'s ``aqk``,
    ``bkk``; empty otherwise)): the WY/UT chunked form (see ``chunk_delta_wy.py``). g: None, (B, H, N, 1)
    one log-decay per token, or (B, H, N, K) per channel. ``seq_chunks``: varlen (see ``chunk_states``).
    ``qk_l2norm``: q and k are L2-normalised first, by one launch of ``l2norm_fwd_kernel``."""
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
    kg = None  # (per-channel gates with op.DELTA_H_KG: the decayed keys for the forward pass)
    if g is not None and not scalar and op.DELTA_H_KG and op.DELTA_H_V2 and op.DELTA_FUSED_GLUE:
        gc, kg = op.gate_cumsum_kg(g.expand(b, h, n, dk), k, chunk, k.dtype if _h_lowp(k) else torch.float32)
    else:
        gc = _delta_cumsum(g, b, h, n, dk, chunk, q.device)
    f32, dev = torch.float32, q.device
    akk = aqk = None
    # (kept for the backward: akk is then the strict scores without beta, B; the UT kernel applies beta)
    keep_scores = save and not scalar and op.DELTA_SAVE_SCORES
    if not scalar:
        v2, wide = op.DELTA_INTRA_V2, op.DELTA_INTRA_V2_F32
        akk_beta = None if keep_scores else bc
        if v2 and op.DELTA_INTRA_PAIR:
            akk, aqk = op.intra_scores_pair(q, k, gc, akk_beta, chunk, f32_operands=wide)
        else:
            akk = op.intra_scores(k, k, gc, akk_beta, chunk, strict=True, v2=v2, f32_operands=wide)
            aqk = op.intra_scores(q, k, gc, None, chunk, strict=False, v2=v2, f32_operands=wide)
    kept_dt = saved_dtype(k)
    w = torch.empty(b, h, np_, dk, dtype=kept_dt, device=dev)
    u = torch.empty(b, h, np_, dv, dtype=u0_dtype(k), device=dev)
    save_t = save
    t = torch.empty((b, h, np_, chunk) if save_t else (0,), dtype=kept_dt, device=dev)
    prec = _prec(q)
    bk, bv = head_block(dk), head_block(dv)
    if op.WY_BLOCKWISE:
        op.delta_wy_block_kernel[(n_chunks, b * h)](
            k, v, gc, bc, akk if akk is not None else w, w, u, t if save_t else w, n, np_, dk, dv,
            GATE=_gate_code(gc), SAVE_T=save_t, BT=chunk, BS=SUB, BK=bk, BV=bv, BKS=min(bk, op.WY_BKS),
            BCK=min(bk, op.WY_COLS), BCV=min(bv, op.WY_COLS), DOT_PREC=prec, INV_PREC=op.WY_INV_PREC,
            UPCAST=_upcast(k), AKK_BETA=not keep_scores, **_cfg("delta_wy_block", num_warps=4),
        )  # fmt: skip
    else:
        op.delta_wy_kernel[(n_chunks, b * h)](
            k, v, gc, bc, akk if akk is not None else w, w, u, t if save_t else w, n, np_, dk, dv,
            GATE=_gate_code(gc), SAVE_T=save_t, BT=chunk, BK=bk, BV=bv, DOT_PREC=prec,
            AKK_BETA=not keep_scores, **_cfg("delta_wy", num_warps=8),
        )  # fmt: skip
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    ht = torch.empty(n_seq, h, dk, dv, dtype=f32, device=dev)
    h0c = h0.float().contiguous() if h0 is not None else ht
    seq = seq_chunks if seq_chunks is not None else ht
    if op.DELTA_H_V2:
        hs, u_out = delta_h_v2(k, w, u, gc, h0c if h0 is not None else None, ht, seq_chunks, save, chunk, kg)
    else:
        hs = torch.empty(b, h, n_chunks, dk, dv, dtype=f32, device=dev)
        u_out = u
        bv = min(head_block(dv), op.DELTA_BV)
        op.delta_h_kernel[(cdiv(dv, bv), n_seq * h)](
            k, w, u, gc, h0c, hs, ht, seq, n, np_, dk, dv, b * h,
            GATE=_gate_code(gc), HAS_H0=h0 is not None, VARLEN=seq_chunks is not None, BT=chunk,
            BK=head_block(dk), BV=bv, DOT_PREC=prec,
            **_cfg("delta_h", num_warps=4, num_stages=2),
        )  # fmt: skip
    o = chunk_output(q, k, u_out, gc, hs, aqk, scale, chunk)

    def empty(dtype: torch.dtype = f32) -> Tensor:  # (a fresh one each: a custom op's outputs must not alias;
        return hs.new_empty(0, dtype=dtype)  # the fake's dtypes)

    qk_empty = (empty(q.dtype), empty(k.dtype))
    if not save:
        return o, ht, empty(), empty(), empty(), empty(), *qk_empty, empty(), empty(), empty(), empty()
    kept = (aqk, akk) if keep_scores and aqk is not None and akk is not None else (empty(), empty())
    if rq is None or rk is None:
        return o, ht, hs, w, u_out, t, *qk_empty, empty(), empty(), *kept
    return o, ht, hs, w, u_out, t, q, k, rq, rk, *kept


def _h_lowp(k: Tensor) -> bool:
    """Whether ``delta_h_v2_kernel`` takes 16-bit dot operands for keys like ``k`` (``op.DELTA_H_LOWP``)."""
    return op.DELTA_H_LOWP and k.dtype in (torch.bfloat16, torch.float16) and not IMPORTED_INTERPRETED


def delta_h_v2(
    k: Tensor, w: Tensor, u: Tensor, gc: Tensor, h0: Tensor | None, ht: Tensor, seq_chunks: Tensor | None,
    save: bool, chunk: int, kg: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The delta rule's forward sequential pass by ``delta_h_v2_kernel``: (the states at the chunk starts
    (B, H, chunks, K, V), U (B, H, NP, V)), the final state written to ``ht`` (h0 float32 or None;
    ``seq_chunks``: varlen, as ``chunk_states``). With ``save``: both in ``saved_dtype(k)``; without: in
    k's dtype (``DELTA_H_COMPACT``), else float32. U is written over U0 (``u``, float32 or with
    ``DELTA_U0_LOWP`` 16-bit: ``u0_dtype``) when their dtypes agree, else into a fresh buffer. ``kg``:
    per-channel gates' decayed keys k exp(G_C - G) (B, H, NP, K; ``gate_cumsum_kg``), read in place of k
    and the gates' rows (the kernel's GATE 3)."""
    b, h, n, dk = k.shape
    dv = u.shape[-1]
    n_chunks = cdiv(n, chunk)
    if save:  # (the backward reads them: ``saved_dtype``)
        sdt = saved_dtype(k)
        compact = sdt != torch.float32
    else:
        compact = op.DELTA_H_COMPACT
        sdt = k.dtype if compact else torch.float32
    hs = torch.empty(b, h, n_chunks, dk, dv, dtype=sdt, device=k.device)
    # (U over U0 when their dtypes agree: each program reads its rows of U0 before it writes them)
    u_out = u if u.dtype == sdt else torch.empty(u.shape, dtype=sdt, device=k.device)
    bk = head_block(dk)
    bkt = min(bk, op.DELTA_H_BKT)
    nkt = cdiv(bk, bkt)
    assert nkt <= 4, f"delta_h_v2_kernel holds at most 4 state tiles (K={dk}, DELTA_H_BKT={op.DELTA_H_BKT})"
    bv = min(head_block(dv), op.DELTA_H_BV)
    lowp = _h_lowp(k)

    def launch(stages: int) -> None:
        op.delta_h_v2_kernel[(cdiv(dv, bv), ht.shape[0] * h)](
            k if kg is None else kg, w, u, u_out, gc, h0 if h0 is not None else ht, hs, ht,
            seq_chunks if seq_chunks is not None else ht, n, w.shape[2], dk, dv, b * h,
            GATE=_gate_code(gc) if kg is None else 3, HAS_H0=h0 is not None, VARLEN=seq_chunks is not None,
            BT=chunk, BKT=bkt, NKT=nkt, BV=bv, LOWP=lowp, DOT_PREC=_prec(k),
            **_cfg("delta_h_v2", num_warps=4, num_stages=stages),
        )  # fmt: skip

    # (16-bit, K <= 128: 3 stages, 127 KB of shared memory for sm_90 (Triton 3.6, K = 128, bf16), 143
    # registers; gated_delta forward + backward 0.97x, KDA 0.995x of 2 stages' at 1x32x32768 on the H100,
    # benchmarks/results/h100-2026-11-25-s23. Float32 or K > 128 at 3 stages is over the H100's 227 KB, and
    # a GPU with less shared memory (sm_86 / sm_89: 99 KB) refuses 3: 2 stages there, as before.)
    _staged(launch, 3 if lowp and bk <= 128 else 2, 2)
    return hs, u_out


def _channel_dh_cfg() -> dict[str, int]:
    """The launch options of ``delta_bwd_dh_v2_kernel`` under per-channel gates (GATE 2): 8 warps, 2 stages.
    Fewer stages are refused on a GPU: compiled at 1 stage by Triton 3.6 for the H100, the kernel's dk, dv,
    dbeta, dg and dh0 came out wrong (twice, the same wrong values; 2 stages pass: the interpreter agrees
    with them) in benchmarks/results/h100-2026-11-25-s24, run 2."""
    cfg = _cfg("delta_bwd_dh_v2_channel", num_warps=8, num_stages=2)
    if cfg["num_stages"] < 2 and not IMPORTED_INTERPRETED:
        raise ValueError(
            f"delta_bwd_dh_v2_channel at num_stages={cfg['num_stages']}: Triton 3.6 compiled it wrong for "
            "the H100 (sm_90; other GPUs unchecked, refused too); use 2 or more"
        )
    return cfg


def _staged(launch: Callable[[int], None], first: int, fallback: int) -> None:
    """``launch(first)`` (a kernel launch at ``first`` pipeline stages), or ``launch(fallback)`` when the GPU
    refuses ``first``'s shared memory (Triton's OutOfResources, raised before anything runs)."""
    try:
        launch(first)
    except OutOfResources:
        if first == fallback:
            raise
        launch(fallback)


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


def _delta_bwd_dh(
    q: Tensor, k: Tensor, do: Tensor, gc: Tensor, w: Tensor, aqk: Tensor | None, dht: Tensor | None,
    scale: float, chunk: int, seq_chunks: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The delta rule's reverse sequential pass (with ``DELTA_BWD_DH_V2`` two launches, ``chunk_delta_dh.py``:
    the intra-chunk dU part for every chunk, then the reverse loop; else ``delta_bwd_dh_kernel``), the first
    launch of both chunked backwards: (dH at every chunk end (B, H, chunks, K, V), dU (B, H, NP, V), the initial state's gradient
    (B, H, K, V), or per sequence with ``seq_chunks``), float32 (dH in W's dtype with ``DELTA_SAVED_LOWP``,
    dU too with ``DELTA_BWD_DU_LOWP``). ``aqk``: per-channel gates' intra-chunk
    q k^T scores (the kernel's GATE 2); None under a gate shared by the channels (GATE 1). ``dht``: the
    final state's gradient (None: zero). q, k, do contiguous; gc the forward's gate cumsum."""
    b, h, n, dk = q.shape
    dv = do.shape[-1]
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    f32, dev = torch.float32, q.device
    # (dH in W's dtype: 16-bit with ``op.DELTA_SAVED_LOWP``, as the forward decided)
    dhs = torch.empty(b, h, n_chunks, dk, dv, dtype=w.dtype if op.DELTA_BWD_DH_V2 else f32, device=dev)
    du_lowp = op.DELTA_BWD_DU_LOWP and op.DELTA_BWD_DH_V2 and w.dtype != f32
    du = torch.empty(b, h, np_, dv, dtype=w.dtype if du_lowp else f32, device=dev)
    n_seq = b if seq_chunks is None else seq_chunks.shape[0] - 1
    dh0 = torch.empty(n_seq, h, dk, dv, dtype=f32, device=dev)
    dht_c = dht.float().contiguous() if dht is not None else dh0
    bv = min(head_block(dv), op.DELTA_BV)
    if op.DELTA_BWD_DH_V2:
        lowp = (
            op.DELTA_BWD_DH_LOWP and q.dtype in (torch.bfloat16, torch.float16) and not IMPORTED_INTERPRETED
        )
        gate = 1 if aqk is None else 2
        bvl = min(head_block(dv), 128)
        if gate == 2:  # the pass's decayed operands (in the dots' dtype)
            kg = torch.empty(b, h, np_, dk, dtype=q.dtype if lowp else f32, device=dev)
            qg = torch.empty_like(kg)
        else:
            kg = qg = du
        op.delta_bwd_du_local_kernel[(n_chunks, cdiv(dv, bvl), b * h)](
            q, k, do, gc, aqk if aqk is not None else du, du, kg, qg, n, np_, dk, dv, float(scale),
            GATE=gate, BT=chunk, BK=head_block(dk), BV=bvl, LOWP=lowp, DOT_PREC=_prec(q),
            **_cfg("delta_bwd_du_local", num_warps=4),
        )  # fmt: skip

        # (sm_90, K = 128, BV = 32, bf16, Triton 3.6: 8 warps spill nothing, 240 / 193 registers; 4 spill.
        # Under a per-head gate, 16-bit, K <= 128: 3 stages (195 registers, 136 KB of shared memory, no
        # spills): 0.95x of one stage's gated_delta forward + backward at 1x32x32768 on the H100
        # (benchmarks/results/h100-2026-11-25-s23); else, or where the GPU refuses 3 stages' shared memory
        # (float32, K > 128, sm_86 / sm_89), one stage as before.)
        def launch(stages: int) -> None:
            cfg = _cfg("delta_bwd_dh_v2", num_warps=8, num_stages=stages) if gate == 1 else _channel_dh_cfg()
            op.delta_bwd_dh_v2_kernel[(cdiv(dv, bv), n_seq * h)](
                q, k, do, gc, w, kg, qg, dht_c, dhs, du, dh0, seq_chunks if seq_chunks is not None else dh0,
                n, np_, dk, dv, b * h, float(scale),
                HAS_DHT=dht is not None, VARLEN=seq_chunks is not None, GATE=gate, BT=chunk,
                BK=head_block(dk), BV=bv, LOWP=lowp, DOT_PREC=_prec(q), **cfg,
            )  # fmt: skip

        _staged(launch, 3 if gate == 1 and lowp and head_block(dk) <= 128 else 1, 1)
        return dhs, du, dh0
    if aqk is None:
        gate, cfg = 1, _cfg("delta_bwd_dh", num_warps=4, num_stages=2)
    else:  # (num_stages=1: 57 KiB of shared memory for sm_90 at K=128, not 189 KiB)
        gate, cfg = 2, _cfg("delta_bwd_dh_channel", num_warps=4, num_stages=1)
    op.delta_bwd_dh_kernel[(cdiv(dv, bv), n_seq * h)](
        q, k, do, gc, w, aqk if aqk is not None else dh0, dht_c, dhs, du, dh0,
        seq_chunks if seq_chunks is not None else dh0, n, np_, dk, dv, b * h, float(scale),
        HAS_DHT=dht is not None, VARLEN=seq_chunks is not None, GATE=gate, BT=chunk, BK=head_block(dk), BV=bv,
        DOT_PREC=_prec(q), **cfg,
    )  # fmt: skip
    return dhs, du, dh0


def delta_bwd_scalar_launch(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, hs: Tensor, w: Tensor, u: Tensor,
    t: Tensor, do: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None = None,
    rq: Tensor | None = None, rk: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:  # fmt: skip
    """The chunked backward of the delta rule under a gate shared by the channels (or none): (dq, dk, dv in
    the inputs' dtypes, dbeta, dg (B, H, N, 1) or None, dh0 float32). A reverse sequential pass over the chunk states (dH,
    dU), then every chunk's gradients in parallel (``chunk_delta_bwd.py``). With ``rq``, ``rk`` (the fused L2
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
    dhs, du, dh0 = _delta_bwd_dh(q, k, do, gc, w, None, dht, scale, chunk, seq_chunks)
    dq, dkk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    db = torch.empty(b, h, n, dtype=f32, device=dev)
    dgc = torch.empty(b, h, np_, dtype=f32, device=dev)
    bvb = min(op.DELTA_BWD_BVB, head_block(dv))
    args = (
        q, k, v, bc, gc, do, hs, dhs, u, du, t, dq, dkk, dvv, db, dgc,
        rq if rq is not None else db, rk if rk is not None else db, n, np_, dk, dv, float(scale),
    )  # fmt: skip
    consts = {"BT": chunk, "BK": head_block(dk), "BV": head_block(dv), "DOT_PREC": prec, "UPCAST": _upcast(q),
              "L2NORM": rq is not None, "BVB": bvb}  # fmt: skip
    with _shared_memory_hint(q):
        if op.DELTA_BWD_SPLIT and op.DELTA_BWD_TRANS and bvb > 0:
            op.delta_bwd_chunk_split_kernel[(n_chunks, b * h)](
                *args, **consts, **_cfg("delta_bwd_chunk", num_warps=8)
            )
        else:
            op.delta_bwd_chunk_kernel[(n_chunks, b * h)](
                *args, **consts, TRANS=op.DELTA_BWD_TRANS, **_cfg("delta_bwd_chunk", num_warps=8)
            )
    dg = None
    if g is not None:  # through the chunk-local cumsum: a reverse cumsum within each chunk
        dg = dgc.view(b, h, n_chunks, chunk).flip(-1).cumsum(-1).flip(-1).reshape(b, h, np_)[:, :, :n, None]
    return dq, dkk, dvv, db, dg, dh0


def delta_bwd_channel_launch(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, hs: Tensor, w: Tensor, u: Tensor, t: Tensor,
    do: Tensor, dht: Tensor | None, scale: float, chunk: int, seq_chunks: Tensor | None = None,
    rq: Tensor | None = None, rk: Tensor | None = None, aqk: Tensor | None = None, bkk: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The chunked backward of the delta rule under per-channel gates (KDA-style): (dq, dk, dv in the
    inputs' dtypes, dbeta, dg (B, H, N, K), dh0 float32). The reverse sequential pass (dH, dU), every
    chunk's state / UT-transform gradients in parallel (``chunk_delta_bwd.py``), then the two intra-chunk
    score backwards (q k^T and the strict k k^T) by split levels (``score_bwd_v2``, 16-bit inputs with
    ``DELTA_SCORE_BWD_V2``) or per 16-row sub-block (``score_bwd_kernel``). With ``rq``,
    ``rk`` (the fused L2 norm: q, k are the normalised rows), dq and dk are returned for the raw q, k: the
    norm's Jacobian is applied by the launch that casts the float32 gradients to the inputs' dtypes
    (``l2norm_bwd_kernel``). ``aqk``, ``bkk``: the forward's intra-chunk q k^T scores and strict k k^T
    scores without beta ((B, H, NP, chunk) fp32, kept with ``op.DELTA_SAVE_SCORES``; None or empty:
    recomputed here)."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    q, k, v, do = (x.contiguous() for x in (q, k, v, do))
    bc = beta.float().expand(b, h, n).contiguous()
    n_chunks = cdiv(n, chunk)
    np_ = n_chunks * chunk
    gc = _delta_cumsum(g, b, h, n, dk, chunk, q.device)  # (the forward's)
    f32, dev = torch.float32, q.device
    prec = _prec(q)
    v2, wide = op.DELTA_INTRA_V2, op.DELTA_INTRA_V2_F32
    need_aqk, need_bkk = aqk is None or aqk.numel() == 0, bkk is None or bkk.numel() == 0
    if need_aqk and need_bkk and v2 and op.DELTA_INTRA_PAIR:
        bkk, aqk = op.intra_scores_pair(q, k, gc, None, chunk, f32_operands=wide)
    if aqk is None or aqk.numel() == 0:
        aqk = op.intra_scores(q, k, gc, None, chunk, strict=False, v2=v2, f32_operands=wide)
    if bkk is None or bkk.numel() == 0:
        bkk = op.intra_scores(k, k, gc, None, chunk, strict=True, v2=v2, f32_operands=wide)
    assert aqk.shape == bkk.shape == (b, h, np_, chunk), (aqk.shape, bkk.shape)
    aqk, bkk = aqk.float().contiguous(), bkk.float().contiguous()
    dhs, du, dh0 = _delta_bwd_dh(q, k, do, gc, w, aqk, dht, scale, chunk, seq_chunks)
    dq = torch.empty(b, h, np_, dk, dtype=f32, device=dev)
    dkk = torch.empty(b, h, np_, dk, dtype=f32, device=dev)
    dgc = torch.empty(b, h, np_, dk, dtype=f32, device=dev)
    dvv = torch.empty_like(v)
    db = torch.empty(b, h, n, dtype=f32, device=dev)
    daqk = torch.empty(b, h, np_, chunk, dtype=f32, device=dev)
    dbkk = torch.empty(b, h, np_, chunk, dtype=f32, device=dev)
    bvb = min(op.DELTA_BWD_BVB, head_block(dv))
    kernel = (
        op.delta_bwd_chunk_channel_split_kernel
        if op.DELTA_BWD_SPLIT_CHANNEL and bvb > 0
        else op.delta_bwd_chunk_channel_kernel
    )
    with _shared_memory_hint(q):
        kernel[(n_chunks, b * h)](
            q, k, v, bc, gc, do, hs, dhs, u, du, t, bkk, dq, dkk, dvv, db, dgc, daqk, dbkk,
            n, np_, dk, dv, float(scale),
            BT=chunk, BK=head_block(dk), BV=head_block(dv), DOT_PREC=prec, UPCAST=_upcast(q), BVB=bvb,
            **_cfg("delta_bwd_channel", num_warps=8),
        )  # fmt: skip
    for x, dp, dx, dy, same in ((q, daqk, dq, dkk, False), (k, dbkk, dkk, dkk, True)):
        if op.DELTA_SCORE_BWD_V2 and q.dtype != torch.float32:  # (float32: the sub-block kernel is faster)
            score_bwd_v2(x, k, gc, dp, dx, dy, dgc, same_out=same, chunk=chunk, prec=prec, upcast=_upcast(q))
            continue
        op.score_bwd_kernel[(np_ // SUB, b * h)](
            x, k, gc, dp, dx, dy, dgc, n, np_, dk,
            SAME_OUT=same, BT=chunk, BS=SUB, BK=head_block(dk), DOT_PREC=prec, UPCAST=_upcast(q), **_cfg("score_bwd", num_warps=4),
        )  # fmt: skip
    # through the chunk-local cumsum: a reverse cumsum within each chunk
    if op.DELTA_FUSED_GLUE:  # one launch (the chunk-end terms are already in dgc's last rows)
        dg = torch.empty(b, h, n, dk, dtype=f32, device=dev)
        bd = min(head_block(dk), 64)
        no_tail = torch.zeros(b * h, n_chunks, dk, dtype=f32, device=dev)  # (the terms are in dgc already)
        op.gate_cumsum_bwd_kernel[(n_chunks, b * h, cdiv(dk, bd))](
            dgc, no_tail, dg, n, np_, dk, BT=chunk, BD=bd, **_cfg("cumsum_bwd", num_warps=4)
        )
    else:
        dg = dgc.view(b, h, n_chunks, chunk, dk).flip(3).cumsum(3).flip(3).reshape(b, h, np_, dk)[:, :, :n]
    if rq is not None and rk is not None:
        dq_raw, dk_raw = l2norm_qk_bwd(q, k, rq, rk, dq, dkk, q.dtype, k.dtype)
        return dq_raw, dk_raw, dvv, db, dg, dh0
    return dq[:, :, :n].to(q.dtype), dkk[:, :, :n].to(k.dtype), dvv, db, dg, dh0


# Imported last: op imports this module, and this module reads op (and the launchers op imports) only at
# call time, so that any of them may be imported first.
from attnlab.kernels.linear import op  # noqa: E402
from attnlab.kernels.linear.launch_scores import chunk_output, gate_cumsum, score_bwd_v2  # noqa: E402
