"""The FlexAttention runner's handling of inputs that share memory (torch 2.11's CPU lowering refuses
query, key and value in one buffer: ``attention(x, x, x)``, or views of one packed qkv tensor)."""

from __future__ import annotations

import torch

import attnlab
from attnlab.kernels.flex import _own_buffers


def test_shared_buffers_are_copied_and_distinct_ones_kept() -> None:
    x = torch.randn(1, 2, 8, 16)
    k, v = _own_buffers(x, x, x)
    assert k is not x and v is not x and v is not k
    assert torch.equal(k, x) and torch.equal(v, x)
    qkv = torch.randn(1, 8, 3 * 2 * 16).view(1, 8, 3, 2, 16).permute(2, 0, 3, 1, 4)  # views of one buffer
    q, kk, vv = qkv.unbind(0)
    k2, v2 = _own_buffers(q, kk, vv)
    storages = {t.untyped_storage().data_ptr() for t in (q, k2, v2)}
    assert len(storages) == 3 and torch.equal(k2, kk) and torch.equal(v2, vv)
    a, b, c = (torch.randn(1, 2, 8, 16) for _ in range(3))
    k3, v3 = _own_buffers(a, b, c)
    assert k3 is b and v3 is c  # nothing copied


def test_self_attention_on_one_tensor_runs_on_flex() -> None:
    x = torch.randn(1, 2, 16, 16)
    out = attnlab.attention(x, x, x, method="sliding_window", causal=True, window=4, backend="flex")
    want = attnlab.attention(
        x, x, x.clone(), method="sliding_window", causal=True, window=4, backend="reference"
    )
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
