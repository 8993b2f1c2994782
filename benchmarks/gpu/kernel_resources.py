"""Registers, spills and device memory of the Triton kernels a few parity cases launch (GPU diagnostic).

Runs each named test_parity case (``method-backend-label`` as in its test id) through
:func:`attnlab.testing.check_parity` in this process, one after another, recording the free device memory
(``torch.cuda.mem_get_info``) before and after each, then lists every compiled Triton kernel of
``attnlab.kernels`` with its registers per thread, local memory per thread (spills, bytes) and shared
memory. A kernel with local memory makes the driver reserve that much per resident thread of the whole
GPU when it first launches (bytes x 2048 threads x SMs), which is device memory the caching allocator
does not see. Writes JSON to ``--out``. The kernel list reads Triton 3.9's per-device caches
(``JITFunction.device_caches``); on Triton 3.6 (the H100's) it came out empty: the free-memory figures are
what that run measured.

    python benchmarks/gpu/kernel_resources.py --out res.json sigmoid-triton-causal_self-B2H4/2-130x130-D64-float32
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

import torch

import attnlab
import attnlab.kernels
from attnlab.testing import check_parity, parity_cases


def _kernels() -> list[dict[str, Any]]:
    """Every compiled kernel of the attnlab.kernels modules' JIT functions (Triton's per-device caches)."""
    from triton.runtime.jit import JITFunction

    out = []
    for info in pkgutil.walk_packages(attnlab.kernels.__path__, "attnlab.kernels."):
        try:
            mod = importlib.import_module(info.name)
        except Exception:  # (a module this machine cannot import: not launched either)
            continue
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", obj)  # autotuned / heuristics wrappers hold the JIT function
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn
            if not isinstance(fn, JITFunction) or fn.__module__ != info.name:
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                for compiled in caches[0].values():
                    compiled._init_handles()
                    out.append({
                        "kernel": f"{info.name}.{name}",
                        "regs": compiled.n_regs,
                        "local_bytes_per_thread": 4 * compiled.n_spills,
                        "shared_bytes": compiled.metadata.shared,
                        "warps": compiled.metadata.num_warps,
                        "stages": compiled.metadata.num_stages,
                    })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", help="test_parity ids without the test name: method-backend-label")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    every = {f"{m}-{b}-{c.label()}": (m, b, c) for m, b, c in parity_cases(True)}
    device = torch.device("cuda")
    rows = []
    for name in args.cases:
        method, backend, case = every[name]
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        err = ""
        try:
            check = check_parity(attnlab.get(method), backend, case, device)
            torch.cuda.synchronize()
            passed = check.passed
        except Exception as e:  # (recorded: the diagnostic goes on to the next case)
            passed, err = False, f"{type(e).__name__}: {e}"[:500]
        free1 = torch.cuda.mem_get_info()[0]
        row = {
            "case": name,
            "passed": passed,
            "error": err,
            "free_mib_drop": round((free0 - free1) / 2**20, 1),
        }
        rows.append(row)
        print(row, flush=True)
    kernels = _kernels()
    for k in sorted(kernels, key=lambda r: -r["local_bytes_per_thread"]):
        print(k)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    args.out.write_text(json.dumps({"cases": rows, "kernels": kernels, "sm_count": sms}, indent=1))


if __name__ == "__main__":
    main()
