"""``retrieval_heads_kv``: full KV for retrieval heads, attention sinks + a recent window for the others.

Selection (per batch and KV head, the same every step; no scores)::

    retrieval KV head:   every cache token                          (exact attention)
    other KV heads:      tokens [0, sink) and [N_k - (budget - sink), N_k)

then causal softmax attention over them (the window is the last ``budget - sink`` keys of the call, for
every query of it). Which KV heads are retrieval heads: the ``heads`` parameter (KV
head indices), and/or the tensor input ``retrieval`` (1, H_kv) or (B, H_kv) whose entries > 0 mark
retrieval heads (e.g. from :mod:`attnlab.analysis` retrieval scores); their union counts. Budget in tokens
for the non-retrieval heads (sinks included); a budget >= N_k runs exact attention for every head. With a
``key_mask`` (left padding) the sinks are each sequence's first real tokens, and padding is never attended.

Queries per call: ``sink < budget``, so the window holds at least one token. A call that selects
(budget < N_k) takes N_q <= ``budget - sink`` queries (decoding: 1 to a few): query ``i`` sits at position
``N_k - N_q + i``, inside the window exactly when ``i >= N_q - (budget - sink)``, so then every query sees
its own token and the window's tokens before it. More queries (a prefill: its first rows would see only the
sinks, or nothing) are refused with an InputError; a call with budget >= N_k is exact for any N_q.

Conventions of other code: DuoAttention (Xiao et al., 2024) learns a gate per KV head and runs
"streaming heads" with sink + recent tokens (its defaults: 64 sinks, 256 recent; StreamingLLM's 4 sinks
here); RazorAttention (Tang et al., 2024) keeps full caches for retrieval heads and compresses the rest.
With GQA a query head is a retrieval head exactly when its KV head is (the cache is per KV head).

KV memory: this method only masks (the cache keeps every token of every head; a cache tensor holds the
same length for every KV head, so the retrieval heads' full caches keep it long); a serving system could
drop the non-retrieval heads' middle tokens, which is what ``kept_tokens`` (and ``attnlab.hf.kv_memory``) reports.

State: none is needed; the method is declared stateful (like every decode method) and returns None.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.backends.decode_select import Attended, Selection, torch_decode, triton_decode
from attnlab.catalog.decode._common import (
    CAUSAL_PATTERNS,
    KEY_MASK,
    attend_reference,
    first_real,
    require_causal,
    valid_keys,
)
from attnlab.core import Call, MethodSpec, TensorInput
from attnlab.errors import InputError
from attnlab.params import Params


@dataclass(frozen=True)
class RetrievalHeadsParams(Params):
    """``heads``: KV head indices that keep the full cache (a tuple of ints; default none). ``budget``:
    tokens each other KV head attends to, sinks included (default 4096). ``sink``: leading tokens kept by
    the other heads (default 4, StreamingLLM's); the rest of the budget is the recent window."""

    method = "retrieval_heads_kv"
    heads: tuple[int, ...] = ()
    budget: int = 4096
    sink: int = 4

    def validate(self) -> None:
        if isinstance(self.heads, list):
            object.__setattr__(self, "heads", tuple(self.heads))
        if not isinstance(self.heads, tuple) or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in self.heads
        ):
            raise self._fail("heads", self.heads, "a tuple of KV head indices >= 0")
        if len(set(self.heads)) != len(self.heads):
            raise self._fail("heads", self.heads, "distinct KV head indices")
        self.check_int("budget", minimum=1)
        self.check_int("sink", minimum=0)
        if self.sink >= self.budget:
            raise self._fail(
                "sink",
                self.sink,
                f"less than budget={self.budget} (the rest of the budget is the recent window, which holds "
                "each query's own token)",
            )

    def check_lengths(self, n_q: int, n_k: int) -> None:
        check_queries(self, n_q, n_k)


def check_queries(p: RetrievalHeadsParams, n_q: int, n_k: int) -> None:
    """Raise InputError when a call that selects (budget < N_k) has more queries than the recent window
    (module docstring: queries per call)."""
    if p.budget < n_k and n_q > p.budget - p.sink:
        raise InputError(
            f"retrieval_heads_kv: N_q={n_q} queries over a {n_k}-token cache with budget={p.budget} < N_k; "
            f"expected N_q <= budget - sink = {p.budget - p.sink} (the recent window), so that every query "
            "sees its own token: run a prefill with a prefill method, or in chunks of at most that many queries"
        )


def retrieval_mask(
    params: RetrievalHeadsParams, extra: Mapping[str, Tensor], b: int, h_kv: int, device: torch.device
) -> Tensor:
    """(B, H_kv) bool: which KV heads keep the full cache (the ``heads`` parameter or ``retrieval`` > 0)."""
    bad = [h for h in params.heads if h >= h_kv]
    if bad:
        raise InputError(
            f"retrieval_heads_kv: heads={params.heads} names KV head(s) {bad}, but k has {h_kv} KV heads "
            f"(indices 0..{h_kv - 1}); retrieval heads are KV heads (a query head h uses KV head h // group)"
        )
    mask = _heads_mask(params.heads, h_kv, str(device))[None].expand(b, h_kv)
    given = extra.get("retrieval")
    if given is not None:
        mask = mask | (given > 0).expand(b, h_kv)
    return mask


@functools.lru_cache(maxsize=64)
def _heads_mask(heads: tuple[int, ...], h_kv: int, device: str) -> Tensor:
    """(H_kv,) bool on ``device``, True at ``heads``: made once per (heads, H_kv, device), so a step copies
    nothing from the host (a host copy cannot be captured in a CUDA graph)."""
    mask = torch.zeros(h_kv, dtype=torch.bool)
    mask[list(heads)] = True
    return mask.to(device)


def _window(params: RetrievalHeadsParams, n_k: int) -> tuple[int, int]:
    """(sink tokens, first token of the recent window) of a non-retrieval head."""
    return params.sink, n_k - (params.budget - params.sink)


def select(
    q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any, fast: bool
) -> tuple[Selection | Attended | None, None]:
    """Token lists (page 1): every token for retrieval heads, sinks + recent window for the others (module
    docstring); None when the budget covers the cache. ``fast`` (the Triton backend): the step attends
    itself in one decode launch over each row's contiguous token runs (:func:`_ranges_step`)."""
    p: RetrievalHeadsParams = call.params  # type: ignore[assignment]
    b, h_kv, n_k = k.shape[0], k.shape[1], k.shape[2]
    check_queries(p, q.shape[2], n_k)
    full = retrieval_mask(p, extra, b, h_kv, k.device)
    if p.budget >= n_k:
        return None, None
    sink, start = _window(p, n_k)
    dev = k.device
    key_mask = extra.get("key_mask")
    if fast and USE_RANGES:
        return Attended(_ranges_step(q, k, v, call, extra, full, sink, start)), None
    first = first_real(valid_keys(key_mask), b, dev)  # sinks follow any left padding
    sinks = first[:, None] + torch.arange(sink, device=dev)
    sinks = torch.where(sinks < start, sinks, -1)  # (already in the window: not twice)
    window = torch.arange(start, n_k, device=dev).expand(b, -1)
    stream = torch.cat([sinks, window], dim=1).to(torch.int32)  # (B, budget)
    if not p.heads and "retrieval" not in extra:  # no retrieval head: budget-long lists
        return Selection(stream[:, None].expand(b, h_kv, -1), 1), None
    if fast:
        return Attended(_two_launches(q, k, v, call, extra, full, stream)), None
    every = torch.arange(n_k, device=dev, dtype=torch.int32)
    padded = torch.nn.functional.pad(stream, (0, n_k - stream.shape[1]), value=-1)[:, None]
    index = torch.where(full[..., None], every, padded)
    count = torch.where(full, n_k, p.budget).to(torch.int32)
    return Selection(index, 1, count), None


#: Tokens per index entry of the retrieval heads' launch (whole key tiles of the decode kernel).
FULL_PAGE = 64
#: The Triton step reads each row's token runs in one launch (:func:`_ranges_step`); False: token lists
#: (no retrieval head) or :func:`_two_launches` (with retrieval heads). Measured on the H100 at 128K, GQA
#: 32:8, budget 4096, CUDA graph (h100-2026-11-25-s19/decode_ranges): 1 of 8 KV heads full 49-51 us at B=1
#: (two launches: 87) and 239 us at B=8 (280); no retrieval head 17.8 / 63.3 us (token lists: 31.4 / 78.7).
USE_RANGES = True


def _ranges_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    call: Call,
    extra: Mapping[str, Tensor],
    full: Tensor,
    sink: int,
    start: int,
) -> Tensor:
    """The step on the GPU in one split-K launch (and its merge) over contiguous token runs, no index
    tensor: retrieval KV heads read ``[0, N_k)``, the others ``[first, first + sink)`` and ``[start, N_k)``
    (:class:`attnlab.kernels.decode.op.Ranges`); the splits are planned for the retrieval heads' rows
    when the ``heads`` parameter names them, for every row when the tensor input may mark any."""
    from attnlab.kernels.decode.op import Ranges, decode_ranges

    key_mask = extra.get("key_mask")
    first = None if key_mask is None else first_real(valid_keys(key_mask), k.shape[0], k.device)
    heads = call.params.heads  # type: ignore[attr-defined]
    active = None if "retrieval" in extra else k.shape[0] * len(heads)
    out, _ = decode_ranges(
        q, k, v, Ranges(full, first, sink, start), call.scale, call.problem.causal, key_mask, active
    )
    return out


def _two_launches(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    call: Call,
    extra: Mapping[str, Tensor],
    full: Tensor,
    stream: Tensor,
) -> Tensor:
    """The step with retrieval heads on the GPU: one decode launch reads the retrieval heads' whole cache
    in whole tiles (entries of ``FULL_PAGE`` tokens; the other heads' rows count 0 entries), one reads the
    other heads' token lists (the retrieval heads' rows count 0), and each query head takes its KV head's
    output. On the H100 (h100-2026-11-24-s14, 1 of 8 KV heads full at 128K, CUDA graph) this takes 86 us
    at B=1 and 279 us at B=8, where one launch over token lists took 81-83 / 319 us (with 2-stage
    pipelining; 178 / 415 us before it)."""
    from attnlab.kernels.decode.op import decode_attention

    b, h_kv, n_k = k.shape[0], k.shape[1], k.shape[2]
    causal = call.problem.causal
    key_mask = extra.get("key_mask")
    pages = -(-n_k // FULL_PAGE)
    every = torch.arange(pages, device=k.device, dtype=torch.int32).expand(b, h_kv, pages)
    none = torch.zeros((), device=k.device, dtype=torch.int32)
    n_full = torch.where(full, pages, none)
    # the rows that read, when the host knows them (the heads parameter): the splits are planned for them;
    # with the tensor input any subset may read: the capped plan for rows of unequal work
    active = None if "retrieval" in extra else b * len(set(call.params.heads))  # type: ignore[attr-defined]
    out_full, _ = decode_attention(
        q, k, v, every, n_full, FULL_PAGE, call.scale, causal, key_mask, active_rows=active
    )
    n_stream = torch.where(full, none, stream.shape[1])
    lists = stream[:, None].expand(b, h_kv, -1)
    out_stream, _ = decode_attention(q, k, v, lists, n_stream, 1, call.scale, causal, key_mask)
    per_head = full[:, :, None].expand(b, h_kv, q.shape[1] // h_kv).reshape(b, q.shape[1])  # (no host sync)
    return torch.where(per_head[:, :, None, None], out_full, out_stream)


def kept_tokens(params: RetrievalHeadsParams, full: Tensor, n_k: int) -> Tensor:
    """(B, H_kv) tokens each KV head needs to keep in memory at cache length ``n_k``."""
    return torch.where(full, n_k, min(n_k, params.budget))


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: RetrievalHeadsParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
    state: Any = None,
    retrieval: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, None]:
    """Causal softmax attention (fp32 when ``upcast``) over real tokens (``key_mask`` > 0) where retrieval
    KV heads see every token and the others see ``first <= t < first + sink or t >= N_k - (budget - sink)``
    with ``first`` the sequence's first real token (every token when budget >= N_k)."""
    require_causal("retrieval_heads_kv", causal)
    b, h_kv, n_k = k.shape[0], k.shape[1], k.shape[2]
    check_queries(params, q.shape[2], n_k)
    extra = {} if retrieval is None else {"retrieval": retrieval}
    full = retrieval_mask(params, extra, b, h_kv, k.device)
    if params.budget >= n_k:
        return attend_reference(q, k, v, None, scale=scale, upcast=upcast, key_mask=key_mask), None
    sink, start = _window(params, n_k)
    t = torch.arange(n_k, device=k.device)
    first = first_real(valid_keys(key_mask), b, k.device)[:, None]
    streaming = ((t >= first) & (t < first + sink)) | (t >= start)  # (B, N_k)
    token_mask = full[..., None] | streaming[:, None]
    return attend_reference(q, k, v, token_mask, scale=scale, upcast=upcast, key_mask=key_mask), None


def _bench(n: int) -> list[dict[str, Any]]:
    return [{"heads": (0,), "budget": 4096}, {"budget": 4096}]


SPEC = MethodSpec(
    name="retrieval_heads_kv",
    family="decode",
    paper="DuoAttention (Xiao et al., 2024); RazorAttention (Tang et al., 2024)",
    summary="decode: full KV for retrieval heads, attention sinks + recent window for the other heads",
    param_class=RetrievalHeadsParams,
    reference=reference,
    backends=(triton_decode(select), torch_decode(select)),
    patterns=CAUSAL_PATTERNS,
    # (the first set exact on the CPU parity's 16 x 16 self case: a prefill that selects is refused)
    test_params=({"heads": (0,), "budget": 16, "sink": 2}, {"budget": 9, "sink": 0}),
    bench_params=_bench,
    inputs=(
        TensorInput(
            "retrieval",
            ("B", "H_kv"),
            "> 0 marks a KV head that keeps the full cache (union with the heads parameter)",
            required=False,
            broadcast=True,
        ),
        KEY_MASK,
    ),
    stateful=True,
)
