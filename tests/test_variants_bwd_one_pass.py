"""The score-transform backward in one pass (``bwd_one_pass.py``, ``op.BWD_ONE_PASS``): its gradients against
the two-kernel path's and autograd of the fp32 naive twin for every transform it takes (plain, soft cap,
sink, ALiBi, dense bias, temperature, softplus), causal and not, GQA, lengths no tile divides, cross
shapes, rows with no key; the launcher's fallback to the two kernels; the flag read when the forward runs.

On CPU the kernels run in Triton's interpreter (tiny shapes); on CUDA the same tests run on the GPU, and one
more checks the one-pass backward at 1x32x8192, D=128, bf16 against the fp32 reference on the last rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from attnlab.kernels.score_transform.naive import score_transform_fwd_naive
from attnlab.testing import BWD_FACTOR, bound, device_under_test, max_abs, random_qkv

DEVICE = device_under_test()
SCALE = 0.25
NAMES = ("dq", "dk", "dv", "dsinks")


def _prefixed(what: str) -> Callable[[str], str]:
    return lambda m: f"{what}: {m}"


def _inputs(transform: str, h: int, n_q: int, n_k: int) -> dict[str, Any]:
    """The kernel's optional inputs for ``transform`` (random, from the global RNG)."""
    x: dict[str, Any] = dict.fromkeys(("sinks", "slopes", "bias", "temp"))
    x.update(cap=0.0, softplus=False)
    if transform == "softcap":
        x["cap"] = 1.5
    elif transform == "sink":
        x["sinks"] = torch.randn(h, device=DEVICE).requires_grad_(True)
    elif transform == "alibi":
        x["slopes"] = torch.rand(h, device=DEVICE)
    elif transform == "bias_temp":  # a dense bias and a per-query temperature, neither requiring grad
        x["bias"] = torch.randn(1, h, n_q, n_k, device=DEVICE)
        x["temp"] = torch.rand(1, h, n_q, device=DEVICE) + 0.5
    elif transform == "softplus":
        x["temp"] = torch.rand(1, 1, n_q, device=DEVICE) + 0.5
        x["softplus"] = True
    return x


def _kernel_grads(
    q: Tensor, k: Tensor, v: Tensor, x: dict[str, Any], causal: bool, one_pass: bool, mp: pytest.MonkeyPatch
) -> tuple[Tensor, ...]:
    """dq, dk, dv (and dsinks) through the custom op's autograd with ``op.BWD_ONE_PASS = one_pass``."""
    from attnlab.kernels.score_transform import op

    mp.setattr(op, "BWD_ONE_PASS", one_pass)
    out, _ = op.score_transform_fwd(q, k, v, x["bias"], x["sinks"], x["slopes"], None, None, x["temp"], SCALE,
                                    x["cap"], causal, x["softplus"])  # fmt: skip
    g = torch.Generator(device="cpu").manual_seed(1)
    do = torch.randn(out.shape, generator=g).to(DEVICE, out.dtype)
    leaves = (q, k, v) if x["sinks"] is None else (q, k, v, x["sinks"])
    return torch.autograd.grad(out, leaves, do)


def _twin_grads(q: Tensor, k: Tensor, v: Tensor, x: dict[str, Any], causal: bool) -> tuple[Tensor, ...]:
    """The same gradients by autograd through the fp32 naive twin."""
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref, _ = score_transform_fwd_naive(
        q32, k32, v32, x["bias"], x["sinks"], SCALE, x["cap"], causal, slopes=x["slopes"], temp=x["temp"],
        softplus=x["softplus"],
    )  # fmt: skip
    g = torch.Generator(device="cpu").manual_seed(1)
    do = torch.randn(ref.shape, generator=g).to(DEVICE, q.dtype).float()
    leaves = (q32, k32, v32) if x["sinks"] is None else (q32, k32, v32, x["sinks"])
    return torch.autograd.grad(ref, leaves, do)


CASES = [  # (transform, N_q, N_k): GQA H=4 over H_kv=2 throughout
    ("plain", 37, 37),
    ("softcap", 50, 50),  # (off by default since 774d414: kept small so CI stays within its time)
    ("sink", 30, 17),  # causal: 13 rows with no key (the sink alone)
    ("alibi", 17, 45),
    ("bias_temp", 21, 33),
    ("softplus", 30, 17),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("transform", "n_q", "n_k"), CASES)
def test_one_pass_matches_two_kernels_and_the_twin(
    poison_empty: None, monkeypatch: pytest.MonkeyPatch, transform: str, n_q: int, n_k: int, causal: bool
) -> None:
    q, k, v = random_qkv(1, 4, 2, n_q, n_k, 16, grad=True)
    x = _inputs(transform, 4, n_q, n_k)
    one = _kernel_grads(q * 2, k, v, x, causal, True, monkeypatch)
    two = _kernel_grads(q * 2, k, v, x, causal, False, monkeypatch)
    want = _twin_grads(q * 2, k, v, x, causal)
    for name, a, b, w in zip(NAMES, one, two, want, strict=False):
        assert a.shape == w.shape and torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=_prefixed(f"{name} vs two kernels"))
        torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4, msg=_prefixed(f"{name} vs the twin"))
    if causal and n_q > n_k:  # rows with no key: no gradient
        assert not one[0][:, :, : n_q - n_k].any()


@pytest.mark.parametrize("block", [(16, 32), (32, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_one_pass_tiles_do_not_change_the_result(
    poison_empty: None, block: tuple[int, int], causal: bool
) -> None:
    """Query and key blocks of different sizes (the causal diagonal straddles tiles), soft cap and sinks,
    N_q != N_k, neither a tile multiple: every config the same gradients as the two kernels."""
    from attnlab.kernels.score_transform import op

    q, k, v = random_qkv(1, 4, 2, 45, 37, 16)
    sinks = torch.randn(4, device=DEVICE)
    out, lse = op.score_transform_fwd_launch(q, k, v, None, sinks, SCALE, 1.5, causal)
    do = torch.randn_like(out)
    args = (do, q, k, v, out, lse, None, sinks, SCALE, 1.5, causal)
    config = op._bwd_config((*block, 4, 1))
    got = op.score_transform_bwd_launch(*args, one_pass=True, config=config)
    want = op.score_transform_bwd_launch(*args, one_pass=False)
    for name, a, w in zip(NAMES, got, want, strict=False):
        assert a is not None and w is not None
        torch.testing.assert_close(a, w, atol=2e-5, rtol=2e-5, msg=_prefixed(name))


@pytest.mark.parametrize("causal", [False, True])
def test_one_pass_in_bf16_is_as_close_to_the_twin_as_two_kernels(
    monkeypatch: pytest.MonkeyPatch, causal: bool
) -> None:
    """bf16 inputs, soft cap, cross shape: the one-pass gradients' error against the fp32 twin within 2x the
    two kernels' (dQ rounded once from its fp32 buffer), plus attnlab.testing's floor."""
    q, k, v = random_qkv(1, 4, 2, 33, 40, 16, torch.bfloat16, grad=True)
    x = _inputs("softcap", 4, 33, 40)
    one = _kernel_grads(q, k, v, x, causal, True, monkeypatch)
    two = _kernel_grads(q, k, v, x, causal, False, monkeypatch)
    want = _twin_grads(q, k, v, x, causal)
    for name, a, b, w in zip(NAMES, one, two, want, strict=False):
        assert a.dtype == torch.bfloat16, name
        assert max_abs(a, w) <= bound(max_abs(b, w), w, 2.0, torch.bfloat16), name


def test_the_flag_is_read_when_the_forward_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``BWD_ONE_PASS`` as it was at the forward decides the backward's path (a benchmark side sets it around
    its forward call; the backward runs after)."""
    from attnlab.kernels.score_transform import op

    seen: list[bool | None] = []
    real = op.score_transform_bwd_launch

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("one_pass"))
        return real(*args, **kwargs)

    monkeypatch.setattr(op, "score_transform_bwd_launch", spy)
    q, k, v = random_qkv(1, 2, 2, 16, 16, 16, grad=True)
    for on in (True, False):
        monkeypatch.setattr(op, "BWD_ONE_PASS", on)
        out, _ = op.score_transform_fwd(q, k, v, None, None, None, None, None, None, SCALE, 1.5, True)
        monkeypatch.setattr(op, "BWD_ONE_PASS", not on)
        torch.autograd.grad(out.sum(), (q, k, v))
    assert seen == [True, False]


def test_what_the_one_pass_kernel_refuses_falls_back_to_two_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A low-rank bias, the ALiBi slopes' or the temperature's gradient, a head dim over 128: the refusal
    names it and the two kernels run (the slopes' gradient still checked against the twin's)."""
    from attnlab.kernels.score_transform import op

    assert op.one_pass_refusal(128, False, False, False) == ""
    for args, word in (
        ((256, False, False, False), "head dim 256"),
        ((64, True, False, False), "low-rank"),
        ((64, False, True, False), "slopes"),
        ((64, False, False, True), "temperature"),
    ):
        assert word in op.one_pass_refusal(*args)
    launched: list[str] = []

    class Spy:
        """A kernel that records its launches by name."""

        def __init__(self, name: str) -> None:
            self.name, self.real = name, getattr(op, name)

        def __getitem__(self, grid: Any) -> Any:
            launched.append(self.name)
            return self.real[grid]

    monkeypatch.setattr(op, "BWD_ONE_PASS", True)
    for name in ("_ONE_PASS_ANY", "_DKDV_ANY"):
        monkeypatch.setattr(op, name, Spy(name))
    q, k, v = random_qkv(1, 4, 2, 17, 30, 16, grad=True)
    slopes = torch.rand(4, device=DEVICE, requires_grad=True)
    out, _ = op.score_transform_fwd(q, k, v, None, None, slopes, None, None, None, SCALE, 0.0, True)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, slopes), do)
    ref, _ = score_transform_fwd_naive(q, k, v, None, None, SCALE, 0.0, True, slopes=slopes)
    want = torch.autograd.grad(ref, (q, k, v, slopes), do)
    assert launched == ["_DKDV_ANY"]
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4)
    launched.clear()
    out, _ = op.score_transform_fwd(q, k, v, None, None, slopes.detach(), None, None, None, SCALE, 0.0, True)
    torch.autograd.grad(out, (q, k, v), do)
    assert launched == ["_ONE_PASS_ANY"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (1x32x8192, D=128)")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["softcap", "sink"])
def test_one_pass_at_8k_matches_the_reference_on_the_last_rows(
    monkeypatch: pytest.MonkeyPatch, name: str, causal: bool
) -> None:
    """1x32x8192, D=128, bf16 with the first one-pass schedule (the pinned one): dO is zero but on the last
    128 query rows, so dq is 0 elsewhere and dk, dv, dsinks are the reference's autograd on those rows (a
    cross-attention shape, bottom-right causal); each within attnlab.testing's rule (3x the bf16
    reference's error against the fp32 one, plus a floor), as benchmarks/variants_bench.py checks."""
    import attnlab
    from attnlab.kernels.score_transform import op

    monkeypatch.setattr(op, "BWD_ONE_PASS", True)
    n, rows, heads, d = 8192, 128, 32, 128
    scale = d**-0.5
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
               for _ in range(3))  # fmt: skip
    x: dict[str, Tensor] = {}
    params: dict[str, Any] = {}
    if name == "sink":
        x["sinks"] = torch.randn(heads, generator=g).cuda().requires_grad_(True)
    else:
        params["cap"] = 5.0
    out, _ = op.score_transform_fwd(
        q, k, v, None, x.get("sinks"), None, None, None, None, scale, params.get("cap", 0.0), causal
    )
    do_rows = torch.randn(1, heads, rows, d, generator=g).to("cuda", torch.bfloat16)
    do = torch.zeros_like(out)
    do[:, :, -rows:] = do_rows
    leaves = [q, k, v, *x.values()]
    got = torch.autograd.grad(out, leaves, do)
    spec = attnlab.get(name)

    def reference(upcast: bool) -> tuple[Tensor, ...]:
        ql = q[:, :, -rows:].detach().clone().requires_grad_(True)
        ls = [ql, *(t.detach().clone().requires_grad_(True) for t in leaves[1:])]
        extra = dict(zip(x, ls[3:], strict=True))
        ref = spec.reference(ql, ls[1], ls[2], spec.make_params(params), causal=causal, scale=scale,
                             upcast=upcast, **extra)  # fmt: skip
        return torch.autograd.grad(ref, ls, do_rows.float().to(ref.dtype) if upcast else do_rows)

    want, low = reference(True), reference(False)
    assert float(got[0][:, :, :-rows].abs().max()) == 0.0
    got = (got[0][:, :, -rows:], *got[1:])
    for label, a, w, lo in zip(NAMES, got, want, low, strict=False):
        err = max_abs(a, w) if torch.isfinite(a).all() else float("nan")
        limit = bound(max_abs(lo, w), w, BWD_FACTOR, torch.bfloat16)
        assert err <= limit, f"{label}: {err} > {limit}"


def test_one_pass_schedule_is_pinned_where_the_two_kernels_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Hopper under the measured Triton (faked), bf16, D=128, both lengths >= 8K: ``ONE_PASS_BWD`` is
    the only candidate; elsewhere the autotuner chooses among ``ONE_PASS_SHAPES`` (fp32: small tiles)."""
    from attnlab.kernels.score_transform import op

    monkeypatch.setattr(op, "_on_hopper", lambda args: True)
    configs = [op._bwd_config(s) for s in op.ONE_PASS_SHAPES]
    args = {"BLOCK_D": 128, "DOT_PREC": "tf32", "N_BUCKET": op.LONG_BUCKET}
    prune = op._prune_bwd(2)
    for causal in (False, True):
        kept = prune(configs, {**args, "CAUSAL": causal})
        assert [op._shape_of(c) for c in kept] == [op.ONE_PASS_BWD[causal]]
    assert len(prune(configs, {**args, "N_BUCKET": 4096})) == len(configs)
    small = prune(configs, {**args, "DOT_PREC": "ieee"})
    assert small and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in small)
