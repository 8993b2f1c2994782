"""FlashSigmoid kernel against cuDNN SDPA softmax on the GPU: correctness at scale, then speed.

    python benchmarks/sigmoid_kernel.py --out results.json

1. Correctness: the Triton kernel vs the fp32 reference under the accuracy rule (attnlab.testing) at
   N=4096 (forward and every gradient), causal and not, MHA and GQA 4:1.
2. Speed (bf16, D=128, H=32, B=1): forward, backward (fwd+bwd minus fwd) and fwd+bwd of the kernel,
   of FlexAttention's sigmoid form, and of cuDNN SDPA softmax in the same run, timed in interleaved rounds
   (``measure_interleaved``); ratio = t_cudnn / t_ours (target: forward >= 0.9, backward >= 0.7).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.nn.attention import SDPBackend

import attnlab
from attnlab.bench.env import environment
from attnlab.bench.timing import attention_flops, measure_interleaved
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.masks import dense_pairs
from attnlab.testing import Case, check_parity


def correctness(device: torch.device) -> list[dict]:
    spec = attnlab.get("sigmoid")
    rows = []
    for causal in (False, True):
        for kv in (8, 2):
            for n_q, n_k in ((4096, 4096), (1024, 4096)):
                case = Case(1, 8, kv, n_q, n_k, 128, torch.bfloat16, causal)
                check = check_parity(spec, "triton", case, device)
                rows.append({"case": case.label(), "passed": check.passed, "detail": check.summary()})
                print("check", case.label(), check.summary(), flush=True)
    return rows


def point(device: torch.device, n: int, causal: bool, heads: int, d: int) -> dict:
    from attnlab.kernels.sigmoid import op

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, n, d, generator=g).to(device, torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    scale, bias = d**-0.5, -math.log(n)
    f_fwd = attention_flops(1, heads, n, n, d, d, dense_pairs(n, n, causal), "fwd")
    fns = {
        "cudnn_softmax": lambda: sdpa_dense(
            q, k, v, causal=causal, scale=scale, kernels=[SDPBackend.CUDNN_ATTENTION]
        ),
        "triton_sigmoid": lambda: op.sigmoid_attention(q, k, v, scale, bias, causal),
        "flex_sigmoid": lambda: attnlab.attention(
            q, k, v, method="sigmoid", causal=causal, backend="flex", check_finite=False
        ),
    }
    row: dict = {"n": n, "causal": causal, "heads": heads, "head_dim": d}

    def no_grad(fn):  # type: ignore[no-untyped-def]
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    def with_grad(fn):  # type: ignore[no-untyped-def]
        return lambda: torch.autograd.grad(fn(), (q, k, v), do)

    # the three implementations take turns call by call, so their ratios see the same GPU state
    t_f = measure_interleaved({name: no_grad(fn) for name, fn in fns.items()}, device, target_s=2.0)
    bwd_only = lambda: op.sigmoid_bwd_launch(do, q, k, v, scale, bias, causal)
    t_fb = measure_interleaved(
        {**{name: with_grad(fn) for name, fn in fns.items()}, "triton_sigmoid_bwd_only": bwd_only},
        device,
        target_s=2.0,
    )
    for name in fns:
        f_ms, fb_ms = t_f[name].median_ms, t_fb[name].median_ms
        row[f"{name}_fwd_ms"] = f_ms
        row[f"{name}_fwdbwd_ms"] = fb_ms
        row[f"{name}_bwd_ms"] = fb_ms - f_ms
        row[f"{name}_fwd_tflops"] = f_fwd / f_ms / 1e9
        row[f"{name}_bwd_tflops"] = 2.5 * f_fwd / max(fb_ms - f_ms, 1e-9) / 1e9
    t_b = t_fb["triton_sigmoid_bwd_only"].median_ms
    row["triton_sigmoid_bwd_only_ms"] = t_b
    row["triton_sigmoid_bwd_only_tflops"] = 2.5 * f_fwd / t_b / 1e9
    row["fwd_ratio_vs_cudnn"] = row["cudnn_softmax_fwd_ms"] / row["triton_sigmoid_fwd_ms"]
    row["bwd_ratio_vs_cudnn"] = row["cudnn_softmax_bwd_ms"] / t_b
    row["fwd_ratio_flex_vs_cudnn"] = row["cudnn_softmax_fwd_ms"] / row["flex_sigmoid_fwd_ms"]
    return row


def speed(device: torch.device, lengths: list[int], heads: int, d: int) -> list[dict]:
    from attnlab.kernels.sigmoid import op

    rows = []
    for n in lengths:
        for causal in (False, True):
            row = point(device, n, causal, heads, d)
            print(
                json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                flush=True,
            )
            rows.append(row)
    configs = {}
    for name, variants in (("fwd", op._FWD), ("dkdv", op._DKDV), ("dq", op._DQ)):
        configs[name] = {str(k): str(c) for k, c in variants[0].cache.items()}
    return [*rows, {"autotune": configs}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sigmoid_kernel.json")
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda")
    result = {"env": environment(device)}
    if not args.skip_check:
        result["correctness"] = correctness(device)
    result["speed"] = speed(device, [int(x) for x in args.lengths.split(",")], args.heads, args.head_dim)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
