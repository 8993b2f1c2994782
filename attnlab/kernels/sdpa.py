"""Dense softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

Causal attention with N_q != N_k is aligned bottom-right (see :mod:`attnlab.patterns`), whereas SDPA's
``is_causal`` is top-left aligned; this module handles the difference. Rows with no allowed key give 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnlab.kernels.heads import expand_kv

#: SDPA kernels in the order attnlab prefers them on CUDA (fastest first on Hopper); SDPA skips the
#: ones that cannot take the inputs.
SDPA_PRIORITY: tuple[SDPBackend, ...] = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
#: The order for decode-shaped calls (at most :data:`DECODE_MAX_QUERIES` queries against a longer key
#: sequence): FlashAttention first. cuDNN builds an execution plan for every new shape (~36-50 ms on the
#: H100 with torch 2.11), and a decode loop's cache grows by one key per step, so every step was a new plan;
#: FlashAttention's decode is as fast as cuDNN's at a fixed length (B=1/8, 4K-128K keys, GQA 32:8, D=128:
#: benchmarks/results/h100-2026-11-23-s2/decode/).
DECODE_PRIORITY: tuple[SDPBackend, ...] = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
DECODE_MAX_QUERIES = 16


def priority_for(n_q: int, n_k: int) -> tuple[SDPBackend, ...]:
    """The SDPA kernel order attnlab uses for a call of ``n_q`` queries and ``n_k`` keys."""
    return DECODE_PRIORITY if n_q <= DECODE_MAX_QUERIES and n_q < n_k else SDPA_PRIORITY


def native_gqa(q: Tensor, v: Tensor) -> bool:
    """Whether SDPA on CUDA takes ``enable_gqa`` without its math kernel: FlashAttention does (16-bit, head
    dims up to 256); other inputs (float32, wider heads) would fall to the math kernel, which builds the
    (B, H, N_q, N_k) scores, so :func:`sdpa_dense` repeats K/V for them and lets the memory-efficient
    kernel run (O(N) memory). On a CPU SDPA's flash kernel takes GQA in every dtype."""
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and v.shape[-1] <= 256


def sdpa_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    kernels: Sequence[SDPBackend] | None = None,
) -> Tensor:
    """Softmax attention (B, H, N_q, D) x (B, H_kv, N_k, D) -> (B, H, N_q, D_v), bottom-right causal.

    ``kernels`` restricts SDPA to these kernels, in this priority (default: :func:`priority_for` the
    shape: :data:`SDPA_PRIORITY`, or :data:`DECODE_PRIORITY` for decode-shaped calls).
    """
    n_q, n_k = q.shape[2], k.shape[2]
    if causal and n_q > n_k:
        # the first N_q - N_k queries see no key: zeros; the rest form a square causal problem
        tail = sdpa_dense(q[:, :, n_q - n_k :], k, v, causal=True, scale=scale, kernels=kernels)
        head = tail.new_zeros(q.shape[0], q.shape[1], n_q - n_k, v.shape[-1])
        return torch.cat([head, tail], dim=2)
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda and not native_gqa(q, v):
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
        gqa = False
    attn_mask = None
    is_causal = causal
    if causal and n_q < n_k:
        is_causal = False
        if n_q > 1:  # one query sits at the last position and sees every key: no mask at all
            # imported here: torch.nn.attention.bias imports torch._dynamo, which writes an environment
            # variable. With enable_gqa (no repeated K/V): 17x faster decode than expanding K/V on the H100.
            from torch.nn.attention.bias import causal_lower_right

            attn_mask = causal_lower_right(n_q, n_k)
    if kernels is None and not torch.compiler.is_compiling():
        return _with_priority(q, k, v, attn_mask, is_causal, scale, gqa)
    with sdpa_kernel(list(kernels or priority_for(n_q, n_k)), set_priority=True):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )


_PRIORITY = [int(b) for b in SDPA_PRIORITY]  # type: ignore[call-overload]
_DECODE = [int(b) for b in DECODE_PRIORITY]  # type: ignore[call-overload]


def _with_priority(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Any, is_causal: bool, scale: float, gqa: bool
) -> Tensor:
    """SDPA with :func:`priority_for` the shape as its kernel order for this call only. The same as
    ``sdpa_kernel(SDPA_PRIORITY, set_priority=True)`` when every kernel is enabled (the default), without
    its per-call cost (about 30 us of Python): only the priority order is set, and restored after. On CPU
    the order does not matter (cuDNN and flash do not run there) and nothing is set."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    order = _DECODE if q.shape[2] <= DECODE_MAX_QUERIES and q.shape[2] < k.shape[2] else _PRIORITY
    return _scoped_priority(
        order,
        lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        ),
    )


#: SDPA's kernel priority order is one setting for the whole process (not per thread: checked on torch
#: 2.13), so :func:`_scoped_priority` holds this lock while it is changed
_PRIORITY_LOCK = threading.Lock()


def _scoped_priority(order: list[int], call: Callable[[], Tensor]) -> Tensor:
    """``call()`` with SDPA's kernel priority order starting with ``order`` (the other kernels after it, in
    their previous order), restored after. One lock around set, call and restore: calls from several
    threads neither run under another's order nor leave it changed (the call itself only launches)."""
    with _PRIORITY_LOCK:
        previous = torch._C._get_sdp_priority_order()
        wanted = order + [b for b in previous if b not in order]
        if previous == wanted:
            return call()
        torch._C._set_sdp_priority_order(wanted)
        try:
            return call()
        finally:
            torch._C._set_sdp_priority_order(previous)


def sdpa_masked(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor, scale: float) -> Tensor:
    """Softmax attention with a dense boolean ``mask`` (N_q, N_k), or any shape broadcastable to
    (B, H, N_q, N_k), True = may attend.

    Rows with no allowed key return 0 with zero gradients: such rows are opened to every key before the
    call (so no NaN enters the backward) and zeroed after.
    """
    empty = ~mask.any(dim=-1, keepdim=True)  # (N_q, 1)
    safe = mask | empty
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=safe, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out * (~empty).to(out.dtype)
