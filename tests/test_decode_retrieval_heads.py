"""retrieval_heads_kv: backends against the reference, the per-head token sets, the tensor input, the exact
fallback and bad input (registered for the test only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import attnlab
from attnlab.catalog.decode import retrieval_heads_kv as rh
from attnlab.core import Result
from attnlab.errors import InputError, ParamError
from attnlab.registry import registered
from attnlab.testing import device_under_test

DEVICE = device_under_test()
SPEC = rh.SPEC


@pytest.fixture(autouse=True)
def _registered() -> Iterator[None]:
    with registered(SPEC):
        yield


def _qkv(b: int, h: int, h_kv: int, n_q: int, n_k: int, d: int = 16) -> list[torch.Tensor]:
    return [torch.randn(b, x, n, d, device=DEVICE) for x, n in ((h, n_q), (h_kv, n_k), (h_kv, n_k))]


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Result:
    res = attnlab.attention(q, k, v, method="retrieval_heads_kv", causal=True, **kw)
    assert isinstance(res, Result)
    return res


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("params", SPEC.test_params, ids=["one_head", "no_head"])
@pytest.mark.parametrize(("n_q", "n_k"), [(1, 41), (3, 30), (2, 150)])
def test_backend_matches_reference(backend: str, params: dict, n_q: int, n_k: int) -> None:
    q, k, v = _qkv(2, 4, 2, n_q, n_k)
    res = _run(q, k, v, backend=backend, **params)
    want, _ = SPEC.reference(q, k, v, SPEC.make_params(params), causal=True, scale=0.25)
    torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)


def test_heads_see_their_token_sets() -> None:
    """With one-hot values, the output of a query says which tokens it attended to."""
    n_k, h_kv = 20, 2
    q = torch.zeros(1, 4, 1, 32, device=DEVICE)  # all scores 0: uniform weights over the allowed tokens
    k = torch.randn(1, h_kv, n_k, 32, device=DEVICE)
    v = torch.eye(32, device=DEVICE)[:n_k].expand(1, h_kv, n_k, 32).contiguous()
    for backend in ("torch", "triton", "reference"):
        out = _run(q, k, v, backend=backend, heads=(1,), budget=6, sink=2).out
        seen = out[0, :, 0, :n_k] > 0
        stream = [0, 1, 16, 17, 18, 19]
        assert [torch.nonzero(seen[h]).flatten().tolist() for h in (0, 1)] == [stream, stream]  # KV head 0
        assert seen[2:].all()  # query heads 2, 3 use KV head 1: every token
        torch.testing.assert_close(out[0, 2, 0, :n_k], torch.full((n_k,), 1 / n_k, device=DEVICE))


def test_tensor_input_marks_heads_per_batch() -> None:
    q, k, v = _qkv(2, 4, 2, 1, 33)
    mark = torch.tensor([[1.0, 0.0], [0.0, 0.0]], device=DEVICE)
    res = _run(q, k, v, budget=8, retrieval=mark)
    full = attnlab.attention(q, k, v, method="softmax", causal=True)
    narrow = _run(q, k, v, budget=8).out
    torch.testing.assert_close(res.out[0, :2], full[0, :2])  # batch 0, KV head 0: exact
    torch.testing.assert_close(res.out[0, 2:], narrow[0, 2:])
    torch.testing.assert_close(res.out[1], narrow[1])
    assert rh.kept_tokens(rh.RetrievalHeadsParams(budget=8), mark > 0, 33).tolist() == [[33, 8], [8, 8]]


def test_budget_at_least_the_context_is_exact() -> None:
    q, k, v = _qkv(1, 4, 2, 2, 25)
    full = attnlab.attention(q, k, v, method="softmax", causal=True)
    for backend in ("torch", "triton", "reference"):
        torch.testing.assert_close(_run(q, k, v, backend=backend, budget=25).out, full, atol=1e-5, rtol=1e-5)


def test_bad_input() -> None:
    q, k, v = _qkv(1, 4, 2, 1, 25)
    with pytest.raises(InputError, match=r"names KV head\(s\) \[2\], but k has 2 KV heads"):
        _run(q, k, v, heads=(0, 2), budget=8)
    with pytest.raises(ParamError, match="distinct KV head indices"):
        attnlab.prepare("retrieval_heads_kv", causal=True, heads=(1, 1))
    with pytest.raises(ParamError, match="sink=9 is invalid; expected less than budget=8"):
        attnlab.prepare("retrieval_heads_kv", causal=True, budget=8, sink=9)
    with pytest.raises(
        InputError, match=r"retrieval has shape \(3\); method 'retrieval_heads_kv' expects \(B=1, H_kv=2\)"
    ):
        _run(q, k, v, retrieval=torch.ones(3, device=DEVICE))
    assert rh.RetrievalHeadsParams(heads=[0, 1]).heads == (0, 1)  # type: ignore[arg-type]  # a list is taken as a tuple
