"""What one decode step of page_topk's fast path does on the host: kernel launches, aten ops, allocations,
host synchronisations and host microseconds per layer call, from the prepared op and from attnlab.hf's
attention function (the bound step a model's decode loop takes).

The Triton kernels are replaced by counting stubs (``--stub``, the default on a CPU: the interpreter's time
would swamp the host code around it), so what is timed is attnlab's own host code plus PyTorch's op
dispatch and the allocator; on the GPU without ``--stub`` the real kernels launch (asynchronously: the
host time then includes launch overhead, not kernel time).

Paths (one per-layer call per step, the cache growing by one token per step, q (B, 32, 1, 128) against a
GQA 32:8 cache of ``--context`` tokens, page 16, ``--budget`` tokens):

- ``op``: ``prepare("page_topk", backend="triton", ...)(q, k, v, state=state)`` (validation and dispatch
  on every call);
- ``hf``: ``Runtime.forward`` of attnlab.hf (what transformers calls per layer), with its bound decode
  step (the op resolved once per signature, then only N_k updated).

Per path: launches/step (by kernel), aten ops/step (torch.profiler, by name), allocations/step
(``aten::empty*``), host syncs/step (``aten::item`` / ``_local_scalar_dense``), host us/step (median of
``--reps`` steps, perf_counter). Writes JSON to ``--out`` and prints a table.

CPU:  python benchmarks/decode_step_profile.py --out /tmp/step.json
GPU:  python benchmarks/decode_step_profile.py --device cuda --no-stub --context 131072 --out $OUT/step.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend on a CPU (kernels stubbed)

KERNELS = ("page_select_kernel", "row_topk_kernel", "decode_split_kernel", "decode_merge_kernel")


class _Stub:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` counts the launch, runs nothing."""

    def __init__(self, name: str, counts: Counter[str]) -> None:
        self.name = name
        self.counts = counts

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.counts[self.name] += 1

        return launch


class _Counting:
    """Wraps a real Triton kernel: counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel: Any, name: str, counts: Counter[str]) -> None:
        self.kernel = kernel
        self.name = name
        self.counts = counts

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        run = self.kernel[grid]

        def launch(*args: Any, **kwargs: Any) -> Any:
            self.counts[self.name] += 1
            return run(*args, **kwargs)

        return launch


@contextlib.contextmanager
def instrument(stub: bool) -> Iterator[Counter[str]]:
    """Replace the decode kernels in ``attnlab.kernels.decode.op`` by stubs or counting wrappers for the
    block (restored after); yields the launch counts by kernel."""
    from attnlab.kernels.decode import op

    counts: Counter[str] = Counter()
    saved = {name: getattr(op, name) for name in KERNELS}
    try:
        for name, kernel in saved.items():
            setattr(op, name, _Stub(name, counts) if stub else _Counting(kernel, name, counts))
        yield counts
    finally:
        for name, kernel in saved.items():
            setattr(op, name, kernel)


def make_paths(
    b: int, n: int, budget: int, device: torch.device, dtype: torch.dtype, steps: int
) -> dict[str, Callable[[int], Any]]:
    """Per path, ``step(i)``: the per-layer decode call at cache length n + i (state carried)."""
    import transformers

    import attnlab
    from attnlab.hf.interface import Runtime
    from attnlab.hf.models import inspect_model
    from attnlab.hf.plan import load_plan

    g = torch.Generator().manual_seed(0)
    h, h_kv, d = 32, 8, 128
    k_all = torch.randn(b, h_kv, n + steps, d, generator=g).to(device, dtype)
    v_all = torch.randn(b, h_kv, n + steps, d, generator=g).to(device, dtype)
    q = torch.randn(b, h, 1, d, generator=g).to(device, dtype)
    params: dict[str, Any] = {"budget": budget, "page": 16}
    op = attnlab.prepare("page_topk", causal=True, backend="triton", **params)
    box: dict[str, Any] = {"state": None}

    def op_step(i: int) -> Any:
        m = n + i
        res = op(q, k_all[:, :, :m], v_all[:, :, :m], state=box["state"])
        box["state"] = res.state  # type: ignore[union-attr]
        return res.out  # type: ignore[union-attr]

    cfg = transformers.LlamaConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=h_kv, head_dim=d,
                                   num_hidden_layers=1, intermediate_size=64, vocab_size=64)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    module = model.model.layers[0].self_attn
    plan = load_plan({"backends": {"page_topk": "triton"}}, decode="page_topk", decode_params=params)
    rt = Runtime(plan, inspect_model(model))

    def hf_step(i: int) -> Any:
        m = n + i
        return rt.forward(module, q, k_all[:, :, :m], v_all[:, :, :m], None, scaling=d**-0.5)[0]

    return {"op": op_step, "hf": hf_step}


def profile_path(step: Callable[[int], Any], counts: Counter[str], warmup: int, reps: int,
                 device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Launches, aten ops, allocations, syncs and host us per step of one path."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(warmup):
        step(i)
    counts.clear()
    times = []
    for i in range(warmup, warmup + reps):
        t = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - t) * 1e6)
    launches = {k: v / reps for k, v in sorted(counts.items())}
    prof_steps = 5
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(warmup + reps, warmup + reps + prof_steps):
            step(i)
    ops = Counter[str]()
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            ops[e.key] += e.count
    per_step = {k: v / prof_steps for k, v in sorted(ops.items(), key=lambda kv: -kv[1])}
    allocs = sum(v for k, v in per_step.items() if k.startswith("aten::empty"))
    syncs = sum(v for k, v in per_step.items() if k in ("aten::item", "aten::_local_scalar_dense"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "host_us_median": statistics.median(times),
        "host_us_min": min(times),
        "launches_per_step": sum(launches.values()),
        "launches": launches,
        "aten_ops_per_step": sum(per_step.values()),
        "allocations_per_step": allocs,
        "host_syncs_per_step": syncs,
        "aten_ops": per_step,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=8192, help="cache tokens at the first timed step")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--stub", action=argparse.BooleanOptionalAction, default=None,
                    help="stub the Triton kernels (default: on a CPU)")  # fmt: skip
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    stub = args.stub if args.stub is not None else device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from attnlab.catalog.decode import register_methods

    register_methods()
    from attnlab.bench.env import environment

    result: dict[str, Any] = {"env": environment(device), "args": vars(args) | {"out": str(args.out)},
                              "stub": stub, "rows": []}  # fmt: skip
    for b in args.batch:
        total = args.warmup + args.reps + 5
        for name, step in make_paths(b, args.context, args.budget, device, dtype, total).items():
            with instrument(stub) as counts:
                r = profile_path(step, counts, args.warmup, args.reps, device)
            result["rows"].append({"path": name, "batch": b} | r)
            top = ", ".join(f"{k[6:]} {v:g}" for k, v in list(r["aten_ops"].items())[:8])
            print(f"B={b} {name:<3} host {r['host_us_median']:7.1f} us/step  launches {r['launches_per_step']:g}  "
                  f"aten ops {r['aten_ops_per_step']:g}  allocs {r['allocations_per_step']:g}  syncs "
                  f"{r['host_syncs_per_step']:g}  [{top}]", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, default=str, indent=1))
    return result


if __name__ == "__main__":
    main()
