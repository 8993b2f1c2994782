"""Head-layout helpers shared by executors and references."""

from __future__ import annotations

from torch import Tensor


def expand_kv(t: Tensor, heads: int) -> Tensor:
    """Repeat each of the H_kv key/value heads H / H_kv times (head ``h`` uses kv head ``h // group``)."""
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)
