"""The stateful fast path of a prepared op (``Op.__call__``): a repeated decode call's signature (q, k, v
shapes, dtypes, devices; the tensor inputs given, by name, shape, dtype and device; the state's type)
runs the backend without the general ``_execute``, with bitwise the same result; a new signature, a
NaN/Inf scan or gradients take the general path, and bad inputs raise as before. (CPU: Triton's
interpreter, tiny shapes; conftest sets TRITON_INTERPRET.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnlab
from attnlab import api
from attnlab.errors import InputError, ParamError
from attnlab.testing import device_under_test

DEVICE = device_under_test()
B, H, D = 1, 2, 16


def _step(seed: int, dtype: torch.dtype = torch.float32, b: int = B) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, H, 1, D, generator=gen).to(DEVICE, dtype) for _ in range(3))
    beta = torch.rand(b, H, 1, generator=gen).to(DEVICE, dtype)
    g = (-torch.rand(b, H, 1, 1, generator=gen)).to(DEVICE, dtype)
    return {"q": q, "k": k, "v": v, "beta": beta, "g": g}


def _count_execute(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = api._execute

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "_execute", counting)
    return calls


def _run(op: Any, x: dict[str, torch.Tensor], state: Any, **kw: Any) -> Any:
    return op(x["q"], x["k"], x["v"], state=state, beta=x["beta"], g=x["g"], **kw)


def test_repeated_decode_step_takes_the_fast_path_with_bitwise_equal_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_execute(monkeypatch)
    op = attnlab.prepare("gated_delta", causal=True, backend="triton")
    ref = attnlab.prepare("gated_delta", causal=True, backend="triton")
    fast_state = ref_state = None
    with torch.no_grad():
        for step in range(4):
            x = _step(step)
            res = _run(op, x, fast_state)
            n = calls[0]
            # the reference: a fresh op's general path every time
            ref._fast.clear()  # type: ignore[union-attr]
            want = _run(ref, x, ref_state)
            assert calls[0] == n + 1
            assert isinstance(res, attnlab.Result)
            assert torch.equal(res.out, want.out) and torch.equal(res.state, want.state)
            fast_state, ref_state = res.state, want.state
    # ref made 4 general calls; op: 2 (no state, then the first with a state), then fast
    assert calls[0] == 4 + 2


def _warm() -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """A prepared gated_delta step whose signature with a state has run twice (the second time fast)."""
    op = attnlab.prepare("gated_delta", causal=True, backend="triton")
    x = _step(0)
    with torch.no_grad():
        s = _run(op, x, None).state
        _run(op, x, s)
        _run(op, x, s)
    return op, x, s


def test_a_new_signature_takes_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_execute(monkeypatch)
    op, x, s = _warm()
    assert calls[0] == 2
    with torch.no_grad():
        y = _step(1, b=2)  # another batch
        s2 = _run(op, y, None).state
        assert calls[0] == 3
        _run(op, y, s2)
        assert calls[0] == 4
        _run(op, y, s2)
        assert calls[0] == 4
        # g left out (optional), then g=None: each a signature of its own, results as the general path
        a = op(x["q"], x["k"], x["v"], state=s, beta=x["beta"])
        b = op(x["q"], x["k"], x["v"], state=s, beta=x["beta"], g=None)
        c = op(x["q"], x["k"], x["v"], state=s, g=None, beta=x["beta"])
        assert calls[0] == 7
        c2 = op(x["q"], x["k"], x["v"], state=s, g=None, beta=x["beta"])
        assert calls[0] == 7
        assert all(torch.equal(r.out, a.out) and torch.equal(r.state, a.state) for r in (b, c, c2))
        # the NaN/Inf scan takes the general path
        checked = attnlab.prepare("gated_delta", causal=True, backend="triton", check_finite=True)
        _run(checked, x, s)
        _run(checked, x, s)
        assert calls[0] == 9


def test_gradients_take_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_execute(monkeypatch)
    op = attnlab.prepare("gated_delta", causal=True, backend="torch_chunk")
    x = _step(0)
    s = _run(op, x, None).state
    _run(op, x, s)
    assert calls[0] == 2  # grad enabled, nothing requires grad: fast
    for name in ("q", "beta"):
        y = dict(x)
        y[name] = x[name].clone().requires_grad_(True)
        for _ in range(2):
            res = _run(op, y, s)
            assert res.out.grad_fn is not None
        res.out.sum().backward()
        assert y[name].grad is not None
    assert calls[0] == 6
    s_grad = s.clone().requires_grad_(True)
    _run(op, x, s_grad)
    _run(op, x, s_grad)
    assert calls[0] == 8
    with torch.no_grad():  # grad disabled: the signature of the calls with ``s`` above, fast
        _run(op, x, s_grad)
    assert calls[0] == 8


def test_bad_inputs_still_raise_after_the_fast_path_is_warm() -> None:
    op, x, s = _warm()
    with torch.no_grad():
        with pytest.raises(InputError, match=r"beta has shape \(1, 2, 2\)"):
            op(x["q"], x["k"], x["v"], state=s, beta=torch.rand(1, H, 2, device=DEVICE), g=x["g"])
        with pytest.raises(InputError, match="beta has dtype torch.int64"):
            op(x["q"], x["k"], x["v"], state=s, beta=torch.ones(1, H, 1, dtype=torch.long, device=DEVICE))
        with pytest.raises(ParamError, match="takes no tensor input 'gate'"):
            op(x["q"], x["k"], x["v"], state=s, beta=x["beta"], gate=x["g"])
        with pytest.raises(InputError, match="needs the tensor input"):
            op(x["q"], x["k"], x["v"], state=s, g=x["g"])
        with pytest.raises(InputError, match="must be a torch.Tensor"):
            op(x["q"], x["k"], x["v"], state=s, beta=[0.5], g=x["g"])
        with pytest.raises(InputError, match="q has dtype torch.int64"):
            op(x["q"].long(), x["k"], x["v"], state=s, beta=x["beta"], g=x["g"])
        bad = dict(x)
        bad["beta"] = torch.full_like(x["beta"], float("nan"))
        checked = attnlab.prepare("gated_delta", causal=True, backend="triton", check_finite=True)
        with pytest.raises(InputError, match="beta contains 2 NaN/Inf"):
            _run(checked, bad, s)
        # a wrong state raises from the backend, on the fast path as on the general one
        wrong = torch.zeros(1, H, D + 1, D, device=DEVICE)
        with pytest.raises(InputError) as fast_err:
            _run(op, x, wrong)
        op._fast.clear()  # type: ignore[union-attr]
        with pytest.raises(InputError) as general_err:
            _run(op, x, wrong)
        assert str(fast_err.value) == str(general_err.value)
        # still fine afterwards
        _run(op, x, s)


def test_only_linear_methods_take_the_fast_path() -> None:
    """A decode-family method's cache grows every step (a new key each time): it keeps the general path."""
    from attnlab.catalog.decode import register_methods

    register_methods()
    assert attnlab.prepare("gated_delta", causal=True)._fast is not None
    assert attnlab.prepare("page_topk", causal=True)._fast is None
    assert attnlab.prepare("gated_delta", causal=True, return_lse=False)._fast is not None
