"""s24 run 5: one gla_bwd_sliced_kernel schedule against the fused kernel at three shapes / dtypes (one process
per schedule: an illegal memory access poisons the process).

    python slvar.py BKS,JOINT,WARPS,STAGES,SPP
"""

import sys

import torch
import torch.nn.functional as F

from attnlab.kernels.linear import op

BKS, JOINT, WARPS, STAGES, SPP = map(int, sys.argv[1].split(","))


def run(shape: str, dt: torch.dtype, sliced: bool) -> list[torch.Tensor]:
    b, h, n, d = map(int, shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to("cuda", dt).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(torch.randn(b, h, n, d, generator=gen) + 3) / 16).to("cuda", dt).requires_grad_()
    op.GLA_BWD_SLICED = sliced
    op.GLA_BWD_SLICED_VERIFIED_ONLY = False
    op.GLA_BWD_SLICED_BKS, op.GLA_BWD_SLICED_JOINT, op.GLA_BWD_SLICED_SPP = BKS, bool(JOINT), SPP
    op.LAUNCH_OVERRIDES["gla_bwd_sliced"] = {"num_warps": WARPS, "num_stages": STAGES}
    o, _ = op.gla_chunk(q, k, v, g, d**-0.5, None, 64)
    do = torch.randn(o.shape, generator=gen).to("cuda", dt)
    return [t.float() for t in torch.autograd.grad(o, (q, k, v, g), do)]


CASES = (
    ("1x32x32768x128", torch.bfloat16),
    ("1x4x1000x128", torch.float16),
    ("2x4x4096x128", torch.bfloat16),
)
for shape, dt in CASES:
    got, ref = run(shape, dt, True), run(shape, dt, False)
    torch.cuda.synchronize()
    err = [round(float((a - r).abs().max() / r.abs().max()), 5) for a, r in zip(got, ref, strict=True)]
    state = "ok" if all(e < 0.02 for e in err) else "DIFF"  # (NaN fails)
    print(sys.argv[1], shape, dt, err, state, flush=True)
