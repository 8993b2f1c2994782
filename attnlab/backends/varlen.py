"""Packed sequences (FlashAttention's varlen layout, batch 1): the checks of ``cu_seqlens``, the slicing of
a method's tensor inputs per sequence, and the block-sparse executor over packed sequences.

:func:`packing_of` turns ``cu_seqlens_q``/``cu_seqlens_k`` into a :class:`~attnlab.core.Packing` (every
error names what was given and expected). :func:`sequence_inputs` cuts a method's tensor inputs to one
sequence along the token axes they declare (``N_q``, ``N_k``). :func:`block_sparse_varlen` joins the
sequences' plans into one block-diagonal plan (:func:`attnlab.plans.executor.varlen_plan`) and runs the
executor's kernels on its tables unchanged. It lives with the backends because it uses both layers below
them: plans (built on the host) and kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from attnlab.core import Packing, TensorInput
from attnlab.errors import InputError
from attnlab.plans.executor import executor_tables, varlen_plan


def _op() -> Any:
    """The executor's op module, imported on first use (it imports Triton: nothing at ``import attnlab``)."""
    from attnlab.kernels.block_sparse import op

    return op


class CuSeqlensTypeError(InputError, TypeError):
    """``cu_seqlens`` of the wrong type or dtype (an :class:`InputError` that is also a TypeError)."""


def check_cu_seqlens(cu: Tensor, total: int, name: str) -> list[int]:
    """``cu`` (int32/int64, 1-D, S + 1 entries: 0, then non-decreasing, ending at ``total``) as a list.

    Reads the tensor on the host (one device synchronisation when it lives on a GPU)."""
    if not isinstance(cu, Tensor):
        raise CuSeqlensTypeError(
            f"{name} must be a torch.Tensor of int32 cumulative lengths, got {type(cu).__name__}"
        )
    if cu.dtype not in (torch.int32, torch.int64):
        raise CuSeqlensTypeError(
            f"{name} must hold integers (int32 or int64, as FlashAttention's varlen), got {cu.dtype}"
        )
    if cu.dim() != 1 or cu.numel() < 2:
        raise InputError(f"{name} must be 1-D with S + 1 >= 2 entries (0, then each sequence's end), "
                         f"got shape {tuple(cu.shape)}")  # fmt: skip
    vals = [int(x) for x in cu.tolist()]
    if vals[0] != 0:
        raise InputError(f"{name} must start at 0, got {vals[0]} ({vals[:4]}...)")
    bad = [i for i in range(1, len(vals)) if vals[i] < vals[i - 1]]
    if bad:
        i = bad[0]
        raise InputError(f"{name} must be non-decreasing (each entry a sequence's end); entry {i} is "
                         f"{vals[i]} < entry {i - 1} = {vals[i - 1]}")  # fmt: skip
    if vals[-1] != total:
        raise InputError(f"{name} ends at {vals[-1]}, but the packed tensor has {total} tokens: the last "
                         "entry must be the total length")  # fmt: skip
    return vals


def packing_of(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor | None, q: Tensor, k: Tensor) -> Packing:
    """The :class:`Packing` of a varlen call: q (1, H, T_q, D) and k (1, H_kv, T_k, D) packed by
    ``cu_seqlens_q`` and ``cu_seqlens_k`` (None: the same as ``cu_seqlens_q``, packed self-attention).
    Raises :class:`InputError` naming what was given and what was expected."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != 1 or k.shape[0] != 1:
        raise InputError(
            f"packed sequences (cu_seqlens) take the layout q (1, H, T_q, D), k/v (1, H_kv, T_k, D): the "
            f"sequences back to back along dim 2 and batch 1; got q {tuple(q.shape)}, k {tuple(k.shape)}. "
            "Concatenate the sequences along the sequence dim (torch.cat(seqs, dim=2))"
        )
    cu_q = check_cu_seqlens(cu_seqlens_q, q.shape[2], "cu_seqlens_q")
    if cu_seqlens_k is None:
        if k.shape[2] != q.shape[2]:
            raise InputError(
                f"cu_seqlens_k is needed when q and k have different totals (T_q={q.shape[2]}, "
                f"T_k={k.shape[2]}); without it the key sequences are those of cu_seqlens_q"
            )
        cu_k = cu_q
    else:
        cu_k = check_cu_seqlens(cu_seqlens_k, k.shape[2], "cu_seqlens_k")
    if len(cu_q) != len(cu_k):
        raise InputError(f"cu_seqlens_q has {len(cu_q) - 1} sequences, cu_seqlens_k {len(cu_k) - 1}: they must "
                         "describe the same sequences (one entry more than the sequence count each)")  # fmt: skip
    return Packing(tuple(cu_q), tuple(cu_k))


def sequence_inputs(
    declared: tuple[TensorInput, ...], extra: Mapping[str, Tensor], packing: Packing, s: int
) -> dict[str, Tensor]:
    """The tensor inputs of sequence ``s``: each input cut along the dims it declares as ``N_q`` (to the
    sequence's queries) or ``N_k`` (to its keys); a broadcast dim of size 1 and every other dim as given."""
    q0, q1, k0, k1 = packing.bounds(s)
    out = dict(extra)
    for spec in declared:
        t = extra.get(spec.name)
        if t is None:
            continue
        for dim, sym in enumerate(spec.shape):
            if sym in ("N_q", "N_k") and not (spec.broadcast and t.shape[dim] == 1):
                lo, hi = (q0, q1) if sym == "N_q" else (k0, k1)
                t = t.narrow(dim, lo, hi - lo)
        out[spec.name] = t
    return out


def packed_tables(
    packing: Packing, plans: list[Any], causal: bool, block: int, device: torch.device
) -> tuple[Tensor, ...] | None:
    """The executor's tables of the sequences' plans joined block-diagonally (one launch), or None when
    they cannot be joined: a plan in other tiles than ``block`` x ``block``, with token columns, or with
    a head count other than 1 or its siblings'."""
    packable = block in _op().TILE_SIZES and all(
        p is None or (p.block_q == p.block_k == block and p.columns is None and p.full.shape[0] == 1)
        for p in plans
    )
    if not packable or len({p.full.shape[1] for p in plans if p is not None} - {1}) > 1:
        return None
    plan = varlen_plan(list(packing.cu_q), list(packing.cu_k), plans, causal, block, device)
    return executor_tables(plan).as_args()


def block_sparse_packed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    packing: Packing,
    plans: list[Any],
    *,
    causal: bool,
    scale: float,
    block: int,
    tables: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """The block-sparse executor over packed sequences given each sequence's plan (None: dense; in the
    sequence's own coordinates): (out (1, H, T_q, D), lse (1, H, T_q)). ``tables``: the joined plan's
    (:func:`packed_tables`, when the caller kept them), else they are built here. Plans that can be
    joined run in one launch; otherwise (token columns, other tiles) each sequence runs on the executor
    alone with its own plan."""
    if tables is None:
        tables = packed_tables(packing, plans, causal, block, q.device)
    if tables is not None:
        return _op().block_sparse_attention(q, k, v, tables, scale, False)
    outs, lses = [], []
    for s, p in enumerate(plans):
        q0, q1, k0, k1 = packing.bounds(s)
        qs, ks, vs = q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]
        if q1 == q0 or k1 == k0:
            outs.append(q.new_zeros((*qs.shape[:3], v.shape[-1])))
            lses.append(torch.full(qs.shape[:3], float("-inf"), device=q.device))
            continue
        if p is None:
            p = varlen_plan([0, q1 - q0], [0, k1 - k0], [None], causal, block, q.device)
            o, lse = _op().block_sparse_attention(qs, ks, vs, executor_tables(p).as_args(), scale, False)
        else:
            o, lse = _op().block_sparse_attention(qs, ks, vs, executor_tables(p).as_args(), scale, causal)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def block_sparse_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    causal: bool,
    plan_fn: Callable[[Tensor, Tensor, bool], Any] | None = None,
    scale: float | None = None,
    block: int = 128,
) -> tuple[Tensor, Tensor]:
    """Attention over packed sequences on the block-sparse executor: (out (1, H, T_q, D), lse (1, H, T_q)).

    q (1, H, T_q, D), k and v (1, H_kv, T_k, D) hold S sequences back to back: sequence ``s`` has queries
    ``cu_seqlens_q[s] : cu_seqlens_q[s+1]`` and keys ``cu_seqlens_k[s] : cu_seqlens_k[s+1]`` (int32 or int64
    cumulative lengths, FlashAttention's varlen convention; empty sequences allowed). Attention never
    crosses a sequence boundary; with ``causal`` each sequence is bottom-right aligned on its own (query
    ``t`` of a sequence at ``t + n_k - n_q``); rows with no allowed key give out 0, lse -inf.

    ``plan_fn(q_s, k_s, causal) -> Plan`` gives a sequence's plan in its own coordinates (batch 1, heads 1,
    H_kv or H, ``block`` x ``block`` tiles, no token columns), e.g. a dynamic estimator run per sequence;
    None runs each sequence densely. The sequences' plans become one block-diagonal plan over the packed
    tokens (:func:`attnlab.plans.executor.varlen_plan`: tiles straddling a boundary are partial, with a
    token mask checking segment ids), so the executor's kernels run it unchanged; differentiable in
    q, k, v like :func:`block_sparse_attention`. ``block``: the tile size (16..256, a power of two).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
        raise InputError(f"varlen takes the packed layout q (1, H, T_q, D), k/v (1, H_kv, T_k, D); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")  # fmt: skip
    if block not in _op().TILE_SIZES:
        raise InputError(f"block={block!r}; the executor takes tiles of {_op().TILE_SIZES}")
    packing = packing_of(cu_seqlens_q, cu_seqlens_k, q, k)
    cu_q, cu_k = list(packing.cu_q), list(packing.cu_k)
    plans: list[Any] = []
    for s in range(len(cu_q) - 1):
        empty = cu_q[s + 1] == cu_q[s] or cu_k[s + 1] == cu_k[s]
        if plan_fn is None or empty:
            plans.append(None)
        else:
            qs, ks = q[:, :, cu_q[s] : cu_q[s + 1]], k[:, :, cu_k[s] : cu_k[s + 1]]
            plans.append(plan_fn(qs, ks, causal))
    plan = varlen_plan(cu_q, cu_k, plans, causal, block, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _op().block_sparse_attention(q, k, v, executor_tables(plan).as_args(), scale, False)
