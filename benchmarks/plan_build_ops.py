"""Device work of building a static plan at a new length: ops, host synchronisations and wall time.

    python benchmarks/plan_build_ops.py --threads 1                      # CPU: counts and CPU times
    python benchmarks/plan_build_ops.py --device cuda --out DIR          # a GPU: the same, timed there
    python benchmarks/plan_build_ops.py --quick                          # smoke test (tests/)

What is measured is what the first call of a mask method at a new sequence length pays for its plan:
:func:`attnlab.plans.static_plan` at a length it has not built (the mask factory, then the block-rule
builder), for ``sliding_window`` with its default window (what ``attnlab.attention(q, k, v,
method="sliding_window", causal=True)`` builds) and the other block-rule methods with their first
benchmark parameters (``causal``: dense causal, :func:`attnlab.plans.causal_plan`).

- **Ops**: every aten op the build dispatches (a ``TorchDispatchMode``), split into *device* ops (on a
  tensor of ``--device``, views excepted: on a GPU each is a launch, a fill or a copy), *views* (no
  launch, a few microseconds of host time each) and *host* ops (on small CPU tensors; on a CPU run, the
  ops inside :data:`HOST_FUNCTIONS` of :mod:`attnlab.plans.blocks`, which work on the host whatever the
  device); and, among the device ops, those that synchronise the host with a GPU (:data:`SYNC_OPS`:
  data-dependent sizes, scalar reads, copies to the host; a boolean index).
- **Time**: median and min wall time over ``--reps`` builds, each at another new length (``n + block r``:
  the same residue modulo the tile), with ``torch.cuda.synchronize`` before and after each build on a
  GPU. One build at another length first warms the process up (kernels loaded, allocator primed).

Each plan is checked equal to the generic builder's (:func:`attnlab.plans.plan_from_mask`: full, partial,
allowed_count) at lengths up to ``--check-max``, and on a GPU to the same build on the CPU (every field,
``pattern_ids`` included) at every length. Writes DIR/plan_build_ops.json with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import attnlab
from attnlab.masks import MaskContext, causal_mask
from attnlab.plans import Plan, blocks, causal_plan, plan_from_mask, static, static_plan

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sliding_window", "streaming", "dilated", "block_local", "causal")
#: Functions of :mod:`attnlab.plans.blocks` whose ops run on host tensors (counted as host ops on a CPU
#: run; absent names are skipped, so the script also measures versions without them).
HOST_FUNCTIONS = ("_host_diagonals", "_host_tiles")
aten = torch.ops.aten
#: Ops that make the host wait for a GPU when their input is on it.
SYNC_OPS = {
    aten.nonzero.default,
    aten.nonzero.out,
    aten.argwhere.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.masked_select.default,
    aten.repeat_interleave.Tensor,
}
#: Ops on device tensors that launch nothing (besides views): counted apart from the device ops.
NO_KERNEL = {aten.lift_fresh.default, aten.detach.default, aten._unsafe_view.default}


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops: device / host, and device ops that synchronise (by name)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.host_depth = 0
        self.device_ops: Counter[str] = Counter()
        self.host_ops: Counter[str] = Counter()
        self.views: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        on_device = self.host_depth == 0 and (
            any(t.device.type == self.device.type for t in tensors)
            or (not tensors and str(kwargs.get("device", "cpu")).startswith(self.device.type))
        )
        name = str(func.overloadpacket.__name__)
        if not on_device:
            self.host_ops[name] += 1
            return out
        if func.is_view or func in NO_KERNEL:
            self.views[name] += 1
            return out
        self.device_ops[name] += 1
        if func in SYNC_OPS or _bool_index(func, args) or _to_host(func, args, kwargs, out, self.device):
            self.syncs[name] += 1
        return out


def _bool_index(func: Any, args: Any) -> bool:
    """An index / index_put with a bool mask (a nonzero inside)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


def _to_host(func: Any, args: Any, kwargs: dict[str, Any], out: Any, device: torch.device) -> bool:
    """A copy from the device to the host (only on a GPU run: on a CPU one there is no such copy)."""
    if device.type == "cpu" or func not in (aten._to_copy.default, aten.copy_.default):
        return False
    src = args[1] if func is aten.copy_.default else args[0]
    dst = args[0] if func is aten.copy_.default else out
    return bool(src.device.type == device.type and dst.device.type == "cpu")


@contextmanager
def counting(device: torch.device) -> Iterator[OpCounter]:
    """An :class:`OpCounter` active in the block; ops inside :data:`HOST_FUNCTIONS` count as host ops."""
    counter = OpCounter(device)
    saved = {name: getattr(blocks, name) for name in HOST_FUNCTIONS if hasattr(blocks, name)}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def host(*a: Any, **k: Any) -> Any:
            counter.host_depth += 1
            try:
                return fn(*a, **k)
            finally:
                counter.host_depth -= 1

        return host

    try:
        for name, fn in saved.items():
            setattr(blocks, name, wrap(fn))
        with counter:
            yield counter
    finally:
        for name, fn in saved.items():
            setattr(blocks, name, fn)


def build(method: str, n: int, causal: bool, device: torch.device, block: int) -> Plan:
    """What a first call at length ``n`` builds: the cached plan builder at a key it has not seen."""
    if method == "causal":
        return causal_plan(n, n, device, block)
    spec = attnlab.get(method)
    params = spec.make_params({} if method == "sliding_window" else spec.bench_params(n)[0])
    return static_plan(spec, params, n, n, causal, device, block)


def generic(method: str, n: int, causal: bool, device: torch.device, block: int) -> Plan:
    if method == "causal":
        return plan_from_mask(
            causal_mask(None, MaskContext(n, n, True, device)), n, n, True, device, block, block
        )
    spec = attnlab.get(method)
    assert spec.mask is not None
    params = spec.make_params({} if method == "sliding_window" else spec.bench_params(n)[0])
    mask_mod = spec.mask(params, MaskContext(n, n, causal, device))
    return plan_from_mask(mask_mod, n, n, causal, device, block, block)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    device, causal, block = torch.device(args.device), not args.non_causal, args.block
    static._cache.clear()
    build(method, n + 64 * block, causal, device, block)  # warm-up at another length
    _sync(device)
    with counting(device) as c:
        plan = build(method, n, causal, device, block)
    _sync(device)
    row: dict[str, Any] = {
        "method": method,
        "n": n,
        "device_ops": sum(c.device_ops.values()),
        "views": sum(c.views.values()),
        "syncs": sum(c.syncs.values()),
        "host_ops": sum(c.host_ops.values()),
        "sync_ops": dict(c.syncs),
        "top_device_ops": dict(c.device_ops.most_common(8)),
        "visited_tiles": plan.computed_blocks,
    }
    if device.type != "cpu":  # the device's plan, every field, equal to the host's
        host = build(method, n, causal, torch.device("cpu"), block)
        for name in ("full", "partial", "allowed_count", "pattern_ids"):
            a, b = getattr(plan, name), getattr(host, name)
            if a is None or b is None or not torch.equal(a.cpu(), b):
                raise AssertionError(f"{method} at {n}: {name} on {device} differs from the CPU plan's")
        row["equal_to_cpu"] = True
    if n <= args.check_max:
        want = generic(method, n, causal, device, block)
        assert want.allowed_count is not None and plan.allowed_count is not None
        ok = (
            torch.equal(plan.full, want.full)
            and torch.equal(plan.partial, want.partial)
            and torch.equal(plan.allowed_count, want.allowed_count)
        )
        if not ok:
            raise AssertionError(f"{method} at {n}: the plan differs from the generic builder's")
        row["equal_to_generic"] = True
    times = []
    for r in range(1, args.reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        build(method, n + r * block, causal, device, block)
        _sync(device)
        times.append(time.perf_counter() - t0)
    row["median_ms"] = statistics.median(times) * 1e3
    row["min_ms"] = min(times) * 1e3
    static._cache.clear()
    return row


def line(row: dict[str, Any]) -> str:
    syncs = ", ".join(f"{k} {v}" for k, v in sorted(row["sync_ops"].items())) or "-"
    return (
        f"{row['method']:>15} {row['n']:>7}  device ops {row['device_ops']:4d}  syncs {row['syncs']:3d}"
        f"  views {row['views']:3d}  host ops {row['host_ops']:4d}  median {row['median_ms']:7.2f} ms  min {row['min_ms']:7.2f} ms"
        f"  (syncs: {syncs})"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 20008, 65536, 131072])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=7, help="builds timed per entry, each at a new length")
    p.add_argument("--block", type=int, default=static.BLOCK, help="tile side (query rows = key columns)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--non-causal", action="store_true", help="non-causal plans (default: causal)")
    p.add_argument(
        "--check-max", type=int, default=8192, help="longest length checked against the generic builder"
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--quick", action="store_true", help="smoke test: lengths 300 1000, 2 reps")
    p.add_argument("--out", type=Path, default=None, help="folder for plan_build_ops.json")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.reps, args.check_max = [300, 1000], 2, 1000
    return args


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    out: dict[str, Any] = {
        "commit": _commit(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "block": args.block,
        "causal": not args.non_causal,
        "rows": [],
    }
    for n in args.lengths:
        for method in args.methods:
            row = measure(method, n, args)
            out["rows"].append(row)
            print(line(row), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan_build_ops.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
