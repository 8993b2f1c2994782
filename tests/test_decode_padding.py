"""Left padding (``key_mask``) for every decode method: backends against the reference over two steps, the
padding's content never matters, and a padded sequence gives what it gives alone (page_topk aside: its
pages are counted from position 0, padding included)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnlab
from attnlab.catalog import decode
from attnlab.core import Result
from attnlab.registry import registered
from attnlab.testing import device_under_test

DEVICE = device_under_test()
PAD, N_K = 9, 40
#: (method, params of the first call, params of the second); budgets below the 31 real tokens
RUNS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("page_topk", {"budget": 12, "page": 4}, {"budget": 12, "page": 4}),
    ("retrieval_heads_kv", {"budget": 10, "sink": 2}, {"budget": 10, "sink": 2, "heads": (1,)}),
    ("snapkv", {"budget": 10, "window": 4, "kernel": 3}, {"budget": 10, "window": 4, "kernel": 3}),
    ("h2o", {"budget": 10}, {"budget": 10}),
    ("recycled", {"budget": 10, "stride": 2, "pool": 3}, {"budget": 10, "stride": 2, "pool": 3}),
    (
        "tokenselect",
        {"budget": 12, "n_init": 2, "n_local": 4, "threshold": 1.0},
        {"budget": 12, "n_init": 2, "n_local": 4, "threshold": 1.0},
    ),
    ("tidal", {"budget": 10, "role": "select"}, {"budget": 10, "role": "reuse"}),
]


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for spec in decode.SPECS:
            stack.enter_context(registered(spec))
        yield


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 4, 16, generator=g)
    k = torch.randn(2, 2, N_K, 16, generator=g)
    v = torch.randn(2, 2, N_K, 16, generator=g)
    mask = torch.ones(2, N_K)
    mask[0, :PAD] = 0.0
    return tuple(t.to(DEVICE) for t in (q, k, v, mask))


def _two_steps(
    method: str,
    first: dict[str, Any],
    second: dict[str, Any],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    backend: str | None,
) -> list[torch.Tensor]:
    """A first call over N_K - 1 tokens (4 queries), then one decode step over N_K tokens (1 query)."""
    kw: dict[str, Any] = {"method": method, "causal": True, "backend": backend, **first}
    if mask is not None:
        kw["key_mask"] = mask[:, : N_K - 1]
    one = attnlab.attention(q, k[:, :, :-1], v[:, :, :-1], **kw)
    assert isinstance(one, Result)
    kw = {"method": method, "causal": True, "backend": backend, "state": one.state, **second}
    if mask is not None:
        kw["key_mask"] = mask
    two = attnlab.attention(q[:, :, -1:], k, v, **kw)
    assert isinstance(two, Result)
    return [one.out, two.out]


@pytest.mark.parametrize(("method", "first", "second"), RUNS, ids=[r[0] for r in RUNS])
def test_padding_is_hidden(method: str, first: dict, second: dict) -> None:
    q, k, v, mask = _inputs(0)
    want = _two_steps(method, first, second, q, k, v, mask, "reference")
    for backend in ("torch", "triton"):
        got = _two_steps(method, first, second, q, k, v, mask, backend)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :PAD] = 50 * torch.randn_like(k2[0, :, :PAD])  # other padding content: nothing changes
    v2[0, :, :PAD] = 50 * torch.randn_like(v2[0, :, :PAD])
    other = _two_steps(method, first, second, q, k2, v2, mask, None)
    for a, b in zip(other, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if method != "page_topk":  # the padded sequence alone, unpadded: the same outputs
        alone = _two_steps(method, first, second, q[:1], k[:1, :, PAD:], v[:1, :, PAD:], None, None)
        for a, b in zip(alone, want, strict=True):
            torch.testing.assert_close(a, b[:1], atol=1e-5, rtol=1e-5)


def test_the_torch_paths_refuse_masks_above_the_dense_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch decode backend's masked paths (exact attention with a key_mask, the gathered selection's
    mask) refuse above attnlab.settings.max_dense_elements like every other dense path."""
    from attnlab.errors import DenseTooLargeError

    q, k, v, mask = _inputs(0)
    monkeypatch.setattr(attnlab.settings, "max_dense_elements", 100)
    with pytest.raises(DenseTooLargeError, match="exact attention with a key_mask"):
        attnlab.attention(q, k, v, method="recycled", causal=True, backend="torch", key_mask=mask,
                          budget=10, stride=2, pool=3)  # fmt: skip
    with pytest.raises(DenseTooLargeError, match="torch decode path's mask"):
        attnlab.attention(q, k, v, method="page_topk", causal=True, backend="torch", budget=12, page=4)
