"""What the decode methods share: their patterns, the budget rule, and the dense reference of a selection.

Conventions of every decode method (family ``decode``):

- q (B, H, N_q, D) holds the step's few queries (N_q = 1..16 in decoding), k/v (B, H_kv, N_k, D) the whole
  cache; causal, bottom-right aligned: query ``i`` sits at position ``i + N_k - N_q`` and sees tokens at or
  before it. Any N_q is defined (a first call may be the prefill: snapkv, h2o, recycled's full step, tidal's
  full and select layers attend exactly), except where a method's selection would leave the call's first
  queries with only sinks or nothing: ``retrieval_heads_kv`` (N_q <= budget - sink), ``tokenselect``
  (N_q <= n_local) and a ``tidal`` "reuse" call with a state (N_q <= the state's positions) refuse more
  queries with an InputError when they select (budget < N_k); each method's docstring says why.
- Budgets are in tokens (so methods compare at equal cost): the tokens each (batch, KV head) attends to.
  A budget >= N_k runs exact causal attention (nothing to select), and the method's state is still
  brought up to date, so a short cache that grows past the budget continues seamlessly.
- Selections are per KV head: the query heads of a GQA group attend to the same tokens (each method says
  how their scores combine), so the fast path reads each selected K/V tile once per group.
- Stateful: ``attnlab.attention(..., state=s)`` returns a Result whose ``state`` goes into the next step;
  ``state=None`` starts a new sequence.
- Padding: the optional tensor input ``key_mask`` (B, N_k), > 0 for a real token (e.g. a batch's left
  padding is 0, as in Hugging Face's attention mask, cast to float), hides padding everywhere: it is never
  attended, selected or scored, and "first tokens" (sinks) count from each sequence's first real token.
  The mask of tokens already in the cache must not change between steps (their state was built with it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.backends.decode_select import Selection
from attnlab.core import TensorInput
from attnlab.kernels.heads import expand_kv
from attnlab.patterns import Pattern
from attnlab.reference import masked_softmax_attention

#: Decode methods define causal attention only (self for N_q = N_k, cross otherwise).
CAUSAL_PATTERNS = frozenset({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS})


#: The padding mask every decode method takes (optional).
KEY_MASK = TensorInput(
    "key_mask",
    ("B", "N_k"),
    "> 0 marks a real cache token, <= 0 padding (e.g. left padding of a batch); default: every token real",
    required=False,
)


def valid_keys(key_mask: Tensor | None) -> Tensor | None:
    """(B, N_k) bool of real tokens, or None when every token is real."""
    return None if key_mask is None else key_mask > 0


def first_real(valid: Tensor | None, b: int, device: torch.device) -> Tensor:
    """(B,) int64: each sequence's first real token (0 without a mask; N_k for an all-padding row)."""
    if valid is None:
        return torch.zeros(b, dtype=torch.long, device=device)
    n_k = valid.shape[1]
    pos = torch.where(valid, torch.arange(n_k, device=device), n_k)
    return pos.amin(dim=1)


def causal_mask(n_q: int, n_k: int, device: torch.device) -> Tensor:
    """(N_q, N_k) bool, bottom-right aligned: key j <= i + N_k - N_q."""
    pos = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    return torch.arange(n_k, device=device)[None, :] <= pos


def attend_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    *,
    scale: float,
    upcast: bool,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Causal softmax attention restricted to ``token_mask`` (B, H_kv, N_k) bool of selected cache tokens
    (None: every token) and to real tokens (``key_mask`` > 0). Rows with no allowed token give 0."""
    n_q, n_k = q.shape[2], k.shape[2]
    mask = causal_mask(n_q, n_k, q.device)
    if token_mask is not None:
        mask = expand_kv(token_mask, q.shape[1])[:, :, None, :] & mask
    if key_mask is not None:
        mask = (key_mask > 0)[:, None, None, :] & mask
    return masked_softmax_attention(q, k, v, scale=scale, mask=mask, upcast=upcast)


def selection_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sel: Selection | None,
    *,
    scale: float,
    upcast: bool,
    key_mask: Tensor | None = None,
) -> Tensor:
    """:func:`attend_reference` over a selection's tokens (None: exact)."""
    token_mask = None if sel is None else sel.token_mask(k.shape[2])
    return attend_reference(q, k, v, token_mask, scale=scale, upcast=upcast, key_mask=key_mask)


#: The most logits (B x H x N_q x N_k floats) :func:`attend_with_logits` writes in one call (512 MiB).
FUSED_LOGITS_MAX = 2**27
#: Tokens per index entry of :func:`attend_with_logits` (the decode kernel's key tile on a GPU).
ALL_TOKENS_PAGE = 64


def attend_with_logits(
    q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None = None, *, group_max: bool = False
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Exact causal attention over every cache token through the Triton decode kernel, with its own scores:
    (out (B, H, N_q, D) in q's dtype, lse (B, H, N_q) float32, logits (B, H, N_q, N_k) float32 =
    ``scale * q . k``, -inf where a token is not allowed: causal, padding). One pass over K and V gives
    what a full step that selects by the attention weights (``exp(logits - lse)``) needs. None when the
    logits would exceed :data:`FUSED_LOGITS_MAX` floats (the caller then scores in chunks). ``group_max``:
    logits (B, H_kv, N_k), each token's maximum over its KV group's query rows, written by the kernel
    (when the group's G * N_q rows fit its one row block, 64; else reduced after it)."""
    from attnlab.kernels.decode.op import decode_attention_logits

    b, h, n_q = q.shape[:3]
    h_kv, n_k = k.shape[1], k.shape[2]
    pages = -(-n_k // ALL_TOKENS_PAGE)
    in_kernel = group_max and (h // h_kv) * n_q <= 64
    if (b * h_kv if in_kernel else b * h * n_q) * pages * ALL_TOKENS_PAGE > FUSED_LOGITS_MAX:
        return None
    index = torch.arange(pages, device=q.device, dtype=torch.int32).expand(b, h_kv, pages)
    out, lse, logits = decode_attention_logits(
        q, k, v, index, None, ALL_TOKENS_PAGE, scale, True, key_mask, group_max=in_kernel
    )
    if group_max and not in_kernel:
        logits = logits.unflatten(1, (h_kv, -1)).amax(dim=(2, 3))
    return out, lse, logits[..., :n_k]


def require_causal(method: str, causal: bool) -> None:
    if not causal:
        raise ValueError(f"method {method!r} is defined for causal decoding only (pass causal=True)")
