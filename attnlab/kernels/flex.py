"""The FlexAttention executor: cached BlockMasks, one compiled kernel for every length.

- BlockMasks are built from a sparsity plan's tables (:meth:`attnlab.plans.Plan.block_mask` calls
  :func:`block_mask_from_tables` once per plan; static plans are cached).
- ``flex_attention`` is compiled once with ``dynamic=True``: sequence lengths are symbolic, and mask
  parameters are captured tensors (see :mod:`attnlab.masks`), so a new length or window does not
  recompile (measured by ``attnlab.bench.recompiles`` and recorded in the benchmark results).
- One kernel is compiled per mask function (per method), dtype and head dim. Dynamo's default limit of
  8 compiled variants per function would fall back to the unfused eager path past 8 methods, so the
  compiled call runs under a scoped ``recompile_limit`` of :data:`RECOMPILE_LIMIT` (restored after).
- Inside a user's ``torch.compile`` region the raw ``flex_attention`` is called, so the outer compile
  traces it into its graph (no nested compile, no graph break).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention, noop_mask

from attnlab.masks import MaskMod

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

#: Compiled variants of flex_attention allowed (methods x dtypes x head dims x GQA on/off).
RECOMPILE_LIMIT = 256

_compiled: dict[str, Callable[..., Any]] = {}


def block_mask_from_tables(
    partial_num: Tensor,
    partial_idx: Tensor,
    full_num: Tensor,
    full_idx: Tensor,
    mask_mod: MaskMod | None,
    n_q: int,
    n_k: int,
    block: tuple[int, int],
    q_tables: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> BlockMask:
    """A BlockMask from per-(batch|1, head|1, query block) tables of partial and full key blocks (int32,
    visited blocks first); ``mask_mod`` decides inside partial blocks (None: every pair).

    ``q_tables``: the same four tables per key block (partial num, indices, full num, indices over query
    blocks), which the backward reads. Given, they are used as they are (the caller derives them from its
    block grids with the same ordering); else ``BlockMask.from_kv_blocks`` derives them from the key-side
    tables by densifying under ``vmap`` and re-sorting, which took most of a first call's BlockMask time
    (about 1 ms of Python and 30 small kernels at any length)."""
    if q_tables is None:
        return BlockMask.from_kv_blocks(
            partial_num,
            partial_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=block,
            mask_mod=mask_mod,
            seq_lengths=(n_q, n_k),
        )
    q_num, q_idx, full_q_num, full_q_idx = q_tables
    return BlockMask(
        seq_lengths=(n_q, n_k),
        kv_num_blocks=partial_num,
        kv_indices=partial_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=block,
        mask_mod=mask_mod if mask_mod is not None else noop_mask,
    )


def compiled_flex() -> Callable[..., Any]:
    """``torch.compile(flex_attention, dynamic=True)``, created on first use."""
    fn = _compiled.get("flex")
    if fn is None:
        fn = torch.compile(flex_attention, dynamic=True)
        _compiled["flex"] = fn
    return fn


#: Tile multiple below which FlexAttention's kernel needs bounds checks (its largest tile side).
DIVISIBLE_BY = 128


def flex_options(n_q: int, n_k: int, gqa: bool, device: torch.device) -> dict[str, Any]:
    """The keyword arguments of one (N_q, N_k, GQA, device) beyond the tensors, made once per call
    signature (:func:`flex_run` then adds nothing per call).

    - ``FORCE_USE_FLEX_ATTENTION``: inductor's flex-decoding template (picked for short queries) found no
      valid config for N_q < 128 with GQA or dynamic shapes on the H100 (torch 2.11: NoValidChoicesError);
      the main kernel handles every length.
    - ``IS_DIVISIBLE`` when both lengths are multiples of 128 (CUDA): compiled with ``dynamic=True``,
      inductor cannot prove it and keeps bounds checks that cost 10-18% at 32K-64K on the H100 against
      a static-shape compile (benchmarks/results/h100-2026-11-22/session4/). Two compiled variants at most.
    """
    options: dict[str, Any] = {"FORCE_USE_FLEX_ATTENTION": True}
    if device.type == "cuda" and n_q % DIVISIBLE_BY == 0 and n_k % DIVISIBLE_BY == 0:
        options["IS_DIVISIBLE"] = True
    return {"enable_gqa": gqa, "kernel_options": options}


def _own_buffers(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """k and v copied where they share memory with q or each other (views of one packed qkv buffer, or
    ``attention(x, x, x)``): inductor's CPU lowering of FlexAttention in torch 2.11 refuses "query, key,
    value are the same buffer" (found on the GPU machine's CPU path, session 19)."""
    qs, ks, vs = (t.untyped_storage().data_ptr() for t in (q, k, v))
    if ks == qs:
        k = k.clone()
    if vs in (qs, ks):
        v = v.clone()
    return k, v


def flex_run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_mask: BlockMask | None,
    score_mod: ScoreMod | None,
    scale: float,
    options: dict[str, Any] | None = None,
    return_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Run FlexAttention (compiled unless already inside a compile); returns (out, lse or None).

    ``options``: :func:`flex_options` of the call (made here when None). ``lse`` is the natural-log sum
    of exp(score) per query row (-inf for rows with no allowed key).
    """
    compiling = torch.compiler.is_compiling()
    fn: Callable[..., Any] = flex_attention if compiling else compiled_flex()  # type: ignore[assignment]
    if not torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # no graph is recorded, but FlexAttention reads the tensors' flags (on a CPU it then refuses:
        # "does not support backward"); dispatch already saw a call without gradients
        q, k, v = q.detach(), k.detach(), v.detach()
    if not compiling and q.device.type == "cpu":
        k, v = _own_buffers(q, k, v)
    if options is None:
        options = flex_options(q.shape[2], k.shape[2], q.shape[1] != k.shape[1], q.device)
    if return_lse:
        options = {**options, "return_aux": AuxRequest(lse=True)}
    if compiling:
        result = fn(q, k, v, block_mask=block_mask, score_mod=score_mod, scale=scale, **options)
    else:  # scoped raise of dynamo's limit (plain set/restore: a third of config.patch's cost per call)
        config = torch._dynamo.config
        old = config.recompile_limit
        config.recompile_limit = max(old, RECOMPILE_LIMIT)
        try:
            result = fn(q, k, v, block_mask=block_mask, score_mod=score_mod, scale=scale, **options)
        finally:
            config.recompile_limit = old
    if return_lse:
        out, aux = result
        return out, aux.lse
    return result, None
