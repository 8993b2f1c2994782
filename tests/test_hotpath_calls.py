"""The per-call path of the sigmoid Triton backend and the hot-path benchmark's timing orders.

- Without autograd (no input requires grad, or grad disabled) the backend launches the Triton kernel
  directly; with autograd it goes through the ``attnlab::sigmoid_fwd`` custom op (its backward). Both give
  the same output. (CPU: Triton's interpreter, tiny shapes; conftest sets TRITON_INTERPRET. CUDA: the GPU.)
- The benchmark's balanced orders put every function right after every other one equally often.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import attnlab
from attnlab.testing import device_under_test

DEVICE = device_under_test()
ROOT = Path(__file__).resolve().parents[1]


def _qkv(grad: bool) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(1, 2, 40, 16, device=DEVICE, requires_grad=grad) for _ in range(3))


def _count_custom_op_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from attnlab.kernels.sigmoid import op as sig

    calls = [0]
    real = sig.sigmoid_fwd

    def counting(*args: Any) -> torch.Tensor:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(sig, "sigmoid_fwd", counting)
    return calls


@pytest.mark.parametrize("causal", [False, True])
def test_sigmoid_triton_launches_directly_without_autograd_and_equals_the_custom_op(
    causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnlab.kernels.sigmoid.op import sigmoid_attention

    calls = _count_custom_op_calls(monkeypatch)
    q, k, v = _qkv(grad=False)
    op = attnlab.prepare("sigmoid", causal=causal, backend="triton")  # a fresh op: its launcher is new
    out = op(q, k, v)
    assert calls[0] == 0, "no autograd needed: the custom op's dispatch is skipped"
    assert isinstance(out, torch.Tensor) and out.grad_fn is None
    bias = -math.log(k.shape[2])  # the method's default bias
    assert torch.equal(out, sigmoid_attention(q, k, v, q.shape[-1] ** -0.5, bias, causal))
    ref = attnlab.attention(q, k, v, method="sigmoid", causal=causal, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_sigmoid_triton_takes_the_custom_op_when_gradients_are_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_custom_op_calls(monkeypatch)
    q, k, v = _qkv(grad=True)
    op = attnlab.prepare("sigmoid", causal=True, backend="triton")
    with torch.no_grad():  # grad disabled: the direct launch even though the inputs require grad
        plain = op(q, k, v)
    assert calls[0] == 0 and isinstance(plain, torch.Tensor) and plain.grad_fn is None
    out = op(q, k, v)
    assert calls[0] == 1 and isinstance(out, torch.Tensor) and out.grad_fn is not None
    assert torch.equal(out.detach(), plain)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def _hotpath() -> Any:
    spec = importlib.util.spec_from_file_location("hotpath_bench", ROOT / "benchmarks" / "hotpath.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_balanced_orders_put_each_function_after_each_other_equally_often(n: int) -> None:
    orders = _hotpath().balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in orders)  # each round calls every function once
    follows = Counter((a, b) for row in orders for a, b in itertools.pairwise(row))
    pairs = {(a, b) for a in range(n) for b in range(n) if a != b}
    assert set(follows) == pairs and len(set(follows.values())) == 1, follows


def test_the_cyclic_order_is_unbalanced() -> None:
    """Why the benchmark changed order: in a cyclic rotation of (baseline, a, b) over rounds, ``a``
    directly follows the baseline twice as often as ``b`` (counted across round boundaries too)."""
    names = ["baseline", "a", "b"]
    orders = _hotpath().round_orders(names, "cyclic")
    seq = [name for r in range(30) for name in orders[r % len(orders)]]
    after = Counter(b for a, b in itertools.pairwise(seq) if a == "baseline")
    assert after["a"] == 2 * after["b"]
