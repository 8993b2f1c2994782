"""Scaled q . k logits of a decode step's few queries against the KV cache (Triton): the decode methods'
selection scores (tidal, recycled, tokenselect, h2o per step) read the cache once, in its own dtype.

``group_logits(q, k, scale, *, causal, key_mask, index, lo, hi) -> (B, H, N_q, n) float32``::

    out[b, h, i, e] = scale * q[b, h, i] . k[b, h // G, t(b, h // G, e)]        (G = H / H_kv)
    t = lo + e                     (a range: n = hi - lo tokens; hi defaults to N_k, may exceed it)
    t = index[b, h // G, e]        (``index`` (B, H_kv, n) int32 / int64: a gather; only tokens in [lo, hi))

and -inf where the token is not allowed: an index entry < 0, t >= N_k (or, with an index, t outside
[lo, hi)), padding (``key_mask`` (B, N_k) <= 0; any dtype, bool too), and, when ``causal``, a token after
the query (bottom-right: token t is visible to query i iff t <= i + N_k - N_q). The products take the
operands as given (bf16 / fp16 tiles on the tensor cores, fp32 as IEEE fp32; fp32 q against a bf16 cache as
two bf16 products of q's high and low halves, ``MIXED_PREC``), fp32 accumulation: there is no fp32 copy
of K.

``group_logits_kernel``. Grid: (cdiv(n, BLOCK_N), B * H_KV). Program (nb, b*h_kv) loads the K tile of its
BLOCK_N tokens once and multiplies it with the group's GROUP * N_Q query rows (row r: query head
``h_kv * GROUP + r // N_Q``, query ``r % N_Q``, as ``decode_split_kernel`` orders them) in blocks of
BLOCK_M rows (one tl.dot each; one block up to 64 rows, e.g. GQA 4:1 at N_q <= 16), and stores the
masked logits. A batched GEMV: bound by the cache read (B * H_kv * n * D elements) and the logits written
(B * H * N_q * n fp32).

``group_logits_naive``: the same in PyTorch (fp32 products of the operands as given; the twin the tests
compare with). :func:`logit_chunks` splits a call into pieces of query rows (and KV heads) of bounded size
for callers that reduce the logits as they go. Importing this module registers ``attnlab::group_logits``
(a fake-tensor rule: opaque to ``torch.compile``; no host synchronisation and shapes from input shapes
only, so a step built on it can be captured in a CUDA graph).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.kernels.decode.fwd import _dot
from attnlab.kernels.triton_utils import head_block, interpreting, next_power_of_2

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernel then takes CPU tensors only).
IMPORTED_INTERPRETED = interpreting()
#: Tokens per program on a GPU (head dims up to 128; 256 takes half: the K tile stays 32 KiB of bf16).
#: Measured on the H100 (128K, GQA 32:8, D=128, bf16, N_q=1; median of do_bench): 64, 128 and 256 tokens
#: with 4 or 8 warps all within 2% (B=1: 106-109 us, B=8: 753-776 us, against ~95 / ~760 us to read K and
#: write the logits at 3.0 TB/s).
LOGITS_BLOCK_N = 128
#: Query rows per tl.dot (more rows loop over the program's K tile).
LOGITS_MAX_BLOCK_M = 64
LOGITS_WARPS = 4
#: The product when q and k differ in dtype (tokenselect's fp32 fingerprint against a bf16 cache):
#: "split" (fp32 q against bf16 k only: q = hi + lo in bf16, two bf16 tensor-core products with fp32
#: accumulation, k as loaded; other mixes widen to fp32 with IEEE products), "tf32x3" (both widened to fp32 in
#: registers, three tf32 products: about fp32's precision, exact for the bf16 / fp16 operand) or "ieee"
#: (widened, fp32 FMAs). Measured on the H100 at the shape above, fp32 q against bf16 k, B=1 / B=8:
#: split 117 / 837 us, tf32x3 196 / 1465 us (64 tokens per program; 32: 220 / 1649), ieee 1158 / 8915 us
#: (bf16 q: 107 / 756 us); relative error against fp32 products over 8192 tokens: split 1.4e-7,
#: tf32x3 1.7e-7, ieee 0 (fp32 logits of |s| ~ 10 differ by <= 2.3e-5 either way). Equal dtypes: bf16 /
#: fp16 on the tensor cores, fp32 as IEEE fp32.
MIXED_PREC = "split"
#: Tokens per program when both operands are widened (a 128 x 128 fp32 K tile would not fit registers).
MIXED_BLOCK_N = 64


@triton.jit
def group_logits_kernel(
    Q, K, IDX, KMASK, OUT,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_ib, stride_ih, stride_mb,
    H_KV, N_Q, N_K, N, LO, HI, HEAD_D, scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_IDX: tl.constexpr, HAS_KMASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, WIDEN: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    nb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)
    hk = bh % H_KV
    offs_e = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    e_ok = offs_e < N
    if HAS_IDX:
        i_base = IDX + b * stride_ib + hk.to(tl.int64) * stride_ih
        tok = tl.load(i_base + offs_e, mask=e_ok, other=-1).to(tl.int64)
        tok_ok = e_ok & (tok >= 0) & (tok >= LO) & (tok < HI) & (tok < N_K)
    else:
        tok = (LO + offs_e).to(tl.int64)
        tok_ok = e_ok & (tok < N_K)
    if HAS_KMASK:
        tok_ok = tok_ok & (tl.load(KMASK + b * stride_mb + tok, mask=tok_ok, other=0) > 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    k_ptr = K + b * stride_kb + hk.to(tl.int64) * stride_kh + tok[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(k_ptr, mask=tok_ok[:, None] & d_ok[None, :], other=0.0)  # once for every row of the group
    if WIDEN:  # (q and k of different dtypes: both in fp32, in registers)
        k = k.to(tl.float32)
    kt = tl.trans(k)
    n_rows = GROUP * N_Q
    out_base = OUT + bh.to(tl.int64) * n_rows * N  # (B, H, N_Q, N) contiguous = (B * H_KV, GROUP * N_Q, N)
    for m0 in range(0, n_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        head = hk * GROUP + rows // N_Q
        qi = rows % N_Q
        q_ptr = (
            Q
            + b * stride_qb
            + head[:, None].to(tl.int64) * stride_qh
            + qi[:, None] * stride_qn
            + offs_d[None, :]
        )
        q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if WIDEN:
            q = q.to(tl.float32)
        if SPLIT:  # fp32 q against bf16 k: q = hi + lo, two bf16 products with fp32 accumulation
            q_hi = q.to(tl.bfloat16)
            q_lo = (q - q_hi.to(tl.float32)).to(tl.bfloat16)
            s = (_dot(q_hi, kt, DOT_PREC, UPCAST) + _dot(q_lo, kt, DOT_PREC, UPCAST)) * scale
        else:
            s = _dot(q, kt, DOT_PREC, UPCAST) * scale
        allowed = tok_ok[None, :]
        if CAUSAL:
            allowed = allowed & (tok[None, :] <= (qi + N_K - N_Q)[:, None])
        s = tl.where(allowed, s, float("-inf"))
        o_ptr = out_base + rows[:, None].to(tl.int64) * N + offs_e[None, :]
        tl.store(o_ptr, s, mask=row_ok[:, None] & e_ok[None, :])


def _width(k: Tensor, index: Tensor | None, lo: int, hi: int | None) -> tuple[int, int]:
    """(n, hi) with hi resolved (N_k by default)."""
    hi = k.shape[2] if hi is None else int(hi)
    if lo < 0 or (index is None and hi < lo):
        raise ValueError(f"group_logits: needs 0 <= lo <= hi, got lo={lo}, hi={hi}")
    return (hi - lo if index is None else int(index.shape[2])), hi


def _check(q: Tensor, k: Tensor, key_mask: Tensor | None, index: Tensor | None) -> None:
    b, h, _, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != d or k.shape[1] < 1 or h % k.shape[1]:
        raise ValueError(
            f"group_logits: k {tuple(k.shape)} must be (B, H_kv, N_k, D) for q {tuple(q.shape)}, H % H_kv == 0"
        )
    if index is not None and (
        index.dim() != 3
        or index.shape[:2] != k.shape[:2]
        or index.dtype not in (torch.int32, torch.int64)
        or index.device != q.device
    ):
        raise ValueError(
            f"group_logits: index {tuple(index.shape)} {index.dtype} must be (B, H_kv, n) = ({b}, "
            f"{k.shape[1]}, n) int32 or int64 on {q.device}"
        )
    if key_mask is not None and (key_mask.shape != (b, k.shape[2]) or key_mask.device != q.device):
        raise ValueError(
            f"group_logits: key_mask {tuple(key_mask.shape)} must be (B, N_k) = ({b}, {k.shape[2]}) on "
            f"{q.device}"
        )


def group_logits_launch(
    q: Tensor,
    k: Tensor,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
    index: Tensor | None,
    lo: int,
    hi: int | None,
) -> Tensor:
    """:func:`group_logits` through the Triton kernel (one launch)."""
    _check(q, k, key_mask, index)
    n, hi = _width(k, index, lo, hi)
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    out = torch.empty(b, h, n_q, n, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if index is not None and index.stride(-1) != 1:
        index = index.contiguous()
    if key_mask is not None:
        if key_mask.dtype == torch.bool:
            key_mask = key_mask.view(torch.uint8)  # (the same bytes: no copy)
        if key_mask.stride(-1) != 1:
            key_mask = key_mask.contiguous()
    group = h // h_kv
    block_d = head_block(d)
    block_m = max(16, min(LOGITS_MAX_BLOCK_M, next_power_of_2(group * n_q)))
    block_n = LOGITS_BLOCK_N if block_d <= 128 else LOGITS_BLOCK_N // 2
    if IMPORTED_INTERPRETED:
        block_n = 16
    mixed = q.dtype != k.dtype
    split = mixed and MIXED_PREC == "split" and q.dtype == torch.float32 and k.dtype == torch.bfloat16
    widen = mixed and not split
    if widen:
        block_n = min(block_n, MIXED_BLOCK_N)
    fp32 = widen or (not split and q.dtype == torch.float32)
    # (the interpreter multiplies bf16 / fp16 tiles as raw integers: there they go into the product as fp32)
    upcast = IMPORTED_INTERPRETED and not fp32
    idx = index if index is not None else out
    kmask = key_mask if key_mask is not None else out
    qs, ks = q.stride(), k.stride()
    group_logits_kernel[(triton.cdiv(n, block_n), b * h_kv)](
        q, k, idx, kmask, out,
        qs[0], qs[1], qs[2],
        ks[0], ks[1], ks[2],
        idx.stride(0), idx.stride(1), kmask.stride(0),
        h_kv, n_q, n_k, n, int(lo), hi, d, float(scale),
        GROUP=group, CAUSAL=bool(causal), HAS_IDX=index is not None, HAS_KMASK=key_mask is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PREC=(("ieee" if MIXED_PREC == "split" else MIXED_PREC) if widen else "ieee") if fp32 else "tf32",
        UPCAST=upcast, WIDEN=widen, SPLIT=split,
        num_warps=LOGITS_WARPS,
    )  # fmt: skip
    return out


@torch.library.custom_op("attnlab::group_logits", mutates_args=())
def group_logits_op(
    q: Tensor,
    k: Tensor,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
    index: Tensor | None,
    lo: int,
    hi: int,
) -> Tensor:
    return group_logits_launch(q, k, scale, causal, key_mask, index, lo, hi)


@group_logits_op.register_fake
def _(
    q: Tensor,
    k: Tensor,
    scale: float,
    causal: bool,
    key_mask: Tensor | None,
    index: Tensor | None,
    lo: int,
    hi: int,
) -> Tensor:
    n = hi - lo if index is None else index.shape[2]
    return q.new_empty((*q.shape[:3], n), dtype=torch.float32)


def group_logits(
    q: Tensor,
    k: Tensor,
    scale: float,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    index: Tensor | None = None,
    lo: int = 0,
    hi: int | None = None,
) -> Tensor:
    """(B, H, N_q, n) float32 logits ``scale * q . k`` of every query row against the tokens [lo, hi) of its
    KV head (or the tokens ``index`` lists), -inf where not allowed (module docstring). q (B, H, N_q, D),
    k (B, H_kv, N_k, D), any dtype each (bf16 / fp16 / fp32), D <= 256. Through the custom op inside
    ``torch.compile``, the launcher directly otherwise (no host synchronisation either way)."""
    hi = k.shape[2] if hi is None else int(hi)
    if torch.compiler.is_compiling():
        return group_logits_op(q, k, float(scale), bool(causal), key_mask, index, int(lo), hi)
    return group_logits_launch(q, k, float(scale), bool(causal), key_mask, index, int(lo), hi)


def group_logits_naive(
    q: Tensor,
    k: Tensor,
    scale: float,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    index: Tensor | None = None,
    lo: int = 0,
    hi: int | None = None,
) -> Tensor:
    """:func:`group_logits` in plain PyTorch (fp32 products of the operands as given; dense, for tests)."""
    _check(q, k, key_mask, index)
    n, hi = _width(k, index, lo, hi)
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    if index is None:
        tok = torch.arange(lo, hi, device=q.device).expand(b, h_kv, n)
        ok = tok < n_k
    else:
        tok = index.long()
        ok = (tok >= 0) & (tok >= lo) & (tok < hi) & (tok < n_k)
    safe = torch.where(ok, tok, torch.zeros_like(tok))
    if key_mask is not None:
        ok = ok & (key_mask.gather(1, safe.flatten(1)).view(safe.shape) > 0)
    kg = k.gather(2, safe[..., None].expand(-1, -1, -1, d)).float()  # (B, H_kv, n, D)
    qg = q.float().view(b, h_kv, h // h_kv, n_q, d)
    s = torch.einsum("bjgrd,bjnd->bjgrn", qg, kg) * scale
    allowed = ok[:, :, None, None, :]
    if causal:
        pos = torch.arange(n_q, device=q.device) + (n_k - n_q)
        allowed = allowed & (tok[:, :, None, None, :] <= pos[:, None])
    return s.masked_fill(~allowed, float("-inf")).view(b, h, n_q, n)


class Chunk(NamedTuple):
    """Query rows [r0, r1) of KV heads [kv0, kv1) (their query heads [kv0 * G, kv1 * G)) and their logits
    (B, (kv1 - kv0) * G, r1 - r0, n) float32."""

    kv0: int
    kv1: int
    r0: int
    r1: int
    logits: Tensor


def logit_chunks(
    q: Tensor,
    k: Tensor,
    scale: float,
    max_elements: int,
    *,
    causal: bool = True,
    key_mask: Tensor | None = None,
    index: Tensor | None = None,
    lo: int = 0,
    hi: int | None = None,
) -> Iterator[Chunk]:
    """:func:`group_logits` in pieces of at most ``max_elements`` logits where one piece of a single query
    row of one KV group allows it (one piece, one launch, when the whole fits): query rows first, then KV
    heads. A piece of query rows [r0, r1) runs on the cache cut to its last visible token (causal), so
    its rows keep their bottom-right positions; the logits are those of the whole call's rows."""
    b, h, n_q, _ = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    g = h // h_kv
    hi = n_k if hi is None else int(hi)
    n = hi - lo if index is None else index.shape[2]
    per_row = b * h * max(n, 1)
    if per_row * n_q <= max_elements:
        rows, heads = n_q, h_kv
    elif per_row <= max_elements:
        rows, heads = max_elements // per_row, h_kv
    else:
        rows, heads = 1, max(1, max_elements // (b * g * max(n, 1)))
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        kr, km = k, key_mask
        if causal and r1 < n_q:  # rows [r0, r1) see no token past N_k - (N_q - r1)
            cut = max(0, n_k - (n_q - r1))
            kr = k[:, :, :cut]
            km = None if key_mask is None else key_mask[:, :cut]
        qr = q[:, :, r0:r1]
        for j0 in range(0, h_kv, heads):
            j1 = min(h_kv, j0 + heads)
            if heads < h_kv:
                qj, kj = qr[:, j0 * g : j1 * g], kr[:, j0:j1]
                ij = None if index is None else index[:, j0:j1]
            else:
                qj, kj, ij = qr, kr, index
            logits = group_logits(qj, kj, scale, causal=causal, key_mask=km, index=ij, lo=lo, hi=hi)
            yield Chunk(j0, j1, r0, r1, logits)
