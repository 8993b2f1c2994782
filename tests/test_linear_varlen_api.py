"""Packed sequences of the linear methods whose Triton kernels have op-level varlen (lightning, gla,
gated_delta: Gated DeltaNet's per-head gate, KDA's per-channel gate, plain DeltaNet) through
``attnlab.attention(..., cu_seqlens_q=)``: one launch (``explain``) equals the sequences run one by one
(outputs, each sequence's final state, None for an empty one, and the gradients of q, k, v and of the
gates / beta), with odd lengths, a length-1 and an empty sequence. On a CPU the kernels run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1): tiny shapes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.core import Result
from attnlab.errors import UnsupportedPatternError
from attnlab.testing import device_under_test

DEVICE = device_under_test()
LENGTHS = [5, 1, 0, 19]  # odd, length 1, empty, more than one chunk of 16
H, H_KV, D = 2, 1, 16
#: on a CPU the automatic choice leaves interpreted Triton kernels out of packed calls: force them
BACKEND = None if DEVICE.type == "cuda" else "triton"

# (method, params, tensor inputs: name -> shape with T for the packed token axis)
CASES: list[tuple[str, dict[str, Any], dict[str, tuple[int | str, ...]]]] = [
    ("lightning", {"chunk": 16}, {}),
    ("lightning", {}, {"decay": (H,)}),  # the user's decays (no token axis), chunk 64 > every sequence
    ("gla", {"chunk": 16}, {"g": (1, H, "T", D)}),
    ("gated_delta", {"chunk": 16}, {"beta": (1, H, "T"), "g": (1, H, "T", 1)}),  # Gated DeltaNet
    ("gated_delta", {"chunk": 16}, {"beta": (1, H, "T"), "g": (1, H, "T", D)}),  # KDA
    ("gated_delta", {"chunk": 16, "qk_l2norm": False}, {"beta": (1, H, "T")}),  # DeltaNet, raw q, k
]
IDS = ["lightning", "lightning_decay", "gla", "gdn", "kda", "deltanet_no_l2"]


def _cu(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _inputs(shapes: dict[str, tuple[int | str, ...]], total: int, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        size = tuple(total if s == "T" else int(s) for s in shape)
        if name == "g":
            t = torch.nn.functional.logsigmoid(torch.randn(size, generator=gen) + 2.0)
        elif name == "decay":
            t = 0.3 + 0.7 * torch.rand(size, generator=gen)
        else:
            t = torch.rand(size, generator=gen)
        out[name] = t.to(DEVICE).requires_grad_()
    return out


def _qkv(total: int, seed: int, no_l2: bool) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, total, D, generator=gen)
    k = torch.randn(1, H_KV, total, D, generator=gen)
    v = torch.randn(1, H_KV, total, D, generator=gen)
    if no_l2:  # the delta rule without normalisation is stable only for small keys
        k = 0.5 * k / k.norm(dim=-1, keepdim=True)
    return tuple(t.to(DEVICE).requires_grad_() for t in (q, k, v))  # type: ignore[return-value]


@pytest.mark.parametrize(("name", "params", "shapes"), CASES, ids=IDS)
def test_packed_equals_sequences_one_by_one(
    name: str, params: dict[str, Any], shapes: dict[str, tuple[int | str, ...]]
) -> None:
    total = sum(LENGTHS)
    q, k, v = _qkv(total, 3, params.get("qk_l2norm") is False)
    x = _inputs(shapes, total, 4)
    cu = _cu(LENGTHS)
    kw: dict[str, Any] = {"causal": True, "backend": BACKEND, **params}
    args: dict[str, Any] = {**kw, **x}
    choice = attnlab.explain(q, k, v, method=name, cu_seqlens_q=cu, **args)
    assert choice.backend is not None and choice.backend.name == "triton" and not choice.per_sequence
    assert "in one launch on backend 'triton'" in str(choice)
    got = attnlab.attention(q, k, v, method=name, cu_seqlens_q=cu, **args)
    assert isinstance(got, Result) and isinstance(got.state, list) and len(got.state) == len(LENGTHS)
    assert got.state[2] is None  # the empty sequence has no state

    outs: list[Tensor] = []
    states: list[Any] = []
    for s, n in enumerate(LENGTHS):
        a = sum(LENGTHS[:s])
        if n == 0:
            states.append(None)
            continue
        xs: dict[str, Any] = {**kw, **{nm: t[:, :, a : a + n] if t.dim() > 2 else t for nm, t in x.items()}}
        r = attnlab.attention(q[:, :, a : a + n], k[:, :, a : a + n], v[:, :, a : a + n], method=name, **xs)
        assert isinstance(r, Result)
        outs.append(r.out)
        states.append(r.state)
    want = torch.cat(outs, 2)
    torch.testing.assert_close(got.out, want, atol=2e-5, rtol=2e-5)
    for a_, b_ in zip(got.state, states, strict=True):
        if b_ is None:
            continue
        assert isinstance(a_, Tensor) and a_.shape == b_.shape == (1, H, D, D)
        torch.testing.assert_close(a_, b_, atol=2e-5, rtol=2e-5)

    # gradients through the outputs and the final states, of q, k, v and the gates / beta
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    leaves = [q, k, v, *x.values()]

    def loss(out: Tensor, sts: list[Any]) -> Tensor:
        return (out * w).sum() + sum(st.square().sum() for st in sts if st is not None)

    g_got = torch.autograd.grad(loss(got.out, got.state), leaves)
    g_want = torch.autograd.grad(loss(want, states), leaves)
    for nm, a_, b_ in zip(["q", "k", "v", *x], g_got, g_want, strict=True):
        assert bool(a_.abs().sum() > 0), nm  # every input reaches the loss
        try:
            torch.testing.assert_close(a_, b_, atol=1e-4, rtol=1e-4)
        except AssertionError as e:
            raise AssertionError(f"d{nm}: {e}") from None


def test_query_and_key_packings_that_differ_are_refused() -> None:
    """A recurrence runs over each sequence's own tokens: a packing whose query and key lengths differ
    in a sequence is a cross pattern, refused with the sequence named."""
    q, k, v = _qkv(6, 1, False)
    with pytest.raises(UnsupportedPatternError, match="sequence 0 of the packed call.*causal_cross"):
        attnlab.attention(
            q, k, v, method="lightning", causal=True, backend=BACKEND, cu_seqlens_q=_cu([3, 3]),
            cu_seqlens_k=_cu([2, 4]),
        )  # fmt: skip
