"""Efficiency: latency, peak memory, dense-equivalent TFLOP/s, speedup over dense SDPA, density.

For each (pattern, length, mode) the dense baseline is timed first in the same run: SDPA restricted to
cuDNN on CUDA (with flash, mem-efficient and FlexAttention as peers), PyTorch's default SDPA on CPU.
Each method's parameter sets (``bench_params``) then run on every backend that can take the call; a
backend is timed only after a small parity check of it against the reference passed on this device.
"""

from __future__ import annotations

import functools
import json
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

import attnlab
from attnlab.backends.base import Call
from attnlab.bench.config import BenchConfig, shapes
from attnlab.bench.timing import Timing, attention_flops, measure, measure_interleaved
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.masks import MaskContext, block_layout, causal_mask, dense_pairs
from attnlab.patterns import Pattern
from attnlab.testing import Case, check_parity

PEERS_CUDA: dict[str, SDPBackend] = {
    "sdpa:cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa:flash": SDPBackend.FLASH_ATTENTION,
    "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION,
}


@dataclass(frozen=True)
class PlannedRow:
    method: str
    params: dict[str, Any]
    pattern: Pattern
    n: int
    mode: str


def planned_rows(
    lengths: tuple[int, ...],
    methods: tuple[str, ...] | None,
    patterns: tuple[Pattern, ...] = (Pattern.CAUSAL_SELF,),
    modes: tuple[str, ...] = ("fwd",),
    budgets: str = "all",
) -> list[PlannedRow]:
    """Every (method, parameters, pattern, length, mode) a run will time, from the registry."""
    rows = []
    for name, spec in attnlab.methods().items():
        if methods is not None and name not in methods:
            continue
        for pattern in patterns:
            if pattern not in spec.patterns:
                continue
            for n in lengths:
                sets = spec.bench_params(n)
                for params in sets if budgets == "all" else sets[:1]:
                    for mode in modes:
                        rows.append(PlannedRow(name, dict(params), pattern, n, mode))
    return rows


def _inputs(cfg: BenchConfig, n_q: int, n_k: int, grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    dev, dt = cfg.torch_device, cfg.torch_dtype

    def make(h: int, n: int) -> Tensor:
        return torch.randn(cfg.batch, h, n, cfg.head_dim, generator=g).to(dev, dt).requires_grad_(grad)

    q, k, v = make(cfg.heads, n_q), make(cfg.n_kv_heads, n_k), make(cfg.n_kv_heads, n_k)
    dout = torch.randn(cfg.batch, cfg.heads, n_q, cfg.head_dim, generator=g).to(dev, dt)
    return q, k, v, dout


def _runner(
    fn: Callable[[], Tensor], mode: str, q: Tensor, k: Tensor, v: Tensor, dout: Tensor
) -> Callable[[], Any]:
    if mode == "fwd":

        def fwd() -> Any:
            with torch.no_grad():
                return fn()

        return fwd

    def fwd_bwd() -> Any:
        return torch.autograd.grad(fn(), (q, k, v), dout)

    return fwd_bwd


def _densities(
    spec: attnlab.MethodSpec, params: Any, n_q: int, n_k: int, causal: bool, device: torch.device
) -> tuple[float, float]:
    """(token density, block density) relative to the dense pattern, with 128 x 128 tiles."""
    pairs = dense_pairs(n_q, n_k, causal)
    if spec.mask is None:
        return 1.0, 1.0
    ctx = MaskContext(n_q, n_k, causal, device)
    layout = block_layout(spec.mask(params, ctx), n_q, n_k, device)
    dense_layout = block_layout(causal_mask(params, ctx), n_q, n_k, device)
    return layout.allowed / pairs, layout.computed_blocks / max(1, dense_layout.computed_blocks)


class EfficiencyRun:
    """Times a config's planned rows; call :meth:`rows` to iterate result dicts."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> None:
        self.cfg = cfg
        self.log = log
        self.checks: dict[tuple[Any, ...], tuple[bool, str]] = {}
        self.check_rows: list[dict[str, Any]] = []

    def plan(self) -> list[PlannedRow]:
        c = self.cfg
        return planned_rows(c.lengths, c.methods, c.patterns, c.modes, c.budgets)

    def groups(self) -> list[tuple[Pattern, int, str]]:
        return [(p, n, m) for p in self.cfg.patterns for n in self.cfg.lengths for m in self.cfg.modes]

    def _check(
        self,
        spec: attnlab.MethodSpec,
        backend: str,
        params: dict[str, Any],
        causal: bool,
        cross: bool,
        grad: bool,
    ) -> tuple[bool, str]:
        key = (spec.name, backend, json.dumps(params, sort_keys=True), causal, cross, grad)
        if key not in self.checks:
            c = self.cfg
            n_q, n_k = (96, 384) if cross else (384, 384)
            case = Case(
                1, 4, max(1, 4 * c.n_kv_heads // c.heads), n_q, n_k, c.head_dim, c.torch_dtype, causal, params
            )
            try:
                res = check_parity(spec, backend, case, c.torch_device, backward=grad)
                ok, detail = (res.passed or bool(res.skipped)), res.summary()
            except Exception as e:  # a crash in the check is a failed check, recorded
                ok, detail = False, f"error: {type(e).__name__}: {e}"
            self.checks[key] = (ok, detail)
            self.check_rows.append(
                {
                    "method": spec.name,
                    "backend": backend,
                    "params": key[2],
                    "pattern": ("causal_" if causal else "noncausal_") + ("cross" if cross else "self"),
                    "dtype": c.dtype,
                    "grad": grad,
                    "passed": ok,
                    "detail": detail,
                }
            )
        return self.checks[key]

    def _time(self, fn: Callable[[], Any], baseline: Callable[[], Any] | None = None) -> dict[str, Any]:
        """Latency and peak memory of ``fn``; with ``baseline`` (and ``paired`` configs) the latency comes
        from interleaved rounds with the baseline, whose median there is returned as ``paired_baseline_ms``."""
        from torch._dynamo.utils import counters

        c = self.cfg
        before = counters["stats"]["unique_graphs"]
        paired: dict[str, float] = {}
        try:
            t = measure(fn, c.torch_device, target_s=c.target_s, max_reps=c.max_reps)
            if baseline is not None and c.paired:
                both = measure_interleaved(
                    {"baseline": baseline, "row": fn},
                    c.torch_device,
                    target_s=2 * c.target_s,
                    max_reps=c.max_reps,
                )
                t = Timing(both["row"].median_ms, both["row"].min_ms, both["row"].reps, t.peak_mem_mb)
                paired["paired_baseline_ms"] = both["baseline"].median_ms
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"status": "oom"}
        except Exception as e:
            self.log(traceback.format_exc(limit=3))
            return {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}
        return {
            "status": "ok",
            "median_ms": t.median_ms,
            "min_ms": t.min_ms,
            "reps": t.reps,
            "peak_mem_mb": t.peak_mem_mb,
            "compiles": counters["stats"]["unique_graphs"] - before,
            **paired,
        }

    def rows(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        for pattern, n, mode in self.groups():
            todo = [r for r in plan if r.pattern == pattern and r.n == n and r.mode == mode]
            yield from self._group(pattern, n, mode, todo)
            if self.cfg.torch_device.type == "cuda":
                torch.cuda.empty_cache()

    def _group(self, pattern: Pattern, n: int, mode: str, todo: list[PlannedRow]) -> Iterator[dict[str, Any]]:
        """The dense baseline (and peers), then every planned row, at one (pattern, length, mode)."""
        c = self.cfg
        n_q, n_k = shapes(pattern, n)
        grad = mode == "fwd_bwd"
        q, k, v, dout = _inputs(c, n_q, n_k, grad)
        causal = pattern.causal
        pairs = dense_pairs(n_q, n_k, causal)
        flops = attention_flops(c.batch, c.heads, n_q, n_k, c.head_dim, c.head_dim, pairs, mode)
        common = {
            "pattern": pattern.value,
            "batch": c.batch,
            "heads": c.heads,
            "kv_heads": c.n_kv_heads,
            "n_q": n_q,
            "n_k": n_k,
            "head_dim": c.head_dim,
            "dtype": c.dtype,
            "mode": mode,
        }

        def finish(row: dict[str, Any], baseline: float | None) -> dict[str, Any]:
            baseline = row.pop("paired_baseline_ms", baseline)  # the baseline's time in the same rounds
            if row.get("median_ms"):
                row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
                if baseline:
                    row["speedup"] = baseline / row["median_ms"]
                    row["baseline_ms"] = baseline
            return {**common, **row}

        def dense(kernel: SDPBackend | None) -> Tensor:
            return sdpa_dense(
                q,
                k,
                v,
                causal=causal,
                scale=c.head_dim**-0.5,
                kernels=[kernel] if kernel is not None else None,
            )

        def method(r: PlannedRow, backend: str) -> Tensor:
            return attnlab.attention(
                q, k, v, method=r.method, causal=causal, backend=backend, check_finite=False, **r.params
            )

        baseline_ms: float | None = None
        baseline_fn: Callable[[], Any] | None = None
        peers: dict[str, SDPBackend | None] = {"sdpa:default": None}
        if c.torch_device.type == "cuda":
            peers = dict(PEERS_CUDA)
        if not c.peers:  # the baseline only
            peers = dict(list(peers.items())[:1])
        for label, kernel in peers.items():
            fn = _runner(functools.partial(dense, kernel), mode, q, k, v, dout)
            row = self._time(fn, baseline_fn)
            if baseline_ms is None and row.get("median_ms"):
                baseline_ms, baseline_fn = row["median_ms"], fn
                row["baseline_of_run"] = True
            self.log(f"{pattern.value} n={n} {mode} {label}: {row.get('median_ms', row['status'])}")
            yield finish(
                {
                    "method": "softmax",
                    "backend": label,
                    "params": "{}",
                    "density": 1.0,
                    "block_density": 1.0,
                    **row,
                },
                baseline_ms,
            )
        for r in todo:
            spec = attnlab.get(r.method)
            params = spec.make_params(r.params)
            density, block_density = _densities(spec, params, n_q, n_k, causal, c.torch_device)
            call = attnlab.resolve(q, k, v, method=r.method, causal=causal, check_finite=False, **r.params)
            for backend in spec.backends:
                base = {
                    "method": r.method,
                    "backend": backend.name,
                    "params": json.dumps(r.params, sort_keys=True),
                    "density": density,
                    "block_density": block_density,
                }
                ok, why = backend.can_use(Call(spec, params, call.problem, call.scale))
                if not ok:
                    yield finish({**base, "status": f"refused: {why}"}, None)
                    continue
                passed, detail = self._check(spec, backend.name, r.params, causal, pattern.cross, grad)
                if not passed:
                    yield finish({**base, "status": f"incorrect: {detail}"}, None)
                    continue
                row = self._time(
                    _runner(functools.partial(method, r, backend.name), mode, q, k, v, dout), baseline_fn
                )
                self.log(
                    f"{pattern.value} n={n} {mode} {r.method}{r.params} {backend.name}: "
                    f"{row.get('median_ms', row['status'])}"
                )
                yield finish({**base, **row}, baseline_ms)
