"""Full-size GPU check of the linear family (``attnlab/kernels/linear``), and of fla-core's chunk kernels
beside it, against the fp32 token-by-token recurrence: output, final state and every gradient, with the
same recurrence run in the input precision beside it (the yardstick of the accuracy rule: an error
against the fp32 recurrence of at most 2x (output, state) or 3x (gradients) that of the bf16 recurrence,
plus 1e-5 relative and half an ulp of the peak).

Our side is called as a user calls it: ``attnlab.prepare(method, causal=True, backend="triton", ...)``
on (B, H, N, D) tensors with the method's tensor inputs; fla-core's side (when ``fla`` imports: it is
never a dependency, the GPU run installs a carried wheel) gets the same values in its (B, N, H, D)
layout. The methods (``make_case``):

- ``linear``: identity map, unnormalised (``S_t = S_{t-1} + k v^T``, ``o = scale S^T q``; fla's
  ``chunk_linear_attn(normalize=False)``);
- ``lightning``: the default ALiBi decays exp(-s_h) (fla's ``chunk_simple_gla(g_gamma=-s)``);
- ``gla``: per-channel log-decays (fla's ``chunk_gla``);
- ``gated_delta``: per-head gate, q and k L2-normalised (fla's ``chunk_gated_delta_rule`` with
  ``use_qk_l2norm_in_kernel=True``);
- ``gated_delta_kda``: the same rule under a per-channel gate (fla's ``chunk_kda``);
- ``hedgehog``: normalised ``linear`` with Hedgehog's map, weights (H, D, D) (no fla twin: fla's map is
  another function); its reference is ``linear.reference`` (token loop, not segmented).

Gates and beta are drawn bf16-representable, so that fla's bf16 copies hold the same values as our fp32
ones. The reference's backward at long N runs the recurrence in segments under activation
checkpointing (same arithmetic, less memory). ``NUMERICS_64K``: 64K tokens in bf16 with decays near 0
and near 1 and beta at its extremes (``--n64k``, ``--numerics``). Timings are ``benchmarks/linear_bench.py``.

    python benchmarks/linear_gpu_check.py --out results.json [--budget 240] [--shapes 1x32x8192:grad,...]

Writes one JSON file (rewritten after every case, so a run stopped at its limit keeps what it did).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnlab.catalog.linear._common import delta_recurrence, gated_recurrence
from attnlab.catalog.linear.gated_delta import l2norm
from attnlab.catalog.linear.lightning import alibi_slopes

#: Where the checks run (a CPU smoke test of this script sets "cpu" under TRITON_INTERPRET=1).
DEV = "cuda"
METHODS = ("linear", "lightning", "gla", "gated_delta", "gated_delta_kda")


def fast_autotune(warmup: int = 5, rep: int = 25) -> None:
    """Shorter benchmarking of each config in Triton's autotuner (``warmup`` / ``rep`` ms instead of 25 /
    100): fla-core autotunes every kernel on first use; its config choice stays its own. Call before
    importing fla (an Autotuner takes its benchmarker when the kernel is decorated)."""
    import functools

    import triton.testing

    triton.testing.do_bench = functools.partial(triton.testing.do_bench, warmup=warmup, rep=rep)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in this (main) thread after ``seconds`` (SIGALRM; 0: no limit). Used for
    fla-core's first calls, whose autotuning compiles and times every config of every kernel: the alarm
    interrupts it between two Python steps (a kernel already queued still finishes on the GPU)."""
    if seconds <= 0:
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after the {seconds:.0f} s limit (first use: compile + autotune)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def cap_fla_configs(n: int) -> dict[str, str]:
    """Limit every fla-core Triton autotuner to at most ``n`` configs (its own pruning first, then the
    first ``n`` by num_warps in (4, 8) first, then num_stages closest to 2, then its order), so that its
    first-use autotuning compiles n configs per kernel instead of up to 36. fla's choice among those n
    stays its own. Returns {kernel: "kept of total"} for the record. Imports fla's chunk and recurrent ops
    of the five cases first (their kernels are made at import)."""
    import importlib
    import sys

    from triton.runtime.autotuner import Autotuner

    for name in ("fla.ops.gla", "fla.ops.gated_delta_rule", "fla.ops.kda", "fla.ops.simple_gla",
                 "fla.ops.linear_attn"):  # fmt: skip
        importlib.import_module(name)

    def pick(configs: list[Any]) -> list[Any]:
        order = sorted(
            range(len(configs)),
            key=lambda i: (configs[i].num_warps not in (4, 8), abs(configs[i].num_stages - 2), i),
        )
        return [configs[i] for i in sorted(order[:n])]

    out: dict[str, str] = {}
    seen: set[int] = set()
    for name, mod in list(sys.modules.items()):
        if not name.startswith("fla.") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            while obj is not None and not isinstance(obj, Autotuner) and hasattr(obj, "fn"):
                obj = obj.fn  # (a triton.heuristics wrapper around the autotuner)
            if not isinstance(obj, Autotuner) or id(obj) in seen:
                continue
            seen.add(id(obj))
            prune = obj.early_config_prune

            def capped(configs: Any, nargs: Any, _prune: Any = prune, **kw: Any) -> list[Any]:
                return pick(list(_prune(configs, nargs, **kw) if _prune is not None else configs))

            obj.early_config_prune = capped
            kname = getattr(getattr(obj, "fn", None), "__name__", str(id(obj)))
            out[kname] = f"{min(n, len(obj.configs))} of {len(obj.configs)}"
    return out


def _err(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _peak(t: Tensor) -> float:
    return float(t.float().abs().max())


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _bf16_values(t: Tensor) -> Tensor:
    """t rounded to bf16-representable values, kept in float32 (both sides then hold the same numbers)."""
    return t.to(torch.bfloat16).float()


@dataclass
class Case:
    """One method's inputs at one shape in attnlab's layout: q, k, v in ``dtype``; ``extra`` the API's
    tensor inputs (float32, bf16-representable); ``params`` for ``attnlab.prepare``; ``h0`` an initial
    state (float32) or None; ``g`` the log-decays the recurrence uses (None: no decay)."""

    method: str
    api: str
    q: Tensor
    k: Tensor
    v: Tensor
    extra: dict[str, Tensor]
    params: dict[str, Any]
    scale: float
    h0: Tensor | None
    g: Tensor | None
    slopes: Tensor | None = None
    learned: tuple[str, ...] = field(default=())  # the extra inputs with gradients
    pair: tuple[Tensor, Tensor] | None = None  # hedgehog's initial state (S, z)


def make_case(
    method: str,
    b: int,
    h: int,
    n: int,
    d: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    gates: str = "default",
    h0: bool = True,
    seed: int = 0,
    dev: str = "cuda",
) -> Case:
    """The inputs of ``method`` (one of ``METHODS``). ``gates``: "default" (decays mostly 0.5..1),
    "near1" (log-decays ~ -1e-3: decays within 0.1% of 1), "near0" (log-decays ~ -8: the state all but
    erased every token; beta then at its extremes 0 / 1 for the delta rule)."""
    gen = torch.Generator(device=dev).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, device=dev, generator=gen)

    q, k, v = (randn(b, h, n, d).to(dtype) for _ in range(3))
    state = randn(b, h, d, d) if h0 else None
    shift = {"default": 3.0, "near1": 8.0, "near0": -8.0}[gates]
    extra: dict[str, Tensor] = {}
    g: Tensor | None = None
    slopes = None
    scale = d**-0.5
    if method == "hedgehog":  # normalised linear attention, Hedgehog's map (2D = 256 features at D = 128)
        from attnlab.catalog.linear.linear import sample_map

        cpu = torch.Generator().manual_seed(seed)
        extra = {nm: _bf16_values(sample_map((h, d, d), cpu).to(dev)) for nm in ("map_q", "map_k")}
        hs = (randn(b, h, 2 * d, d).abs(), randn(b, h, 2 * d).abs()) if h0 else None
        return Case(method, "linear", q, k, v, extra, {"feature_map": "hedgehog"}, scale, None, None,
                    learned=("map_q", "map_k"), pair=hs)  # fmt: skip
    if method == "linear":
        return Case(method, "linear", q, k, v, extra, {"feature_map": "identity", "normalize": False},
                    scale, state, None)  # fmt: skip
    if method == "lightning":
        slopes = torch.tensor(alibi_slopes(h), device=dev, dtype=torch.float32)
        g = (-slopes)[None, :, None, None]
        return Case(method, "lightning", q, k, v, extra, {}, scale, state, g, slopes)
    if method == "gla":
        g = _bf16_values(F.logsigmoid(randn(b, h, n, d) + shift) / (4 if gates == "default" else 1))
        extra["g"] = g
        return Case(method, "gla", q, k, v, extra, {}, scale, state, g, learned=("g",))
    kda = method == "gated_delta_kda"
    g = _bf16_values(F.logsigmoid(randn(b, h, n, d if kda else 1) + shift + 1))
    if gates == "near0":
        beta = (torch.rand(b, h, n, device=dev, generator=gen) > 0.5).float()
    else:
        beta = _bf16_values(torch.sigmoid(randn(b, h, n)))
    extra.update(g=g, beta=beta)
    return Case(method, "gated_delta", q, k, v, extra, {"qk_l2norm": True}, scale, state, g,
                learned=("beta", "g"))  # fmt: skip


def _flat(state: Any) -> Tensor:
    """A state as one tensor: S, or (S, z) as S with z appended as a last column (B, H, K, V + 1)."""
    if isinstance(state, tuple):
        return torch.cat([state[0], state[1][..., None]], -1)
    return state


def _unflat(state: Tensor | None) -> Any:
    """Hedgehog's (S, z) from its flat form (see ``_flat``)."""
    return None if state is None else (state[..., :-1], state[..., -1])


def run_ours(c: Case, q: Tensor, k: Tensor, v: Tensor, extra: dict[str, Tensor], h0: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Our side through the API (a prepared op on the Triton backend): (o (B, H, N, V), final state)."""
    import attnlab

    op = attnlab.prepare(c.api, causal=True, backend="triton", **c.params)
    res = op(q, k, v, state=_unflat(h0) if c.method == "hedgehog" else h0, **extra)
    assert isinstance(res, attnlab.Result)
    return res.out, _flat(res.state)


def fla_fn(c: Case) -> Callable[..., tuple[Tensor, Tensor]]:
    """fla-core's chunk function for ``c`` on (B, N, H, D) inputs: ``fn(q, k, v, extra, h0)`` with extra
    in fla's layout ((B, N, H, ...) gates and beta, bf16 like q)."""
    if c.method == "linear":
        from fla.ops.linear_attn import chunk_linear_attn

        return lambda q, k, v, x, h0: chunk_linear_attn(q, k, v, scale=c.scale, initial_state=h0,
                                                         output_final_state=True, normalize=False)  # fmt: skip
    if c.method == "lightning":
        from fla.ops.simple_gla import chunk_simple_gla

        assert c.slopes is not None
        gamma = -c.slopes
        return lambda q, k, v, x, h0: chunk_simple_gla(q, k, v, g_gamma=gamma, scale=c.scale, initial_state=h0,
                                                        output_final_state=True)  # fmt: skip
    if c.method == "gla":
        from fla.ops.gla import chunk_gla

        return lambda q, k, v, x, h0: chunk_gla(q, k, v, x["g"], scale=c.scale, initial_state=h0,
                                                 output_final_state=True)  # fmt: skip
    if c.method == "gated_delta":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return lambda q, k, v, x, h0: chunk_gated_delta_rule(
            q, k, v, x["g"][..., 0], x["beta"], scale=c.scale, initial_state=h0, output_final_state=True,
            use_qk_l2norm_in_kernel=True)  # fmt: skip
    from fla.ops.kda import chunk_kda

    return lambda q, k, v, x, h0: chunk_kda(q, k, v, x["g"], x["beta"], scale=c.scale, initial_state=h0,
                                             output_final_state=True, use_qk_l2norm_in_kernel=True)  # fmt: skip


def to_fla(t: Tensor) -> Tensor:
    """(B, H, N, ...) -> (B, N, H, ...), contiguous."""
    return t.transpose(1, 2).contiguous()


def fla_extra(c: Case, extra: dict[str, Tensor]) -> dict[str, Tensor]:
    """The gates and beta in fla's layout and q's dtype (bf16-representable values: unchanged)."""
    return {name: to_fla(t).to(c.q.dtype) for name, t in extra.items()}


def run_fla(c: Case, q: Tensor, k: Tensor, v: Tensor, extra: dict[str, Tensor], h0: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """fla-core's side on our layout (transposes in and out, differentiable)."""
    o, s = fla_fn(c)(to_fla(q), to_fla(k), to_fla(v), fla_extra(c, extra), h0)
    return o.transpose(1, 2), s


def run_reference(
    c: Case, q: Tensor, k: Tensor, v: Tensor, extra: dict[str, Tensor], h0: Tensor | None,
    dtype: torch.dtype, seg: int = 1024, ckpt: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The token-by-token recurrence in ``dtype`` (segments of ``seg`` tokens, under activation
    checkpointing when ``ckpt``: the same arithmetic in the same order)."""
    if c.method == "hedgehog":  # the normalised linear recurrence with the learned map (token loop)
        from attnlab.catalog.linear.linear import LinearParams, reference

        o, st = reference(q, k, v, LinearParams(feature_map="hedgehog"), causal=True, scale=c.scale,
                          upcast=dtype == torch.float32, state=_unflat(h0), map_q=extra["map_q"],
                          map_k=extra["map_k"])  # fmt: skip
        return o, _flat(st)
    delta = c.method.startswith("gated_delta")
    g = extra.get("g", c.g)
    if delta:
        q, k = l2norm(q), l2norm(k)
    qq, kk, vv = q.to(dtype), k.to(dtype), v.to(dtype)
    gg = None if g is None else g.to(dtype)
    bb = extra["beta"].to(dtype) if delta else None
    s = None if h0 is None else h0.to(dtype)
    n = q.shape[2]
    outs = []

    def segment(a: int, z: int, s: Tensor | None) -> tuple[Tensor, Tensor]:
        gs = None if gg is None else (gg[:, :, a:z] if gg.shape[2] > 1 else gg)
        if delta:
            assert bb is not None
            return delta_recurrence(
                qq[:, :, a:z], kk[:, :, a:z], vv[:, :, a:z], bb[:, :, a:z], gs, c.scale, s
            )
        return gated_recurrence(qq[:, :, a:z], kk[:, :, a:z], vv[:, :, a:z], gs, c.scale, s)

    for a in range(0, n, seg):
        z = min(a + seg, n)
        if ckpt:
            o, s = checkpoint(segment, a, z, s, use_reentrant=False)
        else:
            o, s = segment(a, z, s)
        outs.append(o)
    assert s is not None
    return torch.cat(outs, 2), s


def run_ours_old_l2norm(
    c: Case, q: Tensor, k: Tensor, v: Tensor, extra: dict[str, Tensor], h0: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``run_ours`` on the old q/k L2-norm path (``attnlab.kernels.linear.op.FUSED_L2NORM`` off: the
    PyTorch normalisation before the chunk op), for gated_delta / KDA: the A/B of the fused norm."""
    from attnlab.kernels.linear import op

    saved = op.FUSED_L2NORM
    op.FUSED_L2NORM = False
    try:
        return run_ours(c, q, k, v, extra, h0)
    finally:
        op.FUSED_L2NORM = saved


@contextlib.contextmanager
def gla_one_kernel_bwd() -> Iterator[None]:
    """``attnlab.kernels.linear.op.GLA_BWD_SPLIT`` off for the duration (forward and backward of a side):
    the one-kernel backward, the default before the split one was checked on the H100."""
    from attnlab.kernels.linear import op

    saved = op.GLA_BWD_SPLIT
    op.GLA_BWD_SPLIT = False
    try:
        yield
    finally:
        op.GLA_BWD_SPLIT = saved


SIDES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "attnlab": run_ours,
    "attnlab-old-l2norm": run_ours_old_l2norm,
    "attnlab-gla-one-kernel": run_ours,  # (under SIDE_CONTEXT's flag, its backward included)
    "fla": run_fla,
}
#: A context a side's whole call (forward and backward) runs in.
SIDE_CONTEXT: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "attnlab-gla-one-kernel": gla_one_kernel_bwd
}
#: Seconds a side's call may take in ``check`` (fla's first use autotunes; 0: no limit), and the
#: (method, side) pairs that ran out of it once (not tried again at another shape).
SIDE_LIMIT = {"fla": 0.0, "attnlab": 0.0}
TIMED_OUT: set[tuple[str, str]] = set()


def check(method: str, b: int, h: int, n: int, d: int, *, grad: bool, sides: tuple[str, ...],
          gates: str = "default", dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:  # fmt: skip
    """One case: every side in ``sides`` (``attnlab``, ``fla``) against the same fp32 recurrence, one row
    per side (output, state and, with ``grad``, the gradients of q, k, v, the learned gates / beta, h0)."""
    c = make_case(method, b, h, n, d, dtype, gates=gates, dev=DEV)
    base = {"q": c.q, "k": c.k, "v": c.v, **c.extra}
    if c.h0 is not None:
        base["h0"] = c.h0
    if c.pair is not None:
        base["h0"] = _flat(c.pair)
    learn = ("q", "k", "v", *c.learned, "h0")
    names = [nm for nm in learn if nm in base] if grad else []
    gen = torch.Generator(device=DEV).manual_seed(1)
    do = ds = None

    def one(
        fn: Callable[..., tuple[Tensor, Tensor]], **kw: Any
    ) -> tuple[Tensor, Tensor, list[Tensor], float]:
        nonlocal do, ds
        _sync()
        t0 = time.perf_counter()
        xs = {nm: t.detach().clone().requires_grad_(nm in names) for nm, t in base.items()}
        extra = {nm: xs[nm] for nm in c.extra}
        with torch.set_grad_enabled(grad):
            o, s = fn(c, xs["q"], xs["k"], xs["v"], extra, xs.get("h0"), **kw)
        grads: list[Tensor] = []
        if grad:
            if do is None:
                do = torch.randn(o.shape, device=DEV, generator=gen)
                ds = torch.randn(s.shape, device=DEV, generator=gen)
            assert ds is not None
            loss = (o.float() * do).sum() + (s.float() * ds).sum()
            grads = [x.detach() for x in torch.autograd.grad(loss, [xs[nm] for nm in names])]
        _sync()
        return o.detach(), s.detach(), grads, time.perf_counter() - t0

    ref = one(run_reference, dtype=torch.float32, ckpt=grad)
    low = one(run_reference, dtype=dtype, ckpt=grad)
    rows = []
    for side in sides:
        if side == "fla" and method == "hedgehog":
            continue  # (fla's HedgehogFeatureMap is another function: one softmax over [2y, -2y])
        if side == "attnlab-old-l2norm" and c.api != "gated_delta":
            continue  # (only the delta rule normalises q and k)
        if side == "attnlab-gla-one-kernel" and method != "gla":
            continue  # (the per-channel gated linear backward only)
        row: dict[str, Any] = {"side": side, "method": method, "gates": gates, "grad": grad, "B": b, "H": h,
                               "N": n, "D": d, "dtype": str(dtype).replace("torch.", "")}  # fmt: skip
        if (method, side) in TIMED_OUT:
            row["error"] = "skipped: ran out of its time limit at an earlier shape"
            rows.append(row)
            continue
        try:
            with time_limit(SIDE_LIMIT.get(side, 0.0)), SIDE_CONTEXT.get(side, contextlib.nullcontext)():
                got = one(SIDES[side])
        except Exception as e:  # recorded (fla refusing, an OOM, a time limit), the other sides still run
            if isinstance(e, TimeoutError):
                TIMED_OUT.add((method, side))
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
            continue
        row["finite"] = bool(torch.isfinite(got[0]).all()) and all(
            bool(torch.isfinite(x).all()) for x in got[2]
        )
        checks = {"out": (got[0], ref[0], low[0], 2.0), "state": (got[1], ref[1], low[1], 2.0)}
        for nm, a, r, lw in zip(names, got[2], ref[2], low[2], strict=True):
            checks["d" + nm] = (a, r, lw, 3.0)
        ok = True
        for nm, (a, r, lw, factor) in checks.items():
            err, err_low, peak = _err(a, r), _err(lw, r), _peak(r)
            bound = factor * err_low + 1e-5 * (1 + peak) + 0.5 * torch.finfo(dtype).eps * peak
            row[nm] = {"err": round(err, 6), "err_lowp": round(err_low, 6), "max_ref": round(peak, 4),
                       "rel": round(err / max(peak, 1e-30), 6), "pass": err <= bound}  # fmt: skip
            ok = ok and err <= bound
        row["pass"] = ok and row["finite"]
        row["seconds"] = {"side": round(got[3], 2), "ref": round(ref[3], 2), "lowp": round(low[3], 2)}
        rows.append(row)
    return rows


def check_varlen(method: str, lens: list[int], h: int, d: int, chunk: int) -> dict[str, Any]:
    """Packed sequences (bf16): output and per-sequence final states of ``gla_chunk_varlen`` (lightning's
    decays) or ``delta_chunk_varlen`` (per-head gate) against the recurrence run on each sequence alone,
    in fp32 and in bf16 (the 2x rule)."""
    from attnlab.kernels.linear.op import delta_chunk_varlen, gla_chunk_varlen

    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    t = sum(lens)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(1, h, t, d, device=dev, generator=gen) for _ in range(3))
    h0 = torch.randn(len(lens), h, d, d, device=dev, generator=gen)
    beta = torch.sigmoid(torch.randn(1, h, t, device=dev, generator=gen))
    if method == "gated_delta":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = F.logsigmoid(torch.randn(1, h, t, 1, device=dev, generator=gen) + 4.0)
    else:
        g = -torch.tensor(alibi_slopes(h), device=dev)[None, :, None, None].expand(1, h, t, 1)
    qb, kb, vb = (x.to(dt) for x in (q, k, v))
    scale = d**-0.5
    cu_t = torch.tensor(cu, device=dev)
    if method == "gated_delta":
        o, s = delta_chunk_varlen(qb, kb, vb, beta, g, scale, h0, chunk, cu_t)
    else:
        o, s = gla_chunk_varlen(qb, kb, vb, g, scale, h0, chunk, cu_t)
    refs: dict[str, tuple[Tensor, Tensor]] = {}
    for label, cast in (("ref", torch.float32), ("low", dt)):
        outs, states = [], []
        for i, (a, b) in enumerate(itertools.pairwise(cu)):
            qs, ks, vs = (x[:, :, a:b].to(cast) for x in (qb, kb, vb))
            s0 = h0[i : i + 1].to(cast)
            if method == "gated_delta":
                ro, rs = delta_recurrence(
                    qs, ks, vs, beta[:, :, a:b].to(cast), g[:, :, a:b].to(cast), scale, s0
                )
            else:
                ro, rs = gated_recurrence(qs, ks, vs, g[:, :, a:b].to(cast), scale, s0)
            outs.append(ro)
            states.append(rs)
        refs[label] = (torch.cat(outs, 2), torch.cat(states, 0))
    row: dict[str, Any] = {"method": method + "_varlen", "lens": lens, "H": h, "D": d, "chunk": chunk}
    ok = True
    pairs: list[tuple[str, Tensor, Tensor, Tensor]] = [
        ("out", o, refs["ref"][0], refs["low"][0]),
        ("state", s, refs["ref"][1], refs["low"][1]),
    ]
    for nm, got, ref, low in pairs:
        err, err_low, peak = _err(got, ref), _err(low, ref), _peak(ref)
        bound = 2.0 * err_low + 1e-5 * (1 + peak) + 0.5 * torch.finfo(dt).eps * peak
        row[nm] = {"err": err, "err_lowp": err_low, "max_ref": peak, "bound": bound, "pass": err <= bound}
        ok = ok and err <= bound
    row["pass"] = ok
    return row


NUMERICS_64K = (
    ("linear", "default"),
    ("lightning", "default"),
    ("gla", "default"),
    ("gla", "near1"),
    ("gla", "near0"),
    ("gated_delta", "near1"),
    ("gated_delta", "near0"),
    ("gated_delta_kda", "near1"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds after which no new case starts")
    ap.add_argument("--shapes", default="1x32x8192:grad,1x32x32768", help="BxHxN[:grad],... (D = 128)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sides", default="attnlab,fla", help="attnlab, fla (skipped when fla does not import)")
    ap.add_argument("--n64k", type=int, default=65536, help="tokens of the numerics cases (0: none)")
    ap.add_argument("--h64k", type=int, default=4, help="heads of the numerics cases")
    ap.add_argument("--numerics", default="", help="method:gates,... of NUMERICS_64K to run (default all)")
    ap.add_argument("--varlen", action="store_true", help="also the packed-sequence checks")
    ap.add_argument("--fast-autotune", action="store_true", help="see fast_autotune()")
    ap.add_argument("--fla-limit", type=float, default=0.0, help="seconds per fla call in a check (0: none)")
    ap.add_argument("--fla-max-configs", type=int, default=0, help="see cap_fla_configs() (0: all configs)")
    args = ap.parse_args()
    if args.fast_autotune:
        fast_autotune()
    SIDE_LIMIT["fla"] = args.fla_limit
    start = time.perf_counter()
    import triton

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, "checks": [], "numerics": []}  # fmt: skip
    sides = tuple(args.sides.split(","))
    if "fla" in sides:
        try:
            import fla

            result["fla"] = getattr(fla, "__version__", "?")
            if args.fla_max_configs:
                result["fla_configs"] = cap_fla_configs(args.fla_max_configs)
        except Exception as e:
            result["fla"] = f"not importable: {type(e).__name__}: {e}"[:300]
            sides = tuple(s for s in sides if s != "fla")

    def save(key: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            print(json.dumps(row), flush=True)
        result[key].extend(rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    def guarded(key: str, what: str, fn: Callable[..., list[dict[str, Any]]], *a: Any, **kw: Any) -> None:
        if time.perf_counter() - start > args.budget:
            save(key, [{"skipped": what, "why": "budget"}])
            return
        try:
            save(key, fn(*a, **kw))
        except Exception as e:
            save(key, [{"case": what, "error": f"{type(e).__name__}: {e}"[:500]}])
        torch.cuda.empty_cache()

    for shape in filter(None, args.shapes.split(",")):
        dims, _, flag = shape.partition(":")
        b, h, n = (int(x) for x in dims.split("x"))
        for method in args.methods.split(","):
            guarded("checks", f"{method} {dims} {flag}", check, method, b, h, n, 128, grad=flag == "grad",
                    sides=sides)  # fmt: skip
    if args.n64k:
        chosen = [tuple(x.split(":")) for x in filter(None, args.numerics.split(","))] or NUMERICS_64K
        for method, gates in chosen:
            guarded("numerics", f"{method} {gates} N={args.n64k}", check, method, 1, args.h64k, args.n64k,
                    128, grad=False, sides=("attnlab",), gates=gates)  # fmt: skip
    if args.varlen:
        for method in ("lightning", "gated_delta"):
            guarded("checks", f"{method}_varlen", lambda m: [check_varlen(m, [1000, 63, 4096, 1, 2900], 16, 128, 64)],
                    method)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - start, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
