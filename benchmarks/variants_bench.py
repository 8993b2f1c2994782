"""Score-transform variants (softcap, alibi, sink, bias, low-rank bias, selective, softplus), the output
transforms on SDPA (gated, affine_scaled) and strided_heads on the block-sparse executor, on the GPU:
correctness at the timed length, then speed against cuDNN SDPA plain softmax and FlexAttention running the
same variant.

    python benchmarks/variants_bench.py --out-dir DIR                  # the issue's benchmark
    python benchmarks/variants_bench.py --probe --out-dir DIR          # schedule sweep of the kernels
    python benchmarks/variants_bench.py --neighborhoods --out-dir DIR  # 2-D/3-D neighborhoods vs dense
    python benchmarks/variants_bench.py --summarize DIR/variants.jsonl # (or DIR/neighborhoods.jsonl)

Every timed configuration is first checked against the fp32 reference on the GPU at the timed length: on
its last ``CHECK_ROWS`` query rows (the full N x N fp32 reference does not fit at 32K), which for the
forward is the reference on those rows (a cross-attention shape, bottom-right causal), and for the
backward uses a dO that is zero except on those rows, so every gradient (dq, dk, dv, the sink logits', the
low-rank factors') is exactly the reference's autograd on those rows. The rule is attnlab.testing's: error
against the fp32 reference at most 2x (forward) / 3x (gradients) the bf16 reference's, plus a floor.

Speed (bf16, D=128, H=32, B=1): the method as called (``attnlab.prepare(method, causal=...)`` with its
defaults, so the backend is the library's choice: which one is recorded; a variant listed in
``EXPLICIT`` is called with that backend instead), FlexAttention running the same
variant (``backend="flex"``) and cuDNN plain softmax, forward and forward+backward, timed in interleaved
rounds (``measure_interleaved``, CUDA events, >= 10 reps; each side's median, min, quartiles). Ratio =
t(cuDNN) / t(side): the issue's targets are forward >= 0.9, forward+backward >= 0.75, and above Flex's.
``softplus`` also has a side ``poly`` (``OPT_IN``: its polynomial log, off by default, on for the call).
``affine_scaled`` and ``softplus`` have a third side, ``unfused``: the same call with their fused Triton
helper switched off (the output map in PyTorch; q, k normalised by F.normalize), to show its gain.
The low-rank bias is not a registered method (its factors need a rank symbol in TensorInput shapes): its
rows time the kernel through :func:`attnlab.catalog.variants.lowrank_bias.lowrank_bias_attention`.

``--neighborhoods``: the 2-D and 3-D neighborhoods of ``NEIGHBORHOODS`` (128 x 128 tokens with 13 x 13 and
31 x 31 windows, 16 x 32 x 32 with 7 x 7 x 7; N = 16384, non-causal unless ``--causal`` says otherwise),
each as called (the library's backend, recorded), on FlexAttention and on the block-sparse executor
(explicit), interleaved with cuDNN dense softmax, after the same last-rows check (the reference: softmax
over each row's NATTEN neighborhood, from the method's mask). Each side's speed-up over dense
(``t(dense) / t(side)``) is reported next to the ideal ``1 / density`` at two levels: the token density
(allowed pairs / dense pairs) and the block density of the plan that backend runs (tiles visited / dense
tiles, its own tile size): ``of_ideal = speed-up * density``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

import attnlab
from attnlab.bench.env import environment
from attnlab.bench.timing import Timing, attention_flops, measure_interleaved
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.masks import dense_pairs
from attnlab.testing import BWD_FACTOR, FWD_FACTOR, bound, max_abs

CHECK_ROWS = 128
#: tensor inputs indexed by query row (dim 2): sliced to the checked rows like q
ROW_INPUTS = ("u", "temperature", "gate", "alpha", "beta")
#: the variants whose forward schedules the probe sweeps
PROBE_KINDS = ("softcap", "alibi")
#: forward schedules (BLOCK_M, BLOCK_N, warps, stages, SPLIT, WS) the probe times: FlashSigmoid's measured
#: ones (plain, split, warp-specialized) and the 128 x 128 tile of Triton's Hopper attention tutorial
PROBE_FWD = [
    (128, 64, 4, 2, 2, False),  # the pinned schedule (op.MEASURED_FWD) first: the others' output comparison
    (128, 128, 8, 2, 2, False),
    (128, 64, 4, 2, 1, False),
    (128, 128, 8, 3, 1, False),
]
#: whether the probe also times backward schedule pairs (--probe-fwd-only: no)
PROBE_BWD_ON = True
#: backward (dK/dV, dQ) schedule pairs the probe times; the last one is the others' comparison
PROBE_BWD = [
    ((64, 128, 8, 3), (128, 64, 8, 3)),
    ((32, 128, 4, 3), (128, 32, 4, 3)),
    ((64, 64, 4, 3), (64, 64, 4, 3)),
]
#: variants whose kernel path is not the default yet (after Flex until timed): "ours" calls this backend.
#: Empty: selective's default is its exact SDPA path (q * tau) since 4290b87, timed as called.
EXPLICIT: dict[str, str] = {}
#: modes per variant: a dense bias has no gradient in the kernel, so its training call runs on Flex (timed
#: there as Flex's), and only its forward is the kernel's
MODES_OF = {"bias": ["fwd"]}
HEADS, HEAD_DIM, RANK = 32, 128, 16
#: variants whose GPU path has a fused Triton helper: an extra side "unfused" times the same call with the
#: helper switched off (the module's device tuple emptied for the call), so one run shows what it gains
UNFUSED = {
    "affine_scaled": ("attnlab.catalog.variants.affine_scaled", "FUSED_DEVICES"),
    "softplus": ("attnlab.catalog.variants.softplus", "FUSED_NORM_DEVICES"),
}


def _inputs(name: str, n: int, device: torch.device, grad: bool) -> dict[str, Tensor]:
    """The variant's tensor inputs at length n (random, seeded)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    if name == "sink":
        return {"sinks": torch.randn(HEADS, generator=g).to(device).requires_grad_(grad)}
    if name == "bias":  # one (N, N) relative-position-like table shared by the heads (2 GiB at 32K)
        return {"bias": (torch.randn(1, 1, n, n, generator=g) * 0.5).to(device, torch.bfloat16)}
    if name == "lowrank":
        u = (torch.randn(1, HEADS, n, RANK, generator=g) * 0.3).to(device, torch.bfloat16)
        vf = (torch.randn(1, HEADS, n, RANK, generator=g) * 0.3).to(device, torch.bfloat16)
        return {"u": u.requires_grad_(grad), "vf": vf.requires_grad_(grad)}
    if name == "selective":  # a per-query temperature in (0.5, 1.5), shared by the batch
        return {"temperature": (0.5 + torch.rand(1, HEADS, n, generator=g)).to(device).requires_grad_(grad)}
    if name == "gated":  # elementwise gate logits (the paper's G1 position), bf16 like the layer's
        gate = torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device, torch.bfloat16)
        return {"gate": gate.requires_grad_(grad)}
    if name == "affine_scaled":
        alpha = (0.5 + torch.rand(1, HEADS, n, generator=g)).to(device)
        beta = (torch.randn(1, HEADS, n, generator=g) * 0.1).to(device)
        return {"alpha": alpha.requires_grad_(grad), "beta": beta.requires_grad_(grad)}
    return {}


def _call(
    name: str, causal: bool, backend: str | None, params: dict[str, Any] | None = None
) -> Callable[..., Tensor]:
    """The variant as called: a prepared op (backend None: the library's choice) with ``params``."""
    if name == "lowrank":
        from attnlab.catalog.variants.lowrank_bias import lowrank_bias_attention

        return lambda q, k, v, **x: lowrank_bias_attention(q, k, v, x["u"], x["vf"], causal=causal,
                                                           backend=backend or "triton")  # fmt: skip
    op = attnlab.prepare(name, causal=causal, backend=backend, **(params or {}))
    return lambda q, k, v, **x: op(q, k, v, **x)  # type: ignore[return-value]


#: options that are off by default, each timed as an extra side with it on: (side, module, its device tuple)
OPT_IN = {
    "softplus": ("poly", "attnlab.kernels.score_transform.op", "SOFTPLUS_POLY_DEVICES"),
}


def _unfused(
    fn: Callable[..., Tensor], module: str, attr: str, devices: tuple[str, ...] = ()
) -> Callable[..., Tensor]:
    """``fn`` with ``module.attr`` (a tuple of devices) set to ``devices`` during the call: by default empty
    (its fused helper off); ``OPT_IN`` sides pass ("cuda", "cpu") to turn an option on."""
    import importlib

    mod = importlib.import_module(module)

    def call(q: Tensor, k: Tensor, v: Tensor, **x: Tensor) -> Tensor:
        saved = getattr(mod, attr)
        setattr(mod, attr, devices)
        try:
            return fn(q, k, v, **x)
        finally:
            setattr(mod, attr, saved)

    return call


def _backend_of(name: str, causal: bool, q: Tensor, k: Tensor, v: Tensor) -> str:
    if name == "lowrank":
        return "triton"
    if name in EXPLICIT:
        return f"{EXPLICIT[name]} (explicit: after flex in the defaults)"
    choice = attnlab.prepare(name, causal=causal).explain(q, k, v)
    return str(choice.backend.name if choice.backend is not None else None)


def _reference(name: str, q: Tensor, k: Tensor, v: Tensor, x: dict[str, Tensor], causal: bool,
               upcast: bool) -> Tensor:  # fmt: skip
    """The variant's reference on q's rows (a bias's rows sliced to q's last rows)."""
    scale = q.shape[-1] ** -0.5
    if name == "lowrank":
        from attnlab.catalog.variants.lowrank_bias import reference as lr_ref

        return lr_ref(q, k, v, x["u"], x["vf"], causal=causal, scale=scale, upcast=upcast)
    spec = attnlab.get(name)
    return spec.reference(q, k, v, spec.make_params({}), causal=causal, scale=scale, upcast=upcast, **x)


def _last_rows(x: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    out = {}
    for key, t in x.items():
        if (key == "bias" and t.shape[2] > 1) or key in ROW_INPUTS:
            t = t[:, :, -rows:]
        out[key] = t
    return out


#: ``reference(q_rows, k, v, inputs, causal, upcast) -> out_rows``: a method's reference on q's last rows
RowsReference = Callable[[Tensor, Tensor, Tensor, dict[str, Tensor], bool, bool], Tensor]


def check(name: str, side: str, fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor,
          x: dict[str, Tensor], causal: bool, backward: bool,
          reference: RowsReference | None = None) -> dict[str, Any]:  # fmt: skip
    """``fn`` (the full problem) against the reference on the last CHECK_ROWS rows (see the module doc);
    ``reference`` replaces the variant's (:func:`_reference`) for methods without cross shapes."""
    r = CHECK_ROWS
    leaves_names = ["q", "k", "v", *[n for n, t in x.items() if t.requires_grad]] if backward else []
    full = {"q": q, "k": k, "v": v, **x}
    with torch.set_grad_enabled(backward):
        out = fn(q, k, v, **x)
    res: dict[str, Any] = {"variant": name, "side": side, "causal": causal, "n": q.shape[2], "rows": r}
    errs: dict[str, tuple[float, float]] = {}

    def sliced(upcast: bool) -> tuple[Tensor, dict[str, Tensor]]:
        leaves = {n: full[n].detach().clone().requires_grad_(n in leaves_names) for n in full}
        ql = leaves["q"][:, :, -r:].detach().requires_grad_("q" in leaves_names)
        xs = _last_rows({n: leaves[n] for n in x}, r)
        for row_input in ROW_INPUTS:  # sliced to the last rows: a leaf of its own
            if row_input in xs and row_input in leaves_names:
                xs[row_input] = xs[row_input].detach().requires_grad_(True)
        if reference is not None:
            got = reference(ql, leaves["k"], leaves["v"], xs, causal, upcast)
        else:
            got = _reference(name, ql, leaves["k"], leaves["v"], xs, causal, upcast)
        return got, {"q": ql, "k": leaves["k"], "v": leaves["v"], **{n: xs[n] for n in x}}

    ref, ref_leaves = sliced(True)
    low, low_leaves = sliced(False)
    got_rows = out[:, :, -r:]
    errs["out"] = (max_abs(got_rows, ref), bound(max_abs(low, ref), ref, FWD_FACTOR, q.dtype))
    if not torch.isfinite(got_rows).all():
        errs["out"] = (float("nan"), errs["out"][1])
    if backward:
        g = torch.Generator(device="cpu").manual_seed(2)
        do_rows = torch.randn(out[:, :, -r:].shape, generator=g).to(out.device, out.dtype)
        do = torch.zeros_like(out)
        do[:, :, -r:] = do_rows
        got = torch.autograd.grad(out, [full[n] for n in leaves_names], do)
        want = torch.autograd.grad(ref, [ref_leaves[n] for n in leaves_names], do_rows.float().to(ref.dtype))
        lowg = torch.autograd.grad(low, [low_leaves[n] for n in leaves_names], do_rows)
        for n, a, w, lo in zip(leaves_names, got, want, lowg, strict=True):
            if (
                n == "q" or n in ROW_INPUTS
            ):  # only the last rows have a gradient: the others must be exactly 0
                errs[f"d{n}_other_rows"] = (float(a[:, :, :-r].abs().max()), 0.0)
                a = a[:, :, -r:]
            err = max_abs(a, w) if torch.isfinite(a).all() else float("nan")
            errs[f"d{n}"] = (err, bound(max_abs(lo, w), w, BWD_FACTOR, q.dtype))
    res["errors"] = {k2: [e, b] for k2, (e, b) in errs.items()}
    res["passed"] = all(e <= b for e, b in errs.values())
    del out, ref, low
    torch.cuda.empty_cache()
    return res


def _baseline(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """cuDNN SDPA plain softmax (on CPU, for a dry run of this script: the math kernel)."""
    kernels = [SDPBackend.CUDNN_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    return sdpa_dense(q, k, v, causal=causal, scale=q.shape[-1] ** -0.5, kernels=kernels)


def _dense(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Callable[[], Tensor]:
    return lambda: _baseline(q, k, v, causal)


def _bind(
    fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, x: dict[str, Tensor]
) -> Callable[[], Tensor]:
    return lambda: fn(q, k, v, **x)


def _timed(fn: Callable[[], Tensor], mode: str, leaves: list[Tensor], do: Tensor) -> Callable[[], object]:
    """One timed call: the forward without autograd, or forward + backward to ``leaves``."""
    if mode == "fwd":

        def fwd() -> None:
            with torch.no_grad():
                fn()

        return fwd

    def fwd_bwd() -> None:
        torch.autograd.grad(fn(), leaves, do)

    return fwd_bwd


def _timing(t: Timing) -> dict[str, Any]:
    return {"median_ms": t.median_ms, "min_ms": t.min_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms, "reps": t.reps,
            "spread": t.spread}  # fmt: skip


def point(name: str, n: int, causal: bool, device: torch.device, with_flex: bool, modes: list[str],
          log: Callable[[dict], None]) -> dict[str, Any]:  # fmt: skip
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device, torch.bfloat16) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    x = _inputs(name, n, device, grad=True)
    ours = _call(name, causal, EXPLICIT.get(name))
    sides: dict[str, Callable[..., Tensor]] = {"ours": ours}
    if with_flex:
        sides["flex"] = _call(name, causal, "flex")
    if name in UNFUSED:
        sides["unfused"] = _unfused(ours, *UNFUSED[name])
    if name in OPT_IN:
        label, module, attr = OPT_IN[name]
        sides[label] = _unfused(ours, module, attr, ("cuda", "cpu"))
    row: dict[str, Any] = {"variant": name, "n": n, "causal": causal, "heads": HEADS, "head_dim": HEAD_DIM,
                           "ours_backend_fwd": _backend_of(name, causal, q.detach(), k.detach(), v.detach()),
                           "ours_backend_fwd_bwd": _backend_of(name, causal, q, k, v)}  # fmt: skip
    checks = []
    for side, fn in sides.items():
        for bwd in [m == "fwd_bwd" for m in modes]:
            try:
                c = check(name, side, fn, q, k, v, x, causal, bwd)
            except Exception as e:  # a side that fails is reported, not timed
                c = {
                    "variant": name,
                    "side": side,
                    "causal": causal,
                    "n": n,
                    "passed": False,
                    "crash": repr(e),
                }
            c["mode"] = "fwd_bwd" if bwd else "fwd"
            log({"check": c})
            checks.append(c)
    row["checks"] = checks
    g2 = torch.Generator(device="cpu").manual_seed(3)
    do = torch.randn(q.shape, generator=g2).to(device, torch.bfloat16)
    leaves = [q, k, v, *[t for t in x.values() if t.requires_grad]]
    flops = attention_flops(1, HEADS, n, n, HEAD_DIM, HEAD_DIM, dense_pairs(n, n, causal), "fwd")
    for mode in modes:
        passed = [
            s for s in sides if all(c["passed"] for c in checks if c["side"] == s and c["mode"] == mode)
        ]
        row[f"not_timed_{mode}"] = sorted(set(sides) - set(passed))
        fns: dict[str, Callable[[], object]] = {
            "cudnn_softmax": _timed(lambda: _baseline(q, k, v, causal), mode, leaves[:3], do)
        }
        for s in passed:
            fns[s] = _timed(_bind(sides[s], q, k, v, x), mode, leaves, do)
        tim = measure_interleaved(fns, device, target_s=1.0)
        for s, tm in tim.items():
            row[f"{s}_{mode}"] = _timing(tm)
            row[f"{s}_{mode}_tflops"] = flops * (3.5 if mode == "fwd_bwd" else 1.0) / tm.median_ms / 1e9
            if s != "cudnn_softmax":
                row[f"{s}_{mode}_ratio_vs_cudnn"] = tim["cudnn_softmax"].median_ms / tm.median_ms
        if "flex" in tim and "ours" in tim:
            row[f"ours_vs_flex_{mode}"] = tim["flex"].median_ms / tim["ours"].median_ms
    torch.cuda.empty_cache()
    return row


#: 2-D/3-D neighborhoods timed by ``--neighborhoods`` (label, parameters; N = the grid's product)
NEIGHBORHOODS: list[tuple[str, dict[str, Any]]] = [
    ("2d-128x128-w13", {"shape": (128, 128), "window": 13}),
    ("2d-128x128-w31", {"shape": (128, 128), "window": 31}),
    ("3d-16x32x32-w7", {"shape": (16, 32, 32), "window": 7}),
]
#: their tiny stand-ins for ``--dry-cpu``
NEIGHBORHOODS_DRY: list[tuple[str, dict[str, Any]]] = [
    ("2d-8x8-w3", {"shape": (8, 8), "window": 3}),
    ("3d-4x4x4-w3", {"shape": (4, 4, 4), "window": 3}),
]
#: the backends every neighborhood is timed on explicitly, besides the call as the library makes it
NEIGHBORHOOD_BACKENDS = ("flex", "block_sparse")


def neighborhood_rows_reference(
    params: dict[str, Any], n: int, causal: bool, device: torch.device
) -> RowsReference:
    """The reference on the last rows of an N-token neighborhood call: softmax attention over each row's
    neighborhood (the method's mask_mod evaluated on those rows only, (rows, N); the method itself is
    self-attention only, so its reference cannot take the rows as a cross-attention call)."""
    from attnlab.catalog.structured import neighborhood
    from attnlab.masks import MaskContext
    from attnlab.reference import masked_softmax_attention

    mask_mod = neighborhood.mask(neighborhood.NeighborhoodParams(**params), MaskContext(n, n, causal, device))

    def ref(q: Tensor, k: Tensor, v: Tensor, x: dict[str, Tensor], causal: bool, upcast: bool) -> Tensor:
        zero = torch.zeros((), dtype=torch.int32, device=q.device)
        q_idx = torch.arange(n - q.shape[2], n, dtype=torch.int32, device=q.device)[:, None]
        kv_idx = torch.arange(n, dtype=torch.int32, device=q.device)[None, :]
        rows = mask_mod(zero, zero, q_idx, kv_idx).expand(q.shape[2], n)
        return masked_softmax_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=rows, upcast=upcast)

    return ref


def _plan_of(
    params: dict[str, Any], backend: str, causal: bool, q: Tensor, k: Tensor, v: Tensor
) -> dict[str, Any]:
    """The densities of the plan ``backend`` runs: token (allowed pairs / dense pairs) and block (tiles
    visited / dense tiles at its tile size), and the ideal speed-ups over dense, their inverses."""
    with torch.no_grad():
        res = attnlab.attention(q, k, v, method="neighborhood", causal=causal, backend=backend, return_plan=True,
                                **params)  # fmt: skip
    assert isinstance(res, attnlab.Result) and res.plan is not None
    plan = res.plan
    token, block = plan.density, plan.block_density
    return {"tile": [plan.block_q, plan.block_k], "token_density": token, "block_density": block,
            "computed_tiles": plan.computed_blocks, "ideal_token": 1 / max(token, 1e-12),
            "ideal_block": 1 / max(block, 1e-12)}  # fmt: skip


def neighborhood_point(label: str, params: dict[str, Any], causal: bool, device: torch.device, modes: list[str],
                       log: Callable[[dict], None]) -> dict[str, Any]:  # fmt: skip
    """One neighborhood: checked, then timed as called, on Flex and on the executor, interleaved with cuDNN
    dense; speed-ups over dense next to the ideal 1 / density (token and block; see the module doc). The
    forward runs on inputs that need no gradient (inference), forward + backward on leaves that do; the
    backend as called is recorded per mode (the library may choose differently for each)."""
    n = math.prod(params["shape"])
    g = torch.Generator(device="cpu").manual_seed(0)
    qd, kd, vd = (
        torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device, torch.bfloat16) for _ in range(3)
    )
    q, k, v = (t.clone().requires_grad_(True) for t in (qd, kd, vd))
    inputs = {"fwd": (qd, kd, vd), "fwd_bwd": (q, k, v)}
    sides: dict[str, Callable[..., Tensor]] = {"ours": _call("neighborhood", causal, None, params)}
    for b in NEIGHBORHOOD_BACKENDS:
        sides[b] = _call("neighborhood", causal, b, params)
    row: dict[str, Any] = {"pattern": label, "params": {k2: list(v2) if isinstance(v2, tuple) else v2
                           for k2, v2 in params.items()}, "n": n, "causal": causal, "heads": HEADS,
                           "head_dim": HEAD_DIM}  # fmt: skip
    plans: dict[str, dict[str, Any]] = {}

    def plan_of(backend: str) -> dict[str, Any]:
        if backend not in plans:
            try:
                plans[backend] = _plan_of(params, backend, causal, qd, kd, vd)
            except Exception as e:
                plans[backend] = {"crash": repr(e)[:400]}
        return plans[backend]

    for mode in modes:
        chosen = attnlab.prepare("neighborhood", causal=causal, **params).explain(*inputs[mode]).backend
        row[f"ours_backend_{mode}"] = chosen.name if chosen is not None else None
    for b in {*NEIGHBORHOOD_BACKENDS, *(row[f"ours_backend_{m}"] for m in modes)} - {None}:
        plan_of(b)
    row["plans"] = plans
    ref = neighborhood_rows_reference(params, n, causal, device)
    checks = []
    for side, fn in sides.items():
        for mode in modes:
            qm, km, vm = inputs[mode]
            try:
                c = check("neighborhood", side, fn, qm, km, vm, {}, causal, mode == "fwd_bwd", reference=ref)
            except Exception as e:  # a side that fails is reported, not timed
                c = {"variant": "neighborhood", "side": side, "causal": causal, "n": n, "passed": False,
                     "crash": repr(e)[:400]}  # fmt: skip
            c["mode"] = mode
            log({"check": {**c, "pattern": label}})
            checks.append(c)
    row["checks"] = checks
    g2 = torch.Generator(device="cpu").manual_seed(3)
    do = torch.randn(q.shape, generator=g2).to(device, torch.bfloat16)
    for mode in modes:
        qm, km, vm = inputs[mode]
        passed = [
            s for s in sides if all(c["passed"] for c in checks if c["side"] == s and c["mode"] == mode)
        ]
        row[f"not_timed_{mode}"] = sorted(set(sides) - set(passed))
        fns: dict[str, Callable[[], object]] = {
            "cudnn_dense": _timed(_dense(qm, km, vm, causal), mode, [q, k, v], do)
        }
        for s in passed:
            fns[s] = _timed(_bind(sides[s], qm, km, vm, {}), mode, [q, k, v], do)
        tim = measure_interleaved(fns, device, target_s=1.0)
        dense = tim["cudnn_dense"].median_ms
        for s, tm in tim.items():
            row[f"{s}_{mode}"] = _timing(tm)
            if s == "cudnn_dense":
                continue
            speedup = dense / tm.median_ms
            row[f"{s}_{mode}_vs_dense"] = speedup
            plan = plans.get(row[f"ours_backend_{mode}"] if s == "ours" else s, {})
            if "token_density" in plan:
                row[f"{s}_{mode}_of_ideal_token"] = speedup * plan["token_density"]
                row[f"{s}_{mode}_of_ideal_block"] = speedup * plan["block_density"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def summarize_neighborhoods(rows: list[dict], env: dict[str, Any]) -> str:
    """A markdown table of ``--neighborhoods`` rows: per pattern, mode and side the median ms, the
    speed-up over cuDNN dense, and the ideal speed-ups 1 / density (token; block, with its tile) with the
    share of each reached."""
    lines = [
        "| pattern | N | causal | mode | side (backend) | check | ms | dense ms | x dense | 1/token density "
        "| of ideal (token) | 1/block density (tile) | of ideal (block) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "crash" in row:
            lines.append(
                f"| {row['pattern']} | {row.get('n')} | {row.get('causal')} | crash: {row['crash'][:120]} |"
            )
            continue
        for mode in ("fwd", "fwd_bwd"):
            if f"cudnn_dense_{mode}" not in row:
                continue
            dense = row[f"cudnn_dense_{mode}"]["median_ms"]
            for side in ("ours", *NEIGHBORHOOD_BACKENDS):
                checks = [c for c in row["checks"] if c["side"] == side and c.get("mode") == mode]
                ok = "ok" if checks and all(c["passed"] for c in checks) else "FAIL"
                backend = row.get(f"ours_backend_{mode}") if side == "ours" else side
                name = f"ours ({backend})" if side == "ours" else side
                t = row.get(f"{side}_{mode}")
                plan = row["plans"].get(backend, {})
                if t is None or "token_density" not in plan:
                    lines.append(f"| {row['pattern']} | {row['n']} | {row['causal']} | {mode} | {name} | {ok} | "
                                 f"- | {dense:.2f} | - | - | - | - | - |")  # fmt: skip
                    continue
                lines.append(
                    f"| {row['pattern']} | {row['n']} | {row['causal']} | {mode} | {name} | {ok} | "
                    f"{t['median_ms']:.2f} | {dense:.2f} | {row[f'{side}_{mode}_vs_dense']:.2f} | "
                    f"{plan['ideal_token']:.1f} | {row[f'{side}_{mode}_of_ideal_token']:.2f} | "
                    f"{plan['ideal_block']:.1f} ({plan['tile'][0]}x{plan['tile'][1]}) | "
                    f"{row[f'{side}_{mode}_of_ideal_block']:.2f} |"
                )
    head = f"device {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}"
    return head + "\n\n" + "\n".join(lines) + "\n"


def probe(device: torch.device, n: int, log: Callable[[dict], None]) -> list[dict]:
    """Time the kernels' schedules (explicit configs) interleaved with cuDNN at length n, softcap and alibi,
    each config's forward first checked against the reference on the last rows."""

    return [row for causal in (False, True) for row in _probe_mask(device, n, causal, log)]


def _fwd_launcher(q: Tensor, k: Tensor, v: Tensor, scale: float, cap: float, causal: bool,
                  slopes: Tensor | None, config: Any) -> Callable[[], object]:  # fmt: skip
    from attnlab.kernels.score_transform import op

    return lambda: op.score_transform_fwd_launch(
        q, k, v, None, None, scale, cap, causal, slopes=slopes, config=config
    )


def _bwd_launcher(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float, causal: bool,
                  configs: Any) -> Callable[[], object]:  # fmt: skip
    from attnlab.kernels.score_transform import op

    return lambda: op.score_transform_bwd_launch(
        do, q, k, v, o, lse, None, None, scale, 50.0, causal, configs=configs
    )


def _probe_mask(device: torch.device, n: int, causal: bool, log: Callable[[dict], None]) -> list[dict]:
    from attnlab.kernels.score_transform import op

    rows = []
    scale = HEAD_DIM**-0.5
    if True:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (
            torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device, torch.bfloat16) for _ in range(4)
        )
        slopes = torch.tensor(
            __import__("attnlab.catalog.variants.alibi", fromlist=["x"]).alibi_slopes(HEADS), device=device
        )
        kinds: dict[str, dict[str, Any]] = {
            "softcap": {"cap": 50.0, "slopes": None},
            "alibi": {"cap": 0.0, "slopes": slopes},
        }
        kinds = {kind: kw for kind, kw in kinds.items() if kind in PROBE_KINDS}
        for kind, kw in kinds.items():
            shapes = [sh for sh in PROBE_FWD if not (causal and sh[5])]
            cfgs = {str(s): op._fwd_config(s) for s in shapes}
            fns: dict[str, Callable[[], object]] = {"cudnn_fwd": lambda: _baseline(q, k, v, causal)}
            ok = {}
            ref = _reference(kind if kind != "softcap" else "softcap", q[:, :, -CHECK_ROWS:], k, v,
                             {"slopes": slopes} if kind == "alibi" else {}, causal, True)  # fmt: skip
            first: Tensor | None = None
            for label, c in cfgs.items():
                try:
                    o, _ = op.score_transform_fwd_launch(q, k, v, None, None, scale, kw["cap"], causal,
                                                         slopes=kw["slopes"], config=c)  # fmt: skip
                    err = max_abs(o[:, :, -CHECK_ROWS:], ref)
                    ok[label] = err < 2e-2
                    first = o if first is None else first
                    # every row against the first schedule's output (bf16: a few ulps where exponentials differ)
                    vs_first = max_abs(o, first)
                    ok[label] = ok[label] and vs_first < 3e-2
                    log({"probe_check": kind, "causal": causal, "config": label, "err": err,
                         "vs_first_all_rows": vs_first})  # fmt: skip
                except Exception as e:
                    log({"probe_check": kind, "causal": causal, "config": label, "crash": repr(e)[:400]})
                    continue
                if ok[label]:
                    fns[label] = _fwd_launcher(q, k, v, scale, kw["cap"], causal, kw["slopes"], c)
            t = measure_interleaved(fns, device, target_s=1.0)
            row = {"probe": "fwd", "kind": kind, "n": n, "causal": causal,
                   "shapes": {str(sh): list(sh) for sh in shapes},
                   **{s: _timing(tm) for s, tm in t.items()},
                   "ratios": {s: t["cudnn_fwd"].median_ms / tm.median_ms for s, tm in t.items()}}  # fmt: skip
            log(row)
            rows.append(row)
        if not PROBE_BWD_ON:
            return rows
        # backward: (dK/dV, dQ) config pairs, softcap, vs cuDNN's fwd+bwd and fwd
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

        def cudnn_fb() -> None:
            out = _baseline(qg, kg, vg, causal)
            torch.autograd.grad(out, (qg, kg, vg), do)

        o, lse = op.score_transform_fwd_launch(q, k, v, None, None, scale, 50.0, causal,
                                               config=op._fwd_config(op.FWD_SHAPES[0]))  # fmt: skip
        ref_pair = (op._bwd_config(PROBE_BWD[-1][0]), op._bwd_config(PROBE_BWD[-1][1]))
        want = op.score_transform_bwd_launch(
            do, q, k, v, o, lse, None, None, scale, 50.0, causal, configs=ref_pair
        )
        bfns: dict[str, Callable[[], object]] = {"cudnn_fwd_bwd": cudnn_fb}
        pairs = PROBE_BWD
        for a, b in pairs:
            cfg = (op._bwd_config(a), op._bwd_config(b))
            label = f"{a}|{b}"
            try:
                got = op.score_transform_bwd_launch(
                    do, q, k, v, o, lse, None, None, scale, 50.0, causal, configs=cfg
                )
                errs = [
                    max_abs(x1, x2) / (1e-6 + float(x2.abs().max()))
                    for x1, x2 in zip(got[:3], want[:3], strict=True)
                ]
                log({"probe_bwd_check": label, "causal": causal, "rel_errs_vs_small_tiles": errs})
                if max(errs) > 2e-2:
                    continue
            except Exception as e:
                log({"probe_bwd_check": label, "causal": causal, "crash": repr(e)[:400]})
                continue
            bfns[label] = _bwd_launcher(do, q, k, v, o, lse, scale, causal, cfg)
        t = measure_interleaved(bfns, device, target_s=1.0)
        row = {"probe": "bwd_only", "kind": "softcap", "n": n, "causal": causal,
               "pairs": {f"{a}|{b}": [list(a), list(b)] for a, b in pairs},
               **{s: _timing(tm) for s, tm in t.items()},
               "ms": {s: tm.median_ms for s, tm in t.items()}}  # fmt: skip
        log(row)
        rows.append(row)
    return rows


def pin(rows: list[dict], log: Callable[[dict], None]) -> None:
    """Pin the probe's fastest checked schedules (forward per mask; backward pair per mask) in this process."""
    from attnlab.kernels.score_transform import op

    for row in rows:
        times = {k: v["median_ms"] for k, v in row.items() if isinstance(v, dict) and "median_ms" in v}
        times = {k: v for k, v in times.items() if not k.startswith("cudnn")}
        if not times:
            continue
        best = min(times, key=lambda k: times[k])
        if row["probe"] == "fwd":
            op.MEASURED_FWD[row["causal"]] = tuple(row["shapes"][best])
        else:
            a, b = row["pairs"][best]
            op.MEASURED_BWD[row["causal"]] = (tuple(a), tuple(b))
    log({"pinned": {"fwd": {str(k): v for k, v in op.MEASURED_FWD.items()},
                    "bwd": {str(k): v for k, v in op.MEASURED_BWD.items()}}})  # fmt: skip


def summarize(path: str) -> str:
    """A markdown table of a run's rows (``variants.jsonl``): per point the backend as called, the checks,
    each side's median ms and the ratios against cuDNN plain softmax and Flex."""
    env: dict[str, Any] = {}
    with open(path) as f:
        objs = [json.loads(line) for line in f if line.strip()]
    for obj in objs:
        env = obj.get("env", env)
    nb_rows = [obj["row"] for obj in objs if "row" in obj and "pattern" in obj["row"]]
    if nb_rows:
        return summarize_neighborhoods(nb_rows, env)
    lines = [
        "| variant | N | causal | mode | as called (backend) | checks | ours ms | flex ms | cuDNN ms | "
        "ours / cuDNN | flex / cuDNN | ours vs flex | unfused / cuDNN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for obj in objs:
        row = obj.get("row")
        if not row:
            continue
        if "crash" in row:
            lines.append(f"| {row['variant']} | {row['n']} | {row['causal']} | crash: {row['crash'][:120]} |")
            continue
        for mode in ("fwd", "fwd_bwd"):
            if f"cudnn_softmax_{mode}" not in row:
                continue
            checks = [c for c in row["checks"] if c.get("mode") == mode]
            ok = ", ".join(f"{c['side']} {'ok' if c['passed'] else 'FAIL'}" for c in checks)

            def ms(side: str, row: dict = row, mode: str = mode) -> str:
                t = row.get(f"{side}_{mode}")
                return f"{t['median_ms']:.2f}" if t else "-"

            def ratio(key: str, row: dict = row) -> str:
                return f"{row[key]:.2f}" if key in row else "-"

            backend = row["ours_backend_fwd" if mode == "fwd" else "ours_backend_fwd_bwd"]
            lines.append(
                f"| {row['variant']} | {row['n']} | {row['causal']} | {mode} | {backend} | {ok} | "
                f"{ms('ours')} | {ms('flex')} | {ms('cudnn_softmax')} | "
                f"{ratio(f'ours_{mode}_ratio_vs_cudnn')} | {ratio(f'flex_{mode}_ratio_vs_cudnn')} | "
                f"{ratio(f'ours_vs_flex_{mode}')} | {ratio(f'unfused_{mode}_ratio_vs_cudnn')} |"
            )
    head = f"device {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}"
    return head + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--variants", default="softcap,sink,alibi,lowrank,bias,selective")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--causal", default=None, help="0,1 (default; --neighborhoods: 0)")
    ap.add_argument(
        "--neighborhoods",
        action="store_true",
        help="time the 2-D/3-D neighborhoods (NEIGHBORHOODS) against dense and 1/density instead",
    )
    ap.add_argument("--patterns", default=None, help="--neighborhoods: a comma list of NEIGHBORHOODS labels")
    ap.add_argument("--no-flex-for", default="lowrank", help="variants timed without a Flex side")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument(
        "--pin-from-probe",
        action="store_true",
        help="probe, pin the fastest schedules (op.MEASURED_*) in this process, then benchmark",
    )
    ap.add_argument("--probe-n", type=int, default=16384)
    ap.add_argument("--probe-fwd-only", action="store_true", help="the probe times forward schedules only")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new points after this")
    ap.add_argument("--dry-cpu", action="store_true", help="tiny CPU run of this script (TRITON_INTERPRET=1)")
    ap.add_argument("--summarize", metavar="JSONL", help="print a markdown table of a run's rows and exit")
    ap.add_argument("--fused", action="store_true",
                    help="turn on the fused Triton helpers for this run (on by default on CUDA since s4; for older commits)")  # fmt: skip
    args = ap.parse_args()
    if args.fused:
        import importlib

        for module, attr in UNFUSED.values():
            setattr(importlib.import_module(module), attr, ("cuda",))
    if args.summarize:
        print(summarize(args.summarize), end="")
        return
    device = torch.device("cuda")
    if args.dry_cpu:
        global HEADS, HEAD_DIM, CHECK_ROWS
        HEADS, HEAD_DIM, CHECK_ROWS, device = 2, 32, 8, torch.device("cpu")
    os.makedirs(args.out_dir, exist_ok=True)
    name = "probe" if args.probe else "neighborhoods" if args.neighborhoods else "variants"
    log_path = os.path.join(args.out_dir, f"{name}.jsonl")
    causal_flags = [c == "1" for c in (args.causal or ("0" if args.neighborhoods else "0,1")).split(",")]
    t0 = time.time()

    def log(obj: dict) -> None:
        obj = {"t_s": round(time.time() - t0, 1), **obj}
        print(json.dumps(obj, default=str), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")

    log({"env": environment(device)})
    if args.neighborhoods:
        patterns = NEIGHBORHOODS_DRY if args.dry_cpu else NEIGHBORHOODS
        if args.patterns:
            patterns = [p for p in patterns if p[0] in args.patterns.split(",")]
        for label, params in patterns:
            for causal in causal_flags:
                if time.time() - t0 > args.budget_s:
                    log({"skipped": label, "causal": causal, "why": "time budget"})
                    continue
                try:
                    row = neighborhood_point(label, params, causal, device, args.modes.split(","), log)
                except Exception as e:
                    row = {"pattern": label, "n": math.prod(params["shape"]), "causal": causal,
                           "crash": repr(e)[:1000]}  # fmt: skip
                log({"row": row})
        return
    if args.probe or args.pin_from_probe:
        global PROBE_BWD_ON
        PROBE_BWD_ON = not args.probe_fwd_only
        rows = probe(device, args.probe_n, log)
        if not args.pin_from_probe:
            return
        pin(rows, log)
    no_flex = set(args.no_flex_for.split(","))
    for name in args.variants.split(","):
        for n in [int(s) for s in args.lengths.split(",")]:
            for causal in causal_flags:
                if time.time() - t0 > args.budget_s:
                    log({"skipped": name, "n": n, "causal": causal, "why": "time budget"})
                    continue
                try:
                    modes = [m for m in args.modes.split(",") if m in MODES_OF.get(name, [m])]
                    row = point(name, n, causal, device, name not in no_flex, modes, log)
                except Exception as e:
                    row = {"variant": name, "n": n, "causal": causal, "crash": repr(e)[:1000]}
                    torch.cuda.empty_cache()
                log({"row": row})


if __name__ == "__main__":
    main()
