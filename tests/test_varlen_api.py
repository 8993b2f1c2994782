"""Packed sequences (``cu_seqlens_q``/``cu_seqlens_k``) through ``attnlab.attention``, prepared ops and
``explain``: every registered method packed equals its sequences run one by one (odd lengths, a length-1
sequence, an empty one; tensor inputs cut along their token axes; stateful methods' final states); the
block-sparse executor's one-launch path (static, dynamic, per-head and dense plans; token columns) against
each sequence's reference, forward, lse and gradients; the per-sequence fallback's gradients; which path
runs; every bad input's error.

On a CPU, Triton kernels run in the interpreter (tiny shapes), and methods whose CPU backend would be
compiled FlexAttention (10-90 s per shape and score function) run their sequences on their next plain
backend: the packing logic under test is the same for every backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.core import Backend, Call, Capabilities, MethodSpec, Result
from attnlab.errors import InputError, UnsupportedPatternError
from attnlab.patterns import Pattern
from attnlab.registry import methods
from attnlab.testing import Case, device_under_test, on_cuda, state_tensors

DEVICE = device_under_test()
SELF = [5, 1, 0, 12]  # odd, length 1, an empty sequence
DECODE_Q, DECODE_K = [1, 2, 0, 1], [20, 9, 0, 13]  # a few queries against longer caches


def cu(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def bounds(lengths: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return [(ends[s], ends[s + 1]) for s in range(len(lengths))]


def plain_backend(spec: MethodSpec) -> str | None:
    """The backend the tests run a method's sequences on: the default, except on a CPU where it would be
    compiled FlexAttention: then the next backend that is neither Flex nor Triton (or the reference)."""
    if on_cuda():
        return None
    plain = [b.name for b in spec.backends if not b.triton]
    if not plain or plain[0] != "flex":
        return None
    rest = [n for n in plain if n != "flex"]
    return rest[0] if rest else "reference"


def cut(spec: MethodSpec, x: dict[str, Tensor], s: int, lq: list[int], lk: list[int]) -> dict[str, Tensor]:
    """Sequence ``s``'s tensor inputs, cut by hand along the dims declared N_q / N_k."""
    (q0, q1), (k0, k1) = bounds(lq)[s], bounds(lk)[s]
    out = {}
    for t in spec.inputs:
        if t.name not in x:
            continue
        val = x[t.name]
        for dim, sym in enumerate(t.shape):
            if sym == "N_q":
                val = val.narrow(dim, q0, q1 - q0)
            elif sym == "N_k":
                val = val.narrow(dim, k0, k1 - k0)
        out[t.name] = val
    return out


def one_by_one(
    spec: MethodSpec, q: Tensor, k: Tensor, v: Tensor, x: dict[str, Tensor], lq: list[int], lk: list[int],
    **kw: Any,
) -> tuple[Tensor, Tensor | None, list[Any]]:  # fmt: skip
    """(out, lse or None, states): each sequence alone through ``attnlab.attention``, packed by hand
    (an empty sequence or one without keys: zero rows, lse -inf)."""
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    states: list[Any] = []
    for s, ((q0, q1), (k0, k1)) in enumerate(zip(bounds(lq), bounds(lk), strict=True)):
        if q1 == q0 or k1 == k0:
            outs.append(torch.zeros(1, q.shape[1], q1 - q0, v.shape[3], device=q.device, dtype=q.dtype))
            lses.append(torch.full((1, q.shape[1], q1 - q0), float("-inf"), device=q.device))
            states.append(None)
            continue
        args: dict[str, Any] = {**kw, **cut(spec, x, s, lq, lk)}
        r = attnlab.attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], method=spec.name, **args)
        if isinstance(r, Result):
            outs.append(r.out)
            lses.append(r.lse if r.lse is not None else torch.empty(0))
            states.append(r.state)
        else:
            outs.append(r)
    lse = torch.cat(lses, 2) if kw.get("return_lse") else None
    return torch.cat(outs, 2), lse, states


def method_case(spec: MethodSpec) -> tuple[list[int], list[int], bool]:
    decode = spec.family == "decode"
    lq, lk = (DECODE_Q, DECODE_K) if decode else (SELF, SELF)
    causal = bool({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS} & spec.patterns)
    return lq, lk, causal


@pytest.mark.parametrize("name", list(methods()))
def test_every_method_packed_equals_its_sequences_run_alone(name: str) -> None:
    spec = methods()[name]
    lq, lk, causal = method_case(spec)
    params = dict(spec.test_params[0])
    case = Case(1, 2, 1, sum(lq), sum(lk), 16, torch.float32, causal, params, optional_inputs=True)
    q, k, v = case.inputs(DEVICE, seed=1)
    x = case.tensor_inputs(spec, DEVICE, seed=1)
    kw: dict[str, Any] = {"causal": causal, "backend": plain_backend(spec), **params}
    args: dict[str, Any] = {**kw, **x}
    got = attnlab.attention(q, k, v, method=name, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), **args)
    want, _, states = one_by_one(spec, q, k, v, x, lq, lk, **kw)
    out = got.out if isinstance(got, Result) else got
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert bool((out[:, :, sum(lq[:2]) : sum(lq[:3])] == 0).all())  # the empty sequence: no row at all
    if spec.stateful:  # each sequence's final state, None for the empty one
        assert isinstance(got, Result) and isinstance(got.state, list) and len(got.state) == len(lq)
        assert got.state[2] is None
        for a, b in zip(got.state, states, strict=True):
            for ta, tb in zip(state_tensors(a), state_tensors(b), strict=True):
                torch.testing.assert_close(ta, tb, atol=1e-5, rtol=1e-5)


# -- the block-sparse executor: one launch ------------------------------------------------------------
LONG = [5, 1, 0, 35, 9]  # sequences straddling the 32-token CPU tiles


def _softmax_on_the_executor() -> MethodSpec:
    return dataclasses.replace(attnlab.get("softmax"), backends=(BLOCK_SPARSE,))


EXECUTOR_CASES = [  # (method, params, causal, kv lengths or None for self)
    ("sliding_window", {"window": 7}, True, None),
    ("block_topk", {"block": 16, "topk": 2}, True, None),
    ("softmax", {}, True, [9, 2, 0, 20, 30]),  # cross: sequence 3 has 35 queries over 20 keys
    ("vertical_slash", dict(attnlab.get("vertical_slash").test_params[0]), True, None),  # token columns
    # its window reads the sequence's length: each sequence planned in its own coordinates (Flex refuses it)
    ("neighborhood", {"window": 5, "dilation": 2}, False, None),
]


@pytest.mark.parametrize(("name", "params", "causal", "lk"), EXECUTOR_CASES)
def test_the_executor_runs_packed_sequences_in_one_launch(
    name: str, params: dict[str, Any], causal: bool, lk: list[int] | None
) -> None:
    spec = _softmax_on_the_executor() if name == "softmax" else attnlab.get(name)
    lq, lk = LONG, LONG if lk is None else lk
    op = attnlab.api.Op(spec, spec.make_params(params), causal=causal, scale=0.3, backend="block_sparse",
                        check_finite=None, return_lse=True, return_plan=False)  # fmt: skip
    choice = op.explain(*Case(1, 2, 1, sum(lq), sum(lk), 16, torch.float32, causal).inputs(DEVICE),
                        cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk))  # fmt: skip
    assert not choice.per_sequence and "in one launch on backend 'block_sparse'" in str(choice)
    q, k, v = (
        t.requires_grad_(True)
        for t in Case(1, 2, 1, sum(lq), sum(lk), 16, torch.float32, causal).inputs(DEVICE, 2)
    )
    res = op(q, k, v, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk))
    assert isinstance(res, Result) and res.lse is not None
    refs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(bounds(lq), bounds(lk), strict=True):
        if q1 == q0 or k1 == k0:
            outs.append(torch.zeros(1, 2, q1 - q0, 16, device=DEVICE))
            lses.append(torch.full((1, 2, q1 - q0), float("-inf"), device=DEVICE))
            continue
        r = attnlab.attention(refs[0][:, :, q0:q1], refs[1][:, :, k0:k1], refs[2][:, :, k0:k1], method=name,
                              causal=causal, scale=0.3, backend="reference", return_lse=True, **params)  # fmt: skip
        assert r.lse is not None
        outs.append(r.out)
        lses.append(r.lse)
    want, want_lse = torch.cat(outs, 2), torch.cat(lses, 2)
    torch.testing.assert_close(res.out, want, atol=2e-5, rtol=1e-5)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(res.lse), finite)  # rows with no key: -inf on both sides
    torch.testing.assert_close(res.lse[finite], want_lse[finite], atol=2e-5, rtol=1e-5)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got_grads = torch.autograd.grad(res.out, (q, k, v), g)
    want_grads = torch.autograd.grad(want, refs, g)
    for label, a, b in zip(("dq", "dk", "dv"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=label)


def test_a_per_head_plan_and_return_plan_on_the_executor() -> None:
    """strided_heads (a subclass of the executor with its own per-head plan) packs its sequences' plans;
    ``return_plan`` gives each sequence's plan in its own coordinates, None for the empty one."""
    spec = attnlab.get("strided_heads")
    params = dict(spec.test_params[0])
    q, k, v = Case(1, 4, 2, sum(LONG), sum(LONG), 16, torch.float32, True).inputs(DEVICE, 4)
    res = attnlab.attention(q, k, v, method="strided_heads", causal=True, backend="block_sparse",
                            return_plan=True, cu_seqlens_q=cu(LONG), **params)  # fmt: skip
    assert isinstance(res, Result) and isinstance(res.plan, list) and len(res.plan) == len(LONG)
    assert res.plan[2] is None and res.plan[3].n_q == 35
    want, _, _ = one_by_one(spec, q, k, v, {}, LONG, LONG, causal=True, backend="reference", **params)
    torch.testing.assert_close(res.out, want, atol=2e-5, rtol=1e-5)


# -- the per-sequence fallback ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["softmax", "bias", "sigmoid"])
def test_the_fallback_has_the_gradients_of_its_sequences(name: str) -> None:
    """Gradients through the per-sequence path (q, k, v, and a tensor input cut along N_q and N_k)."""
    spec = attnlab.get(name)
    lq, lk = [5, 1, 0, 12], [7, 3, 0, 12]
    case = Case(1, 4, 2, sum(lq), sum(lk), 16, torch.float32, True, optional_inputs=True)
    leaves = [t.requires_grad_(True) for t in case.inputs(DEVICE, 5)]
    x = {n: t.requires_grad_(True) for n, t in case.tensor_inputs(spec, DEVICE, 5).items()}
    kw: dict[str, Any] = {"causal": True, "backend": plain_backend(spec)}
    args: dict[str, Any] = {**kw, **x}
    got = attnlab.attention(leaves[0], leaves[1], leaves[2], method=name, cu_seqlens_q=cu(lq),
                            cu_seqlens_k=cu(lk), **args)  # fmt: skip
    refs = [t.detach().clone().requires_grad_(True) for t in leaves]
    rx = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    want, _, _ = one_by_one(spec, refs[0], refs[1], refs[2], rx, lq, lk, **kw)
    assert isinstance(got, Tensor)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    a = torch.autograd.grad(got, [*leaves, *x.values()], g)
    b = torch.autograd.grad(want, [*refs, *rx.values()], g)
    assert len(a) == 3 + len(x) and (name != "bias" or len(x) == 1)
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


def test_the_fallback_packs_the_lse_and_rows_without_keys() -> None:
    lq, lk = [3, 2, 4], [4, 0, 6]  # sequence 1 has queries but no key
    q, k, v = Case(1, 4, 2, sum(lq), sum(lk), 16, torch.float32, False).inputs(DEVICE, 7)
    kw: dict[str, Any] = {"causal": True, "return_lse": True, "backend": None if on_cuda() else "reference"}
    res = attnlab.attention(q, k, v, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), **kw)
    assert isinstance(res, Result) and res.lse is not None
    _, want_lse, _ = one_by_one(attnlab.get("softmax"), q, k, v, {}, lq, lk, **kw)
    assert want_lse is not None
    assert bool((res.lse[:, :, 3:5] == float("-inf")).all())
    assert bool((res.out[:, :, 3:5] == 0).all())
    torch.testing.assert_close(res.lse, want_lse, atol=1e-5, rtol=1e-5)


def test_explain_says_which_path_runs_and_an_op_resolves_a_packing_once() -> None:
    q, k, v = Case(1, 4, 2, 18, 18, 16, torch.float32, True).inputs(DEVICE)
    choice = attnlab.explain(q, k, v, method="sliding_window", causal=True, window=3, cu_seqlens_q=cu(SELF))
    text = str(choice)
    assert "4 packed sequence(s) of lengths [5, 1, 0, 12]" in text
    # Flex's packed path runs only when named (dispatch.PACKED_BY_NAME_ONLY; tests/test_flex_varlen.py):
    # by default the executor takes it in one launch on a GPU, each sequence runs alone on a CPU
    if DEVICE.type == "cpu":
        assert choice.per_sequence and "each sequence runs separately" in text
    else:
        assert not choice.per_sequence and "one launch on backend 'block_sparse'" in text
    op = attnlab.prepare("sigmoid", causal=True)
    for _ in range(2):
        op(q, k, v, cu_seqlens_q=cu(SELF))
    assert len(op._packed) == 1
    op(q, k, v, cu_seqlens_q=cu([9, 9]))
    assert len(op._packed) == 2


def test_the_fallback_resolves_each_sequence_once_and_keeps_the_ops_own_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More distinct sequence lengths than an op's own cache holds: each is resolved once (not on every
    call), and the op's ordinary (unpacked) entries survive packed calls."""
    from attnlab import api

    lengths = list(range(1, api.OP_SIGNATURES + 6))
    total = sum(lengths)
    q, k, v = (torch.randn(1, 2, total, 8) for _ in range(3))
    packed = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    op = attnlab.prepare("softmax", causal=True, backend="sdpa")
    plain = (torch.randn(1, 2, 7, 8) for _ in range(3))
    pq, pk_, pv = plain
    op(pq, pk_, pv)
    resolved: list[int] = []
    original = api.Op.resolve

    def counting(self: Any, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Any:
        resolved.append(q.shape[2])
        return original(self, q, k, v, **kw)

    monkeypatch.setattr(api.Op, "resolve", counting)
    for _ in range(3):
        out = op(q, k, v, cu_seqlens_q=packed)
    assert isinstance(out, Tensor) and sorted(resolved) == lengths  # once per length over three calls
    for n in lengths[:: len(lengths) // 4]:  # a few sequences against running them alone
        first = sum(lengths[: n - 1])
        alone = op(q[:, :, first : first + n], k[:, :, first : first + n], v[:, :, first : first + n])
        assert isinstance(alone, Tensor) and torch.allclose(out[:, :, first : first + n], alone, atol=1e-6)
    resolved.clear()
    op(pq, pk_, pv)
    assert 7 not in resolved  # the plain entry was not evicted


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_packings_get_clear_errors() -> None:
    q, k, v = Case(1, 4, 2, 20, 20, 16, torch.float32, True).inputs(DEVICE)
    good = cu([7, 13])
    cases: list[tuple[Any, Any, str]] = [
        (torch.tensor([0.0, 7.0, 20.0]), None, "must hold integers"),
        ([0, 7, 20], None, "must be a torch.Tensor"),
        (cu([7, 13])[None], None, "1-D"),
        (torch.tensor([1, 7, 20], dtype=torch.int32), None, "must start at 0"),
        (
            torch.tensor([0, 12, 7, 20], dtype=torch.int32),
            None,
            "non-decreasing.*entry 2 is 7 < entry 1 = 12",
        ),
        (
            torch.tensor([0, 7, 19], dtype=torch.int32),
            None,
            "ends at 19, but the packed tensor has 20 tokens",
        ),
        (good, cu([20]), "cu_seqlens_q has 2 sequences, cu_seqlens_k 1"),
        (good, torch.tensor([0, 7, 21]), "cu_seqlens_k ends at 21"),
        (None, good, "cu_seqlens_k was given without cu_seqlens_q"),
    ]
    for cq, ck, match in cases:
        with pytest.raises(InputError, match=match):
            attnlab.attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck)
    with pytest.raises(TypeError):  # a dtype error is also a TypeError
        attnlab.attention(q, k, v, cu_seqlens_q=torch.tensor([0.0, 20.0]))
    q2, k2, v2 = Case(2, 4, 2, 20, 20, 16, torch.float32, True).inputs(DEVICE)
    with pytest.raises(InputError, match=r"layout q \(1, H, T_q, D\).*got q \(2, 4, 20, 16\)"):
        attnlab.attention(q2, k2, v2, cu_seqlens_q=good)
    kx, vx = k[:, :, :15], v[:, :, :15]
    with pytest.raises(InputError, match="cu_seqlens_k is needed when q and k have different totals"):
        attnlab.attention(q, kx, vx, cu_seqlens_q=good)
    with pytest.raises(InputError, match="q must be a torch.Tensor"):
        attnlab.attention("q", k, v, cu_seqlens_q=good)  # type: ignore[call-overload]


def test_packed_inputs_patterns_and_states_are_checked() -> None:
    q, k, v = Case(1, 4, 2, 20, 20, 16, torch.float32, True).inputs(DEVICE)
    gate = torch.rand(1, 4, 13, 16, device=DEVICE)  # one sequence's length, not the packed total
    with pytest.raises(InputError, match=r"gate has shape \(1, 4, 13, 16\).*N_q=20"):
        attnlab.attention(q, k, v, method="gated", cu_seqlens_q=cu([7, 13]), gate=gate)
    with pytest.raises(UnsupportedPatternError, match="sequence 1 of the packed call: method 'multi_axis'"):
        attnlab.attention(q, k[:, :, :18], v[:, :, :18], method="multi_axis", block=4, grid=3,
                          cu_seqlens_q=cu([7, 13]), cu_seqlens_k=cu([7, 11]))  # fmt: skip
    with pytest.raises(attnlab.errors.ParamError, match="takes no tensor input 'state'"):
        attnlab.prepare("softmax")(q, k, v, cu_seqlens_q=cu([7, 13]), state=q)
    lin = attnlab.attention(q, k, v, method="linear", causal=True)
    assert isinstance(lin, Result) and lin.state is not None
    with pytest.raises(InputError, match="a state with packed sequences"):
        attnlab.attention(q, k, v, method="linear", causal=True, cu_seqlens_q=cu([7, 13]), state=lin.state)


def test_a_stateful_backend_with_varlen_returns_each_sequences_state() -> None:
    """The hook for the linear kernels' op-level varlen: a stateful backend declaring ``varlen`` runs the
    packing in one call and returns each sequence's final state (here a stand-in running the method's
    reference per sequence, so the test checks the API's contract, not a kernel)."""
    base = attnlab.get("linear")

    class PackedLinear(Backend):
        name = "packed"
        caps = Capabilities(stateful=True, varlen=True)
        calls = 0

        def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
            raise AssertionError("not called for a packed call")

        def run_varlen_state(
            self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
        ) -> tuple[Tensor, list[Any]]:
            PackedLinear.calls += 1
            pk = call.packing
            assert pk is not None
            outs: list[Tensor] = []
            states: list[Any] = []
            for s in range(pk.count):
                q0, q1, k0, k1 = pk.bounds(s)
                if q1 == q0:
                    outs.append(q.new_zeros(1, q.shape[1], 0, v.shape[3]))
                    states.append(None)
                    continue
                o, st = base.reference(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], call.params,
                                       causal=call.problem.causal, scale=call.scale)  # fmt: skip
                outs.append(o.to(q.dtype))
                states.append(st)
            return torch.cat(outs, 2), states

    spec = dataclasses.replace(base, backends=(PackedLinear(),), training_backends=())
    op = attnlab.api.Op(spec, spec.make_params({}), causal=True, scale=None, backend=None,
                        check_finite=None, return_lse=False, return_plan=False)  # fmt: skip
    q, k, v = Case(1, 2, 1, sum(SELF), sum(SELF), 16, torch.float32, True).inputs(DEVICE, 8)
    res = op(q, k, v, cu_seqlens_q=cu(SELF))
    assert PackedLinear.calls == 1 and isinstance(res, Result)
    assert isinstance(res.state, list) and len(res.state) == len(SELF) and res.state[2] is None
    want, _, states = one_by_one(base, q, k, v, {}, SELF, SELF, causal=True, backend="torch_chunk")
    torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(res.state, states, strict=True):
        for ta, tb in zip(state_tensors(a), state_tensors(b), strict=True):
            torch.testing.assert_close(ta, tb, atol=1e-5, rtol=1e-5)
