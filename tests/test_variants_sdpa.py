"""The exact SDPA backends of ``sink`` (the sink as a prepended zero-value key) and ``selective`` (SDPA on
``q * tau``): outputs and gradients against the method's reference, GQA, causal (bottom-right, cross and
decode shapes), rows with no key, and that a CPU call picks them. The references compute in fp32 (upcast), hence the fp32 tolerances."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnlab
from attnlab.catalog.variants import selective, sink

SHAPES = [(6, 6), (3, 9), (9, 4), (1, 7)]  # (N_q, N_k): square, decode-ish, more queries than keys, one query


def _qkv(n_q: int, n_k: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n_q * 31 + n_k)
    q = torch.randn(2, 4, n_q, 8, generator=g, dtype=dtype)
    k = torch.randn(2, 2, n_k, 8, generator=g, dtype=dtype)
    v = torch.randn(2, 2, n_k, 8, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", SHAPES)
def test_sink_sdpa_matches_reference_with_grads(n_q: int, n_k: int, causal: bool) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(n_q, n_k))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float32, requires_grad=True)
    scale = 8**-0.5
    p = sink.SinkParams()
    out = sink.sdpa_sink(q, k, v, sinks, causal=causal, scale=scale)
    ref = sink.reference(q, k, v, p, causal=causal, scale=scale, sinks=sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out * w).sum(), (q, k, v, sinks))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v, sinks))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sink_sdpa_bf16_keeps_fp32_sink() -> None:
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(5, 5, torch.float32))
    sinks = torch.tensor([0.3141, -1.777, 2.345, 0.01])
    out = sink.sdpa_sink(q, k, v, sinks, causal=True, scale=8**-0.5).float()
    ref = sink.reference(q, k, v, sink.SinkParams(), causal=True, scale=8**-0.5, sinks=sinks).float()
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_rows_with_no_key_are_zero() -> None:
    q, k, v = _qkv(9, 4)
    out = sink.sdpa_sink(q, k, v, torch.zeros(4, dtype=torch.float32), causal=True, scale=0.3)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))  # queries 0-4 see no key
    assert out[:, :, 5:].abs().amax() > 0
    tau = torch.rand(2, 4, 9, dtype=torch.float32) + 0.5
    out = attnlab.attention(q, k, v, method="selective", causal=True, backend="sdpa", temperature=tau)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", SHAPES)
def test_selective_sdpa_matches_reference_with_grads(n_q: int, n_k: int, causal: bool) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(n_q, n_k))
    tau = (torch.rand(2, 1, n_q, dtype=torch.float32) + 0.25).requires_grad_()
    out = attnlab.attention(q, k, v, method="selective", causal=causal, backend="sdpa", temperature=tau)
    ref = selective.reference(
        q, k, v, selective.SelectiveParams(), causal=causal, scale=8**-0.5, temperature=tau
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v, tau))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v, tau))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sink_through_api_and_explain_picks_sdpa_on_cpu() -> None:
    q, k, v = _qkv(6, 10, torch.float32)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = attnlab.attention(q, k, v, method="sink", causal=True, backend="sdpa", sinks=sinks)
    ref = sink.reference(q, k, v, sink.SinkParams(), causal=True, scale=8**-0.5, sinks=sinks)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cases: tuple[tuple[str, dict[str, Any]], ...] = (
        ("sink", {"sinks": sinks}),
        ("selective", {"temperature": torch.ones(2, 4, 6)}),
    )
    for method, extra in cases:
        report = attnlab.explain(q, k, v, method=method, causal=True, **extra)
        assert report.backend is not None and report.backend.name == "sdpa", str(report)
    qg = torch.randn(2, 4, 6, 64, requires_grad=True)  # training at D=64: Flex has no CPU backward
    kg, vg = torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64)
    for method, extra in (("sink", {}), cases[1]):
        report = attnlab.explain(qg, kg, vg, method=method, causal=True, **extra)
        assert report.backend is not None and report.backend.name == "sdpa", str(report)


def test_sink_sdpa_value_dim_differs() -> None:
    q, k, _ = _qkv(5, 7)
    v = torch.randn(2, 2, 7, 6)
    sinks = torch.tensor([1.0, -0.5, 0.0, 3.0])
    out = sink.sdpa_sink(q, k, v, sinks, causal=True, scale=0.3)
    ref = sink.reference(q, k, v, sink.SinkParams(), causal=True, scale=0.3, sinks=sinks)
    assert out.shape == (2, 4, 5, 6)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
