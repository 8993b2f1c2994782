"""Review of the softmax variants (attnlab/catalog/variants, attnlab/kernels/score_transform): one test per
defect found, each failing before its fix.

1. FlexAttention with a float64 ``bias`` / ``temperature`` (the captured tensor entered the score_mod uncast).
2. ``sinks`` of -inf on causal cross rows with no key (NaN on reference, eager, Triton, Flex's rescale).
3. Low-rank bias factors rounded to q's dtype in the kernel (bf16: logit errors of ~1-2).
4. ``return_lse`` for the softmax variants (the log of each method's own normaliser).
5. softplus on eager in float16: the row sum overflowed to inf and the output was all zeros.
6. lowrank_bias factors of different ranks: an InputError naming both.
7. The backward custom op's fake shapes equal the real ones when a factor broadcasts along N.
A. lowrank_bias above the kernel's largest rank on the ``triton`` backend runs (eager), not a BackendError.
B. The ALiBi slope-gradient buffer is sized from the dQ config actually launched.

On a CPU the Triton kernel runs in the interpreter (tiny shapes; the conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

import attnlab
from attnlab.catalog import variants as variants_pkg
from attnlab.catalog.variants import sink
from attnlab.core import Result
from attnlab.errors import BackendError, InputError
from attnlab.testing import device_under_test, random_qkv

DEVICE = device_under_test()
B, H, H_KV, D = 2, 4, 2, 16


def _allowed(n_q: int, n_k: int, causal: bool) -> Tensor:
    pos = torch.arange(n_q)[:, None] + n_k - n_q
    return torch.arange(n_k)[None, :] <= pos if causal else torch.ones(n_q, n_k, dtype=torch.bool)


def _dots(q: Tensor, k: Tensor) -> Tensor:
    """``q . k`` in float64 (B, H, N_q, N_k), GQA heads expanded."""
    return torch.einsum(
        "bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    )


# -- 1. FlexAttention: float64 tensor inputs ---------------------------------------------------------------


def test_flex_casts_float64_bias_and_temperature_before_capturing_them() -> None:
    """The repro of the review: a float64 bias (and a float64 temperature) on FlexAttention against the
    reference (D = 32: CPU FlexAttention's D = 16 template is wrong at some shapes, see test_variants)."""
    q, k, v = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    for name, extra in (
        ("bias", {"bias": torch.randn(1, 2, 5, 9, dtype=torch.float64)}),
        ("selective", {"temperature": torch.rand(1, 2, 5, dtype=torch.float64) + 0.5}),
    ):
        want = attnlab.attention(q, k, v, method=name, causal=True, backend="reference", **extra)
        got = attnlab.attention(q, k, v, method=name, causal=True, backend="flex", **extra)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


# -- 2. sinks of -inf on rows with no key ------------------------------------------------------------------


def _sink_by_hand(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, causal: bool) -> Tensor:
    """``sum_j exp(x_ij) v_j / (exp(s_h) + sum_j exp(x_ij))`` row by row in float64; a row with no key is 0."""
    x = _dots(q, k) / q.shape[-1] ** 0.5
    ok = _allowed(q.shape[2], k.shape[2], causal)
    ve = v.double().repeat_interleave(q.shape[1] // v.shape[1], 1)
    out = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=torch.float64)
    for i in range(q.shape[2]):
        keys = ok[i]
        if not keys.any():
            continue
        w = torch.exp(x[:, :, i, keys])  # (B, H, n)
        den = w.sum(-1) + torch.exp(sinks.double())[None, :]
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", w / den[..., None], ve[:, :, keys])
    return out.float()


def test_minus_inf_sinks_on_causal_cross_rows_with_no_key_are_zero_not_nan() -> None:
    """q (1, 2, 6, 16), k (1, 2, 3, 16), causal: the first 3 rows see no key; the sink of head 0 is -inf
    (plain softmax). Every CPU backend returns 0 on those rows and the by-hand result elsewhere, and the
    gradients (sinks included) are finite; Flex's rescaling (GPU only) gives 0 where its lse is -inf."""
    q, k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    sinks = torch.tensor([float("-inf"), 0.0])
    want = _sink_by_hand(q, k, v, sinks, True)
    assert not want[:, :, :3].any()
    for backend in ("reference", "eager", "sdpa", "triton"):  # (on the device under test: CUDA or the CPU)
        leaves = [t.to(DEVICE).requires_grad_(True) for t in (q, k, v, sinks)]
        got = attnlab.attention(*leaves[:3], method="sink", causal=True, backend=backend, sinks=leaves[3])
        assert not got.isnan().any(), backend
        torch.testing.assert_close(
            got.cpu(), want, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend: f"{b}: {m}"
        )
        grads = torch.autograd.grad(got, leaves, torch.randn_like(got))
        assert all(torch.isfinite(g).all() for g in grads), backend
    # FlexAttention's path: plain softmax output (0 on the rows with no key) and lse -inf there
    x = (q @ k.transpose(-1, -2)) / 4
    x = x.masked_fill(~_allowed(6, 3, True), float("-inf"))
    plain = torch.softmax(x, -1).nan_to_num(0.0) @ v
    got = sink.rescale(plain, torch.logsumexp(x, -1), sinks)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- 3. low-rank factors in fp32 inside the kernel ---------------------------------------------------------


def test_lowrank_bias_kernel_keeps_position_style_factors_in_fp32() -> None:
    """ALiBi with slope 1/2 written as a rank-2 bias whose factors hold large positions (``u = [-m (p_i + P),
    1]``, ``vf = [1, m (j + P)]``, P = 1000: ``u . vf = -m (p_i - j)``, causal), bf16 q, k, v: the kernel's
    error against the fp32 reference is comparable to the ALiBi kernel's on the same inputs (factors rounded
    to bf16 made logit errors of ~2, output errors of ~0.5)."""
    n_q, n_k, slope, big = 8, 24, 0.5, 1000.0
    q, k, v = random_qkv(1, 2, 2, n_q, n_k, 16, torch.bfloat16)
    pos = torch.arange(n_q, dtype=torch.float32) + n_k - n_q + big
    keys = torch.arange(n_k, dtype=torch.float32) + big
    u = torch.stack([-slope * pos, torch.ones(n_q)], -1)[None, None].expand(1, 2, n_q, 2).to(DEVICE)
    vf = torch.stack([torch.ones(n_k), slope * keys], -1)[None, None].expand(1, 2, n_k, 2).to(DEVICE)
    slopes = torch.full((2,), slope, device=DEVICE)
    want = attnlab.attention(q.float(), k.float(), v.float(), method="alibi", causal=True,
                             backend="reference", slopes=slopes)  # fmt: skip
    lowrank = attnlab.attention(q, k, v, method="lowrank_bias", causal=True, backend="triton", u=u, vf=vf)
    alibi = attnlab.attention(q, k, v, method="alibi", causal=True, backend="triton", slopes=slopes)
    err_lowrank = float((lowrank.float() - want).abs().max())
    err_alibi = float((alibi.float() - want).abs().max())
    assert err_lowrank <= 2 * err_alibi + 1e-2, (err_lowrank, err_alibi)
    # the kernel's log-sum-exp too (the backward recomputes the weights from it)
    from attnlab.kernels.score_transform.op import score_transform_fwd

    _, lse = score_transform_fwd(q, k, v, None, None, None, u, vf, None, 0.25, 0.0, True)
    _, lse_alibi = score_transform_fwd(q, k, v, None, None, slopes, None, None, None, 0.25, 0.0, True)
    torch.testing.assert_close(lse, lse_alibi, atol=2e-2, rtol=0.0)


# -- 4. the log-sum-exp of each variant --------------------------------------------------------------------


def _inputs(name: str, n_q: int, n_k: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(params, tensor inputs) of a call of ``name`` that exercises its transform."""
    g = torch.Generator().manual_seed(3)
    if name == "softcap":
        return {"cap": 2.0}, {}
    if name == "alibi":
        return {}, {"slopes": torch.rand(H, generator=g) + 0.1}
    if name == "bias":
        b = torch.randn(B, 1, n_q, n_k, generator=g)
        b[0, 0, 1, :3] = float("-inf")  # masked pairs
        return {}, {"bias": b}
    if name == "sink":
        return {}, {"sinks": torch.tensor([0.5, -1.0, float("-inf"), 2.0])}
    if name == "selective":
        return {}, {"temperature": torch.rand(B, H, n_q, generator=g) * 2}
    if name == "lowrank_bias":
        return {}, {"u": torch.randn(1, H, n_q, 3, generator=g), "vf": torch.randn(B, 1, n_k, 3, generator=g)}
    return {}, {"gate": torch.randn(B, H, n_q, 1, generator=g)}  # gated


def _lse_by_hand(name: str, q: Tensor, k: Tensor, params: dict[str, Any], extra: dict[str, Tensor],
                 causal: bool) -> Tensor:  # fmt: skip
    """log of the normaliser of the method's transformed logits, float64 math: -inf on a row with no key
    (for sink: ``log(exp(s_h) + sum_j exp(x_ij))``, so ``s_h`` on a row with no key)."""
    n_q, n_k = q.shape[2], k.shape[2]
    s = _dots(q, k) / D**0.5
    pos = torch.arange(n_q)[:, None] + n_k - n_q
    if name == "softcap":
        s = params["cap"] * torch.tanh(s / params["cap"])
    elif name == "alibi":
        s = s - extra["slopes"].double()[:, None, None] * (pos - torch.arange(n_k)[None, :]).abs()
    elif name == "bias":
        s = s + extra["bias"].double()
    elif name == "selective":
        s = s * extra["temperature"].double()[..., None]
    elif name == "lowrank_bias":
        s = s + extra["u"].double() @ extra["vf"].double().transpose(-1, -2)
    s = s.masked_fill(~_allowed(n_q, n_k, causal), float("-inf"))
    if name == "sink":
        col = extra["sinks"].double()[None, :, None, None].expand(*s.shape[:3], 1)
        s = torch.cat([s, col], -1)
    return torch.logsumexp(s, -1).float()


LSE_METHODS = ["softcap", "alibi", "bias", "sink", "selective", "lowrank_bias", "gated"]
TRITON_LSE = {"softcap", "alibi", "bias", "sink", "selective", "lowrank_bias"}


@pytest.mark.parametrize("name", LSE_METHODS)
@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(9, 13, False), (17, 13, True)])
def test_variants_return_the_log_sum_exp_of_their_normaliser(
    name: str, n_q: int, n_k: int, causal: bool
) -> None:
    """``return_lse=True`` on every CPU backend that offers it (eager, the kernel in the interpreter; the
    method's reference_lse): the natural log of the normaliser of the transformed logits, -inf on rows with
    no key (17 x 13 causal: 4 of them), the outputs unchanged. Without backend= a CPU call gets it too."""
    q, k, v = torch.randn(B, H, n_q, D) * 2, torch.randn(B, H_KV, n_k, D) * 2, torch.randn(B, H_KV, n_k, D)
    params, extra = _inputs(name, n_q, n_k)
    want = _lse_by_hand(name, q, k, params, extra, causal)
    spec = attnlab.get(name)
    out_ref, lse_ref = variants_pkg.LSE_REFERENCES[name](q, k, v, spec.make_params(params), causal=causal, scale=D**-0.5,
                                            **extra)  # fmt: skip
    plain = attnlab.attention(q, k, v, method=name, causal=causal, backend="reference", **params, **extra)
    torch.testing.assert_close(out_ref, plain)
    backends = ["eager", None, *(["triton"] if name in TRITON_LSE else [])]
    for lse, label in [(lse_ref, "reference_lse")] + [
        (_lse_of(q, k, v, name, causal, b, params, extra, plain), str(b)) for b in backends
    ]:
        assert lse.dtype == torch.float32 and lse.shape == (B, H, n_q), label
        assert torch.equal(torch.isfinite(lse), torch.isfinite(want)), label
        rows = torch.isfinite(want)
        torch.testing.assert_close(
            lse[rows], want[rows], atol=2e-5, rtol=2e-5, msg=lambda m, x=label: f"{x}: {m}"
        )
    if causal and name != "sink":
        assert torch.isneginf(want[:, :, : n_q - n_k]).all()


def _lse_of(q: Tensor, k: Tensor, v: Tensor, name: str, causal: bool, backend: str | None,
            params: dict[str, Any], extra: dict[str, Tensor], plain: Tensor) -> Tensor:  # fmt: skip
    dev = {n: t.to(DEVICE) for n, t in extra.items()}  # (on the device under test: CUDA or the CPU)
    res = attnlab.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), method=name, causal=causal, backend=backend,
                            return_lse=True, **params, **dev)  # fmt: skip
    assert isinstance(res, Result) and res.lse is not None
    torch.testing.assert_close(res.out.cpu(), plain, atol=2e-5, rtol=2e-5)
    return res.lse.cpu()


def test_lse_conventions_where_a_variant_has_none() -> None:
    """softplus (l1-normalised softplus weights) and affine_scaled (weights alpha P + beta / n: the lse of
    the softmax inside cannot merge split outputs) have no log-sum-exp on any backend: the call is refused
    with the reason; gated's is plain softmax's (the gate acts on the output), on the reference too."""
    q, k, v = torch.randn(1, H, 9, D), torch.randn(1, H_KV, 13, D), torch.randn(1, H_KV, 13, D)
    for name in ("softplus", "affine_scaled"):
        assert not any(b.caps.lse for b in attnlab.get(name).backends), name
        with pytest.raises(BackendError, match="log-sum-exp"):
            attnlab.attention(q, k, v, method=name, return_lse=True)
    res = attnlab.attention(q, k, v, method="gated", backend="reference", return_lse=True,
                            gate=torch.randn(1, H, 9, 1))  # fmt: skip
    assert isinstance(res, Result) and res.lse is not None
    torch.testing.assert_close(res.lse, _lse_by_hand("softmax", q, k, {}, {}, False))


@pytest.mark.parametrize("name", ["softcap", "sink", "lowrank_bias"])
def test_kernel_lse_carries_its_gradient(name: str) -> None:
    """A loss on the output *and* the lse: the kernel's gradients (q, k, v, sinks, factors) equal autograd
    through the method's reference_lse (the lse's gradient adds ``dlse_i P_ij`` to the logits' gradient)."""
    q, k, v = random_qkv(B, H, H_KV, 11, 14, D, grad=True)
    params, extra = _inputs(name, 11, 14)
    if name == "sink":
        extra = {"sinks": torch.randn(H)}
    extra = {n: t.to(DEVICE).requires_grad_(True) for n, t in extra.items()}
    leaves = [q, k, v, *extra.values()]
    spec = attnlab.get(name)
    res = attnlab.attention(q, k, v, method=name, causal=True, backend="triton", return_lse=True, **params,
                            **extra)  # fmt: skip
    assert isinstance(res, Result) and res.lse is not None
    out_ref, lse_ref = variants_pkg.LSE_REFERENCES[name](q, k, v, spec.make_params(params), causal=True, scale=D**-0.5,
                                            **extra)  # fmt: skip
    do, dl = torch.randn_like(res.out), torch.randn_like(res.lse)
    got = torch.autograd.grad((res.out * do).sum() + (res.lse * dl).sum(), leaves)
    want = torch.autograd.grad((out_ref * do).sum() + (lse_ref * dl).sum(), leaves)
    for i, (a, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"leaf {i}: {m}")


# -- 5. softplus eager in float16 --------------------------------------------------------------------------


def test_softplus_eager_float16_row_sum_does_not_overflow() -> None:
    """Nearly parallel q and k rows at scale 25 (t = 100: each softplus weight ~ lambda t = 1150 at N = 64):
    the row sum (~74,000) passes float16's largest value; eager still returns the reference's output (it
    returned all zeros: w / inf)."""
    base = torch.randn(D)
    q = (base + 0.05 * torch.randn(1, 2, 64, D)).half()
    k = (base + 0.05 * torch.randn(1, 2, 64, D)).half()
    v = torch.randn(1, 2, 64, D).half()
    want = attnlab.attention(q, k, v, method="softplus", scale=25.0, backend="reference")
    got = attnlab.attention(q, k, v, method="softplus", scale=25.0, backend="eager")
    assert want.abs().max() > 0.1 and got.abs().max() > 0.1
    torch.testing.assert_close(got.float(), want.float(), atol=5e-3, rtol=5e-3)


# -- 6. lowrank_bias: factors of different ranks -----------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "eager", "reference", "triton"])
def test_lowrank_bias_factors_of_different_ranks_are_an_input_error(backend: str | None) -> None:
    """u rank 3 and vf rank 1 pass the declared shapes (broadcast lets a dim be 1) but are not one bias:
    an InputError naming both ranks and what is expected, on every backend."""
    q, k, v = random_qkv(2, 4, 4, 5, 7, 16)
    u, vf = torch.randn(2, 4, 5, 3, device=DEVICE), torch.randn(2, 4, 7, 1, device=DEVICE)
    with pytest.raises(InputError, match=r"u has rank 3 and vf rank 1; expected the same rank"):
        attnlab.attention(q, k, v, method="lowrank_bias", backend=backend, u=u, vf=vf)


# -- 7. the backward op's fake shapes ----------------------------------------------------------------------


def test_backward_fake_shapes_equal_the_real_ones_for_factors_broadcast_along_n() -> None:
    """u (1, 2, 1, 3) over N_q = 5 and vf (1, 1, 9, 3): the real du / dvf have the factors' shapes, as the
    fake (meta) rule says (opcheck compares the two); and the method runs such a call with gradients."""
    from attnlab.kernels.score_transform import op

    q, k, v = random_qkv(1, 2, 2, 5, 9, 16)
    u, vf = torch.randn(1, 2, 1, 3, device=DEVICE), torch.randn(1, 1, 9, 3, device=DEVICE)
    out, lse = op.score_transform_fwd(q, k, v, None, None, None, u, vf, None, 0.25, 0.0, True)
    do = torch.randn_like(out)
    args = (do, q, k, v, out, lse, None, None, None, u, vf, None, 0.25, 0.0, True, False, False, False, False)
    real = op.score_transform_bwd(*args)
    assert real[4].shape == u.shape and real[5].shape == vf.shape
    torch.library.opcheck(op.score_transform_bwd, args, test_utils=("test_schema", "test_faketensor"))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, u, vf)]
    got = attnlab.attention(*leaves[:3], method="lowrank_bias", causal=True, backend="triton", u=leaves[3],
                            vf=leaves[4])  # fmt: skip
    ref = [t.clone().requires_grad_(True) for t in (q, k, v, u, vf)]
    want = attnlab.attention(*ref[:3], method="lowrank_bias", causal=True, backend="reference", u=ref[3],
                             vf=ref[4])  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, w in zip(
        torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), ref), strict=True
    ):
        torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4)


# -- A. lowrank_bias above the kernel's largest rank -------------------------------------------------------


def test_lowrank_bias_above_the_kernels_rank_runs_on_the_triton_backend() -> None:
    """Rank 65 > MAX_RANK: the ``triton`` backend (the CUDA default, which cannot see the rank when it is
    chosen) runs the call on the eager path instead of raising, forward, lse and gradients."""
    q, k, v = random_qkv(1, 2, 2, 6, 8, 16, grad=True)
    u = (torch.randn(1, 2, 6, 65, device=DEVICE) * 0.1).requires_grad_(True)
    vf = (torch.randn(1, 2, 8, 65, device=DEVICE) * 0.1).requires_grad_(True)
    got = attnlab.attention(q, k, v, method="lowrank_bias", causal=True, backend="triton", u=u, vf=vf)
    want = attnlab.attention(q, k, v, method="lowrank_bias", causal=True, backend="reference", u=u, vf=vf)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(g is not None for g in torch.autograd.grad(got.sum(), (q, k, v, u, vf)))
    with torch.no_grad():
        res = attnlab.attention(q, k, v, method="lowrank_bias", backend="triton", return_lse=True, u=u, vf=vf)
    assert isinstance(res, Result) and res.lse is not None and torch.isfinite(res.lse).all()


# -- B. the slope-gradient buffer and an explicit dQ config ------------------------------------------------


def test_alibi_slope_gradient_buffer_fits_an_explicit_dq_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autotuner's dQ candidates start at BLOCK_M = 32 (patched), the launch names BLOCK_M = 16: the
    buffer of per-program partial sums has a row for each of the launched programs (it was sized for the
    candidates' smallest BLOCK_M, and the extra programs wrote past it), and dslopes equals the twin's."""
    from attnlab.kernels.score_transform import op
    from attnlab.kernels.score_transform.naive import score_transform_fwd_naive

    n_q, n_k = 40, 24
    monkeypatch.setattr(op._DQ, "configs", [op._bwd_config((32, 16, 1, 1))])
    seen: list[tuple[int, int]] = []
    real = op._DQ_ANY

    class Spy:
        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> Any:
                programs = math.ceil(n_q / kwargs["BLOCK_M"])
                seen.append((args[13].shape[0], programs))
                assert args[13].shape[0] >= programs, "the slope-gradient buffer is smaller than the grid"
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(op, "_DQ_ANY", Spy())
    q, k, v = random_qkv(1, 2, 1, n_q, n_k, 16)
    slopes = torch.rand(2, device=DEVICE) * 0.5
    out, lse = op.score_transform_fwd_launch(q, k, v, None, None, 0.25, 0.0, True, slopes=slopes)
    do = torch.randn_like(out)
    small = (op._bwd_config((16, 16, 1, 1)), op._bwd_config((16, 16, 1, 1)))
    grads = op.score_transform_bwd_launch(do, q, k, v, out, lse, None, None, 0.25, 0.0, True, slopes=slopes,
                                          slopes_grad=True, configs=small)  # fmt: skip
    assert seen and seen[0][1] == 3
    sl = slopes.clone().requires_grad_(True)
    ref, _ = score_transform_fwd_naive(q, k, v, None, None, 0.25, 0.0, True, slopes=sl)
    (want,) = torch.autograd.grad(ref, sl, do)
    assert grads[6] is not None
    torch.testing.assert_close(grads[6], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["sink", "gated"])
def test_flex_lse_wiring_with_the_output_transform(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention's lse runs on a GPU only; here compiled FlexAttention is replaced by the same math
    (plain softmax and its lse, no score_mod for these two) to check what the flex backend makes of it: the
    output transform (sink's rescaling, the gate) and the method's lse (sink: ``logaddexp(lse, s_h)``, gated:
    plain softmax's), equal to the method's reference_lse, rows with no key included (17 x 13 causal)."""
    from attnlab.kernels import flex as flex_exec

    q, k, v = torch.randn(1, H, 17, D), torch.randn(1, H_KV, 13, D), torch.randn(1, H_KV, 13, D)
    extra = {"sinks": torch.tensor([0.5, float("-inf"), -2.0, 1.0])} if name == "sink" else {}
    if name == "gated":
        extra = {"gate": torch.randn(1, H, 17, 1)}

    def fake_flex(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        assert kwargs["score_mod"] is None
        s = (_dots(q, k) * kwargs["scale"]).float().masked_fill(~_allowed(17, 13, True), float("-inf"))
        out = torch.softmax(s, -1).nan_to_num(0.0) @ v.repeat_interleave(2, 1)
        return out, torch.logsumexp(s, -1) if kwargs.get("return_lse") else None

    monkeypatch.setattr(flex_exec, "flex_run", fake_flex)
    spec = attnlab.get(name)
    call = attnlab.resolve(q, k, v, method=name, causal=True, return_lse=True)
    out, lse = spec.backend("flex").run_lse(q, k, v, call, extra)
    want_out, want_lse = variants_pkg.LSE_REFERENCES[name](q, k, v, spec.params, causal=True, scale=D**-0.5,
                                                           **extra)  # fmt: skip
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse))
    rows = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[rows], want_lse[rows], atol=1e-5, rtol=1e-5)
    if name == "sink":  # rows with no key: lse = s_h (-inf for the head whose sink is -inf)
        torch.testing.assert_close(lse[0, :, :4], extra["sinks"][:, None].expand(H, 4))


def test_flex_sink_helpers_have_no_nan_in_values_or_gradients() -> None:
    """Flex's sink helpers on rows whose softmax lse is -inf (no key), with s_h = -inf, finite and +inf:
    ``rescale`` gives 0 and ``with_sink`` gives ``s_h``, with finite gradients for the lse and the sinks."""
    lse = torch.tensor([[[float("-inf"), 0.3, float("-inf")]] * 3]).requires_grad_(True)  # (1, 3, 3)
    sinks = torch.tensor([float("-inf"), 0.5, float("inf")]).requires_grad_(True)
    out = torch.ones(1, 3, 3, 2)
    got = sink.rescale(out, lse, sinks)
    assert not got.isnan().any() and not got[:, :, [0, 2]].any()
    merged = sink.with_sink(lse, sinks)
    want = torch.logsumexp(torch.stack([lse.detach(), sinks.detach()[None, :, None].expand(1, 3, 3)]), 0)
    torch.testing.assert_close(merged.detach(), want)
    grads = torch.autograd.grad(got.sum() + merged.masked_fill(merged.isinf(), 0).sum(), (lse, sinks))
    assert all(torch.isfinite(g).all() for g in grads)
