"""The score-transform Triton kernels: the naive twin states the variants' math (forward checked against the
method references, backward formulas against autograd), the kernels match the twin for every transform,
pattern, tail and GQA, write every output, and run as the ``triton`` backend of softcap, bias and sink.

On CPU the kernel runs in Triton's interpreter (tiny shapes); on CUDA the same tests run on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

import attnlab
from attnlab.catalog.variants import SPECS, bias, sink, softcap
from attnlab.errors import BackendError
from attnlab.kernels.score_transform.naive import score_transform_bwd_naive, score_transform_fwd_naive
from attnlab.testing import Case, check_parity, device_under_test, on_cuda, random_qkv

DEVICE = device_under_test()
SCALE = 0.25


@pytest.fixture
def variants() -> Iterator[None]:
    """Every variant (registered at import by attnlab.catalog.variants)."""
    assert all(attnlab.get(spec.name) is spec for spec in SPECS)
    yield


@pytest.mark.parametrize("causal", [False, True])
def test_naive_twin_is_the_methods_math(causal: bool) -> None:
    q, k, v = random_qkv(2, 4, 2, 13, 20, 16, device="cpu")
    q = q * 3
    b = torch.randn(2, 1, 13, 20)
    s = torch.randn(4)
    for (bias_t, sinks, cap), want in (
        (
            (None, None, 1.5),
            softcap.reference(q, k, v, softcap.SoftcapParams(1.5), causal=causal, scale=SCALE),
        ),
        ((b, None, 0.0), bias.reference(q, k, v, bias.BiasParams(), causal=causal, scale=SCALE, bias=b)),
        ((None, s, 0.0), sink.reference(q, k, v, sink.SinkParams(), causal=causal, scale=SCALE, sinks=s)),
    ):
        out, lse = score_transform_fwd_naive(q, k, v, bias_t, sinks, SCALE, cap, causal)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # lse: the log of the normaliser of the transformed logits, with the sink term
    x = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) * SCALE
    x = 1.5 * torch.tanh(x / 1.5) + b
    if causal:
        x = x.masked_fill(torch.ones(13, 20, dtype=torch.bool).tril(7).logical_not(), float("-inf"))
    want_lse = torch.log(torch.exp(x).sum(-1) + torch.exp(s)[None, :, None])
    _, lse = score_transform_fwd_naive(q, k, v, b, s, SCALE, 1.5, causal)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


CASES = [  # (N_q, N_k, bias shape or None, sinks, cap, dtype)
    (17, 17, None, False, 2.0, torch.float32),
    (9, 30, (2, 4, 9, 30), False, 0.0, torch.float32),
    (30, 9, (1, 4, 1, 9), True, 0.0, torch.bfloat16),
    (20, 45, (2, 1, 20, 1), True, 1.5, torch.float32),
    (1, 33, None, False, 0.0, torch.bfloat16),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k", "bias_shape", "with_sinks", "cap", "dtype"), CASES)
def test_kernel_matches_naive_twin(
    poison_empty: None,
    n_q: int,
    n_k: int,
    bias_shape: tuple[int, ...] | None,
    with_sinks: bool,
    cap: float,
    causal: bool,
    dtype: torch.dtype,
) -> None:
    from attnlab.kernels.score_transform.op import score_transform_fwd

    q, k, v = random_qkv(2, 4, 2, n_q, n_k, 24, dtype)
    q = q * 2
    b = torch.randn(bias_shape, device=DEVICE) if bias_shape else None
    sinks = torch.randn(4, device=DEVICE) if with_sinks else None
    out, lse = score_transform_fwd(q, k, v, b, sinks, None, None, None, None, SCALE, cap, causal)
    want, want_lse = score_transform_fwd_naive(q, k, v, b, sinks, SCALE, cap, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse))  # rows with no key: -inf on both
    rows = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[rows], want_lse[rows], atol=tol, rtol=tol)
    if causal and n_q > n_k and not with_sinks:
        assert not out[:, :, : n_q - n_k].any()  # rows before the first key: 0


def test_kernel_tiles_do_not_change_the_result() -> None:
    from attnlab.kernels.score_transform.op import score_transform_fwd_launch

    q, k, v = random_qkv(1, 2, 1, 40, 40, 32)
    want, _ = score_transform_fwd_naive(q, k, v, None, None, SCALE, 3.0, True)
    for block in ((16, 16), (32, 16), (16, 32)):
        out, _ = score_transform_fwd_launch(q, k, v, None, None, SCALE, 3.0, True, block=block)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "params"), [("softcap", {"cap": 2.0}), ("sink", {"logit": 1.0})])
def test_triton_backend_matches_reference(variants: None, name: str, params: dict) -> None:
    spec = attnlab.get(name)
    for causal in (False, True):
        check = check_parity(
            spec, "triton", Case(1, 4, 2, 17, 30, 16, torch.bfloat16, causal, params), DEVICE
        )
        assert not check.skipped and check.passed and "dq" in check.errors, check.summary()


def test_triton_backend_of_bias_matches_reference(variants: None) -> None:
    q, k, v = random_qkv(2, 4, 2, 17, 30, 16)
    b = torch.randn(1, 4, 17, 30, device=DEVICE)
    got = attnlab.attention(q, k, v, method="bias", causal=True, backend="triton", bias=b)
    want = attnlab.attention(q, k, v, method="bias", causal=True, backend="reference", bias=b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_naive_backward_formulas_equal_autograd() -> None:
    q, k, v = random_qkv(2, 4, 2, 13, 20, 16, grad=True, device="cpu")  # (the twin computes in fp32)
    b = torch.randn(2, 1, 13, 20)
    s = torch.randn(4, requires_grad=True)
    for causal in (False, True):
        out, _ = score_transform_fwd_naive(q, k, v, b, s, SCALE, 1.5, causal)
        do = torch.randn_like(out)
        want = torch.autograd.grad(out, (q, k, v, s), do)
        got = score_transform_bwd_naive(do, q, k, v, b, s, SCALE, 1.5, causal)
        for a, w in zip(got, want, strict=True):
            assert a is not None
            torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("n_q", "n_k", "bias_shape", "with_sinks", "cap"), [c[:5] for c in CASES[:3]])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_kernels_match_naive_twin(
    poison_empty: None,
    n_q: int,
    n_k: int,
    bias_shape: tuple[int, ...] | None,
    with_sinks: bool,
    cap: float,
    causal: bool,
) -> None:
    from attnlab.kernels.score_transform.op import score_transform_fwd

    q, k, v = random_qkv(2, 4, 2, n_q, n_k, 24, grad=True)
    b = torch.randn(bias_shape, device=DEVICE) if bias_shape else None
    sinks = torch.randn(4, device=DEVICE, requires_grad=True) if with_sinks else None
    out, _ = score_transform_fwd(q * 2, k, v, b, sinks, None, None, None, None, SCALE, cap, causal)
    do = torch.randn_like(out)
    leaves = (q, k, v, sinks) if sinks is not None else (q, k, v)
    got = torch.autograd.grad(out, leaves, do)
    want = score_transform_bwd_naive(
        do, (q * 2).detach(), k.detach(), v.detach(), b, sinks, SCALE, cap, causal
    )
    for a, w in zip(got, want, strict=False):
        assert w is not None
        w = w * 2 if a is got[0] else w  # d(2q) -> dq
        torch.testing.assert_close(a.float(), w.float(), atol=1e-4, rtol=1e-4)


def test_triton_backend_refuses_a_bias_that_needs_its_gradient(variants: None) -> None:
    q, k, v = random_qkv(1, 2, 2, 8, 8, 16)
    b = torch.randn(1, 2, 8, 8, device=DEVICE, requires_grad=True)
    # (since 26b5a5d a tensor input requiring grad makes a training call, refused by the dispatcher on the
    # backend's capabilities before the backend's own check)
    with pytest.raises(
        BackendError,
        match=r"triton.*(has no backward and an input requires grad|has no gradient for the bias tensor)",
    ):
        attnlab.attention(q, k, v, method="bias", backend="triton", bias=b)
    # the bias method's triton backend is forward only, so a training call never lands on it
    assert not attnlab.get("bias").backend("triton").backward
    assert (
        attnlab.get("softcap").backend("triton").backward and attnlab.get("sink").backend("triton").backward
    )


def _prefixed(what: str) -> Callable[[str], str]:
    return lambda m: f"{what}: {m}"


def _schedules(causal: bool) -> list:  # type: ignore[type-arg]
    """Forward schedules to launch directly: on CPU the split and warp-specialized code paths on
    interpreter-sized tiles; on CUDA every candidate the pruner keeps for the call below (every transform,
    a bias and low-rank factors among them)."""
    from attnlab.kernels.score_transform import op

    if DEVICE.type == "cpu":
        shapes = [(32, 16, 1, 1, 2, False), (32, 16, 1, 1, 1, True), (16, 16, 1, 1, 1, False)]
        return [op._fwd_config(s) for s in shapes]
    configs = [op._fwd_config(s) for s in op.FWD_SHAPES]
    q = torch.empty(1, device=DEVICE, dtype=torch.bfloat16)
    args = {
        "Q": q,
        "TMA": True,
        "DOT_PREC": "tf32",
        "CAUSAL": causal,
        "BLOCK_D": 32,
        "HAS_BIAS": True,
        "LOWRANK": True,
    }
    return op._prune_fwd(configs, args)


@pytest.mark.parametrize("causal", [False, True])
def test_every_forward_schedule_matches_the_naive_twin(poison_empty: None, causal: bool) -> None:
    """Split query tile, warp specialization and plain tiles, with every transform at once (soft cap,
    dense bias, ALiBi slopes, sink, low-rank bias) on lengths that no tile divides."""
    from attnlab.kernels.score_transform.op import score_transform_fwd_launch

    q, k, v = random_qkv(1, 4, 2, 37, 45, 32, torch.bfloat16)
    b = torch.randn(1, 4, 37, 45, device=DEVICE)
    sinks, slopes = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE)
    u, vf = torch.randn(1, 4, 37, 3, device=DEVICE), torch.randn(1, 1, 45, 3, device=DEVICE)
    temp = torch.rand(1, 4, 37, device=DEVICE) * 2
    want, want_lse = score_transform_fwd_naive(
        q, k, v, b, sinks, SCALE, 2.0, causal, slopes=slopes, u=u, vf=vf, temp=temp
    )  # (the factors stay fp32 in the kernel)
    for config in _schedules(causal):
        out, lse = score_transform_fwd_launch(
            q, k, v, b, sinks, SCALE, 2.0, causal, slopes=slopes, u=u, vf=vf, temp=temp, config=config
        )
        torch.testing.assert_close(
            out.float(), want.float(), atol=2e-2, rtol=2e-2, msg=_prefixed(str(config))
        )
        torch.testing.assert_close(lse, want_lse, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(70, 100, False), (100, 70, True)])
def test_alibi_forward_matches_the_twin(poison_empty: None, n_q: int, n_k: int, causal: bool) -> None:
    """ALiBi alone and with sinks (key blocks below, above and across the diagonal, several of each at these
    lengths; steep slopes): out and lse equal the twin's; on CPU also with the split and warp-specialized
    schedules."""
    from attnlab.kernels.score_transform.op import score_transform_fwd_launch

    q, k, v = random_qkv(1, 4, 2, n_q, n_k, 16, torch.float32)
    slopes = torch.tensor([0.05, 0.5, 2.0, 8.0], device=DEVICE)
    sinks = torch.randn(4, device=DEVICE)
    runs = [(None, None), (None, sinks)]
    runs += [(c, sinks) for c in (_schedules(causal) if DEVICE.type == "cpu" else [])]
    for config, sink_t in runs:
        want, want_lse = score_transform_fwd_naive(q, k, v, None, sink_t, SCALE, 0.0, causal, slopes=slopes)
        out, lse = score_transform_fwd_launch(
            q, k, v, None, sink_t, SCALE, 0.0, causal, slopes=slopes, config=config
        )
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=_prefixed(str(config)))
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5, msg=_prefixed(str(config)))


@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(17, 30, True), (30, 17, True), (21, 21, False)])
def test_alibi_and_lowrank_gradients_match_autograd_of_the_twin(
    poison_empty: None, n_q: int, n_k: int, causal: bool
) -> None:
    """dq, dk, dv (GQA summed), dsinks, the ALiBi slopes' gradient, the low-rank factors' gradients (summed
    over the factors' broadcast dims) and the per-query temperature's (summed over its broadcast head dim)
    against autograd through the naive twin, with ALiBi, a temperature and a soft cap in the logits."""
    from attnlab.kernels.score_transform.op import score_transform_fwd

    q, k, v = random_qkv(2, 4, 2, n_q, n_k, 16, grad=True)
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)
    slopes = torch.rand(4, device=DEVICE, requires_grad=True)
    u = torch.randn(2, 1, n_q, 5, device=DEVICE, requires_grad=True)  # shared by the heads
    vf = torch.randn(1, 4, n_k, 5, device=DEVICE, requires_grad=True)  # shared by the batch
    temp = (torch.rand(2, 1, n_q, device=DEVICE) * 2).requires_grad_(True)  # shared by the heads
    leaves = (q, k, v, sinks, slopes, u, vf, temp)
    out, _ = score_transform_fwd(q, k, v, None, sinks, slopes, u, vf, temp, SCALE, 1.5, causal)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, do)
    ref, _ = score_transform_fwd_naive(
        q, k, v, None, sinks, SCALE, 1.5, causal, slopes=slopes, u=u, vf=vf, temp=temp
    )
    want = torch.autograd.grad(ref, leaves, do)
    names = ("dq", "dk", "dv", "dsinks", "dslopes", "du", "dvf", "dtemp")
    for name, a, w in zip(names, got, want, strict=True):
        assert a.shape == w.shape, name
        torch.testing.assert_close(a.float(), w.float(), atol=1e-4, rtol=1e-4, msg=_prefixed(name))


@pytest.mark.parametrize("name", ["alibi", "selective"])
def test_triton_backend_of_alibi_and_selective_matches_reference(variants: None, name: str) -> None:
    """With their tensor inputs (slopes, temperature) drawn and requiring grad: every gradient checked."""
    for causal in (False, True):
        check = check_parity(
            attnlab.get(name),
            "triton",
            Case(1, 4, 2, 17, 30, 16, torch.bfloat16, causal, optional_inputs=True),
            DEVICE,
        )
        grad_of_input = "dslopes" if name == "alibi" else "dtemperature"
        assert not check.skipped and check.passed and grad_of_input in check.errors, check.summary()


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_bias_fast_path_matches_its_reference(poison_empty: None, causal: bool) -> None:
    """lowrank_bias_attention: the kernel (bias tile computed from the factors) against the dense-bias
    reference, forward and every gradient, bf16, GQA, N_q != N_k, rank 6 (padded to 16 in the kernel)."""
    from attnlab.catalog.variants.lowrank_bias import lowrank_bias_attention

    q, k, v = random_qkv(1, 4, 2, 24, 40, 32, torch.bfloat16, grad=True)
    g = torch.Generator(device="cpu").manual_seed(5)
    u = (torch.randn(1, 4, 24, 6, generator=g) * 0.5).to(DEVICE, torch.bfloat16).requires_grad_(True)
    vf = (torch.randn(1, 4, 40, 6, generator=g) * 0.5).to(DEVICE, torch.bfloat16).requires_grad_(True)
    leaves = (q, k, v, u, vf)
    got = lowrank_bias_attention(q, k, v, u, vf, causal=causal)
    with torch.no_grad():
        ref32 = lowrank_bias_attention(*(t.float() for t in leaves), causal=causal, backend="reference")
    low = lowrank_bias_attention(q, k, v, u, vf, causal=causal, backend="reference")
    assert got.dtype == torch.bfloat16
    # the rule of attnlab.testing: within 2x (forward) / 3x (gradients) of bf16's own error, plus a floor
    from attnlab.testing import bound, max_abs

    assert max_abs(got, ref32) <= bound(max_abs(low, ref32), ref32, 2.0, torch.bfloat16)
    do = torch.randn_like(got)
    g_got = torch.autograd.grad(got, leaves, do)
    g_low = torch.autograd.grad(low, leaves, do)
    leaves32 = tuple(t.detach().float().requires_grad_(True) for t in leaves)
    ref32 = lowrank_bias_attention(*leaves32, causal=causal, backend="reference")
    g_ref = torch.autograd.grad(ref32, leaves32, do.float())
    for name, a, lo, r in zip(("dq", "dk", "dv", "du", "dvf"), g_got, g_low, g_ref, strict=True):
        assert max_abs(a, r) <= bound(max_abs(lo, r), r, 3.0, torch.bfloat16), name


def test_lowrank_bias_never_materialises_the_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path hands the factors to the kernel: no (N_q, N_k) tensor is built on the way."""
    from attnlab.catalog.variants import lowrank_bias

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reference (dense bias) ran on the fast path")

    monkeypatch.setattr(lowrank_bias, "reference", refuse)
    q, k, v = random_qkv(1, 2, 2, 16, 16, 16)
    u, vf = torch.randn(1, 2, 16, 2, device=DEVICE), torch.randn(1, 2, 16, 2, device=DEVICE)
    out = lowrank_bias.lowrank_bias_attention(q, k, v, u, vf)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("u_shape", "vf_shape", "match"),
    [
        (
            (1, 2, 15, 4),
            (1, 2, 16, 4),
            r"u has shape \(1, 2, 15, 4\); expected \(B=1 or 1, H=2 or 1, N_q=16, r\)",
        ),
        (
            (1, 2, 16, 4),
            (1, 3, 16, 4),
            r"vf has shape \(1, 3, 16, 4\); expected \(B=1 or 1, H=2 or 1, N_k=16, r\)",
        ),
        ((1, 2, 16, 4), (1, 2, 16, 3), r"u has rank 4 and vf rank 3; expected the same rank"),
        ((2, 16, 4), (1, 2, 16, 4), r"u has shape \(2, 16, 4\)"),
        ((1, 2, 16, 65), (1, 2, 16, 65), r"rank 65: the Triton kernel takes ranks up to 64"),
    ],
)
def test_lowrank_bias_bad_factors_are_named(
    u_shape: tuple[int, ...], vf_shape: tuple[int, ...], match: str
) -> None:
    from attnlab.catalog.variants.lowrank_bias import lowrank_bias_attention
    from attnlab.errors import InputError

    q, k, v = random_qkv(1, 2, 2, 16, 16, 16)
    with pytest.raises(InputError, match=match):
        lowrank_bias_attention(
            q, k, v, torch.zeros(u_shape, device=DEVICE), torch.zeros(vf_shape, device=DEVICE)
        )


def test_lowrank_bias_bad_backend_and_int_factors_are_named() -> None:
    from attnlab.catalog.variants.lowrank_bias import lowrank_bias_attention
    from attnlab.errors import InputError

    q, k, v = random_qkv(1, 2, 2, 8, 8, 16)
    u = torch.zeros(1, 2, 8, 2, device=DEVICE)
    with pytest.raises(InputError, match=r"backend 'flex'; expected one of \('triton', 'reference'\)"):
        lowrank_bias_attention(q, k, v, u, u, backend="flex")
    with pytest.raises(InputError, match=r"u has dtype torch.int64; expected a floating dtype"):
        lowrank_bias_attention(q, k, v, u.long(), u)


def test_measured_schedules_are_pinned_only_where_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Hopper under the measured Triton (faked here), bf16, D=128, both lengths >= 8K: the pinned
    schedules are the only candidates; a bias or low-rank call never gets a pinned 128 x 128 or
    warp-specialized tile (sm_90's shared memory / Triton's pass refuse them); elsewhere no pin."""
    from attnlab.kernels.score_transform import op

    monkeypatch.setattr(op, "_on_hopper", lambda args: True)
    fwd = [op._fwd_config(s) for s in op.FWD_SHAPES]
    args = {"TMA": True, "BLOCK_D": 128, "DOT_PREC": "tf32", "N_BUCKET": op.LONG_BUCKET}
    for causal in (False, True):
        kept = op._prune_fwd(fwd, {**args, "CAUSAL": causal})
        assert [op._shape_of(c) for c in kept] == [op.MEASURED_FWD[causal]]
        kept_b = op._prune_bwd(0)([op._bwd_config(s) for s in op.DKDV_SHAPES], {**args, "CAUSAL": causal})
        assert [op._shape_of(c) for c in kept_b] == [op.MEASURED_BWD[causal][0]]
        kept_q = op._prune_bwd(1)([op._bwd_config(s) for s in op.DQ_SHAPES], {**args, "CAUSAL": causal})
        assert [op._shape_of(c) for c in kept_q] == [op.MEASURED_BWD[causal][1]]
    monkeypatch.setitem(op.MEASURED_FWD, False, (128, 128, 8, 3, 1, False))
    heavy = op._prune_fwd(fwd, {**args, "CAUSAL": False, "HAS_BIAS": True})
    assert [op._shape_of(c) for c in heavy] == [op.FWD_SHAPES[0]]
    monkeypatch.setitem(op.MEASURED_FWD, False, (128, 64, 4, 2, 1, True))
    temp = op._prune_fwd(fwd, {**args, "CAUSAL": False, "TEMP": True})
    assert [op._shape_of(c) for c in temp] == [op.FWD_SHAPES[0]]  # warp specialization fails with TEMP
    temp_short = op._prune_fwd(fwd, {**args, "CAUSAL": False, "TEMP": True, "N_BUCKET": 4096})
    assert temp_short and not any(c.kwargs["WS"] for c in temp_short)
    short = op._prune_fwd(fwd, {**args, "CAUSAL": False, "N_BUCKET": 4096})
    # not measured there: the autotuner chooses, never the warp-specialized forward (a wrong lse on Hopper)
    assert len(short) == len(fwd) - 1 and not any(c.kwargs["WS"] for c in short)


def test_naive_twin_softplus_is_the_methods_math() -> None:
    """The twin's softplus transform on the L2-normalised q, k with ``log(D) log(n_i) sqrt(D)`` as its
    temperature (``sqrt(D)``: the paper's cosine at the default scale) is softplus.reference; without
    the options, the plain transform on q, k."""
    from attnlab.catalog.variants import softplus

    q, k, v = random_qkv(2, 4, 2, 13, 20, 16, device="cpu")
    for causal in (False, True):
        for scaled, norm in ((True, True), (False, True), (True, False), (False, False)):
            params = softplus.SoftplusParams(length_scale=scaled, qk_norm=norm)
            lam = softplus.length_scale(13, 20, causal, 16, q.device) if scaled else torch.ones(1, 1, 13)
            qn, kn, _ = softplus.normalise_qk(q * 3, k, params, SCALE)
            temp = lam * (16**0.5 if norm else 1.0)
            got, _ = score_transform_fwd_naive(
                qn, kn, v, None, None, SCALE, 0.0, causal, temp=temp, softplus=True
            )
            want = softplus.reference(q * 3, k, v, params, causal=causal, scale=SCALE)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("n_q", "n_k", "causal", "dtype"),
    [(17, 30, True, torch.float32), (30, 17, True, torch.float32), (21, 21, False, torch.float32),
     (9, 40, False, torch.bfloat16)],
)  # fmt: skip
def test_softplus_kernel_matches_the_twin_forward_and_backward(
    poison_empty: None, n_q: int, n_k: int, causal: bool, dtype: torch.dtype
) -> None:
    """Forward (out, lse = log of the l1 normaliser) and dq, dk, dv (GQA summed) against the twin and
    autograd through it, with a per-query length scale; rows with no key (N_q > N_k causal) are 0 with
    zero gradients."""
    from attnlab.kernels.score_transform.op import score_transform_fwd

    q, k, v = random_qkv(2, 4, 2, n_q, n_k, 16, dtype, grad=True)
    lam = torch.rand(1, 1, n_q, device=DEVICE) * 2 + 0.5
    out, lse = score_transform_fwd(q * 2, k, v, None, None, None, None, None, lam, SCALE, 0.0, causal, True)
    ref, ref_lse = score_transform_fwd_naive(
        q * 2, k, v, None, None, SCALE, 0.0, causal, temp=lam, softplus=True
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    rows = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[rows], ref_lse[rows], atol=tol, rtol=tol)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q, k, v), do)
    gtol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, a, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a.float(), w.float(), atol=gtol, rtol=gtol, msg=_prefixed(name))
    if causal and n_q > n_k:
        assert not out[:, :, : n_q - n_k].any() and not got[0][:, :, : n_q - n_k].any()


def test_softplus_kernel_does_not_overflow_on_huge_logits() -> None:
    """Logits of +-1e4 (exp would overflow fp32): softplus is linear there and the l1 sum stays finite;
    rows of very negative logits keep their relative weights (the series branch)."""
    from attnlab.kernels.score_transform.op import score_transform_fwd

    q, k, v = random_qkv(1, 2, 2, 16, 24, 16)
    for mult in (1e4, -1e4, -40.0):
        qs = q * mult
        out, _ = score_transform_fwd(qs, k, v, None, None, None, None, None, None, SCALE, 0.0, True, True)
        want, _ = score_transform_fwd_naive(qs, k, v, None, None, SCALE, 0.0, True, softplus=True)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4, msg=_prefixed(f"q * {mult}"))


def test_softplus_polynomial_fits_log2_of_one_plus_e() -> None:
    """FAST bit 1's ``log2(1 + e) ~ e P(e)`` on [0, 1]: relative error under 2e-6 in float64, and under 3e-6
    evaluated in float32 by Horner's rule as the kernel does."""
    from attnlab.kernels.score_transform.common import SOFTPLUS_POLY

    for dt, bound in ((torch.float64, 2e-6), (torch.float32, 3e-6)):
        e = torch.linspace(1e-6, 1.0, 100001, dtype=dt)
        p = torch.full_like(e, SOFTPLUS_POLY[-1])
        for c in reversed(SOFTPLUS_POLY[:-1]):
            p = p * e + c
        want = torch.log2(1 + e.double())
        assert float(((e * p).double() - want).abs().div(want).max()) < bound, dt
    # the kernel spells the same constants out in Horner form: each one is in softplus2's source
    import inspect

    from attnlab.kernels.score_transform import common

    source = inspect.getsource(common.softplus2.fn)
    for c in SOFTPLUS_POLY:
        assert repr(abs(c)) in source, c


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(
                not on_cuda(), reason="FAST bit 0 (inline PTX) with the polynomial: CUDA"
            ),
        ),
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_softplus_polynomial_path_matches_the_twin(
    causal: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the polynomial on for this device (``op.SOFTPLUS_POLY_DEVICES``; off by default), the softplus
    kernel's forward and gradients still match the twin (fp32 tightly; bf16 on CUDA, where it joins the
    other fast approximations), also on huge and very negative logits; other transforms never get the bit."""
    from attnlab.kernels.score_transform import op
    from attnlab.kernels.score_transform.op import score_transform_fwd

    monkeypatch.setattr(op, "SOFTPLUS_POLY_DEVICES", (DEVICE.type,))
    q, k, v = random_qkv(2, 4, 2, 40, 40, 16, dtype, grad=True)
    assert op._flags(q, softplus=True)["FAST"] // 2 == 1 and op._flags(q)["FAST"] // 2 == 0
    tol, gtol = (2e-5, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
    for mult in (2.0, 1e4, -40.0):
        out, lse = score_transform_fwd(
            q * mult, k, v, None, None, None, None, None, None, SCALE, 0.0, causal, True
        )
        ref, ref_lse = score_transform_fwd_naive(
            q * mult, k, v, None, None, SCALE, 0.0, causal, softplus=True
        )
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol, msg=_prefixed(f"q * {mult}"))
        torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
        if mult == 2.0:
            do = torch.randn_like(out)
            got = torch.autograd.grad(out, (q, k, v), do)
            want = torch.autograd.grad(ref, (q, k, v), do)
            for name, a, w in zip(("dq", "dk", "dv"), got, want, strict=True):
                torch.testing.assert_close(a.float(), w.float(), atol=gtol, rtol=gtol, msg=_prefixed(name))


def test_softplus_backward_takes_the_forwards_log_even_if_the_setting_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The polynomial is decided when the forward runs and saved for its backward: switching
    ``SOFTPLUS_POLY_DEVICES`` between the two (a benchmark's A/B side, a user's toggle) does not give a
    polynomial forward an exact-log backward."""
    from attnlab.kernels.score_transform import op
    from attnlab.kernels.score_transform.op import score_transform_fwd

    seen: list[int] = []
    real = op._flags

    def spy(q: torch.Tensor, softplus: bool = False, poly: bool | None = None) -> dict:
        flags = real(q, softplus, poly)
        seen.append(flags["FAST"] // 2)
        return flags

    monkeypatch.setattr(op, "_flags", spy)
    q, k, v = random_qkv(1, 2, 2, 24, 24, 16, torch.float32, grad=True)
    for on in (True, False):
        monkeypatch.setattr(op, "SOFTPLUS_POLY_DEVICES", (DEVICE.type,) if on else ())
        out, _ = score_transform_fwd(q, k, v, None, None, None, None, None, None, SCALE, 0.0, True, True)
        monkeypatch.setattr(op, "SOFTPLUS_POLY_DEVICES", () if on else (DEVICE.type,))  # flipped
        seen.clear()
        torch.autograd.grad(out.sum(), (q, k, v))
        assert seen and set(seen) == {int(on)}, (on, seen)


def test_softplus_kernel_refuses_sinks() -> None:
    from attnlab.kernels.score_transform.op import score_transform_fwd_launch

    q, k, v = random_qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(
        ValueError, match=r"softplus transform takes no sink logits .*; got sinks of shape \(2,\)"
    ):
        score_transform_fwd_launch(
            q, k, v, None, torch.zeros(2, device=DEVICE), SCALE, 0.0, False, softplus=True
        )


@pytest.mark.parametrize("params", [{}, {"length_scale": False, "qk_norm": False}])
def test_triton_backend_of_softplus_matches_reference(variants: None, params: dict) -> None:
    """The registry's parity rule (bf16, GQA, cross shapes, every gradient) for the softplus kernel: the
    paper's form (q, k normalised before the kernel) and plain softplus."""
    for n_q, n_k, causal in ((17, 30, False), (17, 30, True), (30, 17, True)):  # 30 x 17: 13 empty rows
        check = check_parity(
            attnlab.get("softplus"),
            "triton",
            Case(1, 4, 2, n_q, n_k, 16, torch.bfloat16, causal, params),
            DEVICE,
        )
        assert not check.skipped and check.passed and "dq" in check.errors, check.summary()
    q, k, v = random_qkv(1, 4, 2, 30, 17, 16)
    out = attnlab.attention(q, k, v, method="softplus", causal=True, backend="triton", **params)
    assert not out[:, :, :13].any() and out[:, :, 13:].abs().sum() > 0
    assert attnlab.get("softplus").backends[0].name == "triton"


#: (B, H, H_kv, N_q, N_k, D, causal, alpha's shape, beta's shape): cross rows, rows with no key (N_q > N_k
#: causal), GQA, broadcast dims, a missing alpha or beta, D not a power of two, several scan steps
AFFINE_CASES = [
    (2, 4, 2, 21, 37, 16, True, (2, 4, 21), (1, 1, 21)),
    (1, 4, 2, 37, 21, 16, True, (1, 4, 1), (1, 1, 37)),
    (2, 4, 4, 19, 19, 24, False, (2, 4, 19), (2, 4, 19)),
    (1, 2, 1, 33, 50, 16, False, None, (1, 2, 33)),
    (1, 2, 1, 33, 50, 16, True, (1, 2, 33), None),
]


@pytest.mark.parametrize("case", AFFINE_CASES, ids=[f"case{i}" for i in range(len(AFFINE_CASES))])
def test_affine_finish_kernel_is_the_map_forward_and_backward(case: tuple) -> None:
    """The fused map ``alpha * out + beta * mean_allowed(v)`` against the same map in PyTorch on
    affine_scaled.allowed_mean (fp32), output and every gradient (out, v, alpha, beta; broadcast dims
    summed)."""
    from attnlab.catalog.variants import affine_scaled
    from attnlab.kernels.score_transform.affine import affine_finish

    b, h, h_kv, n_q, n_k, d, causal, a_shape, b_shape = case
    g = torch.Generator(device="cpu").manual_seed(0)
    out = torch.randn(b, h, n_q, d, generator=g).to(DEVICE).requires_grad_(True)
    v = torch.randn(b, h_kv, n_k, d, generator=g).to(DEVICE).requires_grad_(True)
    alpha = (
        None if a_shape is None else (torch.rand(a_shape, generator=g) + 0.5).to(DEVICE).requires_grad_(True)
    )
    beta = None if b_shape is None else torch.randn(b_shape, generator=g).to(DEVICE).requires_grad_(True)
    got = affine_finish(out, v, alpha, beta, causal)
    want = out * (1.0 if alpha is None else alpha[..., None])
    if beta is not None:
        want = want + beta[..., None] * affine_scaled.allowed_mean(v, n_q, causal, h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if causal and n_q > n_k:  # rows with no key: no mean (allowed_mean is 0 there), alpha * out only
        assert not affine_scaled.allowed_mean(v, n_q, causal, h)[:, :, : n_q - n_k].any()
    leaves = [t for t in (out, v, alpha, beta) if t is not None]
    do = torch.randn(got.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(got, leaves, do, allow_unused=True)
    wants = torch.autograd.grad(want, leaves, do, allow_unused=True)
    for leaf, a, w in zip(leaves, grads, wants, strict=True):
        if w is None:  # v without beta: no gradient from the map
            assert a is None or not a.any()
            continue
        assert a is not None and a.shape == leaf.shape
        torch.testing.assert_close(a, w, atol=2e-5, rtol=2e-5)


def test_sdpa_backend_of_affine_scaled_runs_the_fused_map(
    variants: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """affine_scaled's first backend with the fused map (forced on this device): the registry's parity
    rule (bf16, GQA, cross shapes, alpha and beta drawn; every gradient), the kernel called."""
    from attnlab.catalog.variants import affine_scaled
    from attnlab.kernels.score_transform import affine

    monkeypatch.setattr(affine_scaled, "FUSED_DEVICES", ("cuda", "cpu"))
    calls: list[bool] = []
    real = affine.affine_finish

    def spy(*args: object) -> torch.Tensor:
        calls.append(True)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(affine, "affine_finish", spy)
    spec = attnlab.get("affine_scaled")
    for causal in (False, True):
        case = Case(1, 4, 2, 17, 30, 16, torch.bfloat16, causal, optional_inputs=True)
        check = check_parity(spec, "sdpa", case, DEVICE)
        assert not check.skipped and check.passed, check.summary()
        assert all(g in check.errors for g in ("dq", "dk", "dv", "dalpha", "dbeta")), check.summary()
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_normalize_kernel_is_f_normalize(dtype: torch.dtype) -> None:
    """The one-pass L2 normalisation (softplus's q, k) against F.normalize in fp32: output, and the
    gradient through it (a zero row included: output 0, finite gradient)."""
    from attnlab.kernels.score_transform.l2norm import l2_normalize

    g = torch.Generator(device="cpu").manual_seed(0)
    x32 = torch.randn(2, 3, 13, 24, generator=g) * 3
    x32[0, 0, 5] = 0.0
    x = x32.to(DEVICE, dtype).requires_grad_(True)
    got = l2_normalize(x, 1e-12)
    xr = x.detach().float().requires_grad_(True)
    want = torch.nn.functional.normalize(xr, dim=-1, eps=1e-12)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert got.dtype == dtype and not got[0, 0, 5].any()
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    dy = torch.randn(got.shape, generator=g).to(DEVICE)
    (gx,) = torch.autograd.grad(got, x, dy.to(dtype))
    (wx,) = torch.autograd.grad(want, xr, dy)
    keep = torch.ones(2, 3, 13, dtype=torch.bool)
    keep[0, 0, 5] = False  # (F.normalize's gradient at a zero row is dy / eps; ours subtracts a 0 projection)
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx.float()[keep], wx[keep], atol=tol * 4, rtol=tol * 4)


def test_triton_backend_of_softplus_with_the_fused_norm(
    variants: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """softplus's kernel path with q and k normalised by the one-pass kernel (forced on this device): the
    registry's parity rule (bf16, GQA, cross, every gradient), the kernel called."""
    from attnlab.catalog.variants import softplus
    from attnlab.kernels.score_transform import l2norm

    monkeypatch.setattr(softplus, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    calls: list[bool] = []
    real = l2norm.l2_normalize

    def spy(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
        calls.append(True)
        return real(x, eps)

    monkeypatch.setattr(l2norm, "l2_normalize", spy)
    check = check_parity(
        attnlab.get("softplus"), "triton", Case(1, 4, 2, 17, 30, 16, torch.bfloat16, True, {}), DEVICE
    )
    assert not check.skipped and check.passed and "dq" in check.errors, check.summary()
    assert calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the H100)")
@pytest.mark.parametrize("causal", [False, True])
def test_every_forward_candidate_returns_the_right_lse_on_the_gpu(causal: bool) -> None:
    """Each forward schedule the autotuner may pick, named explicitly, against fp32: output and log-sum-exp
    (the backward reads the lse: a schedule with a right output and a wrong lse gave wrong gradients)."""
    from attnlab.kernels.score_transform import op

    torch.manual_seed(0)
    q = torch.randn(2, 4, 257, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 257, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    x = (q.float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2)) * 0.125
    if causal:
        x = x.masked_fill(~torch.ones(257, 257, dtype=torch.bool, device="cuda").tril(), float("-inf"))
    want_out, want_lse = torch.softmax(x, -1) @ v.float().repeat_interleave(2, 1), x.logsumexp(-1)
    args = {"TMA": True, "BLOCK_D": 64, "DOT_PREC": "tf32", "N_BUCKET": 512, "CAUSAL": causal, "Q": q}
    fwd = [op._fwd_config(s) for s in op.FWD_SHAPES[:-1]]
    kept = op._prune_fwd(fwd, args)
    assert kept and not any(c.kwargs["WS"] for c in kept)
    for cfg in kept:
        out, lse = op.score_transform_fwd_launch(q, k, v, None, None, 0.125, 0.0, causal, config=cfg)
        torch.testing.assert_close(out.float(), want_out, atol=2e-2, rtol=2e-2, msg=_prefixed(str(cfg)))
        torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4, msg=_prefixed(str(cfg)))
    ws = op._fwd_config((128, 64, 4, 2, 1, True))
    with pytest.raises(ValueError, match="warp-specialized schedule"):
        op.score_transform_fwd_launch(q, k, v, None, None, 0.125, 0.0, causal, config=ws)
