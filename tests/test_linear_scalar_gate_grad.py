"""A gate shared by the channels, given as (B, H, N, 1), reaches the chunk kernels as (B, H, N) without a
(B, H, N, K) view in between: the backward then makes no (B, H, N, K) float32 tensor to fill and sum for
dg (at 1x32x32768, K = 128 that was 512 MB filled, copied and reduced per call, about 0.5 ms on the H100).
Checked on the ops autograd runs (a dispatch mode records every op's outputs), for gated_delta.
Tiny shapes (Triton's interpreter on a CPU machine)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import attnlab
from attnlab.testing import device_under_test

DEV = device_under_test()


class _Shapes(TorchDispatchMode):
    """Records (op name, output shape, dtype) of every op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), tuple(t.shape), t.dtype))
        return out


def test_no_channel_sized_gate_gradient() -> None:
    b, h, n, dk = 1, 2, 40, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, dk, generator=gen).to(DEV).requires_grad_(True) for _ in range(3))
    g = F.logsigmoid(torch.randn(b, h, n, 1, generator=gen) + 2).to(DEV).requires_grad_(True)
    extra = {"g": g, "beta": torch.rand(b, h, n, generator=gen).to(DEV).requires_grad_(True)}
    op = attnlab.prepare("gated_delta", causal=True, backend="triton", qk_l2norm=True)
    out = op(q, k, v, **extra).out
    with _Shapes() as mode:
        grads = torch.autograd.grad(out, [q, k, v, *extra.values()], torch.randn_like(out))
    assert grads[3].shape == g.shape and torch.isfinite(grads[3]).all()
    wide = [(f, s) for f, s, dt in mode.seen if dt == torch.float32 and s == (b, h, n, dk)]
    assert not [x for x in wide if "select_backward" in x[0] or "zeros" in x[0]], wide
