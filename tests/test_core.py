"""The core types and the hot path: prepared ops, their caches, capabilities, results, tensor inputs, state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.backends.eager import EAGER
from attnlab.core import Backend, Call, Capabilities, MethodSpec, Result, TensorInput
from attnlab.dispatch import choose
from attnlab.errors import BackendError, InputError, ParamError
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS, SELF_PATTERNS
from attnlab.reference import masked_softmax_attention
from attnlab.registry import registered
from attnlab.testing import random_qkv


def qkv(b: int = 1, h: int = 4, hk: int = 2, n: int = 16, nk: int | None = None, d: int = 16) -> list[Tensor]:
    return random_qkv(b, h, hk, n, n if nk is None else nk, d, device="cpu")


# -- prepared ops -------------------------------------------------------------------------------------
def test_a_prepared_op_matches_attention_and_resolves_each_signature_once() -> None:
    op = attnlab.prepare("sliding_window", causal=True, window=5)
    q, k, v = qkv()
    want = attnlab.attention(q, k, v, method="sliding_window", causal=True, window=5)
    got = op(q, k, v)
    assert isinstance(got, Tensor) and torch.equal(got, want)
    entries = op._entries
    assert len(entries) == 1
    first = next(iter(entries.values()))
    for _ in range(3):
        op(q, k, v)
    assert len(entries) == 1 and next(iter(entries.values())) is first  # the resolution is reused
    q2, k2, v2 = qkv(n=24)
    op(q2, k2, v2)
    assert len(entries) == 2  # a new shape is validated and dispatched again


def test_a_new_signature_is_validated_in_full() -> None:
    op = attnlab.prepare("softmax")
    q, k, v = qkv()
    op(q, k, v)
    with pytest.raises(InputError, match="grouped-query attention needs H % H_kv == 0"):
        op(*qkv(h=3, hk=2))
    with pytest.raises(InputError, match="must share one dtype"):
        op(q, k.double().float().half(), v)
    with pytest.raises(InputError, match="q must be a torch.Tensor"):
        op([1, 2], k, v)  # type: ignore[arg-type]


def test_parameters_are_validated_when_the_op_is_prepared() -> None:
    with pytest.raises(ParamError, match="window=0 is invalid"):
        attnlab.prepare("sliding_window", window=0)
    with pytest.raises(ParamError, match="has no backend 'flax'.*Did you mean 'flex'"):
        attnlab.prepare("sliding_window", backend="flax")
    with pytest.raises(InputError, match="causal must be a bool"):
        attnlab.prepare("softmax", causal=1)  # type: ignore[arg-type]


def test_dispatch_follows_settings_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    op = attnlab.prepare("sigmoid", backend="reference")
    q, k, v = qkv()
    op(q, k, v)
    monkeypatch.setattr(attnlab.settings, "max_dense_elements", 100)
    with pytest.raises(attnlab.DenseTooLargeError, match="max_dense_elements=100"):
        op(q, k, v)


def test_gradients_change_the_signature_and_honour_backward() -> None:
    op = attnlab.prepare("dilated", causal=True, window=3)
    q, k, v = qkv()
    chosen = op.explain(q, k, v).backend
    assert chosen is not None and chosen.name == "flex"
    q.requires_grad_(True)
    out = op(q, k, v)  # flex has no CPU backward: dispatch picks the next backend that has one
    assert isinstance(out, Tensor)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    chosen = op.explain(q, k, v).backend
    assert chosen is not None and chosen.name != "flex" and chosen.backward


def test_training_backends_go_first_only_when_a_gradient_is_needed() -> None:
    class Named(Backend):
        caps = Capabilities(backward=True)

        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
            return masked_softmax_attention(q, k, v, scale=call.scale, mask=None)

    base = attnlab.get("softmax")
    spec = dataclasses.replace(
        base, backends=(Named("fast_fwd"), Named("fast_bwd")), training_backends=("fast_bwd",)
    )
    assert [b.name for b in spec.backends_for(False)] == ["fast_fwd", "fast_bwd"]
    assert [b.name for b in spec.backends_for(True)] == ["fast_bwd", "fast_fwd"]
    call = dataclasses.replace(_call({"causal": True}), spec=spec)
    assert choose(call).backend.name == "fast_fwd"  # type: ignore[union-attr]
    grad_call = dataclasses.replace(call, problem=dataclasses.replace(call.problem, requires_grad=True))
    assert choose(grad_call).backend.name == "fast_bwd"  # type: ignore[union-attr]
    assert choose(grad_call, "fast_fwd").backend.name == "fast_fwd"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"training_backends \['flax'\] are not among its backends"):
        dataclasses.replace(base, training_backends=("flax",))


def test_attention_reuses_ops_and_takes_unhashable_params_through_validation() -> None:
    from attnlab import api

    q, k, v = qkv()
    attnlab.attention(q, k, v, method="streaming", sinks=2, window=4)
    n = len(api._OPS)
    attnlab.attention(q, k, v, method="streaming", sinks=2, window=4)
    assert len(api._OPS) == n
    with pytest.raises(ParamError, match="window=\\[4\\] is invalid"):
        attnlab.attention(q, k, v, method="sliding_window", window=[4])


def test_explain_takes_every_argument_attention_does() -> None:
    q, k, v = qkv()
    choice = attnlab.explain(
        q, k, v, method="sliding_window", causal=True, scale=0.5, backend="sdpa_mask", check_finite=True,
        return_lse=False, return_plan=True, window=3,
    )  # fmt: skip
    assert choice.backend is not None and choice.backend.name == "sdpa_mask"
    text = str(choice)
    assert "method 'sliding_window'" in text and "runs on backend 'sdpa_mask'" in text


# -- capabilities -------------------------------------------------------------------------------------
def _call(problem_kw: dict[str, Any] | None = None, *, want_lse: bool = False) -> Call:
    q, k, v = qkv()
    call = attnlab.resolve(q, k, v, method="softmax")
    if problem_kw:
        call = dataclasses.replace(call, problem=dataclasses.replace(call.problem, **problem_kw))
    return dataclasses.replace(call, want_lse=want_lse)


def test_capabilities_return_every_reason_at_once() -> None:
    caps = Capabilities(
        devices=("cuda",),
        dtypes=(torch.bfloat16,),
        max_head_dim=8,
        same_v_dim=True,
        patterns=SELF_PATTERNS,
        gqa=False,
        backward=False,
    )
    call = _call({"requires_grad": True, "v_dim": 12, "n_k": 32}, want_lse=True)
    reasons = caps.reasons(call)
    expected = [
        "runs on cuda, not cpu",
        "takes bfloat16, not float32",
        "takes head dims up to 8, got D=16, D_v=12",
        "needs D_v == D, got D=16, D_v=12",
        "does not run the noncausal_cross pattern",
        "has no grouped-query attention (H=4, H_kv=2)",
        "has no backward and an input requires grad",
        "cannot return the log-sum-exp (return_lse=True)",
    ]
    assert reasons == expected
    assert Capabilities().reasons(_call()) == []


def test_a_backend_adds_its_own_reasons_after_the_declared_ones() -> None:
    class Picky(Backend):
        name = "picky"
        caps = Capabilities(devices=("cuda",))

        def reasons(self, call: Call) -> list[str]:
            return ["needs a full moon"]

        def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
            raise AssertionError("never chosen")

    ok, why = Picky().can_use(_call())
    assert not ok and why == "runs on cuda, not cpu; needs a full moon"


def test_plan_kinds_are_enforced() -> None:
    q, k, v = qkv()
    call = attnlab.resolve(q, k, v, method="sliding_window", window=3)
    assert "does not execute static sparsity plans" in attnlab.get("softmax").backends[0].refusals(call)


# -- results -------------------------------------------------------------------------------------------
def test_return_lse_gives_a_result_with_the_reference_lse() -> None:
    q, k, v = qkv(n=9, nk=20)
    res = attnlab.attention(q, k, v, method="streaming", causal=True, sinks=1, window=3, backend="reference",
                            return_lse=True, return_plan=True)  # fmt: skip
    assert isinstance(res, Result) and res.lse is not None and res.plan is not None
    mask = res.plan.dense_mask()[0, 0]
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 16**-0.5
    want = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(res.lse, want)
    assert torch.equal(res.out, attnlab.attention(q, k, v, method="streaming", causal=True, sinks=1, window=3,
                                                  backend="reference"))  # fmt: skip


def test_lse_is_refused_where_it_does_not_exist() -> None:
    q, k, v = qkv()
    with pytest.raises(BackendError, match="not softmax-normalised: it has no log-sum-exp"):
        attnlab.attention(q, k, v, method="sigmoid", backend="reference", return_lse=True)
    with pytest.raises(BackendError, match="sdpa_mask: cannot return the log-sum-exp"):
        attnlab.attention(q, k, v, method="sliding_window", window=2, backend="sdpa_mask", return_lse=True)


def test_rows_without_keys_have_zero_output_and_minus_inf_lse() -> None:
    q, k, v = qkv(n=6, nk=3)  # causal, N_q > N_k: the first 3 queries see no key
    res = attnlab.attention(q, k, v, causal=True, backend="reference", return_lse=True)
    assert isinstance(res, Result) and res.lse is not None
    assert torch.equal(res.out[:, :, :3], torch.zeros_like(res.out[:, :, :3]))
    assert torch.isneginf(res.lse[:, :, :3]).all() and torch.isfinite(res.lse[:, :, 3:]).all()


# -- tensor inputs beyond q, k, v, and state ------------------------------------------------------------
@dataclass(frozen=True)
class _GateParams(Params):
    """No parameters."""

    method = "test_gated"


def _gated_reference(
    q: Tensor, k: Tensor, v: Tensor, params: Any, *, causal: bool, scale: float, upcast: bool = True,
    gate: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """softmax attention times sigmoid(gate) per (batch, head, query)."""
    out = masked_softmax_attention(q, k, v, scale=scale, mask=None, upcast=upcast)
    assert gate is not None
    return (out.float() * torch.sigmoid(gate.float())[..., None]).to(q.dtype)


GATED = MethodSpec(
    name="test_gated",
    family="dense",
    paper="(test)",
    summary="softmax attention with an output gate (a test method)",
    param_class=_GateParams,
    reference=_gated_reference,  # type: ignore[arg-type]
    backends=(EAGER,),
    patterns=ALL_PATTERNS,
    test_params=({},),
    bench_params=lambda n: [{}],
    inputs=(TensorInput("gate", ("B", "H", "N_q"), "output gate logits", broadcast=True),),
)


def test_declared_tensor_inputs_are_validated_and_passed() -> None:
    q, k, v = qkv()
    gate = torch.randn(1, 4, 16)
    with registered(GATED):
        out = attnlab.attention(q, k, v, method="test_gated", gate=gate)
        want = _gated_reference(q, k, v, None, causal=False, scale=0.25, gate=gate)
        torch.testing.assert_close(out, want)
        op = attnlab.prepare("test_gated")
        torch.testing.assert_close(
            op(q, k, v, gate=gate[:, :1]), op(q, k, v, gate=gate[:, :1].expand(1, 4, 16))
        )
        with pytest.raises(InputError, match=r"needs the tensor input gate \(B, H, N_q; 1 broadcasts\)"):
            op(q, k, v)
        with pytest.raises(InputError, match=r"gate has shape \(1, 4, 15\); method 'test_gated' expects "
                                              r"\(B=1, H=4, N_q=16\) where any dim may be 1"):  # fmt: skip
            op(q, k, v, gate=torch.randn(1, 4, 15))
        with pytest.raises(InputError, match="gate has dtype torch.int64; expected a floating dtype"):
            op(q, k, v, gate=torch.ones(1, 4, 16, dtype=torch.long))
        with pytest.raises(ParamError, match="takes no tensor input 'gates'"):
            op(q, k, v, gate=gate, gates=gate)
        gate_bad = gate.clone()
        gate_bad[0, 0, 0] = float("nan")
        with pytest.raises(InputError, match="gate contains 1 NaN/Inf"):
            attnlab.attention(q, k, v, method="test_gated", gate=gate_bad, check_finite=True)
    assert "test_gated" not in attnlab.methods()


@dataclass(frozen=True)
class _KeyMaskParams(Params):
    """No parameters."""

    method = "test_key_mask"


def _key_mask_reference(
    q: Tensor, k: Tensor, v: Tensor, params: Any, *, causal: bool, scale: float, upcast: bool = True,
    key_mask: Tensor | None = None, scores_bias: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """softmax attention over the keys where ``key_mask`` (B, N_k, bool) is True, plus a float bias per key."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if scores_bias is not None:
        v = v + 0 * scores_bias.sum()  # the float input takes part in the graph (its gradient is checked)
    return masked_softmax_attention(q, k, v, scale=scale, mask=mask, upcast=upcast)


def _half_true(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    m = torch.rand(shape, generator=g) < 0.5
    m[..., 0] = True  # every row keeps a key
    return m


KEY_MASKED = MethodSpec(
    name="test_key_mask",
    family="dense",
    paper="(test)",
    summary="softmax attention over a boolean key mask (a test method)",
    param_class=_KeyMaskParams,
    reference=_key_mask_reference,  # type: ignore[arg-type]
    backends=(EAGER,),
    patterns=frozenset({attnlab.Pattern.NONCAUSAL_SELF}),
    test_params=({},),
    bench_params=lambda n: [{}],
    inputs=(
        TensorInput("key_mask", ("B", "N_k"), "True: a real key", kind="bool", sample=_half_true),
        TensorInput("scores_bias", ("B",), "a float input beside it", required=False),
    ),
)


def test_bool_and_int_tensor_inputs_are_validated_and_carry_no_gradient() -> None:
    from attnlab.testing import Case, check_parity

    q, k, v = qkv(hk=4)
    mask = _half_true((1, 16), torch.Generator().manual_seed(0))
    with registered(KEY_MASKED):
        out = attnlab.attention(q, k, v, method="test_key_mask", key_mask=mask, check_finite=True)
        torch.testing.assert_close(out, _key_mask_reference(q, k, v, None, causal=False, scale=0.25,
                                                            key_mask=mask))  # fmt: skip
        with pytest.raises(InputError, match=r"key_mask has dtype torch.float32; expected torch.bool"):
            attnlab.attention(q, k, v, method="test_key_mask", key_mask=mask.float())
        case = Case(2, 4, 2, 9, 9, 8, torch.float32, causal=False, optional_inputs=True)
        drawn = case.tensor_inputs(KEY_MASKED, "cpu")
        assert drawn["key_mask"].dtype == torch.bool and not bool(drawn["key_mask"].all())
        check = check_parity(KEY_MASKED, "eager", case, "cpu")
        assert check.passed, check.summary()
        assert {"out", "dq", "dk", "dv", "dscores_bias"} <= set(check.errors)
        assert "dkey_mask" not in check.errors  # a bool input has no gradient
    with pytest.raises(ValueError, match="'offsets' \\(int\\) needs a sample function"):
        TensorInput("offsets", ("B",), "sequence starts", kind="int")
    with pytest.raises(ValueError, match="kind 'complex'"):
        TensorInput("x", ("B",), "x", kind="complex")
    ints = TensorInput(
        "offsets", ("B",), "starts", kind="int", sample=lambda s, g: torch.zeros(s, dtype=torch.long)
    )
    assert ints.random({"B": 3}, torch.Generator(), device="cpu", dtype=torch.bfloat16).dtype == torch.int64


@dataclass(frozen=True)
class _LowRankParams(Params):
    """No parameters."""

    method = "test_low_rank"


def _low_rank_reference(
    q: Tensor, k: Tensor, v: Tensor, params: Any, *, causal: bool, scale: float, upcast: bool = True,
    u: Tensor | None = None, w: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """softmax(q k^T * scale + u w^T) v: a score bias of rank R given by its factors."""
    assert u is not None and w is not None
    bias = torch.matmul(u.float(), w.float().transpose(-1, -2))
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + bias
    return torch.matmul(torch.softmax(s, -1), v.float()).to(q.dtype)


LOW_RANK = MethodSpec(
    name="test_low_rank",
    family="dense",
    paper="(test)",
    summary="softmax attention with a low-rank score bias (a test method)",
    param_class=_LowRankParams,
    reference=_low_rank_reference,  # type: ignore[arg-type]
    backends=(EAGER,),
    patterns=frozenset({attnlab.Pattern.NONCAUSAL_SELF}),
    gqa=False,
    test_params=({},),
    bench_params=lambda n: [{}],
    inputs=(
        TensorInput("u", ("B", "H", "N_q", "R"), "query-side factor"),
        TensorInput("w", ("B", "H", "N_k", "R"), "key-side factor"),
    ),
)


def test_a_free_symbol_takes_its_size_from_the_first_input_and_binds_the_others() -> None:
    from attnlab.core import FREE_SIZE
    from attnlab.testing import Case, check_parity

    q, k, v = qkv(hk=4)
    u, w = torch.randn(1, 4, 16, 3), torch.randn(1, 4, 16, 3)
    with registered(LOW_RANK):
        out = attnlab.attention(q, k, v, method="test_low_rank", u=u, w=w)
        torch.testing.assert_close(
            out, _low_rank_reference(q, k, v, None, causal=False, scale=0.25, u=u, w=w)
        )
        rank5 = torch.randn(1, 4, 16, 5)
        with pytest.raises(InputError, match=r"w has shape \(1, 4, 16, 5\); method 'test_low_rank' expects "
                                              r"\(B=1, H=4, N_k=16, R=3\) \(free sizes fixed by u\)"):  # fmt: skip
            attnlab.attention(q, k, v, method="test_low_rank", u=u, w=rank5)
        case = Case(1, 2, 2, 7, 7, 8, torch.float32, causal=False)
        drawn = case.tensor_inputs(LOW_RANK, "cpu")
        assert drawn["u"].shape[-1] == drawn["w"].shape[-1] == FREE_SIZE
        check = check_parity(LOW_RANK, "eager", case, "cpu")
        assert check.passed and {"du", "dw"} <= set(check.errors), check.summary()
    assert LOW_RANK.inputs[0].free_symbols() == ("R",)


@dataclass(frozen=True)
class _SumParams(Params):
    """No parameters."""

    method = "test_running_sum"


def _running_sum_reference(
    q: Tensor, k: Tensor, v: Tensor, params: Any, *, causal: bool, scale: float, upcast: bool = True,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Unnormalised causal linear attention: S_t = S_{t-1} + k_t v_t^T, o_t = q_t S_t; state S (B,H,D,D_v)."""
    s = torch.zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3]) if state is None else state
    outs = []
    for t in range(q.shape[2]):
        s = s + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], s))
    return torch.stack(outs, 2), s


RUNNING_SUM = MethodSpec(
    name="test_running_sum",
    family="linear",
    paper="(test)",
    summary="a stateful test method",
    param_class=_SumParams,
    reference=_running_sum_reference,  # type: ignore[arg-type]
    backends=(EAGER,),
    patterns=frozenset({attnlab.Pattern.CAUSAL_SELF}),
    test_params=({},),
    bench_params=lambda n: [{}],
    gqa=False,
    stateful=True,
)


def test_state_flows_in_and_out_of_a_stateful_method() -> None:
    q, k, v = qkv(hk=4, n=10)
    with registered(RUNNING_SUM):
        op = attnlab.prepare("test_running_sum", causal=True)
        whole = op(q, k, v)
        assert isinstance(whole, Result) and whole.state is not None
        first = op(q[:, :, :6], k[:, :, :6], v[:, :, :6])
        assert isinstance(first, Result)
        second = op(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], state=first.state)
        assert isinstance(second, Result)
        torch.testing.assert_close(torch.cat([first.out, second.out], 2), whole.out)
        torch.testing.assert_close(second.state, whole.state)
        # the same through attnlab.attention: state= is the state, not a parameter
        third = attnlab.attention(
            q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], method="test_running_sum", causal=True, state=first.state
        )
        assert isinstance(third, Result)
        torch.testing.assert_close(third.state, whole.state)
        flex_like = [b for b in attnlab.get("softmax").backends if not b.caps.stateful]
        call = attnlab.resolve(q, k, v, method="test_running_sum", causal=True)
        assert "cannot carry the method's recurrent state" in flex_like[0].refusals(call)
        assert choose(call).backend is EAGER


def test_registered_leaves_a_registered_spec_registered() -> None:
    spec = attnlab.get("sliding_window")
    with registered(spec) as same:
        assert same is spec
    assert attnlab.get("sliding_window") is spec


def test_registered_removes_the_method_even_on_error() -> None:
    with pytest.raises(RuntimeError), registered(GATED):
        raise RuntimeError
    assert "test_gated" not in attnlab.methods()


def test_register_missing_registers_only_what_is_absent() -> None:
    from attnlab.registry import register_missing

    assert register_missing([attnlab.get("softmax")]) == []  # already there: left alone
    try:
        assert register_missing([GATED, attnlab.get("softmax")]) == [GATED.name]
        assert attnlab.get(GATED.name) is GATED
    finally:
        attnlab.registry._REGISTRY.pop(GATED.name, None)


def test_a_prepared_decode_op_grows_its_cache_length_without_resolving_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decode loop (N_k + 1 per step) on a backend whose refusals cannot depend on N_k: the op resolves
    its first step only, and every step equals a fresh call; a self-attention call is a new pattern."""
    op = attnlab.prepare("page_topk", causal=True, backend="torch", budget=8, page=4)
    resolved: list[int] = []
    real = attnlab.api.Op.resolve

    def counting(self: attnlab.api.Op, q: Tensor, k: Tensor, v: Tensor) -> Any:
        if self is op:
            resolved.append(k.shape[2])
        return real(self, q, k, v)

    monkeypatch.setattr(attnlab.api.Op, "resolve", counting)
    g = torch.Generator().manual_seed(0)
    k_all, v_all = torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    state = None
    for n_k in range(30, 40):
        q = torch.randn(2, 4, 1, 16, generator=g)
        k, v = k_all[:, :, :n_k], v_all[:, :, :n_k]
        res = op(q, k, v, state=state)
        fresh = attnlab.prepare("page_topk", causal=True, backend="torch", budget=8, page=4)(
            q, k, v, state=state
        )
        assert isinstance(res, Result) and isinstance(fresh, Result)
        torch.testing.assert_close(res.out, fresh.out, rtol=0, atol=0)
        state = res.state
    assert resolved == [30]  # the op resolved its first step only
    op(torch.randn(2, 4, 12, 16), k_all[:, :, :12], v_all[:, :, :12])  # N_q == N_k: another pattern
    assert resolved[-1] == 12
    with pytest.raises(InputError, match="must have the same heads"):  # a bad step is still validated
        op(q, k_all[:, :, :20], v_all[:, :, :21])


def test_parity_cases_skip_head_dims_a_parameter_set_refuses_by_design() -> None:
    """based's Taylor mixer takes D <= 64 (its feature count grows as D^2): no D=128 case for it, while the
    window mixer keeps its D=128 case; a method without a limit keeps every head dim."""
    from attnlab.testing import cases_for

    def dims(name: str) -> set[tuple[int, str]]:
        cases = cases_for(attnlab.get(name), lengths=((17, 17),), head_dims=(16, 128), groups=(1,),
                          dtypes=(torch.float32,))  # fmt: skip
        return {(c.head_dim, str(c.params.get("mixer", ""))) for c in cases}

    based = attnlab.get("based")
    assert based.make_params({}).head_dim_limit() == 64
    assert dims("based") == {(16, ""), (16, "window"), (128, "window")}
    assert {d for d, _ in dims("softmax")} == {16, 128}


def test_decode_shaped_sdpa_calls_put_flash_attention_before_cudnn() -> None:
    """cuDNN plans per shape (tens of ms) and a decode loop's key length changes every step: decode-shaped
    calls (<= 16 queries against more keys) ask FlashAttention first, prefill shapes keep cuDNN first."""
    from torch.nn.attention import SDPBackend

    from attnlab.kernels.sdpa import DECODE_PRIORITY, SDPA_PRIORITY, priority_for

    assert SDPA_PRIORITY[0] == SDPBackend.CUDNN_ATTENTION and DECODE_PRIORITY[0] == SDPBackend.FLASH_ATTENTION
    assert set(SDPA_PRIORITY) == set(DECODE_PRIORITY)
    assert priority_for(1, 131072) == DECODE_PRIORITY and priority_for(16, 17) == DECODE_PRIORITY
    assert priority_for(17, 4096) == SDPA_PRIORITY  # a chunk of prefill
    assert priority_for(8, 8) == SDPA_PRIORITY and priority_for(4096, 4096) == SDPA_PRIORITY


def test_per_call_settings_keep_prepared_ops_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_values / check_finite are read on every call: toggling them must not re-resolve a prepared op
    (a captured decode loop would refuse a new signature), unlike a dispatch setting."""
    op = attnlab.prepare("softmax")
    q, k, v = qkv()
    op(q, k, v)
    before = dict(op._entries)
    monkeypatch.setattr(attnlab.settings, "check_values", False)
    monkeypatch.setattr(attnlab.settings, "check_finite", True)
    op(q, k, v)
    assert dict(op._entries) == before
    monkeypatch.setattr(attnlab.settings, "max_dense_elements", 2**27)
    op(q, k, v)
    assert len(op._entries) != len(before) or dict(op._entries) != before


def test_estimate_inputs_are_checked_at_registration() -> None:
    seer = attnlab.get("seer")
    with pytest.raises(ValueError, match=r"estimate_inputs \['nope'\] are not declared tensor inputs"):
        dataclasses.replace(seer, estimate_inputs=("nope",))
    with pytest.raises(ValueError, match="given but the method has no estimate"):
        dataclasses.replace(seer, estimate=None)


def test_training_backends_named_twice_are_refused() -> None:
    base = attnlab.get("alibi")
    with pytest.raises(ValueError, match=r"names \['flex'\] more than once"):
        dataclasses.replace(base, training_backends=("flex", "eager", "flex"))


def test_a_tensor_input_that_requires_grad_makes_a_training_call() -> None:
    """Only a method's extra input (not q, k, v) requires grad: dispatch treats the call as training
    (training_backends first, a backend without backward skipped), on ops, attention and explain."""
    ran: list[str] = []

    class Named(Backend):
        def __init__(self, name: str, backward: bool) -> None:
            self.name = name
            self.caps = Capabilities(backward=backward)

        def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
            ran.append(self.name)
            out = masked_softmax_attention(q, k, v, scale=call.scale, mask=None)
            return out * extra["gain"][None, :, None, None]

    gain = TensorInput("gain", ("H",), "a per-head output gain")
    spec = dataclasses.replace(
        attnlab.get("softmax"),
        backends=(Named("fwd_only", False), Named("other", True), Named("train", True)),
        training_backends=("train",),
        inputs=(gain,),
    )
    op = attnlab.api.Op(spec, spec.make_params({}), causal=True, scale=None, backend=None,
                        check_finite=None, return_lse=False, return_plan=False)  # fmt: skip
    q, k, v = qkv()
    g = torch.ones(4)
    assert op.explain(q, k, v, gain=g).backend.name == "fwd_only"  # type: ignore[union-attr]
    op(q, k, v, gain=g)
    g.requires_grad_(True)
    assert op.explain(q, k, v, gain=g).backend.name == "train"  # type: ignore[union-attr]
    out = op(q, k, v, gain=g)
    assert isinstance(out, Tensor) and ran == ["fwd_only", "train"]
    out.sum().backward()
    assert g.grad is not None
    with torch.no_grad():  # no gradient wanted: the inference order again
        op(q, k, v, gain=g)
    assert ran[-1] == "fwd_only"
    no_training = dataclasses.replace(spec, training_backends=())
    op2 = attnlab.api.Op(no_training, spec.make_params({}), causal=True, scale=None, backend=None,
                         check_finite=None, return_lse=False, return_plan=False)  # fmt: skip
    op2(q, k, v, gain=g)
    assert ran[-1] == "other"  # the backend without backward is skipped


def test_the_generic_block_sparse_backend_gives_the_estimator_its_inputs() -> None:
    """seer's estimator takes its gate weights (estimate_inputs) on the generic executor backend: the plan
    and the output follow the weights (the reference's, with the same weights), not the weightless gate."""
    from attnlab.backends.block_sparse import BLOCK_SPARSE
    from attnlab.testing import Case, device_under_test

    seer = attnlab.get("seer")
    spec = dataclasses.replace(seer, backends=(BLOCK_SPARSE,), training_backends=())
    case = Case(1, 4, 2, 96, 96, 16, torch.float32, True, {"block": 16, "topk": 2}, optional_inputs=True)
    dev = device_under_test()  # (the executor runs on a GPU where there is one, not on its CPU)
    q, k, v = case.inputs(dev, seed=3)
    w = case.tensor_inputs(seer, dev, seed=3)
    params = spec.make_params(case.params)
    op = attnlab.api.Op(spec, params, causal=True, scale=None, backend="block_sparse",
                        check_finite=None, return_lse=True, return_plan=True)  # fmt: skip
    res = op(q, k, v, **w)
    assert isinstance(res, Result)
    call = attnlab.resolve(q, k, v, method="seer", causal=True, **case.params)
    want_plan = seer.estimate_plan(q, k, call, w)
    assert seer.estimate is not None
    weightless = seer.estimate(q, k, params, causal=True, scale=call.scale)
    assert torch.equal(res.plan.dense_mask(), want_plan.dense_mask())
    assert not torch.equal(want_plan.dense_mask(), weightless.dense_mask())  # the weights matter here
    kw: dict[str, Any] = {**case.params, **w}
    ref = attnlab.attention(q, k, v, method="seer", causal=True, backend="reference", return_lse=True, **kw)
    torch.testing.assert_close(res.out, ref.out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(res.lse, ref.lse, atol=2e-5, rtol=1e-5)


def test_the_sdpa_priority_order_is_scoped_per_call_across_threads() -> None:
    """SDPA's kernel order is process-wide: a second thread's call (prefill-like) that starts while a first
    one (decode-like) runs waits for it, so each runs under its own order, and the order is the user's
    again after both (without the lock the first call ran on under the second's order)."""
    import threading

    from attnlab.kernels.sdpa import _DECODE, _PRIORITY, _scoped_priority

    before = torch._C._get_sdp_priority_order()
    seen: dict[str, list[int]] = {}
    started, second_in, first_done = threading.Event(), threading.Event(), threading.Event()

    def first_call() -> Tensor:
        started.set()
        second_in.wait(0.5)  # (with the lock the second call cannot start now: this times out)
        seen["first"] = torch._C._get_sdp_priority_order()
        return torch.zeros(1)

    def second_call() -> Tensor:
        second_in.set()
        first_done.wait(0.5)
        seen["second"] = torch._C._get_sdp_priority_order()
        return torch.zeros(1)

    def first() -> None:
        _scoped_priority(_DECODE, first_call)
        first_done.set()

    def second() -> None:
        started.wait(5)
        _scoped_priority(_PRIORITY, second_call)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["first"][: len(_DECODE)] == _DECODE and seen["second"][: len(_PRIORITY)] == _PRIORITY
    assert torch._C._get_sdp_priority_order() == before
