"""Timing of the linear family as called (``attnlab.prepare(method, causal=True)(q, k, v, ...)``, the
Triton backend chosen by the API) against cuDNN SDPA (dense causal softmax) on the same shapes: median ms
of forward and of forward + backward over CUDA-event timed runs after warm-up. No fla-core here.

    python benchmarks/linear_bench.py --lengths 4096,16384 --out linear_bench.json

The linear methods are not in the global registry yet (attnlab/catalog/linear/__init__.py says why):
this script registers them for its process.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _median_ms(fn: Callable[[], Any], reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench(b: int, h: int, n: int, d: int) -> dict[str, Any]:
    """Median ms (fwd, fwd+bwd) of each method as called and of cuDNN SDPA, bf16, causal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnlab
    from attnlab.catalog.linear import register_methods

    register_methods()
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn(b, h, n, d, device=dev, dtype=dt)
    g = (F.logsigmoid(torch.randn(b, h, n, d, device=dev) + 3) / 4).requires_grad_(True)
    beta = torch.rand(b, h, n, device=dev, requires_grad=True)
    sides: dict[str, tuple[Callable[[], Tensor], tuple[Tensor, ...]]] = {}

    def sdpa() -> Tensor:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    sides["cudnn_sdpa"] = (sdpa, (q, k, v))
    for name, extra, wrt in (
        ("linear", {}, (q, k, v)),
        ("lightning", {}, (q, k, v)),
        ("gla", {"g": g}, (q, k, v, g)),
        ("gated_delta", {"g": g, "beta": beta}, (q, k, v, g, beta)),
    ):
        op = attnlab.prepare(name, causal=True)
        sides[name] = (lambda op=op, extra=extra: op(q, k, v, **extra).out, wrt)  # type: ignore[misc]
    out: dict[str, Any] = {"B": b, "H": h, "N": n, "D": d, "dtype": "bfloat16"}
    for name, (fn, wrt) in sides.items():
        try:
            with torch.no_grad():
                fwd = _median_ms(fn)
            fb = _median_ms(lambda fn=fn, wrt=wrt: torch.autograd.grad(fn(), wrt, do))
            out[name] = {"fwd_ms": round(fwd, 4), "fwd_bwd_ms": round(fb, 4)}
        except Exception as e:  # recorded, and the others still run
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    base = out["cudnn_sdpa"]
    for name in sides:
        if name != "cudnn_sdpa" and "fwd_ms" in out[name] and "fwd_ms" in base:
            out[name]["fwd_speedup_vs_cudnn"] = round(base["fwd_ms"] / out[name]["fwd_ms"], 3)
            out[name]["fwd_bwd_speedup_vs_cudnn"] = round(base["fwd_bwd_ms"] / out[name]["fwd_bwd_ms"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        rows.append(bench(args.batch, args.heads, n, args.head_dim))
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
