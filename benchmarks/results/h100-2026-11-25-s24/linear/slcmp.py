"""s24 runs 2-3: gla's backward with ``GLA_BWD_SLICED`` at one schedule against the default on the same inputs
(one process per case: an illegal memory access poisons the process).

    python slcmp.py BxHxNxD BKS,JOINT,UNROLL,WARPS [dtype]
"""

import sys

import torch
import torch.nn.functional as F

from attnlab.kernels.linear import op

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run(b: int, h: int, n: int, d: int, flags: dict, dt: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(DEV, dt).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(torch.randn(b, h, n, d, generator=gen) + 3) / 16).to(DEV, dt).requires_grad_()
    saved = {f: getattr(op, f) for f in flags}
    for f, x in flags.items():
        setattr(op, f, x)
    try:
        o, _ = op.gla_chunk(q, k, v, g, d**-0.5, None, 64)
        do = torch.randn(o.shape, generator=gen).to(DEV, dt)
        grads = torch.autograd.grad(o, (q, k, v, g), do)
    finally:
        for f, x in saved.items():
            setattr(op, f, x)
    return [o.detach(), *grads]


b, h, n, d = map(int, sys.argv[1].split("x"))
bks, joint, unroll, w = map(int, sys.argv[2].split(","))
op.LAUNCH_OVERRIDES["gla_bwd_sliced"] = {"num_warps": w}
dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16
ref = run(b, h, n, d, {}, dtype)
flags = {"GLA_BWD_SLICED": True, "GLA_BWD_SLICED_BKS": bks, "GLA_BWD_SLICED_JOINT": bool(joint),
         "GLA_BWD_SLICED_UNROLL": bool(unroll)}  # fmt: skip
got = run(b, h, n, d, flags, dtype)
err = [
    round(float((a.float() - r.float()).abs().max() / r.float().abs().max()), 5)
    for a, r in zip(got, ref, strict=True)
]
print(sys.argv[1:], err, "ok", flush=True)
