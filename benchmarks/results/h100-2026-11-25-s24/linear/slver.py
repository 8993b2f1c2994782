"""s24 run 4: the default gla backward (sliced where verified) against the fused kernel, both gate paths
(the cumsum in the op or in PyTorch), several shapes in one process.

    python slver.py DTYPE BxHxNxD [...]
"""

import sys

import torch
import torch.nn.functional as F

from attnlab.kernels.linear import launch_gla, op

DTYPE = getattr(torch, sys.argv[1])


def run(b: int, h: int, n: int, d: int, sliced: bool, glue: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to("cuda", DTYPE).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(torch.randn(b, h, n, d, generator=gen) + 3) / 16).to("cuda", DTYPE).requires_grad_()
    saved = op.GLA_BWD_SLICED, op.GLA_FUSED_GLUE
    op.GLA_BWD_SLICED, op.GLA_FUSED_GLUE = sliced, glue
    try:
        o, _ = op.gla_chunk(q, k, v, g, d**-0.5, None, 64)
        do = torch.randn(o.shape, generator=gen).to("cuda", DTYPE)
        grads = torch.autograd.grad(o, (q, k, v, g), do)
    finally:
        op.GLA_BWD_SLICED, op.GLA_FUSED_GLUE = saved
    return [t.detach().float() for t in grads]


for shape in sys.argv[2:]:
    b, h, n, d = map(int, shape.split("x"))
    for glue in (True, False):
        probe = torch.empty(1, 1, 1, d, device="cuda", dtype=DTYPE)
        used = "sliced" if launch_gla.sliced_verified(probe, probe, 64) else "fused(not verified)"
        got, ref = run(b, h, n, d, True, glue), run(b, h, n, d, False, glue)
        torch.cuda.synchronize()
        err = [round(float((a - r).abs().max() / r.abs().max()), 5) for a, r in zip(got, ref, strict=True)]
        state = "ok" if all(e < 0.02 for e in err) else "DIFF"  # (NaN fails)
        print(DTYPE, shape, "glue" if glue else "cumsum", used, "dq dk dv dg", err, state, flush=True)
