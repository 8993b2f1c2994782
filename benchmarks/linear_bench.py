"""Timing of the linear family against cuDNN SDPA (dense causal softmax) and fla-core's chunk kernels on the
same shapes and values, bf16: forward and forward + backward, CUDA events, every side taking its turn
in the same rounds (the same clocks and thermal state for all), min / median / IQR / max over the reps
after warm-up. And the single-token recurrent decode step against fla-core's fused recurrent step and a
dense decode over a 128K KV cache, with the bytes a step moves against the measured HBM bandwidth.

Our side is called as a user calls it: a prepared op (``attnlab.prepare(method, causal=True,
backend="triton", ...)``) on (B, H, N, D) tensors, its checks, feature maps and gate checks included.
fla-core's side (when ``fla`` imports; never a dependency, the GPU run installs a carried wheel) gets
the same values in its (B, N, H, D) layout, made before the clock. The methods and fla's twins are
``linear_gpu_check.make_case`` (identity-map unnormalised linear / ``chunk_linear_attn``, lightning /
``chunk_simple_gla``, gla / ``chunk_gla``, gated_delta per-head gate / ``chunk_gated_delta_rule``, per
channel / ``chunk_kda``; q, k L2-normalised inside both). fla's own correctness is checked by
``linear_gpu_check.py``.

    python benchmarks/linear_bench.py --shapes 1x32x8192,1x32x16384 --out linear_bench.json [--decode]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linear_gpu_check import (
    METHODS,
    cap_fla_configs,
    check,
    fast_autotune,
    fla_extra,
    fla_fn,
    make_case,
    time_limit,
    to_fla,
)

#: Where the sides' tensors live (a CPU smoke test of this script sets "cpu" under TRITON_INTERPRET=1).
DEV = "cuda"
#: Time gated_delta / KDA a second time with the old PyTorch q/k L2 norm (``--l2norm-ab``).
L2NORM_AB = False
#: Time gla a second time with its one-kernel backward (``--gla-split-ab``; the split backward,
#: op.GLA_BWD_SPLIT, is the default since it was checked and timed on the H100).
GLA_SPLIT_AB = False
#: Time gated_delta / KDA a second time with the previous delta-rule forward (``--wy-ab``: op.WY_BLOCKWISE
#: and op.DELTA_FUSED_GLUE off for the whole call, its backward included).
WY_AB = False


@contextlib.contextmanager
def previous_wy(off: bool = True) -> Iterator[None]:
    """The delta rule's previous forward (row-by-row UT inverse, PyTorch cumsum and padding) for the
    duration when ``off`` (forward and backward inside: the backward's gate cumsum follows the flag)."""
    from attnlab.kernels.linear import op

    saved = (op.WY_BLOCKWISE, op.DELTA_FUSED_GLUE)
    if off:
        op.WY_BLOCKWISE = op.DELTA_FUSED_GLUE = False
    try:
        yield
    finally:
        op.WY_BLOCKWISE, op.DELTA_FUSED_GLUE = saved


def _previous_wy_fwd_bwd(fn: Callable[[], Tensor], wrt: list[Tensor], do: Tensor) -> tuple[Tensor, ...]:
    with previous_wy():
        return torch.autograd.grad(fn(), wrt, do)


#: Boolean flags of ``attnlab.kernels.linear.op`` to A/B (``--ab-flags``): each adds, per method it applies
#: to (``flag_applies``), a side ``<method>[<FLAG>=off]`` with the flag off for the whole call, its backward
#: included.
AB_FLAGS: tuple[str, ...] = ()


def flag_applies(flag: str, api: str) -> bool:
    """Whether op flag ``flag`` changes the kernels of a method of API ``api``: ``GLA_*`` flags those of the
    gated linear recurrence (gla, lightning, linear), the others the delta rule's (gated_delta, KDA)."""
    return flag.startswith("GLA_") == (api != "gated_delta")


#: Settings of ``attnlab.kernels.linear.op`` to A/B (``--ab-values``): each a tuple of (name, value) pairs, set
#: together; each adds, per method it applies to, a side ``<method>[<NAME>=<value>+...]`` with them for the
#: whole call, its backward included.
Setting = tuple[tuple[str, Any], ...]
AB_VALUES: tuple[Setting, ...] = ()


def parse_value(text: str) -> Any:
    """An ``--ab-values`` value: off / on / false / true as bools, then int, float, else the string."""
    low = text.lower()
    if low in ("off", "false", "on", "true"):
        return low in ("on", "true")
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_setting(text: str) -> Setting:
    """``NAME=VALUE[+NAME=VALUE...]`` (one ``--ab-values`` item) as (name, value) pairs."""
    return tuple((nm, parse_value(x)) for nm, _, x in (a.partition("=") for a in text.split("+")))


def ab_label(setting: Setting) -> str:
    """A side's suffix for ``setting``: ``[NAME=off]`` for one flag off (``--ab-flags``' sides)."""
    shown = ("off" if x is False else "on" if x is True else str(x) for _, x in setting)
    return "[" + "+".join(f"{nm}={x}" for (nm, _), x in zip(setting, shown, strict=True)) + "]"


def setting_applies(setting: Setting, api: str) -> bool:
    """Whether every setting of ``setting`` applies to a method of API ``api`` (``flag_applies``)."""
    return all(flag_applies(nm, api) for nm, _ in setting)


@contextlib.contextmanager
def applied(setting: Setting) -> Iterator[None]:
    """The settings of ``attnlab.kernels.linear.op`` in ``setting`` for the duration."""
    from attnlab.kernels.linear import op

    saved = [(nm, getattr(op, nm)) for nm, _ in setting]
    try:
        for nm, x in setting:
            setattr(op, nm, x)
        yield
    finally:
        for nm, x in reversed(saved):
            setattr(op, nm, x)


def flag_off(name: str) -> contextlib.AbstractContextManager[None]:
    """``attnlab.kernels.linear.op.<name>`` set to False for the duration."""
    return applied(((name, False),))


def _setting_fwd_bwd(
    setting: Setting, fn: Callable[[], Tensor], wrt: list[Tensor], do: Tensor
) -> tuple[Tensor, ...]:
    with applied(setting):
        return torch.autograd.grad(fn(), wrt, do)


def _ab_setting(side: str) -> Setting | None:
    """The setting of an A/B side named ``<method>[<NAME>=<value>+...]`` (None for other sides)."""
    if not side.endswith("]") or "=" not in side[side.rindex("[") :]:
        return None
    return parse_setting(side[side.rindex("[") + 1 : -1])


def ab_settings() -> list[Setting]:
    """Every A/B setting: each ``--ab-flags`` flag off, then the ``--ab-values`` items."""
    return [((f, False),) for f in AB_FLAGS] + list(AB_VALUES)


def _side_fwd_bwd(name: str) -> Callable[..., tuple[Tensor, ...]]:
    """How bench() times side ``name`` forward + backward (A/B sides keep their setting in the backward)."""
    if name.endswith("[one-kernel-bwd]"):
        return _one_kernel_fwd_bwd
    if name.endswith("[previous-wy]"):
        return _previous_wy_fwd_bwd
    setting = _ab_setting(name)
    if setting is not None:
        return functools.partial(_setting_fwd_bwd, setting)
    return _fwd_bwd


@contextlib.contextmanager
def gla_split_bwd(on: bool) -> Iterator[None]:
    """``attnlab.kernels.linear.op.GLA_BWD_SPLIT`` set to ``on`` for the duration (read by the backward)."""
    from attnlab.kernels.linear import op

    saved = op.GLA_BWD_SPLIT
    op.GLA_BWD_SPLIT = on
    try:
        yield
    finally:
        op.GLA_BWD_SPLIT = saved


def _one_kernel_fwd_bwd(fn: Callable[[], Tensor], wrt: list[Tensor], do: Tensor) -> tuple[Tensor, ...]:
    with gla_split_bwd(False):
        return torch.autograd.grad(fn(), wrt, do)


@contextlib.contextmanager
def fused_l2norm(on: bool) -> Iterator[None]:
    """``attnlab.kernels.linear.op.FUSED_L2NORM`` set to ``on`` for the duration (the A/B of the fused
    q/k L2 norm; the forward decides, its backward follows what the forward saved)."""
    from attnlab.kernels.linear import op

    saved = op.FUSED_L2NORM
    op.FUSED_L2NORM = on
    try:
        yield
    finally:
        op.FUSED_L2NORM = saved


def _stats(ts: list[float]) -> dict[str, float]:
    s = sorted(ts)
    n = len(s)

    def q(p: float) -> float:
        x = p * (n - 1)
        lo = int(x)
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return {"min_ms": round(s[0], 4), "median_ms": round(q(0.5), 4), "iqr_ms": round(q(0.75) - q(0.25), 4),
            "max_ms": round(s[-1], 4), "reps": n}  # fmt: skip


#: The methods whose fla-core twin is timed (None: all that have one).
FLA_METHODS: frozenset[str] | None = None
#: Seconds a side's warm-up may take (its first call compiles, and for fla autotunes; 0: no limit).
WARMUP_LIMIT = 0.0


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 3) -> dict[str, Any]:
    """Per side, CUDA-event times of ``reps`` runs, the sides taking turns within each round. A side that
    raises in its warm-up, or outlasts ``WARMUP_LIMIT`` there (first use: compile, fla's autotuning), is
    left out (its error recorded in its place); the warm-up's seconds are recorded as ``warmup_s``."""
    out: dict[str, Any] = {}
    live: dict[str, Callable[[], Any]] = {}
    warm_s: dict[str, float] = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        try:
            with time_limit(WARMUP_LIMIT):
                for _ in range(warmup):
                    fn()
                torch.cuda.synchronize()
            live[name] = fn
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[:300]
        warm_s[name] = round(time.perf_counter() - t0, 1)
        print(f"warm-up {name}: {warm_s[name]} s{'' if name in live else ' (left out)'}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(reps):
        events = []
        for name, fn in live.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        for name, start, end in events:
            times[name].append(start.elapsed_time(end))
    out.update({name: _stats(ts) for name, ts in times.items()})
    out["warmup_s"] = warm_s
    return out


Side = tuple[Callable[[], Tensor], list[Tensor], Tensor]  # forward, what the backward differentiates, dout


def sides(b: int, h: int, n: int, d: int, methods: tuple[str, ...], fla: bool) -> dict[str, Side]:
    """cuDNN SDPA, then per method our prepared op and fla's chunk function, on the same values."""
    import attnlab

    dt = torch.bfloat16
    gen = torch.Generator(device=DEV).manual_seed(5)
    do = torch.randn(b, h, n, d, device=DEV, dtype=dt, generator=gen)
    out: dict[str, Side] = {}
    qkv: list[Tensor] = []
    for method in methods:
        c = make_case(method, b, h, n, d, dt, h0=False, dev=DEV)
        q, k, v = (t.requires_grad_(True) for t in (c.q, c.k, c.v))
        if not qkv:
            qkv = [q, k, v]

            def sdpa(q: Tensor = q, k: Tensor = k, v: Tensor = v) -> Tensor:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            out["cudnn_sdpa"] = (sdpa, [q, k, v], do)
        extra = {nm: t.requires_grad_(nm in c.learned) for nm, t in c.extra.items()}
        op = attnlab.prepare(c.api, causal=True, backend="triton", **c.params)

        def ours(op: Any = op, q: Tensor = q, k: Tensor = k, v: Tensor = v, extra: Any = extra) -> Tensor:
            return op(q, k, v, **extra).out

        out[method] = (ours, [q, k, v, *(extra[nm] for nm in c.learned)], do)
        if L2NORM_AB and c.api == "gated_delta":

            def old(op: Any = op, q: Tensor = q, k: Tensor = k, v: Tensor = v, extra: Any = extra) -> Tensor:
                with fused_l2norm(False):
                    return op(q, k, v, **extra).out

            out[method + "[old-l2norm]"] = (old, out[method][1], do)
        if WY_AB and c.api == "gated_delta":

            def prev(op: Any = op, q: Tensor = q, k: Tensor = k, v: Tensor = v, extra: Any = extra) -> Tensor:
                with previous_wy():
                    return op(q, k, v, **extra).out

            out[method + "[previous-wy]"] = (prev, out[method][1], do)
        for setting in (x for x in ab_settings() if setting_applies(x, c.api)):

            def off(
                op: Any = op,
                q: Tensor = q,
                k: Tensor = k,
                v: Tensor = v,
                extra: Any = extra,
                setting: Setting = setting,
            ) -> Tensor:
                with applied(setting):
                    return op(q, k, v, **extra).out

            out[method + ab_label(setting)] = (off, out[method][1], do)
        if GLA_SPLIT_AB and method == "gla":  # (the forward is the same; bench() runs its old backward)
            out[method + "[one-kernel-bwd]"] = out[method]
        if fla and method != "hedgehog" and (FLA_METHODS is None or method in FLA_METHODS):
            qf, kf, vf = (to_fla(t.detach()).requires_grad_(True) for t in (q, k, v))
            xf = {nm: t.requires_grad_(nm in c.learned) for nm, t in fla_extra(c, c.extra).items()}
            fn = fla_fn(c)

            def theirs(
                fn: Any = fn, qf: Tensor = qf, kf: Tensor = kf, vf: Tensor = vf, xf: Any = xf
            ) -> Tensor:
                return fn(qf, kf, vf, xf, None)[0]

            out["fla:" + method] = (theirs, [qf, kf, vf, *(xf[nm] for nm in c.learned)], to_fla(do))
    return out


def register_check_sides(api: str) -> tuple[str, ...]:
    """The A/B settings (``--ab-flags`` off, ``--ab-values``) of a method of API ``api`` as sides of
    ``linear_gpu_check.check`` (``attnlab[<NAME>=<value>]``: our op with that setting for the whole call),
    registered there; their names."""
    import linear_gpu_check as lgc

    names = []
    for setting in ab_settings():
        if not setting_applies(setting, api):
            continue
        side = "attnlab" + ab_label(setting)
        lgc.SIDES[side] = lgc.run_ours
        lgc.SIDE_CONTEXT[side] = functools.partial(applied, setting)
        names.append(side)
    return tuple(names)


def _fwd_bwd(fn: Callable[[], Tensor], wrt: list[Tensor], do: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(fn(), wrt, do)


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, dict) and isinstance(b, dict):
        return round(a["median_ms"] / b["median_ms"], 3)
    return None


def bench(
    b: int, h: int, n: int, d: int, methods: tuple[str, ...], fla: bool, reps: int = 10, backward: bool = True
) -> dict[str, Any]:
    """Forward and forward+backward of every side, all interleaved in the same rounds; speedups vs cuDNN
    (its time / ours) and our time over fla's (the 1.1x target: <= 1.1)."""
    s = sides(b, h, n, d, methods, fla)
    row: dict[str, Any] = {"B": b, "H": h, "N": n, "D": d, "dtype": "bfloat16", "chunk": 64, "reps": reps}
    t0 = time.perf_counter()
    with torch.no_grad():
        row["fwd"] = interleaved({name: fn for name, (fn, _, _) in s.items()}, reps)
    if backward:
        row["fwd_bwd"] = interleaved(
            {name: functools.partial(_side_fwd_bwd(name), fn, wrt, do) for name, (fn, wrt, do) in s.items()},
            reps,
        )
    for mode in ("fwd", "fwd_bwd") if backward else ("fwd",):
        t = row[mode]
        row[mode + "_speedup_vs_cudnn"] = {m: _ratio(t.get("cudnn_sdpa"), t.get(m)) for m in methods}
        if GLA_SPLIT_AB and mode == "fwd_bwd":  # the split backward's fwd+bwd over the one-kernel one's
            row["fwd_bwd_split_over_one_kernel"] = _ratio(t.get("gla"), t.get("gla[one-kernel-bwd]"))
        for flag in AB_FLAGS:  # the default's time over the flag-off side's (< 1: the flag helps)
            row[f"{mode}_default_over_{flag}_off"] = {
                m: _ratio(t.get(m), t.get(f"{m}[{flag}=off]")) for m in methods if f"{m}[{flag}=off]" in t
            }
        for setting in AB_VALUES:  # the default's time over the side's (< 1: the default is faster)
            lab = ab_label(setting)
            row[f"{mode}_default_over{lab}"] = {
                m: _ratio(t.get(m), t.get(m + lab)) for m in methods if m + lab in t
            }
        if WY_AB:  # the blockwise WY forward's time over the previous one's (< 1: faster)
            row[mode + "_blockwise_over_previous_wy"] = {
                m: _ratio(t.get(m), t.get(m + "[previous-wy]")) for m in methods if m + "[previous-wy]" in t
            }
        if L2NORM_AB:  # the fused q/k L2 norm's time over the old path's (< 1: the fusion helps)
            row[mode + "_fused_over_old_l2norm"] = {
                m: _ratio(t.get(m), t.get(m + "[old-l2norm]")) for m in methods if m + "[old-l2norm]" in t
            }
        if fla:
            row[mode + "_ours_over_fla"] = {m: _ratio(t.get(m), t.get("fla:" + m)) for m in methods}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def hbm_bandwidth(gib: float = 1.0, reps: int = 20) -> dict[str, float]:
    """Measured device-memory bandwidth: a copy of ``gib`` GiB (read + write) timed with CUDA events."""
    x = torch.empty(int(gib * 2**30) // 4, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    r = interleaved({"copy": lambda: y.copy_(x)}, reps)["copy"]
    assert isinstance(r, dict)
    return {
        "copy_gib": gib,
        "median_ms": r["median_ms"],
        "GBps": round(2 * x.numel() * 4 / r["median_ms"] / 1e6, 1),
    }


def decode(b: int, h: int, d: int, methods: tuple[str, ...], fla: bool, reps: int = 100,
           cache: int = 131072) -> dict[str, Any]:  # fmt: skip
    """One token against a carried state: our prepared op, our kernel entry point (``gla_chunk`` /
    ``delta_chunk``, which take the step kernel), fla's fused recurrent step; a dense decode over a
    ``cache``-token KV cache (SDPA, default backend); each method's step checked against the one-step
    recurrence in fp32 (ours and fla's). Bytes per step: the fp32 state read and written, plus q, k, v, o
    and the gates."""
    from linear_gpu_check import run_reference

    import attnlab
    from attnlab.catalog.linear.gated_delta import l2norm
    from attnlab.kernels.linear.op import delta_chunk, gla_chunk

    dt = torch.bfloat16
    row: dict[str, Any] = {"B": b, "H": h, "D": d, "dense_cache": cache}
    fns: dict[str, Callable[[], Any]] = {}
    bytes_per_step: dict[str, int] = {}
    checks: dict[str, Any] = {}
    methods = tuple(m for m in methods if m != "hedgehog")  # (the step of `linear` with other features)
    for method in methods:
        c = make_case(method, b, h, 1, d, dt, seed=3, dev=DEV)
        assert c.h0 is not None
        h0 = c.h0
        op = attnlab.prepare(c.api, causal=True, backend="triton", **c.params)
        fns[method] = functools.partial(op, c.q, c.k, c.v, state=h0, **c.extra)
        delta = method.startswith("gated_delta")
        g = c.extra.get("g", c.g)
        gk = None if g is None else g.expand(b, h, 1, -1) if g.shape[-1] == 1 else g.expand(b, h, 1, d)
        if delta:
            qn, kn = (l2norm(t).to(dt) for t in (c.q, c.k))
            fns["kernel:" + method] = functools.partial(
                delta_chunk, qn, kn, c.v, c.extra["beta"], g, c.scale, h0, 64
            )
        else:
            gx = None if g is None else g.expand(b, h, 1, d)
            fns["kernel:" + method] = functools.partial(gla_chunk, c.q, c.k, c.v, gx, c.scale, h0, 64)
        state_bytes = 2 * b * h * d * d * 4
        io_bytes = 4 * b * h * d * 2 + (0 if gk is None else gk.numel() * 4) + (b * h * 4 if delta else 0)
        bytes_per_step[method] = state_bytes + io_bytes
        with torch.no_grad():
            ref = run_reference(c, c.q, c.k, c.v, c.extra, h0, torch.float32)
            res = op(c.q, c.k, c.v, state=h0, **c.extra)
        assert isinstance(res, attnlab.Result)
        got: dict[str, tuple[Tensor, Tensor]] = {"attnlab": (res.out, res.state)}
        if fla:
            try:
                fr = fla_step(c, h0)
                fns["fla:" + method] = fr
                with torch.no_grad():
                    o, s = fr()
                got["fla"] = (o.transpose(1, 2), s)
            except Exception as e:
                checks["fla:" + method] = f"{type(e).__name__}: {e}"[:300]
        for side, (o, s) in got.items():
            checks[f"{side}:{method}"] = {
                "out_err": float((o.float() - ref[0].float()).abs().max()),
                "out_max": float(ref[0].float().abs().max()),
                "state_err": float((s.float() - ref[1]).abs().max()),
                "state_max": float(ref[1].abs().max()),
            }
    gen = torch.Generator(device=DEV).manual_seed(9)
    qd = torch.randn(b, h, 1, d, device=DEV, dtype=dt, generator=gen)
    kc = torch.randn(b, h, cache, d, device=DEV, dtype=dt, generator=gen)
    vc = torch.randn(b, h, cache, d, device=DEV, dtype=dt, generator=gen)
    fns["dense_sdpa_128k"] = functools.partial(F.scaled_dot_product_attention, qd, kc, vc)
    bytes_per_step["dense_sdpa_128k"] = 2 * kc.numel() * 2
    with torch.no_grad():
        t = interleaved(fns, reps, warmup=5)
    row["times"] = t
    row["checks"] = checks
    row["bytes_per_step"] = bytes_per_step
    bw = hbm_bandwidth()
    row["hbm"] = bw
    row["achieved_GBps"] = {}
    for name, r in t.items():
        base = name.split(":")[-1]
        if isinstance(r, dict) and base in bytes_per_step:
            row["achieved_GBps"][name] = round(bytes_per_step[base] / r["median_ms"] / 1e6, 1)
    row["ours_over_fla"] = {m: _ratio(t.get(m), t.get("fla:" + m)) for m in methods}
    row["kernel_over_fla"] = {m: _ratio(t.get("kernel:" + m), t.get("fla:" + m)) for m in methods}
    row["dense_over_ours"] = {m: _ratio(t.get("dense_sdpa_128k"), t.get(m)) for m in methods}
    return row


#: aten ops that launch no device kernel (views, allocations, dtype no-ops, containers whose work is
#: counted in the ops they call); ``_local_scalar_dense`` is a host read, counted as a synchronisation.
_NO_LAUNCH = frozenset(
    "aten::" + n
    for n in (
        "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "expand", "view",
        "as_strided", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "detach", "alias",
        "lift_fresh", "_to_copy", "to", "contiguous", "clone", "resolve_conj", "resolve_neg", "reshape",
        "_reshape_alias", "result_type", "_unsafe_view", "_local_scalar_dense", "item", "is_nonzero",
    )
)  # fmt: skip


class _StubLaunch:
    """Stands in for a Triton kernel (``kernel[grid](...)``) on a CPU: counts launches, runs nothing, so
    the host time measured is the call's own work (the interpreter would dominate it). Zeroes the step
    kernel's range-check counts (its BAD argument) when CHECK is on, as a valid launch would."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*a: Any, **kw: Any) -> None:
            self.launches += 1
            if kw.get("CHECK"):
                a[8].zero_()  # (one fill_ per checked call that a real launch would not make)

        return launch


def decode_host(
    b: int, h: int, d: int, methods: tuple[str, ...], reps: int = 2000, profiled: int = 20
) -> dict[str, Any]:
    """What one prepared-op decode step (one token, a carried state, bf16) launches and costs on the host:
    per method, with ``attnlab.settings.check_values`` on and off, the aten ops per call that launch a
    device kernel (by name), all aten ops per call (``aten_calls``: views and allocations too, each a
    dispatch on the host), Triton launches, allocations (aten::empty*), host reads (``tolist`` /
    ``item``: synchronisations on a GPU) and the median host time per call over ``reps`` calls. On a CPU
    (``DEV == "cpu"``, TRITON_INTERPRET=1) the step kernel is replaced by a launch counter that runs
    nothing (``_StubLaunch``): the time is the host's own work per step. On CUDA the real kernel runs and
    the time is per call, synchronised after each (a host-bound step's wall time)."""
    import statistics

    import attnlab
    from attnlab.kernels.linear import op as kop

    stub = _StubLaunch() if DEV == "cpu" else None
    real_kernel = kop.recurrent_step_kernel
    reads = [0]
    real_tolist = torch.Tensor.tolist

    def counted_tolist(t: Tensor) -> Any:
        reads[0] += 1
        return real_tolist(t)

    row: dict[str, Any] = {"B": b, "H": h, "D": d, "device": DEV, "stubbed_kernel": stub is not None}
    saved = attnlab.settings.check_values
    try:
        if stub is not None:
            kop.recurrent_step_kernel = stub
        torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign, assignment]
        for method in methods:
            c = make_case(method, b, h, 1, d, torch.bfloat16, seed=3, dev=DEV)
            op = attnlab.prepare(c.api, causal=True, backend="triton", **c.params)
            fn = functools.partial(op, c.q, c.k, c.v, state=c.h0, **c.extra)
            for check in (True, False):
                attnlab.settings.check_values = check
                with torch.no_grad():
                    for _ in range(20):
                        fn()
                    if stub is not None:
                        stub.launches = 0
                    reads[0] = 0
                    acts = [torch.profiler.ProfilerActivity.CPU]
                    with torch.profiler.profile(activities=acts) as prof:
                        for _ in range(profiled):
                            fn()
                    launches = (stub.launches / profiled) if stub is not None else None
                    n_reads = reads[0] / profiled
                    ops = {
                        e.key: e.count / profiled for e in prof.key_averages() if e.key.startswith("aten::")
                    }
                    if stub is not None and check and method in ("gla", "gated_delta", "gated_delta_kda"):
                        ops["aten::fill_"] = ops.get("aten::fill_", 0) - 1  # (the stub's zero_)
                        ops["aten::zero_"] = ops.get("aten::zero_", 0) - 1
                    launching = {k: v for k, v in ops.items() if k not in _NO_LAUNCH and v > 0}
                    ts = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        fn()
                        if DEV != "cpu":
                            torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t0)
                key = f"{method}:check_values={'on' if check else 'off'}"
                row[key] = {
                    "aten_launching_ops": round(sum(launching.values()), 2),
                    "aten_calls": round(sum(v for v in ops.values() if v > 0), 2),
                    "aten_ops": dict(sorted(launching.items())),
                    "triton_launches": launches,
                    "allocations": ops.get("aten::empty", 0) + ops.get("aten::empty_strided", 0),
                    "host_reads": n_reads,
                    "host_us_median": round(statistics.median(ts) * 1e6, 1),
                    "host_us_min": round(min(ts) * 1e6, 1),
                }
                print(key, row[key], flush=True)
    finally:
        kop.recurrent_step_kernel = real_kernel
        torch.Tensor.tolist = real_tolist  # type: ignore[method-assign]
        attnlab.settings.check_values = saved
    return row


def fla_step(c: Any, h0: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
    """fla's fused recurrent step for case ``c`` (one token, (B, 1, H, D) inputs made here)."""
    q, k, v = (to_fla(t) for t in (c.q, c.k, c.v))
    x = fla_extra(c, c.extra)
    kw = {"scale": c.scale, "initial_state": h0, "output_final_state": True}
    if c.method == "linear":
        from fla.ops.linear_attn import fused_recurrent_linear_attn

        return functools.partial(fused_recurrent_linear_attn, q, k, v, normalize=False, **kw)
    if c.method == "lightning":
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        return functools.partial(fused_recurrent_simple_gla, q, k, v, g_gamma=-c.slopes, **kw)
    if c.method == "gla":
        from fla.ops.gla import fused_recurrent_gla

        return functools.partial(fused_recurrent_gla, q, k, v, gk=x["g"], **kw)
    if c.method == "gated_delta":
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        return functools.partial(fused_recurrent_gated_delta_rule, q, k, v, g=x["g"][..., 0], beta=x["beta"],
                                 use_qk_l2norm_in_kernel=True, **kw)  # fmt: skip
    from fla.ops.kda import fused_recurrent_kda

    return functools.partial(
        fused_recurrent_kda, q, k, v, x["g"], x["beta"], use_qk_l2norm_in_kernel=True, **kw
    )


def _device_us(e: Any) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, attr):
            return float(getattr(e, attr))
    return 0.0


def profile(
    b: int, h: int, n: int, d: int, methods: tuple[str, ...], iters: int = 2, fwd_only: bool = False,
    fla: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Where our fwd+bwd (``fwd_only``: forward) time goes: torch.profiler over ``iters`` calls of each
    method's prepared op (after a warm-up), GPU time per kernel (ms per iteration, share of the method's
    GPU total); ``fla``: fla-core's twin too (as ``fla:<method>``), profiled the same way."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    s = sides(b, h, n, d, methods, fla=fla)
    out: dict[str, Any] = {
        "B": b,
        "H": h,
        "N": n,
        "D": d,
        "iters": iters,
        "mode": "fwd" if fwd_only else "fwd_bwd",
    }
    for m in [x for x in s if x != "cudnn_sdpa"]:
        fn, wrt, do = s[m]

        # (an A/B side keeps its setting through the backward, as bench() times it)
        def call(
            fn: Callable[[], Tensor] = fn, wrt: list[Tensor] = wrt, do: Tensor = do, side: str = m
        ) -> Any:
            if fwd_only:
                with torch.no_grad():
                    return fn()
            return _side_fwd_bwd(side)(fn, wrt, do)

        try:
            call()
        except Exception as e:  # (fla's gated backward refuses on Hopper with Triton 3.6: its #640)
            out[m] = f"{type(e).__name__}: {e}"[:200]
            continue
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                call()
            torch.cuda.synchronize()
        rows = [(e.key, _device_us(e) / 1000 / iters, e.count // iters) for e in prof.key_averages()]
        rows = [r for r in rows if r[1] > 0]
        total = sum(r[1] for r in rows)
        rows.sort(key=lambda r: -r[1])
        out[m] = {
            "gpu_ms_per_iter": round(total, 3),
            "kernels": [
                {"name": k[:80], "ms": round(t, 3), "share": round(t / total, 3), "calls": c}
                for k, t, c in rows[:14]
            ],
        }
    return out


#: Launch variants tried by ``sweep`` per method: (label, LAUNCH_OVERRIDES, module constants of op.py).
SWEEP: dict[str, list[tuple[str, dict[str, dict[str, int]], dict[str, int]]]] = {
    "gla": [
        ("fused kernel", {}, {"GLA_BWD_SLICED": 0}),
        *(
            (
                f"sliced {bks} {'joint' if joint else 'sep'} w{w} s{st} x{spp}",
                {"gla_bwd_sliced": {"num_warps": w, "num_stages": st}},
                {
                    "GLA_BWD_SLICED_BKS": bks,
                    "GLA_BWD_SLICED_JOINT": joint,
                    "GLA_BWD_SLICED_SPP": spp,
                    "GLA_BWD_SLICED_VERIFIED_ONLY": 0,
                },
            )
            # (left out, compiled wrong on the H100 by Triton 3.6: 32 channels at 4 warps, illegal memory
            # accesses; 1 stage, wrong dq and dg; 2 stages with 2 slices per program, NaN: s24 runs 1-5)
            for bks, joint, w, st, spp in (
                (16, 1, 4, 3, 1),
                (16, 1, 4, 3, 2),
                (16, 1, 4, 3, 4),
                (16, 1, 8, 3, 2),
                (16, 1, 4, 2, 1),
                (16, 0, 4, 3, 1),
                (16, 1, 8, 3, 1),
            )
        ),
        ("intra_v2 w4", {"intra_v2": {"num_warps": 4}}, {}),
        ("intra_v2 BKS16", {}, {"GLA_INTRA_BKS": 16}),
        ("intra_v2 s2", {"intra_v2": {"num_stages": 2}}, {}),
        ("gla_h w8", {"gla_h": {"num_warps": 8}}, {}),
        ("gla_h 64x64 w8", {"gla_h": {"num_warps": 8}}, {"GLA_H_BV": 64}),
        ("gla_h s3", {"gla_h": {"num_stages": 3}}, {}),
        ("scan 64x64", {}, {"SCAN_BK": 64, "SCAN_BV": 64}),
        ("scan 16x32", {}, {"SCAN_BK": 16}),
        ("local_state w8", {"local_state": {"num_warps": 8}}, {}),
    ],
    "gated_delta": [
        ("dh_v2 BV64", {}, {"DELTA_BV": 64}),
        ("h_v2 BV64", {}, {"DELTA_H_BV": 64}),
        ("h_v2 BV64 w8", {"delta_h_v2": {"num_warps": 8}}, {"DELTA_H_BV": 64}),
        ("dh_v2 BV16 w4", {"delta_bwd_dh_v2": {"num_warps": 4, "num_stages": 3}}, {"DELTA_BV": 16}),
        ("dh_v2 s4", {"delta_bwd_dh_v2": {"num_stages": 4}}, {}),
        ("h_v2 s4", {"delta_h_v2": {"num_stages": 4}}, {}),
        ("h_v2 w8", {"delta_h_v2": {"num_warps": 8}}, {}),
        ("bwd_split s2", {"delta_bwd_chunk": {"num_stages": 2}}, {}),
        ("du_local w8", {"delta_bwd_du_local": {"num_warps": 8}}, {}),
    ],
    "gated_delta_kda": [
        ("dh_v2_channel s3", {"delta_bwd_dh_v2_channel": {"num_stages": 3}}, {}),
        ("h_v2 s2", {"delta_h_v2": {"num_stages": 2}}, {}),
        ("intra_v2 w4", {"intra_v2": {"num_warps": 4}}, {}),
        ("bwd_channel s2", {"delta_bwd_channel": {"num_stages": 2}}, {}),
    ],
}


def largest_rel_diff(got: tuple[Tensor, ...], ref: tuple[Tensor, ...]) -> float:
    """The largest over the tensors of max |got - ref| / max |ref|; NaN when any value of either is not
    finite (Python's max() would drop a NaN that is not first)."""
    worst = 0.0
    for a, r in zip(got, ref, strict=True):
        a32, r32 = a.float(), r.float()
        if not (bool(torch.isfinite(a32).all()) and bool(torch.isfinite(r32).all())):
            return math.nan
        worst = max(worst, float((a32 - r32).abs().max() / r32.abs().max().clamp_min(1e-30)))
    return worst


def sweep(
    b: int, h: int, n: int, d: int, methods: tuple[str, ...], reps: int = 5, budget: float = 120.0,
    only: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    """Launch variants (``SWEEP``) of our fwd+bwd: each timed interleaved with the defaults, and its output
    and gradients compared with the defaults' (the largest difference over the largest value: a variant
    changes tiling and rounding, not the math). A starting point for a default change, which is then
    checked against the recurrence (``linear_gpu_check.py``). ``only``: the variants whose labels are in it
    (all when empty)."""
    unknown = sorted(set(only) - {label for m in methods for label, _, _ in SWEEP.get(m, [])})
    if unknown:
        known = [label for m in methods for label, _, _ in SWEEP.get(m, [])]
        raise ValueError(f"--sweep-only: no variant {unknown} of {methods} in SWEEP; they are: {known}")
    from attnlab.kernels.linear import op as kop

    base_consts = {
        nm: getattr(kop, nm)
        for nm in (
            "SCAN_BK",
            "SCAN_BV",
            "DELTA_BV",
            "DELTA_H_BV",
            "GLA_H_BK",
            "GLA_H_BV",
            "GLA_INTRA_BKS",
            "GLA_BWD_SLICED",
            "GLA_BWD_SLICED_BKS",
            "GLA_BWD_SLICED_JOINT",
            "GLA_BWD_SLICED_UNROLL",
            "GLA_BWD_SLICED_VERIFIED_ONLY",
            "GLA_BWD_SLICED_SPP",
        )
    }
    s = sides(b, h, n, d, methods, fla=False)
    out: dict[str, Any] = {"B": b, "H": h, "N": n, "D": d, "reps": reps}
    t0 = time.perf_counter()

    def setting(over: dict[str, dict[str, int]], consts: dict[str, int]) -> None:
        kop.LAUNCH_OVERRIDES.clear()
        kop.LAUNCH_OVERRIDES.update(over)
        for nm, val in {**base_consts, **consts}.items():
            setattr(kop, nm, val)

    def run(fn: Any, wrt: Any, do: Tensor, over: Any, consts: Any) -> tuple[Tensor, ...]:
        setting(over, consts)
        o = fn()
        return (o.detach(), *torch.autograd.grad(o, wrt, do))

    try:
        for m in methods:
            fn, wrt, do = s[m]
            ref = run(fn, wrt, do, {}, {})
            rows: list[dict[str, Any]] = []
            for label, over, consts in SWEEP.get(m, []):
                if only and label not in only:
                    continue
                if time.perf_counter() - t0 > budget:
                    rows.append({"variant": label, "skipped": "budget"})
                    continue
                try:
                    got = run(fn, wrt, do, over, consts)
                    diff = largest_rel_diff(got, ref)
                    if not math.isfinite(diff):  # (a variant that makes NaN / inf is not timed)
                        rows.append({"variant": label, "error": f"not finite: {diff}"})
                        print(json.dumps({m: rows[-1]}), flush=True)
                        continue
                    # (each round's first side starts on an idle GPU, its host work exposed: a lead call
                    # not reported goes first, so that both sides start with the host ahead)
                    t = interleaved(
                        {
                            "lead": functools.partial(run, fn, wrt, do, {}, {}),
                            "default": functools.partial(run, fn, wrt, do, {}, {}),
                            "variant": functools.partial(run, fn, wrt, do, over, consts),
                        },
                        reps,
                        warmup=1,
                    )
                    rows.append({"variant": label, "max_rel_diff_vs_default": round(diff, 6),
                                 "default": t.get("default"), "variant_t": t.get("variant"),
                                 "variant_over_default": _ratio(t.get("variant"), t.get("default"))})  # fmt: skip
                except Exception as e:
                    rows.append({"variant": label, "error": f"{type(e).__name__}: {e}"[:300]})
                print(json.dumps({m: rows[-1]}), flush=True)
            out[m] = rows
    finally:
        setting({}, {})
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="1x32x8192,1x32x16384,1x32x32768", help="BxHxN,...")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--decode", default="", help="BxH,...: decode steps at these shapes")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which no new shape starts")
    ap.add_argument("--fast-autotune", action="store_true", help="see linear_gpu_check.fast_autotune()")
    ap.add_argument("--fla-limit", type=float, default=0.0, help="seconds per side's warm-up (0: none)")
    ap.add_argument("--fla-max-configs", type=int, default=0, help="see linear_gpu_check.cap_fla_configs()")
    ap.add_argument("--fla-methods", default="", help="time fla's twin of these methods only (default all)")
    ap.add_argument("--profile", default="", help="BxHxN: per-kernel GPU time of our fwd+bwd (profile())")
    ap.add_argument(
        "--profile-fwd",
        action="store_true",
        help="--profile the forward only (fla's twins too when it imports)",
    )
    ap.add_argument("--sweep", default="", help="BxHxN: launch variants of our kernels (sweep())")
    ap.add_argument("--sweep-budget", type=float, default=120.0)
    ap.add_argument("--sweep-only", default="", help="label,...: only these SWEEP variants")
    ap.add_argument(
        "--decode-host", default="", help="BxHxD,...: what a decode step launches (decode_host())"
    )
    ap.add_argument(
        "--ab-flags",
        default="",
        help="comma list of boolean flags of attnlab.kernels.linear.op: each adds a side with it off per method "
        "it applies to (GLA_*: gla, lightning, linear; others: gated_delta, KDA)",
    )
    ap.add_argument(
        "--ab-values",
        default="",
        help="comma list of NAME=VALUE[+NAME=VALUE...] settings of attnlab.kernels.linear.op (off/on, ints, "
        "floats, strings): each item adds a side with those values per method they apply to (GLA_*: gla, "
        "lightning, linear)",
    )
    ap.add_argument(
        "--check-ab",
        action="store_true",
        help="--check also runs every --ab-flags / --ab-values side (its setting for the whole call)",
    )
    ap.add_argument("--check-no-fla", action="store_true", help="--check leaves fla out")
    ap.add_argument(
        "--wy-ab",
        action="store_true",
        help="also time gated_delta / KDA with the previous delta-rule forward (op.WY_BLOCKWISE, "
        "op.DELTA_FUSED_GLUE off)",
    )
    ap.add_argument(
        "--l2norm-ab",
        action="store_true",
        help="also time gated_delta / KDA with the old PyTorch q/k L2 norm (op.FUSED_L2NORM off)",
    )
    ap.add_argument(
        "--gla-split-ab",
        action="store_true",
        help="also time gla with its one-kernel backward (op.GLA_BWD_SPLIT off)",
    )
    ap.add_argument(
        "--cpu", action="store_true", help="run on the CPU (TRITON_INTERPRET=1; --decode-host only)"
    )
    ap.add_argument(
        "--check",
        default="",
        help="BxHxN[:grad],...: first check every method (and with --l2norm-ab the old norm path, fla when "
        "it imports) against the fp32 recurrence (linear_gpu_check.check, the 2x rule)",
    )
    ap.add_argument("--check-budget", type=float, default=200.0, help="seconds after which no check starts")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    global DEV, L2NORM_AB, GLA_SPLIT_AB, WY_AB, AB_FLAGS, AB_VALUES
    WY_AB = args.wy_ab
    AB_FLAGS = tuple(filter(None, args.ab_flags.split(",")))
    AB_VALUES = tuple(parse_setting(a) for a in filter(None, args.ab_values.split(",")))
    from attnlab.kernels.linear import op as linear_op

    for nm in (*AB_FLAGS, *(nm for x in AB_VALUES for nm, _ in x)):
        if not hasattr(linear_op, nm):
            raise SystemExit(f"--ab-flags / --ab-values: attnlab.kernels.linear.op has no setting {nm}")
    L2NORM_AB = args.l2norm_ab
    if L2NORM_AB:  # "ours": the fused norm (the default since checked on the H100); the A/B side: the old one
        from attnlab.kernels.linear import op

        op.FUSED_L2NORM = True
    GLA_SPLIT_AB = args.gla_split_ab
    if args.cpu:  # (only --decode-host and --check run on a CPU: a smoke test at tiny shapes)
        import linear_gpu_check

        DEV = linear_gpu_check.DEV = "cpu"
        args.shapes = args.decode = args.profile = args.sweep = ""
    if args.fast_autotune:
        fast_autotune()
    global WARMUP_LIMIT, FLA_METHODS
    WARMUP_LIMIT = args.fla_limit
    FLA_METHODS = frozenset(args.fla_methods.split(",")) if args.fla_methods else None
    start = time.perf_counter()
    methods = tuple(args.methods.split(","))
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                              "torch": torch.__version__, "rows": [], "decode": [], "decode_host": [],
                              "checks": []}  # fmt: skip
    fla = not args.no_fla and DEV == "cuda"
    if fla:
        try:
            import fla as fla_mod

            result["fla"] = getattr(fla_mod, "__version__", "?")
            if args.fla_max_configs:
                result["fla_configs"] = cap_fla_configs(args.fla_max_configs)
        except Exception as e:
            result["fla"] = f"not importable: {type(e).__name__}: {e}"[:300]
            fla = False

    def save(key: str, row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)
        result[key].append(row)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for shape in filter(None, args.check.split(",")):
        dims, _, flag = shape.partition(":")
        b, h, n = (int(x) for x in dims.split("x"))
        for method in methods:
            if time.perf_counter() - start > args.check_budget:
                save("checks", {"skipped": f"{method} {shape}", "why": "check budget"})
                continue
            api = "gated_delta" if method.startswith("gated_delta") else method
            ab_sides = register_check_sides(api) if args.check_ab else ()
            sides_ = (
                "attnlab",
                *ab_sides,
                *(("attnlab-old-l2norm",) if L2NORM_AB else ()),
                *(("attnlab-gla-one-kernel",) if GLA_SPLIT_AB else ()),
                *(("fla",) if fla and not args.check_no_fla else ()),
            )
            try:
                rows = check(method, b, h, n, args.head_dim, grad=flag == "grad", sides=sides_)
                for r in rows:
                    save("checks", r)
            except Exception as e:
                save("checks", {"case": f"{method} {shape}", "error": f"{type(e).__name__}: {e}"[:500]})
            torch.cuda.empty_cache()
    for shape in filter(None, args.decode_host.split(",")):
        b, h, d = (int(x) for x in shape.split("x"))
        save("decode_host", decode_host(b, h, d, tuple(m for m in methods if m != "hedgehog")))
    for shape in filter(None, args.decode.split(",")):
        if time.perf_counter() - start > args.budget:
            save("decode", {"skipped": shape, "why": "budget"})
            continue
        b, h = (int(x) for x in shape.split("x"))
        try:
            save("decode", decode(b, h, args.head_dim, methods, fla))
        except Exception as e:
            save("decode", {"shape": shape, "error": f"{type(e).__name__}: {e}"[:500]})
        torch.cuda.empty_cache()
    for shape in filter(None, args.shapes.split(",")):
        if time.perf_counter() - start > args.budget:
            save("rows", {"skipped": shape, "why": "budget"})
            continue
        b, h, n = (int(x) for x in shape.split("x"))
        try:
            save("rows", bench(b, h, n, args.head_dim, methods, fla, args.reps))
        except Exception as e:
            save("rows", {"shape": shape, "error": f"{type(e).__name__}: {e}"[:500]})
        torch.cuda.empty_cache()
    for key, arg, fn in (("profile", args.profile, profile), ("sweep", args.sweep, sweep)):
        if not arg:
            continue
        if time.perf_counter() - start > args.budget:
            result[key] = {"skipped": arg, "why": "budget"}
            continue
        b, h, n = (int(x) for x in arg.split("x"))
        kw: dict[str, Any] = (
            {"budget": args.sweep_budget, "only": tuple(filter(None, args.sweep_only.split(",")))}
            if key == "sweep"
            else {"fwd_only": args.profile_fwd, "fla": fla}
        )
        try:
            result[key] = fn(b, h, n, args.head_dim, tuple(m for m in methods if m != "hedgehog"), **kw)
        except Exception as e:
            result[key] = {"shape": arg, "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps({key: result[key]})[:3000], flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - start, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
