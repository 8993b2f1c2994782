"""Where the first call of a method at a new sequence length spends its time (what a model pays when every
prompt has another length, e.g. in ``attnlab eval``).

    PYTHONPATH=$PWD python benchmarks/first_call_profile.py --method strided_heads --out DIR
    python benchmarks/first_call_profile.py --device cpu --lengths 256 300 --heads 2 --out /tmp/f  # smoke

For each length: one call at that length (a length the process has not seen), timed with a device
synchronisation on both sides, under cProfile; then a second call at the same length (warm). Writes
DIR/first_call_<method>.json: per length the first and warm wall times (ms), the backend the call took,
and the functions with the most cumulative time in the first call (cProfile, top ``--top``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path
from typing import Any

import torch

import attnlab


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _top(profile: cProfile.Profile, top: int) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile)
    rows = []
    for (file, line, name), (_cc, calls, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}:{name}", "calls": calls, "cumulative_s": ct})
    rows.sort(key=lambda r: -r["cumulative_s"])
    return rows[:top]


def profile_lengths(
    method: str,
    lengths: list[int],
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    causal: bool,
    device: torch.device,
    top: int,
) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for n in lengths:
        g = torch.Generator(device=device).manual_seed(n)
        q = torch.randn(1, heads, n, head_dim, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, kv_heads, n, head_dim, device=device, dtype=dtype, generator=g)
        v = torch.randn_like(k)
        chosen = attnlab.explain(q, k, v, method=method, causal=causal).backend
        backend = chosen.name if chosen is not None else None
        prof = cProfile.Profile()
        _sync(device)
        t0 = time.perf_counter()
        prof.enable()
        attnlab.attention(q, k, v, method=method, causal=causal)
        _sync(device)
        prof.disable()
        first = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        attnlab.attention(q, k, v, method=method, causal=causal)
        _sync(device)
        warm = (time.perf_counter() - t0) * 1e3
        rows.append({"n": n, "backend": backend, "first_ms": first, "warm_ms": warm, "top": _top(prof, top)})
        print(f"{method} n={n} ({backend}): first {first:.1f} ms, warm {warm:.1f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="strided_heads")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4000, 4100, 4196, 8000, 8200])
    ap.add_argument("--heads", type=int, default=5, help="query heads (default: the small organism's 5)")
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = profile_lengths(args.method, args.lengths, heads=args.heads, kv_heads=args.kv_heads,
                           head_dim=args.head_dim, causal=not args.non_causal, device=device,
                           top=args.top)  # fmt: skip
    result = {"method": args.method, "device": str(device), "torch": torch.__version__, "heads": args.heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim, "causal": not args.non_causal,
              "dtype": "bfloat16" if device.type == "cuda" else "float32",
              "timing": "first call under cProfile, after attnlab.explain of the same call", "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"first_call_{args.method}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
