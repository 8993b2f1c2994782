"""Decode-time KV selection (family ``decode``): a few queries against a long cache, a selector that picks
the cache entries each KV group reads, and an executor over them (:mod:`attnlab.backends.decode_select`).

Each method is one module, imported below; each defines its ``SPEC``; importing this package registers
them (the registry parity compares their outputs with the reference on decode-shaped calls; their own
tests compare the selections). Shared conventions
(budgets in tokens, exact fallback, per-KV-head selection, state, ``key_mask`` for padding):
:mod:`attnlab.catalog.decode._common`.

How a model integration drives them (one state per layer and sequence batch, except ``tidal``):

- ``page_topk``, ``retrieval_heads_kv``, ``tokenselect``: decode calls (a prefill runs a prefill method:
  ``retrieval_heads_kv`` and ``tokenselect`` refuse a call with more queries than their recent window /
  local window when they select, see :mod:`attnlab.catalog.decode._common`); the first decode call gets
  ``state=None`` and builds the state from the whole cache (page_topk: O(N_k) once), each later call passes
  the previous call's ``Result.state``.
- ``snapkv``, ``h2o``: the call with ``state=None`` decides what to keep and runs exact attention; route the
  prefill itself to the method so that its last queries are the observation window (SnapKV) and every
  prompt query votes (H2O; O(N^2) in PyTorch chunks, slow at 128K). A first decode call decides from its
  own few queries instead. ``h2o`` with ``per_step=True`` (the H2O paper's loop) decides again at every
  call, from the scores accumulated so far; each call passes the previous call's state.
- ``recycled``: the call with ``state=None`` is a full step; the schedule counts calls.
- ``tidal``: one state per decode step shared by the layers in order (see its module docstring); its prefill
  is dense (a "reuse" call with a state takes at most as many queries as the state holds positions).

The state objects (:mod:`attnlab.state`) hold tensors of the batch's shape: reorder or crop the batch
(beam search) and the state must be rebuilt (``state=None``). A state belongs to the method that made it:
recycled, tokenselect and tidal share :class:`attnlab.state.reuse.TokenSet`, which names its method, and
each refuses another's (InputError).
"""
# isort: skip_file

from attnlab.catalog.decode import page_topk
from attnlab.catalog.decode import retrieval_heads_kv
from attnlab.catalog.decode import snapkv
from attnlab.catalog.decode import h2o
from attnlab.catalog.decode import recycled
from attnlab.catalog.decode import tokenselect
from attnlab.catalog.decode import tidal

from attnlab.core import MethodSpec
from attnlab.registry import register_missing

SPECS: tuple[MethodSpec, ...] = (
    page_topk.SPEC,
    retrieval_heads_kv.SPEC,
    snapkv.SPEC,
    h2o.SPEC,
    recycled.SPEC,
    tokenselect.SPEC,
    tidal.SPEC,
)


register_missing(SPECS)


def register_methods() -> list[str]:
    """Register the decode methods not yet registered (importing this package registers them; this is kept
    for code that removed them). Returns the names registered now."""
    return register_missing(SPECS)


__all__ = [
    "SPECS",
    "h2o",
    "page_topk",
    "recycled",
    "register_methods",
    "retrieval_heads_kv",
    "snapkv",
    "tidal",
    "tokenselect",
]
