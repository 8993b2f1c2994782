"""Time of building a static plan at a new length: the block-rule path vs the generic path.

    PYTHONPATH=$PWD python benchmarks/plan_build.py --out DIR                    # CPU, 8K / 32K / 128K
    PYTHONPATH=$PWD python benchmarks/plan_build.py --device cuda --generic-max 32768 --out DIR
    python benchmarks/plan_build.py --quick --out /tmp/pb                        # smoke test (tests/)

What is timed is what a first call of a mask method at a new length pays for its plan
(``static_plan``'s build, the cache bypassed): the mask factory, then :func:`plan_from_rule` (methods
whose mask has a block rule, and dense causal) or :func:`plan_from_mask` (the generic path, O(N_q x N_k):
about a minute at 32K on a busy 2-core CPU, so by default only up to ``--generic-max``). Derived values
(the BlockMask, the executor's tables) are not included; ``--patterns`` adds the executor's tile patterns
(the costly part of its tables), from the plan's pattern ids vs evaluated on every partial tile. Before timing, the two paths' plans are
checked equal (full, partial, allowed_count) at every length where the generic one runs. Each entry
reports min and median over ``--reps`` builds (seconds). Writes DIR/plan_build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.masks import MaskContext, causal_mask
from attnlab.plans import Plan, plan_from_mask
from attnlab.plans.blocks import block_rule, plan_from_rule, tile_patterns
from attnlab.plans.static import BLOCK, CAUSAL_RULE

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sliding_window", "streaming", "dilated", "block_local")


def builders(method: str, n: int, causal: bool, device: torch.device, block: int) -> tuple[
    dict[str, Any], Callable[[], Plan], Callable[[], Plan]
]:  # fmt: skip
    """(params, block-path build, generic build) of one method at length ``n`` (self-attention); the
    method's first benchmark parameter set, or dense causal for ``method == "causal"``."""
    if method == "causal":

        def factory() -> Any:
            return causal_mask(None, MaskContext(n, n, True, device))

        rule, params, raw = CAUSAL_RULE, None, {}
    else:
        spec = attnlab.get(method)
        raw = spec.bench_params(n)[0]
        params = spec.make_params(raw)
        found = block_rule(spec.mask)
        assert spec.mask is not None and found is not None, f"{method} has no block rule"
        rule, mask_factory = found, spec.mask

        def factory() -> Any:
            return mask_factory(params, MaskContext(n, n, causal, device))

    def fast() -> Plan:
        return plan_from_rule(factory(), rule, params, n, n, causal, device, block, block)

    def generic() -> Plan:
        return plan_from_mask(factory(), n, n, causal, device, block, block)

    return raw, fast, generic


def timed(fn: Callable[[], Any], reps: int, device: torch.device) -> dict[str, float]:
    """min / median seconds of ``reps`` calls (synchronised on CUDA)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "reps": reps}


def same(a: Plan, b: Plan) -> bool:
    assert a.allowed_count is not None and b.allowed_count is not None
    return (
        torch.equal(a.full, b.full)
        and torch.equal(a.partial, b.partial)
        and torch.equal(a.allowed_count, b.allowed_count)
    )


def env(device: torch.device) -> dict[str, Any]:
    commit = os.environ.get("ATTNLAB_COMMIT")
    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "commit": commit,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"env": env(device), "block": args.block, "causal": not args.non_causal, "rows": []}
    causal = not args.non_causal
    for n in args.lengths:
        for method in args.methods:
            if method == "causal" and not causal:
                continue
            raw, fast, generic = builders(method, n, causal, device, args.block)
            row: dict[str, Any] = {"method": method, "n": n, "params": raw}
            plan = fast()  # warm-up, and the plan checked below
            if n <= args.generic_max:
                row["equal_to_generic"] = same(plan, generic())
                if not row["equal_to_generic"]:
                    raise AssertionError(f"{method} at {n}: the block-rule plan differs from the generic one")
                row["generic"] = timed(generic, args.generic_reps, device)
            row["block_rule"] = timed(fast, args.reps, device)
            row["visited_tiles"] = plan.computed_blocks
            if args.patterns:
                row.update(pattern_times(plan, args))
            if "generic" in row:
                row["speedup_min"] = row["generic"]["min_s"] / row["block_rule"]["min_s"]
            out["rows"].append(row)
            print(line(row), flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "plan_build.json").write_text(json.dumps(out, indent=1))
    return out


def pattern_times(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """The executor's tile patterns of ``plan``: keyed (:func:`attnlab.plans.blocks.tile_patterns`, one
    tile evaluated per pattern id) vs the executor's generic path (every partial tile), checked equal."""
    from attnlab.plans import executor

    device = plan.full.device
    keyed = lambda: tile_patterns(plan, plan.partial, executor.TILE_CHUNK)
    generic = lambda: executor._tile_patterns(plan, plan.partial)
    a, b = keyed(), generic()
    if a is None or not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
        raise AssertionError("keyed tile patterns differ from the executor's generic ones")
    return {
        "partial_tiles": int(plan.partial.sum()),
        "patterns": int(b[1].shape[0]),
        "patterns_keyed": timed(keyed, args.reps, device),
        "patterns_generic": timed(generic, args.pattern_generic_reps, device),
    }


def line(row: dict[str, Any]) -> str:
    ms = lambda s: f"{s * 1e3:9.2f}"
    fast = row["block_rule"]
    text = f"{row['method']:>15} {row['n']:>7}  block rule min/median {ms(fast['min_s'])} /{ms(fast['median_s'])} ms"
    if "generic" in row:
        gen = row["generic"]
        text += f"   generic {ms(gen['min_s'])} /{ms(gen['median_s'])} ms  ({row['speedup_min']:.0f}x)"
    if "patterns_keyed" in row:
        pk, pg = row["patterns_keyed"], row["patterns_generic"]
        text += (
            f"\n{'':>24}executor patterns ({row['partial_tiles']} partial tiles, {row['patterns']} distinct): "
            f"keyed {ms(pk['min_s'])} /{ms(pk['median_s'])} ms   generic {ms(pg['min_s'])} /{ms(pg['median_s'])} ms"
        )
    return text


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--methods", nargs="+", default=[*METHODS, "causal"], choices=[*METHODS, "causal"])
    p.add_argument("--reps", type=int, default=10, help="builds timed per entry (block-rule path)")
    p.add_argument(
        "--generic-max", type=int, default=8192, help="longest length the generic path is timed at"
    )
    p.add_argument("--generic-reps", type=int, default=10, help="builds timed per entry (generic path)")
    p.add_argument("--block", type=int, default=BLOCK, help="tile side (query rows = key columns)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--non-causal", action="store_true", help="time non-causal plans")
    p.add_argument(
        "--patterns", action="store_true", help="also time the executor's tile patterns: keyed vs generic"
    )
    p.add_argument("--pattern-generic-reps", type=int, default=3, help="builds timed (generic patterns)")
    p.add_argument("--quick", action="store_true", help="smoke test: lengths 512 1024, 3 reps")
    p.add_argument("--out", type=Path, default=None, help="folder for plan_build.json")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.reps, args.generic_reps, args.generic_max = [512, 1024], 3, 2, 1024
        args.pattern_generic_reps = 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    threads = torch.get_num_threads()
    try:
        return run(parse(argv))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
