"""attnlab.attention inside torch.compile(fullgraph=True): no graph breaks on the Flex and Triton paths.

``fullgraph=True`` makes any graph break an error. On CPU, compiled FlexAttention is inference-only and
the Triton kernel runs in the interpreter behind its custom op; on CUDA both run for real.
"""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.testing import on_cuda, random_qkv

ON_CUDA = on_cuda()


@pytest.mark.parametrize(
    ("method", "params"), [("sliding_window", {"window": 16}), ("block_local", {"block": 16})]
)
def test_flex_path_compiles_without_graph_breaks(method: str, params: dict) -> None:
    q, k, v = random_qkv(1, 4, 2, 64, 64, 32)

    def f(q, k, v):  # type: ignore[no-untyped-def]
        # (no pointwise op right after: inductor's CPU flex template cannot fuse epilogues, torch 2.13)
        return attnlab.attention(q, k, v, method=method, causal=True, backend="flex", **params)

    compiled = torch.compile(f, fullgraph=True)
    with torch.no_grad():
        out = compiled(q, k, v)
    ref = attnlab.attention(q, k, v, method=method, causal=True, backend="reference", **params)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_triton_sigmoid_compiles_without_graph_breaks_forward_and_backward() -> None:
    q, k, v = random_qkv(1, 4, 2, 24, 24, 16, grad=True)

    def f(q, k, v):  # type: ignore[no-untyped-def]
        return attnlab.attention(q, k, v, method="sigmoid", causal=True, backend="triton").sum()

    loss = torch.compile(f, fullgraph=True)(q, k, v)
    loss.backward()
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    attnlab.attention(qr, kr, vr, method="sigmoid", causal=True, backend="reference").sum().backward()
    torch.testing.assert_close(loss, f(qr, kr, vr).detach(), rtol=1e-4, atol=1e-4)
    for a, b in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ON_CUDA, reason="compiled FlexAttention has no backward on CPU")
def test_flex_path_compiles_with_backward_on_cuda() -> None:
    q, k, v = random_qkv(1, 4, 2, 256, 256, 64, grad=True)
    f = lambda q, k, v: attnlab.attention(q, k, v, method="streaming", causal=True, sinks=4, window=32).sum()
    torch.compile(f, fullgraph=True)(q, k, v).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_lengths_do_not_recompile_flex() -> None:
    """One compiled FlexAttention serves new lengths and new window values (no recompilation storm)."""
    from torch._dynamo.utils import counters

    def run(n: int, window: int) -> None:
        q, k, v = random_qkv(1, 4, 2, n, n, 32)
        with torch.no_grad():
            attnlab.attention(q, k, v, method="dilated", causal=True, window=window, dilation=2)

    run(200, 8)
    run(333, 9)  # the first change of shape may specialise once
    before = counters["stats"]["unique_graphs"]
    for n, w in ((517, 5), (1000, 31), (777, 64), (129, 3)):
        run(n, w)
    assert counters["stats"]["unique_graphs"] - before == 0


def _compiled_matches_reference(method: str, backend: str | None, causal: bool, params: dict) -> None:
    """``attention`` compiled with fullgraph=True against the uncompiled reference, on a tiny call."""
    torch._dynamo.reset()  # a fresh cache: a case must compile, not fall back to eager past the recompile limit
    q, k, v = random_qkv(1, 2, 2, 12, 12, 16)

    def f(q, k, v):  # type: ignore[no-untyped-def]
        return attnlab.attention(q, k, v, method=method, causal=causal, backend=backend, **params)

    with torch.no_grad():
        out = torch.compile(f, fullgraph=True)(q, k, v)
    ref = attnlab.attention(q, k, v, method=method, causal=causal, backend="reference", **params)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


#: both per-axis branches of NATTEN's rule (axis_causal True on one axis, False on the other)
NEIGHBORHOOD = {"shape": (3, 4), "window": (3, 2), "axis_causal": (True, False)}


@pytest.mark.parametrize("backend", [None, "sdpa_mask", "reference"])
def test_neighborhood_compiles_on_every_backend(backend: str | None) -> None:
    """Under compile the mask context holds Python ints: neighborhood's per-axis causal flag was one, and
    ``torch.where`` refused it on every backend (the default is FlexAttention on a CPU, the executor on CUDA)."""
    _compiled_matches_reference("neighborhood", backend, False, NEIGHBORHOOD)


# The other structured methods on one backend each, causal (the call-level flag is a Python bool under
# compile too): sdpa_mask builds their mask from the same mask_mod as FlexAttention and the executor, in
# about 2 s a compile on a CPU (FlexAttention takes 4-6 s; neighborhood above covers the default backend).
# strided_heads runs its own per-head sdpa_mask backend.
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("power", {"block": 2, "window": 1, "sinks": 1}),
        ("radial", {"frame": 4, "window": 3}),
        ("multi_axis", {"shape": (3, 4), "block": 2, "grid": 2}),
        ("doc_blocks", {"boundaries": (3, 7)}),
        ("strided_heads", {"block": 2, "local": 1, "vert_stride": 3}),
    ],
)
def test_structured_methods_compile_like_eager(method: str, params: dict) -> None:
    _compiled_matches_reference(method, "sdpa_mask", True, params)


def test_the_executor_is_not_chosen_inside_a_compiled_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block-sparse executor builds its tables with data-dependent sizes, which torch.compile cannot
    trace (fullgraph): inside a trace it refuses, saying why, and a static method's call takes its next
    backend (on the H100 the executor is their default: neighborhood failed to compile there)."""
    from attnlab.backends.block_sparse import COMPILE_REFUSAL

    q = torch.randn(1, 2, 16, 16)
    call = attnlab.resolve(q, q, q, method="sliding_window", causal=True, window=4)
    executor = attnlab.get("sliding_window").backend("block_sparse")
    assert COMPILE_REFUSAL not in executor.reasons(call)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert COMPILE_REFUSAL in executor.reasons(call)
    choice = attnlab.explain(q, q, q, method="sliding_window", causal=True, window=4, backend="block_sparse")
    assert choice.backend is None and "inside torch.compile" in choice.explain()
    # a dynamic method keeps the executor (its other backend is dense): dynamo runs it through a graph break
    dyn = attnlab.resolve(q, q, q, method="block_topk", causal=True, block=16, topk=2)
    assert COMPILE_REFUSAL not in attnlab.get("block_topk").backend("block_sparse").reasons(dyn)
