"""Decode-shaped calls through prepared ops can be captured in a CUDA graph (runs on the H100).

A decode step is one (or a few) queries against a long cache, one call per layer per token: host work
per call matters, and a CUDA graph removes it. After one warm-up call at the shape (which resolves the
call and builds its plan), the prepared op's call does no host synchronisation and creates no tensor from
host data, so it can be captured; a new shape inside capture is refused with a clear message.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import attnlab

CACHE = 131072


@pytest.mark.cuda
@pytest.mark.parametrize("n_q", [1, 16])
@pytest.mark.parametrize(
    ("method", "params"),
    [("softmax", {}), ("sliding_window", {"window": 4096}), ("streaming", {"sinks": 4, "window": 4096}),
     ("sigmoid", {})],
)  # fmt: skip
def test_decode_call_is_captured_and_replayed(method: str, params: dict, n_q: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, n_q, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, CACHE, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8, CACHE, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    op = attnlab.prepare(method, causal=True, **params)
    with torch.no_grad():
        want = op(q, k, v).clone()  # warm-up: resolves the signature, compiles, builds the plan
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            op(q, k, v)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = op(q, k, v)
        q.copy_(torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, op(q, k, v), atol=0, rtol=0)  # the replay read the new q
        assert not torch.equal(out, want)


@pytest.mark.cuda
def test_a_new_signature_inside_capture_is_refused_clearly() -> None:
    code = (
        "import torch, attnlab\n"
        "q = torch.randn(1, 4, 1, 64, device='cuda', dtype=torch.bfloat16)\n"
        "k = torch.randn(1, 4, 1024, 64, device='cuda', dtype=torch.bfloat16)\n"
        "op = attnlab.prepare('sliding_window', causal=True, window=64)\n"
        "g = torch.cuda.CUDAGraph()\n"
        "try:\n"
        "    with torch.cuda.graph(g):\n"
        "        op(q, k, k)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "Call the op once at this shape before capturing" in out.stdout + out.stderr, (
        out.stdout + out.stderr
    )
