"""Packed sequences (``cu_seqlens``) on the GPU: FlexAttention in one launch (``FlexBackend.run_varlen``)
against the block-sparse executor in one launch and the per-sequence path, after a correctness check.

    python benchmarks/flex_varlen_bench.py --out-dir DIR            # the issue's measurement (GPU)
    python benchmarks/flex_varlen_bench.py --smoke --out-dir DIR    # tiny shapes, CPU dry run of the logic

For each method (softmax, sliding_window with window 1024, alibi) and packing (``PACKINGS``: documents of
mixed lengths summing to 16K and 32K tokens, bf16, H=32, H_kv=8, D=128, causal):

1. ``check``: the one-launch Flex output against the fp32 reference run sequence by sequence, on each
   sequence's last ``CHECK_ROWS`` query rows (a cross shape, bottom-right causal, so no N x N fp32 tensor),
   with attnlab.testing's rule: error at most 2x that of the same reference run in bf16, plus a floor;
   the forward + backward side's gradients are not checked here (tests/test_flex_varlen.py covers the
   packing logic on CPU; the GPU parity suite covers Flex's backward).
2. ``recompiles``: dynamo's compiled-graph count after the first packed call, after a second packing of
   the same total, after a total of the same table size and after a total of the next size (the claim of
   ``run_varlen``'s docstring: no recompilation within one table size).
3. ``timing``: forward and forward + backward, interleaved (``measure_interleaved``, CUDA events): ``flex``
   (one launch), ``block_sparse`` (one launch) and ``per_sequence`` (each sequence through the method's
   prepared op, outputs concatenated: what a packed call ran before Flex took packed calls). The
   question it answers: which one-launch backend should come first for packed calls of each method
   (softmax lists flex before block_sparse, so Flex now takes its packed calls).

Rows go to ``DIR/flex_varlen.jsonl`` with the environment (device, versions, commit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._dynamo.utils import counters

import attnlab
from attnlab.backends.flex import table_size
from attnlab.bench.env import environment
from attnlab.bench.timing import measure_interleaved
from attnlab.testing import FWD_FACTOR, bound, max_abs

CHECK_ROWS = 128
METHODS: dict[str, dict[str, Any]] = {"softmax": {}, "sliding_window": {"window": 1024}, "alibi": {}}
SMOKE_METHODS: dict[str, dict[str, Any]] = {"softmax": {}, "sliding_window": {"window": 7}}


def lengths(total: int, count: int, seed: int, minimum: int = 1) -> list[int]:
    """``count`` random lengths (each >= ``minimum``) summing to ``total`` (seeded)."""
    rng = random.Random(seed)
    m = total - count * (minimum - 1)  # parts >= 1 summing to m, then minimum - 1 added to each
    cuts = sorted(rng.sample(range(1, m), count - 1))
    return [b - a + minimum - 1 for a, b in zip([0, *cuts], [*cuts, m], strict=True)]


def packings(smoke: bool) -> dict[str, list[int]]:
    if smoke:
        return {"smoke_a": [5, 1, 40, 17], "smoke_b": [30, 3, 20, 10]}
    return {
        "16k_8docs": lengths(16384, 8, 1, 64),
        "32k_32docs": lengths(32768, 32, 2, 64),
        "32k_skewed": [16384, 8192, 4096, 2048, 1024, 512, 256, 256],
    }


def cu(lens: list[int], device: torch.device) -> Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def qkv(total: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype, device: torch.device,
        grad: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    g = torch.Generator().manual_seed(total)
    q = torch.randn(1, heads, total, d, generator=g)
    k, v = (torch.randn(1, kv_heads, total, d, generator=g) for _ in range(2))
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v))  # type: ignore[return-value]


def check(
    method: str, params: dict[str, Any], lens: list[int], q: Tensor, k: Tensor, v: Tensor
) -> dict[str, Any]:
    """The one-launch Flex output against the fp32 reference on each sequence's last rows."""
    spec = attnlab.get(method)
    prm, scale = spec.make_params(params), q.shape[-1] ** -0.5
    with torch.no_grad():
        out = attnlab.attention(q, k, v, method=method, causal=True, backend="flex", cu_seqlens_q=cu(lens, q.device),
                                **params)  # fmt: skip
        worst: dict[str, Any] = {"ok": True, "err": 0.0, "bound": 0.0, "margin": -float("inf")}
        start = 0
        for n in lens:
            rows = min(CHECK_ROWS, n)
            qs = q[:, :, start + n - rows : start + n]
            ks, vs = k[:, :, start : start + n], v[:, :, start : start + n]
            ref32 = spec.reference(qs.float(), ks.float(), vs.float(), prm, causal=True, scale=scale)
            low = spec.reference(qs, ks, vs, prm, causal=True, scale=scale, upcast=False)
            got = out[:, :, start + n - rows : start + n]
            err, allowed = max_abs(got, ref32), bound(max_abs(low, ref32), ref32, FWD_FACTOR, q.dtype)
            if err - allowed > worst["margin"]:  # the sequence closest to (or past) its bound
                worst = {"ok": err <= allowed, "err": err, "bound": allowed, "margin": err - allowed}
            start += n
    return worst


def recompiles(method: str, params: dict[str, Any], heads: int, kv_heads: int, d: int, dtype: torch.dtype,
               device: torch.device, smoke: bool) -> dict[str, Any]:  # fmt: skip
    """Compiled graphs after packings: first, same total, another total of the same table size, a total of
    the next size."""
    base = 100 if smoke else 12000  # both totals in the 16384-token table
    same_size = base + (20 if smoke else 3000)
    assert table_size(same_size) == table_size(base)
    next_size = table_size(base) + (5 if smoke else 1000)
    plan = {
        "first": lengths(base, 4, 11),
        "same_total": lengths(base, 6, 12),
        "same_size": lengths(same_size, 5, 13),
        "next_size": lengths(next_size, 5, 14),
    }
    out = {}
    for label, lens in plan.items():
        q, k, v = qkv(sum(lens), heads, kv_heads, d, dtype, device, False)
        with torch.no_grad():
            attnlab.attention(q, k, v, method=method, causal=True, backend="flex", cu_seqlens_q=cu(lens, device),
                              **params)  # fmt: skip
        out[label] = int(counters["stats"]["unique_graphs"])
    return out


def _tensor(r: Any) -> Tensor:
    assert isinstance(r, Tensor)
    return r


def sides(
    method: str, params: dict[str, Any], lens: list[int], q: Tensor, k: Tensor, v: Tensor
) -> dict[str, Callable[[], Tensor]]:
    c = cu(lens, q.device)
    flex = attnlab.prepare(method, causal=True, backend="flex", **params)
    out: dict[str, Callable[[], Tensor]] = {"flex": lambda: _tensor(flex(q, k, v, cu_seqlens_q=c))}
    has_executor = any(b.name == "block_sparse" for b in attnlab.get(method).backends)
    if has_executor and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        executor = attnlab.prepare(method, causal=True, backend="block_sparse", **params)
        out["block_sparse"] = lambda: _tensor(executor(q, k, v, cu_seqlens_q=c))
    op = attnlab.prepare(method, causal=True, **params)
    bounds = [(sum(lens[:s]), sum(lens[: s + 1])) for s in range(len(lens))]

    def per_sequence() -> Tensor:
        return torch.cat(
            [_tensor(op(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])) for a, b in bounds if b > a], 2
        )

    out["per_sequence"] = per_sequence
    return out


def timed(fn: Callable[[], Tensor], mode: str, leaves: list[Tensor], do: Tensor) -> Callable[[], object]:
    if mode == "fwd":

        def fwd() -> None:
            with torch.no_grad():
                fn()

        return fwd
    return lambda: torch.autograd.grad(fn(), leaves, do)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True, help="folder for flex_varlen.jsonl")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, forward only off CUDA (a dry run)")
    ap.add_argument("--methods", default="", help="comma-separated subset of the methods")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    heads, kv_heads, d = (2, 1, 16) if smoke else (32, 8, 128)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    methods = SMOKE_METHODS if smoke else METHODS
    if args.methods:
        methods = {m: methods.get(m, {}) for m in args.methods.split(",")}
    modes = ["fwd"] if device.type == "cpu" else ["fwd", "fwd_bwd"]  # CPU Flex has no backward
    os.makedirs(args.out_dir, exist_ok=True)
    env = environment(device)
    path = os.path.join(args.out_dir, "flex_varlen.jsonl")
    with open(path, "a") as f:

        def log(row: dict[str, Any]) -> None:
            row = {**row, "env": env}
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps({k: v for k, v in row.items() if k != "env"}), flush=True)

        for method, params in methods.items():
            log({"kind": "recompiles", "method": method,
                 **recompiles(method, params, heads, kv_heads, d, dtype, device, smoke)})  # fmt: skip
            for label, lens in packings(smoke).items():
                q, k, v = qkv(sum(lens), heads, kv_heads, d, dtype, device, False)
                log({"kind": "check", "method": method, "packing": label, "lengths": lens,
                     **check(method, params, lens, q, k, v)})  # fmt: skip
                for mode in modes:
                    leaves = [t.detach().requires_grad_(mode == "fwd_bwd") for t in (q, k, v)]
                    do = torch.randn_like(leaves[0])
                    fns = {name: timed(fn, mode, leaves, do)
                           for name, fn in sides(method, params, lens, leaves[0], leaves[1], leaves[2]).items()}  # fmt: skip
                    times = measure_interleaved(fns, device, min_reps=3 if smoke else 10)
                    base = times["per_sequence"].median_ms
                    log({"kind": "timing", "method": method, "packing": label, "mode": mode, "total": sum(lens),
                         "sequences": len(lens),
                         **{f"{n}_ms": t.median_ms for n, t in times.items()},
                         **{f"{n}_q1_q3_ms": [t.q1_ms, t.q3_ms] for n, t in times.items()},
                         "reps": min(t.reps for t in times.values()),
                         **{f"{n}_speedup_vs_per_sequence": base / t.median_ms for n, t in times.items()}})  # fmt: skip
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
