"""What backends share: the :class:`~attnlab.core.Backend` contract (defined in :mod:`attnlab.core`,
below the registry) and the refusal of dense paths above the size limit."""

from __future__ import annotations

from attnlab.core import Backend, Call, Capabilities, Verdict
from attnlab.settings import settings

__all__ = ["Backend", "Call", "Capabilities", "Verdict", "dense_size_reasons"]


def dense_size_reasons(name: str, call: Call, elements: int) -> list[str]:
    """A refusal when a dense path would materialise ``elements`` score elements above the limit."""
    if elements <= settings.max_dense_elements:
        return []
    return [
        f"{name} would materialise {elements:,} score elements (an N x N tensor), above "
        f"attnlab.settings.max_dense_elements={settings.max_dense_elements:,}; a fast backend of this "
        "method must run it (see their refusals), or raise the limit if you have the memory"
    ]
