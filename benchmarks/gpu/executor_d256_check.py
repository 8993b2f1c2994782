"""The executor at D=256 in bf16 with autotuning off: the autotuning-off launchers (``_FirstFit``) must skip
configs the compiler refuses for their resources (the first dQ and dK/dV configs need more shared memory
than sm_90 has at D=256) and run the next. Checks the output and gradients against an fp32 reference over
the plan and prints which configs each launcher skipped.

    PYTHONPATH=$PWD python benchmarks/gpu/executor_d256_check.py    (on a CUDA GPU)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_sparse_bench import random_plan, rows_mask

import attnlab
from attnlab.kernels.block_sparse import op
from attnlab.plans.executor import executor_tables


def main() -> None:
    attnlab.settings.autotune = False
    n, d = 4096, 256
    torch.manual_seed(0)
    q = torch.randn(1, 8, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(1, 2, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)
    )
    plan = random_plan(8, n, True, 0.3, seed=1)
    tables = executor_tables(plan).as_args()
    out, _ = op.block_sparse_attention(q, k, v, tables, d**-0.5, True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    mask = rows_mask(plan, 0, n)[None]
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    s = (qf @ kf.repeat_interleave(4, 1).transpose(-1, -2)) * d**-0.5
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vf.repeat_interleave(4, 1)
    refs = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    print("out max err", (out.float() - ref).abs().max().item())
    for name, a, b in zip("qkv", grads, refs, strict=True):
        print(f"d{name} rel err", ((a.float() - b).abs().max() / b.abs().max()).item())
    for name, launcher in (("fwd", op._FWD[1]), ("dq", op._DQ[1]), ("dkdv", op._DKDV[1])):
        print(name, "skipped", launcher.skipped)


if __name__ == "__main__":
    main()
