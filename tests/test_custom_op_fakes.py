"""Every ``attnlab::`` custom op's fake (``register_fake``) against the real op, by ``torch.library.opcheck``.

torch.compile traces a custom op through its fake rule alone: the outputs' shapes, dtypes, devices and
strides that the rule returns are what the compiled graph assumes the real kernel gives (Inductor reads
and writes them at those strides, without a check). A fake that differs from the real op in any of them
gives a compiled program that is silently wrong, or fails far from its cause. ``opcheck``'s
``test_faketensor`` runs each op for real and under fake tensors and compares every output's metadata,
strides included; ``test_schema`` checks the declared mutations and aliasing against the real run.

Each op is checked on tiny inputs (Triton's interpreter on CPU), with contiguous inputs and, where it
takes (B, H, N, D) tensors, with them as transposed views of (B, N, H, D) memory (unit last stride, as
Hugging Face hands q, k, v over): the launchers copy or keep such views, and the fakes must say what
they return for them. Shapes are chosen so that the lengths are not multiples of the chunks and tiles
and H > 1 (strides of padded buffers' slices show only then). The ops whose contiguous forward is
already opcheck-ed in test_linear_kernels / test_linear_gla_forward are checked here with H > 1 and
the transposed layout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.testing import device_under_test

DEV = device_under_test()
CHECKS = ("test_schema", "test_faketensor")
LAYOUTS = ["contiguous", "transposed"]


def _opcheck(op: object, args: tuple) -> None:
    torch.library.opcheck(op, args, test_utils=CHECKS)  # type: ignore[arg-type]


def _laid(t: Tensor, layout: str) -> Tensor:
    """t as it is, or with the same values in (B, N, H, D) memory seen as (B, H, N, D)."""
    if layout == "contiguous":
        return t
    out = t.transpose(1, 2).contiguous().transpose(1, 2)
    assert not out.is_contiguous() and out.stride(-1) == 1
    return out


def _qkv(h: int, h_kv: int, n_q: int, n_k: int, d: int, layout: str) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.randn(1, h, n_q, d, device=DEV)
    k, v = (torch.randn(1, h_kv, n_k, d, device=DEV) for _ in range(2))
    return _laid(q, layout), _laid(k, layout), _laid(v, layout)


def _index(h_kv: int, n_entries: int, n: int) -> Tensor:
    """(1, h_kv, n) distinct entries of range(n_entries), one -1 hole."""
    idx = torch.stack([torch.randperm(n_entries)[:n] for _ in range(h_kv)]).view(1, h_kv, n)
    idx[0, 0, 1] = -1
    return idx.to(torch.int32).to(DEV)


# --- block-sparse executor ---------------------------------------------------------------------------


def _block_sparse_tables() -> list[Tensor]:
    from attnlab.plans.executor import executor_tables
    from attnlab.plans.static import plan_from_mask

    def causal(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return kv_idx <= q_idx

    plan = plan_from_mask(causal, 40, 40, True, "cpu", 32, 32)
    return [t.to(DEV) for t in executor_tables(plan).as_args()]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_sparse_fwd(layout: str) -> None:
    from attnlab.kernels.block_sparse.op import block_sparse_fwd

    q, k, v = _qkv(4, 2, 40, 40, 16, layout)
    _opcheck(block_sparse_fwd, (q, k, v, _block_sparse_tables(), 0.25, True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_sparse_bwd(layout: str) -> None:
    from attnlab.kernels.block_sparse.op import block_sparse_bwd, block_sparse_fwd_launch

    q, k, v = _qkv(4, 2, 40, 40, 16, layout)
    tables = _block_sparse_tables()
    o, lse = block_sparse_fwd_launch(q, k, v, tuple(tables), 0.25, True)
    do = _laid(torch.randn(o.shape, device=DEV), layout)
    _opcheck(block_sparse_bwd, (do, q, k, v, o, lse, tables, 0.25, True))


# --- decode ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_select_fwd_with_count_and_key_mask(layout: str) -> None:
    from attnlab.kernels.decode.op import decode_select_fwd

    q, k, v = _qkv(4, 2, 3, 40, 16, layout)
    count = torch.tensor([[2, 3]], dtype=torch.int32, device=DEV)
    key_mask = torch.ones(1, 40, device=DEV)
    key_mask[0, :5] = 0
    _opcheck(decode_select_fwd, (q, k, v, _index(2, 10, 3), count, 4, 0.25, True, key_mask))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_ranges_fwd_with_first_and_key_mask(layout: str) -> None:
    from attnlab.kernels.decode.op import decode_ranges_fwd

    q, k, v = (torch.cat([t, t]) for t in _qkv(4, 2, 3, 40, 16, "contiguous"))
    q, k, v = (_laid(t, layout) for t in (q, k, v))
    full = torch.tensor([[True, False]], device=DEV).expand(2, 2)
    key_mask = torch.ones(2, 40, device=DEV)
    key_mask[1, :5] = 0
    first = torch.tensor([0, 5], device=DEV)
    _opcheck(decode_ranges_fwd, (q, k, v, full, first, 4, 30, 0.25, True, key_mask, -1))


@pytest.mark.parametrize("group_max", [False, True], ids=["per-query", "group-max"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_logits_fwd(layout: str, group_max: bool) -> None:
    from attnlab.kernels.decode.op import decode_logits_fwd

    q, k, v = _qkv(4, 2, 3, 40, 16, layout)
    count = torch.tensor([[2, 3]], dtype=torch.int32, device=DEV)
    for cnt in (None, count):
        args = (q, k, v, _index(2, 10, 3), cnt, 4, 0.25, True, None, group_max)
        _opcheck(decode_logits_fwd, args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_logits(layout: str) -> None:
    from attnlab.kernels.decode.logits import group_logits_op

    q, k, _ = _qkv(4, 2, 3, 40, 16, layout)
    key_mask = torch.ones(1, 40, device=DEV)
    key_mask[0, :5] = 0
    _opcheck(group_logits_op, (q, k, 0.3, True, None, None, 0, 40))
    _opcheck(group_logits_op, (q, k, 0.3, True, key_mask, None, 3, 37))
    _opcheck(group_logits_op, (q, k, 0.3, False, None, _index(2, 40, 12), 0, 40))


@pytest.mark.parametrize("reduce_max", [True, False], ids=["max", "mean"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_page_scores(layout: str, reduce_max: bool) -> None:
    from attnlab.kernels.decode.op import page_scores_op
    from attnlab.state.pages import summarize

    q, k, _ = _qkv(4, 2, 3, 40, 16, layout)
    summary = summarize(k, 4)
    _opcheck(page_scores_op, (q, summary.kmax, summary.kmin, 10, reduce_max))


@pytest.mark.parametrize("rank", ["fused", "triton", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_page_select(layout: str, rank: str) -> None:
    """Two stale pages recomputed in place (``kmax``, ``kmin``: the declared mutations)."""
    from attnlab.kernels.decode.op import page_select_op
    from attnlab.state.pages import summarize

    q, k, _ = _qkv(4, 2, 3, 40, 16, layout)
    summary = summarize(k, 4)
    counter = torch.zeros(2, dtype=torch.int32, device=DEV)
    args = (q, k, summary.kmax, summary.kmin, counter, 4, 3, 9, 8, True, None, False, rank)
    _opcheck(page_select_op, args)


@pytest.mark.parametrize("wide", [False, True], ids=["contiguous", "slice-of-wider"])
def test_recycled_scores(wide: bool) -> None:
    from attnlab.kernels.decode.recycled_scores import recycled_scores_op

    logits = torch.randn(1, 4, 3, 48 if wide else 40, device=DEV)[..., :40]
    lse = torch.logsumexp(logits, -1)
    valid = torch.ones(1, 40, dtype=torch.bool, device=DEV)
    valid[0, :3] = False
    _opcheck(recycled_scores_op, (logits, lse, 2, 3, None, 16))
    _opcheck(recycled_scores_op, (logits, lse, 2, 1, valid, 16))


@pytest.mark.parametrize("wide", [False, True], ids=["contiguous", "slice-of-wider"])
def test_row_topk(wide: bool) -> None:
    from attnlab.kernels.decode.op import row_topk_op

    x = torch.randn(2, 3, 48 if wide else 40, device=DEV)[..., :40]
    _opcheck(row_topk_op, (x, 5))


# --- linear attention: chunked forms and the step kernel ------------------------------------------------

N_LIN, D_LIN, CHUNK = 20, 16, 16  # (20 tokens: a partial second chunk)


def _lin_inputs(layout: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q, k, v (1, 2, N, D) in ``layout``, per-channel log-decays g (1, 2, N, D), h0 (1, 2, D, D)."""
    q, k, v = _qkv(2, 2, N_LIN, N_LIN, D_LIN, layout)
    q, k = q * 0.3, k * 0.3
    g = F.logsigmoid(torch.randn(1, 2, N_LIN, D_LIN, device=DEV) + 2.0)
    return q, k, v, g, torch.randn(1, 2, D_LIN, D_LIN, device=DEV)


def _gla_gc(g: Tensor, gate: str) -> Tensor:
    from attnlab.kernels.linear import op

    if gate == "scalar":
        return op.chunk_cumsum_scalar(g[..., 0], 1, 2, N_LIN, CHUNK, DEV)
    if gate == "raw":
        return g
    return op.chunk_cumsum(g, 1, 2, N_LIN, D_LIN, CHUNK, DEV)


@pytest.mark.parametrize("gate", ["channel", "scalar", "raw"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gla_chunk_fwd(layout: str, gate: str) -> None:
    from attnlab.kernels.linear.custom_ops import gla_chunk_fwd

    q, k, v, g, h0 = _lin_inputs(layout)
    _opcheck(gla_chunk_fwd, (q, k, v, _gla_gc(g, gate), h0, 0.3, CHUNK, True, None, gate == "raw"))


@pytest.mark.parametrize("gate", ["channel", "scalar", "raw"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gla_chunk_bwd(layout: str, gate: str) -> None:
    """The backward's inputs as the forward's autograd passes them (its saved outputs)."""
    from attnlab.kernels.linear.custom_ops import gla_chunk_bwd, gla_chunk_fwd

    q, k, v, g, h0 = _lin_inputs(layout)
    raw = gate == "raw"
    gc = _gla_gc(g, gate)
    o, ht, hs, a, gcs = gla_chunk_fwd(q, k, v, gc, h0, 0.3, CHUNK, True, None, raw)
    do = _laid(torch.randn(o.shape, device=DEV), layout)
    dht = torch.randn_like(ht)
    g_dtype = g.dtype if raw else None
    _opcheck(gla_chunk_bwd, (q, k, v, gcs if raw else gc, hs, ht, do, dht, 0.3, CHUNK, None, a, g_dtype))


def _delta_gate(g: Tensor, gate: str) -> Tensor | None:
    return None if gate == "none" else g[..., :1].contiguous() if gate == "scalar" else g


#: (gate, fused L2 norm of q and k): no gate, one per token (the chunked backward), per channel (the
#: sub-block score backwards)
DELTA_CASES = [("none", False), ("scalar", False), ("scalar", True), ("channel", False), ("channel", True)]
DELTA_IDS = [f"{g}-{'l2norm' if n else 'raw-qk'}" for g, n in DELTA_CASES]


@pytest.mark.parametrize(("gate", "l2norm"), DELTA_CASES, ids=DELTA_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_delta_chunk_fwd(layout: str, gate: str, l2norm: bool) -> None:
    from attnlab.kernels.linear.custom_ops import delta_chunk_fwd

    q, k, v, g, h0 = _lin_inputs(layout)
    beta = torch.rand(1, 2, N_LIN, device=DEV)
    args = (q, k, v, beta, _delta_gate(g, gate), h0, 0.3, CHUNK, True, None, l2norm)
    _opcheck(delta_chunk_fwd, args)


@pytest.mark.parametrize(("gate", "l2norm"), DELTA_CASES, ids=DELTA_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_delta_chunk_bwd(layout: str, gate: str, l2norm: bool) -> None:
    """The backward's inputs as the forward's autograd passes them (with the fused L2 norm: the
    normalised q, k and their reciprocal norms in place of the raw q, k)."""
    from attnlab.kernels.linear.custom_ops import delta_chunk_bwd, delta_chunk_fwd

    q, k, v, g, h0 = _lin_inputs(layout)
    beta = torch.rand(1, 2, N_LIN, device=DEV)
    gd = _delta_gate(g, gate)
    o, ht, hs, w, u, t, qn, kn, rq, rk, *_ = delta_chunk_fwd(
        q, k, v, beta, gd, h0, 0.3, CHUNK, True, None, l2norm
    )
    do = _laid(torch.randn(o.shape, device=DEV), layout)
    dht = torch.randn_like(ht)
    if l2norm:
        q, k = qn, kn
    args = (
        q,
        k,
        v,
        beta,
        gd,
        hs,
        w,
        u,
        t,
        do,
        dht,
        0.3,
        CHUNK,
        None,
        rq if l2norm else None,
        rk if l2norm else None,
    )
    _opcheck(delta_chunk_bwd, args)


@pytest.mark.parametrize("rule", ["gla", "delta"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_step(layout: str, rule: str) -> None:
    from attnlab.kernels.linear import op

    q, k, v, g, h0 = _lin_inputs(layout)
    q, k, v, g = (t[:, :, :2] for t in (q, k, v, g))  # (two tokens: a decode step)
    beta = torch.rand(1, 2, 2, device=DEV) if rule == "delta" else None
    bad = torch.zeros(op.step_programs(q, v), dtype=torch.int32, device=DEV)
    _opcheck(op.linear_step_op, (q, k, v, g, beta, h0, 0.3, rule == "delta", bad))


# --- score transform and sigmoid attention ---------------------------------------------------------------

N_Q, N_K = 20, 24


def _extras(full_lowrank: bool) -> dict[str, Tensor | None]:
    """Every optional input of the score-transform op: a dense bias, sinks, ALiBi slopes, a low-rank bias
    (u per batch and head, or u shared by the heads) and a per-query temperature."""
    return {
        "bias": torch.randn(1, 1, N_Q, N_K, device=DEV),
        "sinks": torch.randn(4, device=DEV),
        "slopes": torch.rand(4, device=DEV),
        "u": torch.randn(1, 4 if full_lowrank else 1, N_Q, 3, device=DEV),
        "vf": torch.randn(1, 4, N_K, 3, device=DEV),
        "temp": torch.rand(1, 4, N_Q, device=DEV) + 0.5,
    }


NONE = dict.fromkeys(("bias", "sinks", "slopes", "u", "vf", "temp"))
TRANSFORMS = ["plain", "all", "all-shared-u", "softplus"]


def _transform(name: str) -> tuple[dict[str, Tensor | None], float, bool]:
    """(optional inputs, soft cap, softplus) of a named case."""
    if name == "plain":
        return dict(NONE), 0.0, False
    if name == "softplus":
        return {**NONE, "temp": torch.rand(1, 4, N_Q, device=DEV) + 0.5}, 0.0, True
    return _extras(name == "all"), 2.0, False


def _st_inputs(x: dict[str, Tensor | None]) -> tuple[Tensor | None, ...]:
    return tuple(x[n] for n in ("bias", "sinks", "slopes", "u", "vf", "temp"))


@pytest.mark.parametrize("case", TRANSFORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_score_transform_fwd(layout: str, case: str) -> None:
    from attnlab.kernels.score_transform.op import score_transform_fwd

    q, k, v = _qkv(4, 2, N_Q, N_K, 16, layout)
    x, cap, softplus = _transform(case)
    _opcheck(score_transform_fwd, (q, k, v, *_st_inputs(x), 0.25, cap, True, softplus))


@pytest.mark.parametrize("case", TRANSFORMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_score_transform_bwd(layout: str, case: str) -> None:
    """With the gradients of the slopes and the temperature asked for (as autograd asks when they require
    grad); ``poly`` as the forward chose it."""
    from attnlab.kernels.score_transform.op import score_transform_bwd, score_transform_fwd, softplus_poly

    q, k, v = _qkv(4, 2, N_Q, N_K, 16, layout)
    x, cap, softplus = _transform(case)
    ins = _st_inputs(x)
    out, lse = score_transform_fwd(q, k, v, *ins, 0.25, cap, True, softplus)
    do = _laid(torch.randn(out.shape, device=DEV), layout)
    flags = (x["slopes"] is not None, x["temp"] is not None, softplus, softplus_poly(q, softplus))
    _opcheck(score_transform_bwd, (do, q, k, v, out, lse, *ins, 0.25, cap, True, *flags))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigmoid_fwd(layout: str) -> None:
    from attnlab.kernels.sigmoid.op import sigmoid_fwd

    q, k, v = _qkv(4, 2, N_Q, N_K, 16, layout)
    _opcheck(sigmoid_fwd, (q, k, v, 0.25, -1.0, True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigmoid_bwd(layout: str) -> None:
    from attnlab.kernels.sigmoid.op import sigmoid_bwd

    q, k, v = _qkv(4, 2, N_Q, N_K, 16, layout)
    do = _laid(torch.randn(q.shape, device=DEV), layout)
    _opcheck(sigmoid_bwd, (do, q, k, v, 0.25, -1.0, True))
