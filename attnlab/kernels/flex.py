"""The FlexAttention executor: cached BlockMasks, one compiled kernel for every length.

- BlockMasks are built from a mask function by :func:`attnlab.masks.block_layout` (chunked, exact
  full/partial tile classification) and cached per (mask key, N_q, N_k, device, block size).
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

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from attnlab.masks import BlockLayout, MaskMod, block_layout

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

#: BlockMask tile size (query rows x key columns); FlexAttention's kernels take multiples of their own.
BLOCK_SIZE = 128
#: How many BlockMasks the cache keeps (least recently used go first).
CACHE_SIZE = 64
#: Compiled variants of flex_attention allowed (methods x dtypes x head dims x GQA on/off).
RECOMPILE_LIMIT = 256

_block_masks: OrderedDict[Hashable, tuple[BlockMask, BlockLayout]] = OrderedDict()
_compiled: dict[str, Callable[..., Any]] = {}
stats = {"block_mask_builds": 0, "block_mask_hits": 0}


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(num, indices) of True tiles per query-block row, True columns first, as FlexAttention wants."""
    num = blocks.sum(dim=-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None], idx[None, None]


def build_block_mask(
    mask_mod: MaskMod, n_q: int, n_k: int, device: torch.device, block: int = BLOCK_SIZE
) -> tuple[BlockMask, BlockLayout]:
    """A BlockMask (broadcast over batch and heads) and the layout it was built from."""
    layout = block_layout(mask_mod, n_q, n_k, device, block, block)
    kv_num, kv_idx = _ordered(layout.partial)
    full_num, full_idx = _ordered(layout.full)
    bm = BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(block, block),
        mask_mod=mask_mod,
        seq_lengths=(n_q, n_k),
    )
    return bm, layout


def cached_block_mask(
    key: Hashable, make_mask: Callable[[], MaskMod], n_q: int, n_k: int, device: torch.device
) -> tuple[BlockMask, BlockLayout]:
    """The BlockMask for ``key`` (which must identify the mask and its parameters), built once.

    Plain dict operations (atomic under the GIL) so that ``torch.compile`` can trace a lookup: inside a
    compiled region a cached BlockMask enters the graph as an input, like one built outside.
    """
    full_key = (key, n_q, n_k, str(device), BLOCK_SIZE)
    hit = _block_masks.get(full_key)
    if hit is not None:
        if not torch.compiler.is_compiling():
            _block_masks.move_to_end(full_key)
            stats["block_mask_hits"] += 1
        return hit
    built = build_block_mask(make_mask(), n_q, n_k, device)
    if not torch.compiler.is_compiling():
        _block_masks[full_key] = built
        stats["block_mask_builds"] += 1
        while len(_block_masks) > CACHE_SIZE:
            _block_masks.popitem(last=False)
    return built


def clear_cache() -> None:
    _block_masks.clear()


def compiled_flex() -> Callable[..., Any]:
    """``torch.compile(flex_attention, dynamic=True)``, created on first use."""
    fn = _compiled.get("flex")
    if fn is None:
        fn = torch.compile(flex_attention, dynamic=True)
        _compiled["flex"] = fn
    return fn


def flex_run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_mask: BlockMask | None,
    score_mod: ScoreMod | None,
    scale: float,
    return_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Run FlexAttention (compiled unless already inside a compile); returns (out, lse or None).

    ``lse`` is the natural-log sum of exp(score) per query row (-inf for rows with no allowed key).
    """
    compiling = torch.compiler.is_compiling()
    fn: Callable[..., Any] = flex_attention if compiling else compiled_flex()  # type: ignore[assignment]
    kwargs: dict[str, Any] = {
        "block_mask": block_mask,
        "score_mod": score_mod,
        "scale": scale,
        "enable_gqa": q.shape[1] != k.shape[1],
        # Inductor's flex-decoding template (picked for short queries) found no valid config for
        # N_q < 128 with GQA or dynamic shapes on the H100 (torch 2.11: NoValidChoicesError); the main
        # kernel handles every length.
        "kernel_options": {"FORCE_USE_FLEX_ATTENTION": True},
    }
    if return_lse:
        kwargs["return_aux"] = AuxRequest(lse=True)
    if compiling:
        result = fn(q, k, v, **kwargs)
    else:  # scoped raise of dynamo's limit (plain set/restore: a third of config.patch's cost per call)
        config = torch._dynamo.config
        old = config.recompile_limit
        config.recompile_limit = max(old, RECOMPILE_LIMIT)
        try:
            result = fn(q, k, v, **kwargs)
        finally:
            config.recompile_limit = old
    if return_lse:
        out, aux = result
        return out, aux.lse
    return result, None
