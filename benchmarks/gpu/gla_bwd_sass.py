"""The SASS of gla's per-chunk backward kernels (``gla_bwd_chunk_kernel``, ``gla_bwd_sliced_kernel``) compiled
for sm_90 on a CPU machine, one file per (dtype, gate path, kernel, slices per program), K = V = 128, chunk
64, at the current settings. Two dumps compared (``cmp``) tell whether a change of the kernels' source
(a refactor) leaves the compiled code of the schedules checked on the H100 the same; Triton's compile is
deterministic here (two dumps of one tree are equal).

    PYTHONPATH=<triton 3.6 site>:. python benchmarks/gpu/gla_bwd_sass.py OUT_DIR

Uses ``offline_resources.py``'s stub driver (nothing is launched); ``cuobjdump`` ships with Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import offline_resources as res
import torch
import triton
from triton.runtime import driver


def sass(cubin: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    text = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in text.splitlines() if line.strip().startswith("/*"))


def main(out: Path) -> None:
    driver.set_active(res._Sm90())
    from attnlab.kernels.linear import launch, launch_gla, op

    launch_gla.IMPORTED_INTERPRETED = launch.IMPORTED_INTERPRETED = False  # type: ignore[attr-defined]
    out.mkdir(parents=True, exist_ok=True)
    b, h, n, d = 1, 2, 256, 128
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for raw in (False, True):
            for sliced, spp in ((True, 1), (True, 8), (False, 1)):
                q = torch.randn(b, h, n, d, dtype=dt)
                gc = -torch.rand(b, h, n, d)
                hs = torch.randn(b, h, n // 64, d, d, dtype=dt)
                a = torch.randn(b, h, n, 64)
                op.GLA_BWD_SLICED, op.GLA_BWD_SLICED_VERIFIED_ONLY, op.GLA_BWD_SLICED_SPP = sliced, False, spp
                before = res._cubins()
                launch_gla._gla_bwd_fused(q, q, q, gc, hs, q, None, 0.1, 64, None, a, dt if raw else None)
                for path in sorted(res._cubins() - before):
                    fn = res._usage(path)["function"]
                    if fn in ("gla_bwd_chunk_kernel", "gla_bwd_sliced_kernel"):
                        name = f"{fn}_{str(dt).removeprefix('torch.')}_raw{int(raw)}_spp{spp}.sass"
                        (out / name).write_text(sass(path))
                        print(name, flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
