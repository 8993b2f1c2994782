"""Per-thread registers and stack (spills) of the attention kernels, compiled for sm_90 on a CPU machine.

Triton compiles a kernel for a target without a GPU when the active driver only reports the target (and
its "launch" does nothing): the cubin lands in Triton's cache. This script installs such a stub
driver, launches each kernel family (sigmoid, score_transform, block_sparse: forward, dK/dV, dQ; block_sparse's dK/dV in its one-pass form) once per
candidate schedule with CPU tensors of the given dtype and head dim, and reads each cubin's resource usage
with the ``cuobjdump`` that ships with Triton. STACK is local memory per thread: when a kernel with stack
first launches, the driver reserves it for every thread the GPU can hold (2048 per SM: on an H100, 132 SMs,
17 KB per thread is 4.7 GB of device memory, which the caching allocator does not see).

    python benchmarks/gpu/offline_resources.py --dtype float32 --head-dim 64 --out res.json

Diagnostic only (not a test, and not a launch: nothing here runs the kernels). What it does not mirror:
the tensors are CPU tensors, so a launcher's own device checks take their CPU branch (``--tma auto`` means
no TMA; ``FAST`` is off, so 16-bit compiles differ from the GPU's); block_sparse compiles every config
given, including ones its prune would drop for the plan. ``--kernels`` keeps some kernels only (e.g.
``sigmoid.fwd``).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CACHE = tempfile.mkdtemp(prefix="attnlab_sm90_")
os.environ["TRITON_CACHE_DIR"] = CACHE

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends import backends  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _Sm90(backends["nvidia"].driver):  # type: ignore[misc, name-defined]
    """Reports an sm_90 target; launches nothing."""

    def __init__(self) -> None:
        pass

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    # "launches" do nothing, so a launcher's later kernels compile too (a backward's dQ after its dK/dV)
    launcher_cls = staticmethod(lambda src, metadata: lambda *args, **kwargs: None)

    class utils:  # (the driver attribute's name)
        @staticmethod
        def load_binary(name: str, kernel: bytes, shared: int, device: int) -> tuple[int, int, int, int, int]:
            return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads

        @staticmethod
        def get_device_properties(device: int) -> dict[str, int]:
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}  # fmt: skip


def _cubins() -> set[str]:
    return set(glob.glob(f"{CACHE}/**/*.cubin", recursive=True))


def _usage(path: str) -> dict[str, Any]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    name = re.search(r"Function (\w+):", out)
    line = next(line for line in out.splitlines() if "REG:" in line)
    usage: dict[str, Any] = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", line)}
    return {"function": name.group(1) if name else "?", **usage}


@contextlib.contextmanager
def _only(autotuner: Any, config: triton.Config) -> Iterator[None]:
    """The autotuner (or a launcher with ``configs``, such as the executor's autotuning-off one) with this
    one config and no pruning."""
    names = [n for n in ("configs", "early_config_prune", "cache") if hasattr(autotuner, n)]
    saved = {n: getattr(autotuner, n) for n in names}
    for n, value in {"configs": [config], "early_config_prune": None, "cache": {}}.items():
        if n in saved:
            setattr(autotuner, n, value)
    try:
        yield
    finally:
        for n, value in saved.items():
            setattr(autotuner, n, value)


#: (kernel function, config) -> the resource usage of a cubin compiled while that kernel was held to the config
HELD: dict[tuple[str, tuple], dict[str, Any]] = {}


def _name(tuner: Any) -> str:
    return str(tuner.base_fn.__name__ if hasattr(tuner, "base_fn") else tuner.fn.__name__)


def _key(config: triton.Config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


#: Largest BLOCK_M x BLOCK_N compiled (``--max-tile``; fp32 tiles above 64 x 64 take minutes each).
MAX_TILE = [64 * 64]
#: The kernels to compile (``--kernels``; None: all of the families').
ONLY: list[set[str] | None] = [None]


def _compile(
    name: str,
    tuner: Any,
    configs: list[triton.Config],
    launch: Callable[[], object],
    other: tuple[Any, triton.Config] | None = None,
) -> list[dict]:
    """Compile ``launch`` once per config of ``tuner`` (the kernel ``name``); report the new cubin of that
    kernel (a launch may compile other kernels too: they are told apart by function name). ``other``: the
    launch's other kernel (a backward's dQ beside its dK/dV) and a small config it is held to meanwhile, so
    that neither its first config's compile error lands on this kernel's rows nor its first config's cubin
    is compiled here (it would then be missing, as not new, from its own rows). The held config's cubin is
    kept (:data:`HELD`) and reported on its own row when that kernel's turn finds it already compiled."""
    fn = _name(tuner)
    rows: list[dict] = []
    if ONLY[0] is not None and name not in ONLY[0]:
        return rows
    for c in configs:
        if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > MAX_TILE[0]:
            continue
        before = _cubins()
        error = ""
        held = _only(*other) if other is not None else contextlib.nullcontext()
        with _only(tuner, c), held:
            try:
                launch()
            except Exception as e:  # a compile error (or a launcher's own check) is kept
                error = f"{type(e).__name__}: {e}"[:200]
        new = [_usage(path) for path in sorted(_cubins() - before)]
        if other is not None:
            for u in new:
                if u["function"] == _name(other[0]):
                    HELD.setdefault((u["function"], _key(other[1])), u)
        usage = [u for u in new if u["function"] == fn] or [
            u for u in [HELD.get((fn, _key(c)))] if u is not None and not error
        ]
        row = {"kernel": name, "config": {**c.kwargs, "warps": c.num_warps, "stages": c.num_stages}}
        row.update(usage[0] if usage else {"error": error or "no new cubin"})
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument(
        "--tma", choices=["auto", "on", "off"], default="auto", help="force the forwards' TMA flag"
    )
    ap.add_argument("--families", nargs="*", default=["sigmoid", "score_transform", "block_sparse"])
    ap.add_argument("--max-tile", type=int, default=64 * 64, help="largest BLOCK_M * BLOCK_N compiled")
    ap.add_argument("--kernels", nargs="*", default=None, help="only these, e.g. sigmoid.fwd block_sparse.dq")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    MAX_TILE[0] = args.max_tile
    ONLY[0] = set(args.kernels) if args.kernels else None
    driver.set_active(_Sm90())
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    from attnlab.settings import settings

    settings.autotune = False
    dt, d = getattr(torch, args.dtype), args.head_dim
    q = torch.randn(2, 4, 256, d, dtype=dt)
    k = torch.randn(2, 2, 256, d, dtype=dt)
    lse = torch.zeros(2, 4, 256)
    rows: list[dict] = []
    force = {"on": True, "off": False}.get(args.tma)
    if "sigmoid" in args.families:
        import attnlab.kernels.sigmoid.op as sig

        if force is not None:
            sig._tma_ready = lambda *ts: force
        rows += _compile("sigmoid.fwd", sig._FWD[1], sig._configs("fwd"),
                         lambda: sig.sigmoid_fwd_launch(q, k, k, 0.1, 0.0, True))  # fmt: skip
        bwd_sig = lambda: sig.sigmoid_bwd_launch(q, q, k, k, 0.1, 0.0, True)
        rows += _compile(
            "sigmoid.dkdv",
            sig._DKDV[1],
            sig._configs("dkdv"),
            bwd_sig,
            other=(sig._DQ[1], sig._configs("dq")[-1]),
        )
        rows += _compile(
            "sigmoid.dq",
            sig._DQ[1],
            sig._configs("dq"),
            bwd_sig,
            other=(sig._DKDV[1], sig._configs("dkdv")[-1]),
        )
    if "score_transform" in args.families:
        import attnlab.kernels.score_transform.op as st

        if force is not None:
            st._tma_ready = lambda *ts: force  # type: ignore[attr-defined]
        rows += _compile("score_transform.fwd", st._FWD, st._FWD.configs,
                         lambda: st.score_transform_fwd_launch(q, k, k, None, None, 0.1, 0.0, True))  # fmt: skip
        bwd = lambda: st.score_transform_bwd_launch(q, q, k, k, q, lse, None, None, 0.1, 0.0, True)
        rows += _compile(
            "score_transform.dkdv", st._DKDV, st._DKDV.configs, bwd, other=(st._DQ, st._DQ.configs[-1])
        )
        rows += _compile(
            "score_transform.dq", st._DQ, st._DQ.configs, bwd, other=(st._DKDV, st._DKDV.configs[-1])
        )
    if "block_sparse" in args.families:
        import attnlab
        import attnlab.kernels.block_sparse.op as bs
        from attnlab.plans.executor import executor_tables
        from attnlab.plans.static import static_plan

        if force is not None:
            bs._tma_ready = lambda *ts: force
            bs._dq_tma_ready = lambda q: force  # the one-pass backward's dQ reductions
        spec = attnlab.get("sliding_window")
        plan = static_plan(spec, spec.make_params({"window": 100}), 256, 256, True, torch.device("cpu"))
        tables = executor_tables(plan).as_args()
        # the executor's autotuning-off launchers (_FirstFit), each held to one config by _only
        rows += _compile("block_sparse.fwd", bs._FWD[1], bs._FWD[1].configs,
                         lambda: bs.block_sparse_fwd_launch(q, k, k, tables, 0.1, True))  # fmt: skip
        bwd_bs = lambda: bs.block_sparse_bwd_launch(q, q, k, k, q, lse, tables, 0.1, True)
        rows += _compile(
            "block_sparse.dq",
            bs._DQ[1],
            bs._DQ[1].configs,
            bwd_bs,
            other=(bs._DKDV[1], bs._DKDV[1].configs[-1]),
        )
        rows += _compile(
            "block_sparse.dkdv",
            bs._DKDV[1],
            bs._DKDV[1].configs,
            bwd_bs,
            other=(bs._DQ[1], bs._DQ[1].configs[-1]),
        )
        fused_bs = lambda: bs.block_sparse_bwd_launch(q, q, k, k, q, lse, tables, 0.1, True, fused=True)
        rows += _compile("block_sparse.dkdv_one_pass", bs._DKDV[1], bs._DKDV[1].configs, fused_bs)
    meta = {
        "dtype": args.dtype,
        "head_dim": d,
        "tma": args.tma,
        "triton": triton.__version__,
        "target": "sm_90",
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
