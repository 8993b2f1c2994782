"""Rows of bits: bool matrices packed into 64-bit words, and their distinct rows numbered by first
occurrence, on the rows' device with a constant number of host synchronisations (the executor's tile
patterns, :mod:`attnlab.plans.executor` and :mod:`attnlab.plans.blocks`)."""

from __future__ import annotations

import torch
from torch import Tensor

#: :func:`_row_hash_multipliers` per (words, device): made and copied to the device once per process
_MULTIPLIERS: dict[tuple[int, torch.device], Tensor] = {}


def _row_hash_multipliers(words: int, device: torch.device) -> Tensor:
    """Odd 64-bit multipliers of :func:`distinct_words`' row hash, one per word (a fixed seed: the same
    rows give the same hashes); kept per device, so the host-to-device copy (a synchronisation from
    pageable memory) happens once per width and device, not per call."""
    key = (words, torch.device(device))
    mult = _MULTIPLIERS.get(key)
    if mult is None:
        g = torch.Generator().manual_seed(0x9E3779B9)
        mult = (torch.randint(0, 2**62, (words,), generator=g, dtype=torch.int64) * 2 + 1).to(device)
        if len(_MULTIPLIERS) < 64:
            _MULTIPLIERS[key] = mult
    return mult


def packed_rows(m: Tensor) -> Tensor:
    """The rows of a bool (T, L) matrix as int64 (T, ceil(L / 64)) words, 64 columns each (zero padded);
    :func:`unpacked_rows` inverts it."""
    t, n = m.shape
    bits = torch.nn.functional.pad(m.to(torch.uint8), (0, (-n) % 64)).view(t, -1, 8)
    ones = torch.ones(8, dtype=torch.uint8, device=m.device)  # (made on the device: no host copy)
    powers = torch.bitwise_left_shift(ones, torch.arange(8, dtype=torch.uint8, device=m.device))
    return (bits * powers).sum(-1, dtype=torch.uint8).view(torch.int64)


def unpacked_rows(words: Tensor, n: int) -> Tensor:
    """uint8 (T, n) 0 / 1: the first ``n`` columns of the rows that :func:`packed_rows` packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    bits = (words.contiguous().view(torch.uint8)[..., None] >> shifts) & 1  # (T, 8W, 8)
    return bits.reshape(words.shape[0], -1)[:, :n]


def distinct_words(words: Tensor, hashed: bool | None = None) -> tuple[Tensor, Tensor]:
    """(first, inverse) of the rows of an int64 (T, W) matrix: ``first`` the index of each distinct row's
    first occurrence, ascending, and ``inverse`` each row's id, the distinct rows numbered by first
    occurrence (so the ids depend on the rows only, not on the device or the route). ``hashed``: hash each
    row to one int64 and deduplicate the hashes, then compare every row with its group's representative,
    exactly, falling back to ``unique(dim=0)`` on a collision; else ``unique(dim=0)``, which sorts the
    rows (of the unpacked uint8 tile masks it took 0.6 s on the H100 for a per-head plan at 8K; on the
    CPU it is the faster route). Default: hashed off the CPU. A constant number of host syncs (the
    uniques' sizes, the collision check)."""
    t, dev = words.shape[0], words.device
    if t == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.int64, device=dev)
    inverse = None
    use_hash = dev.type != "cpu" if hashed is None else hashed
    if use_hash:
        h = (words * _row_hash_multipliers(words.shape[1], dev)).sum(-1)  # (int64 wraps: a hash, checked)
        keys, inverse = torch.unique(h, return_inverse=True)
        first = _firsts(inverse, keys.shape[0])
        if not bool((words == words[first[inverse]]).all()):  # a collision: two distinct rows share a hash
            inverse = None
    if inverse is None:
        uniq, inverse = torch.unique(words, dim=0, return_inverse=True)
        first = _firsts(inverse, uniq.shape[0])
    order = torch.argsort(first)  # the groups by first occurrence
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=dev)
    return first[order], rank[inverse]


def _firsts(inverse: Tensor, groups: int) -> Tensor:
    """The smallest row index of each of ``groups`` groups (``inverse``: each row's group)."""
    t = inverse.shape[0]
    first = torch.full((groups,), t, dtype=torch.int64, device=inverse.device)
    return first.scatter_reduce_(0, inverse, torch.arange(t, device=inverse.device), reduce="amin")
