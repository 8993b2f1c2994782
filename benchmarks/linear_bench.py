"""Timing of the linear family's Triton kernels against cuDNN SDPA (dense causal softmax) on the same shapes,
bf16: forward and forward + backward, CUDA events, each rep of a kernel interleaved with a rep of cuDNN
(the same clocks and thermal state for both), min / median / IQR over the reps after warm-up.

The sides call the kernel entry points the Triton backends call (``attnlab.kernels.linear.op.gla_chunk``
and ``delta_chunk``) with the inputs each method hands them: ``gla`` per-channel log-decays (learned),
``lightning`` the ALiBi per-head decays broadcast over the channels (the scalar-gate kernels), ``linear``
no gate (its feature map is elementwise work before the kernel, not timed), ``gated_delta`` a per-head
gate (Gated DeltaNet; q, k L2-normalised beforehand) and ``gated_delta_kda`` a per-channel gate (KDA).
``--api`` also times ``attnlab.prepare(method, causal=True)`` calls (feature maps, checks, dispatch).
No fla-core here.

    python benchmarks/linear_bench.py --shapes 1x16x4096,4x32x16384 --out linear_bench.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _stats(ts: list[float]) -> dict[str, float]:
    s = sorted(ts)
    n = len(s)

    def q(p: float) -> float:
        x = p * (n - 1)
        lo = int(x)
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return {"min_ms": round(s[0], 4), "median_ms": round(q(0.5), 4), "iqr_ms": round(q(0.75) - q(0.25), 4),
            "reps": n}  # fmt: skip


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Per side, CUDA-event times of ``reps`` runs, the sides taking turns within each round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        events = []
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize()
        for name, start, end in events:
            times[name].append(start.elapsed_time(end))
    return {name: _stats(ts) for name, ts in times.items()}


def _sides(
    b: int, h: int, n: int, d: int, dev: str = "cuda"
) -> tuple[dict[str, tuple[Callable[[], Tensor], list[Tensor]]], Tensor]:
    from attnlab.catalog.linear.lightning import alibi_slopes
    from attnlab.kernels.linear.op import delta_chunk, gla_chunk

    dt = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn(b, h, n, d, device=dev, dtype=dt, generator=gen).requires_grad_(True) for _ in range(3)
    )
    qn, kn = (F.normalize(t.detach().float(), dim=-1).to(dt).requires_grad_(True) for t in (q, k))
    do = torch.randn(b, h, n, d, device=dev, dtype=dt, generator=gen)
    g = (F.logsigmoid(torch.randn(b, h, n, d, device=dev, generator=gen) + 3) / 4).requires_grad_(True)
    g_head = F.logsigmoid(torch.randn(b, h, n, 1, device=dev, generator=gen) + 3).requires_grad_(True)
    g_kda = F.logsigmoid(torch.randn(b, h, n, d, device=dev, generator=gen) + 4).requires_grad_(True)
    # (negated before the expand: a stride-0 gate, as lightning.py hands the kernels; negating the expanded
    # tensor would materialise it and time the per-channel kernels, as the run at 2c5277b did)
    slopes = (-torch.tensor(alibi_slopes(h), device=dev))[None, :, None, None].expand(b, h, n, d)
    beta = torch.sigmoid(torch.randn(b, h, n, device=dev, generator=gen)).requires_grad_(True)
    scale = d**-0.5

    def sdpa() -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    sides: dict[str, tuple[Callable[[], Tensor], list[Tensor]]] = {
        "cudnn_sdpa": (sdpa, [q, k, v]),
        "linear": (lambda: gla_chunk(q, k, v, None, scale, None, 64)[0], [q, k, v]),
        "lightning": (lambda: gla_chunk(q, k, v, slopes, scale, None, 64)[0], [q, k, v]),
        "gla": (lambda: gla_chunk(q, k, v, g, scale, None, 64)[0], [q, k, v, g]),
        "gated_delta": (lambda: delta_chunk(qn, kn, v, beta, g_head, scale, None, 64)[0], [qn, kn, v, beta, g_head]),
        "gated_delta_kda": (lambda: delta_chunk(qn, kn, v, beta, g_kda, scale, None, 64)[0], [qn, kn, v, beta, g_kda]),
    }  # fmt: skip
    return sides, do


def _fwd_bwd(fn: Callable[[], Tensor], wrt: list[Tensor], do: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(fn(), wrt, do)


def bench(b: int, h: int, n: int, d: int, reps: int = 10, backward: bool = True) -> dict[str, Any]:
    """min/median/IQR ms of forward and forward+backward, each method interleaved with cuDNN SDPA."""
    sides, do = _sides(b, h, n, d)
    out: dict[str, Any] = {"B": b, "H": h, "N": n, "D": d, "dtype": "bfloat16", "chunk": 64}
    sdpa_fn, sdpa_wrt = sides.pop("cudnn_sdpa")
    for name, (fn, wrt) in sides.items():
        row: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                fwd = interleaved({name: fn, "cudnn_sdpa": sdpa_fn}, reps)
            row["fwd"], row["cudnn_fwd"] = fwd[name], fwd["cudnn_sdpa"]
            row["fwd_speedup_vs_cudnn"] = round(fwd["cudnn_sdpa"]["median_ms"] / fwd[name]["median_ms"], 3)
            if backward:
                fb = interleaved(
                    {
                        name: functools.partial(_fwd_bwd, fn, wrt, do),
                        "cudnn_sdpa": functools.partial(_fwd_bwd, sdpa_fn, sdpa_wrt, do),
                    },
                    reps,
                )
                row["fwd_bwd"], row["cudnn_fwd_bwd"] = fb[name], fb["cudnn_sdpa"]
                row["fwd_bwd_speedup_vs_cudnn"] = round(
                    fb["cudnn_sdpa"]["median_ms"] / fb[name]["median_ms"], 3
                )
            row["seconds"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # recorded, and the others still run
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        out[name] = row
    return out


def bench_api(b: int, h: int, n: int, d: int, reps: int = 10) -> dict[str, Any]:
    """Forward median ms of each method as called through ``attnlab.prepare`` (feature maps, checks and
    dispatch included), interleaved with cuDNN SDPA."""
    import attnlab
    from attnlab.catalog.linear import register_methods

    register_methods()
    sides, _ = _sides(b, h, n, d)
    q, k, v = sides["cudnn_sdpa"][1]
    g = sides["gla"][1][3]
    beta, g_head = sides["gated_delta"][1][3:]
    out: dict[str, Any] = {"B": b, "H": h, "N": n, "D": d, "dtype": "bfloat16", "via": "attnlab.prepare"}
    for name, extra in (
        ("linear", {}),
        ("lightning", {}),
        ("gla", {"g": g}),
        ("gated_delta", {"g": g_head, "beta": beta}),
    ):
        try:
            op = attnlab.prepare(name, causal=True)
            with torch.no_grad():
                r = interleaved(
                    {
                        name: functools.partial(op, q, k, v, **extra),
                        "cudnn_sdpa": sides["cudnn_sdpa"][0],
                    },
                    reps,
                )
            out[name] = {"fwd": r[name], "cudnn_fwd": r["cudnn_sdpa"]}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
    return out


def profile(b: int, h: int, n: int, d: int, path: str) -> None:
    """Per-kernel GPU time of one forward + backward of each side (torch.profiler), as a text table per
    side: where each method's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sides, do = _sides(b, h, n, d)
    with open(path, "w") as f:
        for name, (fn, wrt) in sides.items():
            for _ in range(2):
                _fwd_bwd(fn, wrt, do)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    _fwd_bwd(fn, wrt, do)
                torch.cuda.synchronize()
            f.write(f"== {name} B={b} H={h} N={n} D={d}: 3 x (forward + backward)\n")
            f.write(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
            )
            f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="1x16x4096,1x32x16384", help="BxHxN,...")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--api", action="store_true")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which no new shape starts")
    ap.add_argument("--profile", default="", help="BxHxN: write a per-kernel profile to --out + .prof.txt")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    start = time.perf_counter()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for shape in args.shapes.split(","):
        if time.perf_counter() - start > args.budget:
            result["rows"].append({"skipped": shape, "why": "budget"})
            continue
        b, h, n = (int(x) for x in shape.split("x"))
        result["rows"].append(bench(b, h, n, args.head_dim, args.reps))
        print(json.dumps(result["rows"][-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.profile:
        b, h, n = (int(x) for x in args.profile.split("x"))
        try:
            profile(b, h, n, args.head_dim, args.out + ".prof.txt")
        except Exception as e:
            result["profile_error"] = f"{type(e).__name__}: {e}"[:400]
    if args.api:
        b, h, n = (int(x) for x in args.shapes.split(",")[0].split("x"))
        try:
            result["api"] = bench_api(b, h, n, args.head_dim, args.reps)
        except Exception as e:
            result["api"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        print(json.dumps(result["api"]), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
