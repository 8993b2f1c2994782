"""FlexAttention over packed sequences (``cu_seqlens``) in one launch (:meth:`FlexBackend.run_varlen`).

Packed through ``backend="flex"`` equals the sequences run one by one on a plain backend and on the fp32
reference, causal and not, self and cross (a sequence with more keys than queries, one with more queries
than keys whose first rows see no key, an empty one, a length-1 one, one with queries but no key: zero
rows, never NaN); a new packing of the same total, or of another total of the same table size, does not
recompile; ``explain`` reports the one-launch path, and a method that cannot be made local gets the
per-sequence path. Compiled FlexAttention on CPU is inference only: forward under ``torch.no_grad()``.

Each compiled method costs one compile (~10 s on 2 shared cores; the first also builds the compiler's
headers when its cache is cold): the compiled runs are softmax (with gated, the same kernel),
sliding_window (the BlockMask's full and partial tiles, skipped by the kernel) and alibi (a LOCAL
score_mod capturing the per-token tables). The masks of dilated, power, streaming, block_local and
doc_blocks and the score_mods of softcap, alibi with slopes, bias and selective run on uncompiled
FlexAttention (PyTorch's eager form of the same function: the same mask_mod and score_mod over every
pair; the BlockMask's tile tables are not read), which checks where each is evaluated (local or packed
positions) in a second or two each. The file: about 20 s with a warm inductor cache, about 60 s cold.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import flex_attention

import attnlab
from attnlab.api import _resolve_call
from attnlab.backends.flex import FLEX, VARLEN, FlexBackend, table_size
from attnlab.backends.varlen import packing_of
from attnlab.core import Result
from attnlab.kernels import flex as flex_exec
from attnlab.masks import MaskContext, mask_for
from attnlab.patterns import pattern_of
from attnlab.plans import Plan
from attnlab.registry import methods
from attnlab.testing import device_under_test

DEVICE = device_under_test()
H, H_KV, D = 2, 1, 16
# cross first: a kernel first compiled with T_q == T_k would be specialised to equal lengths
#   seq 0: 7 queries over 2 keys (causal: its first 5 rows see no key); seq 1: 3 over 1; seq 2: no query,
#   4 keys; seq 3: 9 queries over 20 keys; seq 4: length 1; seq 5: 4 queries, no key
CROSS_Q, CROSS_K = [7, 3, 0, 9, 1, 4], [2, 1, 4, 20, 1, 0]
SELF = [5, 1, 0, 12, 30]


def cu(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def bounds(lengths: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return [(ends[s], ends[s + 1]) for s in range(len(lengths))]


def qkv(lq: list[int], lk: list[int], seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, sum(lq), D, generator=g)
    k, v = (torch.randn(1, H_KV, sum(lk), D, generator=g) for _ in range(2))
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def one_by_one(
    name: str, q: Tensor, k: Tensor, v: Tensor, lq: list[int], lk: list[int], backend: str,
    inputs: dict[str, Tensor], **kw: Any,
) -> Tensor:  # fmt: skip
    """Each sequence alone on ``backend`` (its tensor inputs cut along N_q / N_k), packed by hand; zero
    rows for a sequence without queries or keys."""
    spec = attnlab.get(name)
    outs = []
    for (q0, q1), (k0, k1) in zip(bounds(lq), bounds(lk), strict=True):
        if q1 == q0 or k1 == k0:
            outs.append(torch.zeros(1, H, q1 - q0, D, device=DEVICE))
            continue
        xs = {}
        for t in spec.inputs:
            if t.name in inputs:
                x = inputs[t.name]
                for dim, sym in enumerate(t.shape):
                    if sym in ("N_q", "N_k") and x.shape[dim] > 1:
                        x = x.narrow(dim, *((q0, q1 - q0) if sym == "N_q" else (k0, k1 - k0)))
                xs[t.name] = x
        args: dict[str, Any] = {"backend": backend, **kw, **xs}
        outs.append(attnlab.attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], method=name, **args))
    return torch.cat(outs, 2)


def plain(name: str) -> str:
    """The method's first backend that is neither Flex nor Triton (cheap on a CPU), else the reference."""
    rest = [b.name for b in attnlab.get(name).backends if not b.triton and b.name != "flex"]
    return rest[0] if rest else "reference"


def check_packed(name: str, params: dict[str, Any], inputs_of: Any = None) -> None:
    """Packed on flex == one by one (plain backend) == one by one (fp32 reference), every pattern the
    method defines, cross packing first; rows without a key are exactly zero."""
    for lq, lk in ((CROSS_Q, CROSS_K), (SELF, SELF)):
        for causal in (True, False):
            pattern = pattern_of(causal, 2, 3) if lq is CROSS_Q else pattern_of(causal, 2, 2)
            if pattern not in attnlab.get(name).patterns:
                continue
            q, k, v = qkv(lq, lk, seed=len(lq) + causal)
            x: dict[str, Tensor] = inputs_of(sum(lq), sum(lk)) if inputs_of else {}
            args: dict[str, Any] = {"causal": causal, "backend": "flex", **params, **x}
            with torch.no_grad():
                got = attnlab.attention(
                    q, k, v, method=name, cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), **args
                )
                ref = one_by_one(name, q, k, v, lq, lk, "reference", x, causal=causal, **params)
                alone = one_by_one(name, q, k, v, lq, lk, plain(name), x, causal=causal, **params)
            label = f"{name} {params} causal={causal} lq={lq} lk={lk}"
            assert isinstance(got, Tensor) and got.shape == ref.shape, label
            assert not bool(got.isnan().any()), label
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5, msg=label)
            torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-5, msg=label)
            if lq is CROSS_Q:  # no key: sequence 5 entirely; when causal also sequence 0's first 5 rows
                assert bool((got[:, :, 20:24] == 0).all()), label
                if causal:
                    assert bool((got[:, :, :5] == 0).all()), label


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


# -- compiled FlexAttention ----------------------------------------------------------------------------
def test_softmax_and_gated_packed_in_one_launch_without_recompiling() -> None:
    check_packed("softmax", {})
    compiled = graphs()
    q, k, v = qkv([20, 28], [20, 28])  # the same total as SELF (48), another packing
    q2, k2, v2 = qkv([60, 7, 33], [60, 7, 33])  # another total, of the same table size
    assert table_size(48) == table_size(100)
    gate = torch.randn(1, H, sum(CROSS_Q), 1, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    with torch.no_grad():
        for a, b, c, lens in ((q, k, v, [20, 28]), (q2, k2, v2, [60, 7, 33])):
            got = attnlab.attention(a, b, c, causal=True, backend="flex", cu_seqlens_q=cu(lens))
            want = one_by_one("softmax", a, b, c, lens, lens, "reference", {}, causal=True)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        # gated: the same kernel (no score_mod), then its gate on the packed rows
        q, k, v = qkv(CROSS_Q, CROSS_K, seed=3)
        got = attnlab.attention(q, k, v, method="gated", causal=True, backend="flex", gate=gate,
                                cu_seqlens_q=cu(CROSS_Q), cu_seqlens_k=cu(CROSS_K))  # fmt: skip
        want = one_by_one("gated", q, k, v, CROSS_Q, CROSS_K, "reference", {"gate": gate}, causal=True)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert graphs() == compiled, "a new packing of the same table size recompiled FlexAttention"


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("sliding_window", {"window": 3}),
        ("alibi", {}),
    ],
)
def test_mask_and_score_methods_packed_equal_their_sequences(name: str, params: dict[str, Any]) -> None:
    check_packed(name, params)


# -- uncompiled FlexAttention: where each score_mod is evaluated -------------------------------------------
@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention's eager form in place of the compiled one (same mask_mod and score_mod, every pair)."""
    monkeypatch.setitem(flex_exec._compiled, "flex", flex_attention)


def _bias(t_q: int, t_k: int) -> dict[str, Tensor]:
    return {"bias": torch.randn(1, H, t_q, t_k, generator=torch.Generator().manual_seed(5)).to(DEVICE)}


def _temperature(t_q: int, t_k: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(6)
    return {"temperature": (0.25 + torch.rand(1, H, t_q, generator=g)).to(DEVICE)}


def _slopes(t_q: int, t_k: int) -> dict[str, Tensor]:
    return {"slopes": torch.tensor([0.7, 0.3], device=DEVICE)}


@pytest.mark.parametrize(
    ("name", "params", "inputs"),
    [
        ("dilated", {"window": 3, "dilation": 2}, None),  # every tile partial
        ("power", dict(attnlab.get("power").test_params[0]), None),  # a structured mask (no score_mod)
        ("streaming", {"sinks": 1, "window": 2}, None),
        ("block_local", {"block": 7, "neighbors": 0}, None),
        ("doc_blocks", {"boundaries": (3, 8), "prefix_global": False, "last_sees_all": False}, None),
        ("softcap", {"cap": 2.0, "window": 4}, None),  # LOCAL: the window reads p - j
        ("softcap", {"cap": 1.5}, None),
        ("alibi", {"max_bias": 2.0}, _slopes),  # LOCAL, with the slopes input
        ("bias", {}, _bias),  # PACKED: bias[b, h, q, k] at packed indices
        ("selective", {}, _temperature),  # PACKED: temperature[b, h, q]
    ],
)
def test_masks_and_score_mods_are_evaluated_where_their_method_says(
    eager_flex: None, name: str, params: dict[str, Any], inputs: Any
) -> None:
    check_packed(name, params, inputs)


def test_return_plan_gives_each_sequences_plan(eager_flex: None) -> None:
    """``return_plan`` with the one-launch path: each sequence's static plan at its own lengths (None for
    the sequences without queries or keys), the plans the packed BlockMask was joined from."""
    q, k, v = qkv(CROSS_Q, CROSS_K)
    with torch.no_grad():
        res = attnlab.attention(q, k, v, method="sliding_window", causal=True, window=3, backend="flex",
                                return_plan=True, cu_seqlens_q=cu(CROSS_Q), cu_seqlens_k=cu(CROSS_K))  # fmt: skip
    assert isinstance(res, Result) and isinstance(res.plan, list) and len(res.plan) == len(CROSS_Q)
    spec = attnlab.get("sliding_window")
    factory = spec.mask
    assert factory is not None
    for s, (n_q, n_k) in enumerate(zip(CROSS_Q, CROSS_K, strict=True)):
        plan = res.plan[s]
        if n_q == 0 or n_k == 0:
            assert plan is None
            continue
        assert isinstance(plan, Plan) and (plan.n_q, plan.n_k, plan.causal) == (n_q, n_k, True)
        want = mask_for(factory, spec.make_params({"window": 3}), n_q, n_k, True, "cpu")
        assert torch.equal(plan.dense_mask()[0, 0].cpu(), want)


def test_the_lse_comes_back_packed(eager_flex: None) -> None:
    """``run_varlen`` with ``want_lse`` (a GPU call's ``return_lse``; compiled Flex on CPU cannot return it,
    so the backend is called directly here, on eager Flex): the lse packed like q, each sequence's own,
    -inf on rows without a key."""
    q, k, v = qkv(CROSS_Q, CROSS_K, seed=8)
    spec = attnlab.get("sliding_window")
    call = _resolve_call(spec, spec.make_params({"window": 3}), q, k, v, causal=True, scale=None, want_lse=True,
                         packing=packing_of(cu(CROSS_Q), cu(CROSS_K), q, k))  # fmt: skip
    with torch.no_grad():
        out, lse = FLEX.run_varlen(q, k, v, call, {})
    assert lse is not None and lse.shape == (1, H, sum(CROSS_Q)) and lse.dtype == torch.float32
    for (q0, q1), (k0, k1) in zip(bounds(CROSS_Q), bounds(CROSS_K), strict=True):
        if q1 == q0:
            continue
        if k1 == k0:
            assert bool((lse[:, :, q0:q1] == float("-inf")).all()) and bool((out[:, :, q0:q1] == 0).all())
            continue
        want = attnlab.attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], method="sliding_window",
                                 window=3, causal=True, backend="reference", return_lse=True)  # fmt: skip
        assert want.lse is not None
        finite = torch.isfinite(want.lse)
        assert torch.equal(torch.isfinite(lse[:, :, q0:q1]), finite)
        torch.testing.assert_close(lse[:, :, q0:q1][finite], want.lse[finite], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, :, q0:q1], want.out, atol=2e-5, rtol=1e-5)


# -- which path runs -----------------------------------------------------------------------------------
def test_explain_reports_the_one_launch_flex_path_and_a_refusal_runs_per_sequence() -> None:
    q, k, v = qkv(SELF, SELF)
    with torch.no_grad():
        choice = attnlab.explain(
            q, k, v, method="sliding_window", causal=True, window=3, cu_seqlens_q=cu(SELF), backend="flex"
        )
        assert not choice.per_sequence and "in one launch on backend 'flex'" in str(choice)
        # by default Flex's packed path is not taken (dispatch.PACKED_BY_NAME_ONLY: not yet checked on a
        # GPU; slower than SDPA per sequence on a CPU): the executor on a GPU, each sequence on a CPU
        for method, kw in (("sliding_window", {"window": 3}), ("softmax", {})):
            choice = attnlab.explain(q, k, v, method=method, causal=True, cu_seqlens_q=cu(SELF), **kw)
            text = str(choice)
            if DEVICE.type == "cpu":
                assert choice.per_sequence and "runs only when named (backend='flex')" in text, text
            else:
                assert not choice.per_sequence and "in one launch on backend 'block_sparse'" in text, text
        # neighborhood's mask reads the sequence length (its grid): Flex refuses it. On a CPU each sequence
        # runs alone; on a GPU the block-sparse executor, which plans each sequence in its own coordinates,
        # runs them in one launch (checked there by tests/test_varlen_api.py)
        choice = attnlab.explain(q, k, v, method="neighborhood", causal=False, window=3,
                                 cu_seqlens_q=cu(SELF))  # fmt: skip
        text = str(choice)
        assert FlexBackend().varlen_refusals(attnlab.get("neighborhood"))
        if DEVICE.type == "cpu":
            assert choice.per_sequence and "each sequence runs separately" in text
            assert "flex refused: method 'neighborhood' is not checked for packed sequences" in text
            assert "sequence 0 (N_q=5, N_k=5)" in text  # each sequence's own choice
        else:
            assert not choice.per_sequence and "in one launch on backend 'block_sparse'" in text, text
    # with gradients: on a CPU Flex refuses (no backward there), per sequence; on a GPU one launch on Flex
    choice = attnlab.explain(q.requires_grad_(True), k, v, method="sliding_window", causal=True, window=3,
                             cu_seqlens_q=cu(SELF))  # fmt: skip
    if DEVICE.type == "cpu":
        assert choice.per_sequence and "FlexAttention has no backward on CPU" in str(choice)
    else:
        assert "in one launch on backend 'flex'" not in str(choice)  # (named only)


def test_every_flex_method_is_listed_or_refuses_packed_calls() -> None:
    """Each method with a Flex backend takes packed calls exactly when :data:`VARLEN` lists it; every
    listed method exists and has a Flex backend (no stale entry)."""
    flex_methods = set()
    for name, spec in methods().items():
        for b in spec.backends:
            if isinstance(b, FlexBackend):
                flex_methods.add(name)
                assert (not b.varlen_refusals(spec)) == (name in VARLEN), name
    assert set(VARLEN) <= flex_methods, sorted(set(VARLEN) - flex_methods)
    strided = attnlab.get("strided_heads")
    assert all(b.varlen_refusals(strided) for b in strided.backends if isinstance(b, FlexBackend))


@pytest.mark.parametrize("name", sorted(n for n in VARLEN if methods()[n].mask is not None))
def test_listed_masks_are_local(name: str) -> None:
    """A listed mask, built in one key frame of offset 0 (as the packed kernel builds it) and evaluated at
    ``p = i + N_k - N_q``, is the method's own mask at every sequence's lengths: it reads positions only
    through ``p`` and ``j``, and the lengths only through the cap of its constants."""
    spec = methods()[name]
    factory = spec.mask
    assert factory is not None
    frame = table_size(40)
    for params in spec.test_params:
        prm = spec.make_params(params)
        for n_q, n_k in ((5, 5), (3, 9), (9, 3), (1, 7), (17, 17), (12, 30)):
            for causal in (True, False):
                if pattern_of(causal, n_q, n_k) not in spec.patterns:
                    continue
                want = mask_for(factory, prm, n_q, n_k, causal, "cpu")
                mm = factory(prm, MaskContext(frame, frame, causal, "cpu"))
                pos = torch.arange(n_q, dtype=torch.int32)[:, None] + (n_k - n_q)
                got = mm(torch.zeros((), dtype=torch.int32), torch.zeros((), dtype=torch.int32), pos,
                         torch.arange(n_k, dtype=torch.int32)[None, :]).expand(n_q, n_k)  # fmt: skip
                assert torch.equal(got, want), f"{name} {params} {n_q}x{n_k} causal={causal}"
