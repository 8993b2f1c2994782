"""What the decode methods share: their patterns, the budget rule, and the dense reference of a selection.

Conventions of every decode method (family ``decode``):

- q (B, H, N_q, D) holds the step's few queries (N_q = 1..16 in decoding; any N_q is defined), k/v
  (B, H_kv, N_k, D) the whole cache; causal, bottom-right aligned: query ``i`` sits at position
  ``i + N_k - N_q`` and sees tokens at or before it.
- Budgets are in tokens (so methods compare at equal cost): the tokens each (batch, KV head) attends to.
  A budget >= N_k runs exact causal attention (nothing to select), and the method's state is still
  brought up to date, so a short cache that grows past the budget continues seamlessly.
- Selections are per KV head: the query heads of a GQA group attend to the same tokens (each method says
  how their scores combine), so the fast path reads each selected K/V tile once per group.
- Stateful: ``attnlab.attention(..., state=s)`` returns a Result whose ``state`` goes into the next step;
  ``state=None`` starts a new sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.backends.decode_select import Selection
from attnlab.kernels.heads import expand_kv
from attnlab.patterns import Pattern
from attnlab.reference import masked_softmax_attention

#: Decode methods define causal attention only (self for N_q = N_k, cross otherwise).
CAUSAL_PATTERNS = frozenset({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS})


def causal_mask(n_q: int, n_k: int, device: torch.device) -> Tensor:
    """(N_q, N_k) bool, bottom-right aligned: key j <= i + N_k - N_q."""
    pos = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    return torch.arange(n_k, device=device)[None, :] <= pos


def attend_reference(
    q: Tensor, k: Tensor, v: Tensor, token_mask: Tensor | None, *, scale: float, upcast: bool
) -> Tensor:
    """Causal softmax attention restricted to ``token_mask`` (B, H_kv, N_k) bool of selected cache tokens
    (None: every token). Rows with no allowed token give 0."""
    n_q, n_k = q.shape[2], k.shape[2]
    mask = causal_mask(n_q, n_k, q.device)
    if token_mask is not None:
        mask = expand_kv(token_mask, q.shape[1])[:, :, None, :] & mask
    return masked_softmax_attention(q, k, v, scale=scale, mask=mask, upcast=upcast)


def selection_reference(
    q: Tensor, k: Tensor, v: Tensor, sel: Selection | None, *, scale: float, upcast: bool
) -> Tensor:
    """:func:`attend_reference` over a selection's tokens (None: exact)."""
    return attend_reference(
        q, k, v, None if sel is None else sel.token_mask(k.shape[2]), scale=scale, upcast=upcast
    )


def require_causal(method: str, causal: bool) -> None:
    if not causal:
        raise ValueError(f"method {method!r} is defined for causal decoding only (pass causal=True)")
