"""Packed sequences (FlashAttention's varlen layout, batch 1) on the block-sparse executor.

:func:`block_sparse_varlen` joins the sequences' plans into one block-diagonal plan
(:func:`attnlab.plans.executor.varlen_plan`) and runs the executor's kernels on its tables unchanged. It lives
with the backends because it uses both layers below them: plans (built on the host) and kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnlab.kernels.block_sparse.op import TILE_SIZES, block_sparse_attention
from attnlab.plans.executor import executor_tables, varlen_plan


def check_cu_seqlens(cu: Tensor, total: int, name: str) -> list[int]:
    """``cu`` (int32/int64, 1-D, S + 1 entries: 0, then non-decreasing, ending at ``total``) as a list."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 cumulative lengths, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must hold integers (int32, as FlashAttention's varlen), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with S + 1 >= 2 entries (0, then each sequence's end), "
                         f"got shape {tuple(cu.shape)}")  # fmt: skip
    vals = [int(x) for x in cu.tolist()]
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]} ({vals[:4]}...)")
    bad = [i for i in range(1, len(vals)) if vals[i] < vals[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(f"{name} must be non-decreasing (each entry a sequence's end); entry {i} is "
                         f"{vals[i]} < entry {i - 1} = {vals[i - 1]}")  # fmt: skip
    if vals[-1] != total:
        raise ValueError(f"{name} ends at {vals[-1]}, but the packed tensor has {total} tokens: the last "
                         "entry must be the total length")  # fmt: skip
    return vals


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
        raise ValueError(f"varlen takes the packed layout q (1, H, T_q, D), k/v (1, H_kv, T_k, D); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")  # fmt: skip
    if block not in TILE_SIZES:
        raise ValueError(f"block={block!r}; the executor takes tiles of {TILE_SIZES}")
    cu_q = check_cu_seqlens(cu_seqlens_q, q.shape[2], "cu_seqlens_q")
    cu_k = check_cu_seqlens(cu_seqlens_k, k.shape[2], "cu_seqlens_k")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_q) - 1} sequences, cu_seqlens_k {len(cu_k) - 1}: they must "
                         "describe the same sequences")  # fmt: skip
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
    return block_sparse_attention(q, k, v, executor_tables(plan).as_args(), scale, False)
