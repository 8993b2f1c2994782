"""Full-size GPU check of the linear family's Triton kernels (``attnlab/kernels/linear``) against the fp32
token-by-token recurrence: output, final state and (at 4K) every gradient, with the same recurrence run
in the input precision beside it (the yardstick of the 2x / 3x accuracy rule: the kernel's error against
the fp32 recurrence at most 2x (output, state) or 3x (gradients) that of the bf16 recurrence, plus 1e-5
relative and half an ulp of the peak). Timings are ``benchmarks/linear_bench.py``.

    python benchmarks/linear_gpu_check.py --out results.json [--budget 240]

Writes one JSON file (rewritten after every case, so a run stopped at its limit keeps what it did).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.catalog.linear._common import delta_recurrence, gated_recurrence
from attnlab.catalog.linear.lightning import alibi_slopes


def _err(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _peak(t: Tensor) -> float:
    return float(t.float().abs().max())


def check(
    method: str, b: int, h: int, n: int, d: int, dtype: torch.dtype, chunk: int, grad: bool = True
) -> dict[str, Any]:
    """One case; ``gated_delta`` with a per-head gate (Gated DeltaNet), ``gated_delta_kda`` per channel."""
    from attnlab.kernels.linear.op import delta_chunk, gla_chunk

    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    q = torch.randn(b, h, n, d, device=dev, generator=gen)
    k = torch.randn(b, h, n, d, device=dev, generator=gen)
    v = torch.randn(b, h, n, d, device=dev, generator=gen)
    extra: dict[str, Tensor] = {}
    if method == "gla":
        extra["g"] = F.logsigmoid(torch.randn(b, h, n, d, device=dev, generator=gen) + 3.0) / 4
    if method == "lightning":
        extra["g"] = -torch.tensor(alibi_slopes(h), device=dev)[None, :, None, None].expand(b, h, n, d)
    kda = method == "gated_delta_kda"
    if kda:
        method = "gated_delta"
    if method == "gated_delta":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        extra["beta"] = torch.sigmoid(torch.randn(b, h, n, device=dev, generator=gen))
        extra["g"] = F.logsigmoid(torch.randn(b, h, n, d if kda else 1, device=dev, generator=gen) + 4.0)
    h0 = torch.randn(b, h, d, d, device=dev, generator=gen)
    scale = d**-0.5
    base = [q.to(dtype), k.to(dtype), v.to(dtype)]
    learn_g = method in ("gla", "gated_delta")

    def leaves(cast: torch.dtype | None) -> list[Tensor]:
        xs = [t.to(cast) if cast is not None else t for t in base]
        xs = [t.detach().clone().requires_grad_(grad) for t in xs]
        if method == "gated_delta":
            xs.append(extra["beta"].detach().clone().requires_grad_(grad))
        g = extra.get("g")
        xs.append(g.detach().clone().requires_grad_(learn_g and grad) if g is not None else None)  # type: ignore[arg-type]
        xs.append(h0.detach().clone().requires_grad_(grad))
        return xs

    def run(xs: list[Tensor], fn: str) -> tuple[Tensor, Tensor]:
        if method == "gated_delta":
            qq, kk, vv, beta, g, s0 = xs
            if fn == "kernel":
                return delta_chunk(qq, kk, vv, beta, g, scale, s0, chunk)
            return delta_recurrence(qq, kk, vv, beta.to(qq.dtype), g, scale, s0.to(qq.dtype))
        qq, kk, vv, g, s0 = xs
        if fn == "kernel":
            return gla_chunk(qq, kk, vv, g, scale, s0, chunk)
        return gated_recurrence(qq, kk, vv, g, scale, s0.to(qq.dtype))

    names = (
        (
            ["dq", "dk", "dv"]
            + (["dbeta"] if method == "gated_delta" else [])
            + (["dg"] if learn_g else [])
            + ["dh0"]
        )
        if grad
        else []
    )
    outs = {}
    for label, cast, fn in (("kernel", None, "kernel"), ("ref", torch.float32, "rec"), ("low", None, "rec")):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        xs = leaves(cast)
        with torch.set_grad_enabled(grad):
            o, s = run(xs, fn)
        grads: tuple[Tensor, ...] = ()
        if grad:
            gg = torch.Generator(device="cuda").manual_seed(1)
            do = torch.randn(o.shape, device=dev, generator=gg)
            ds = torch.randn(s.shape, device=dev, generator=gg)
            wrt = [t for t in xs if t is not None and t.requires_grad]
            grads = torch.autograd.grad((o.float() * do).sum() + (s.float() * ds).sum(), wrt)
        torch.cuda.synchronize()
        outs[label] = (o.detach(), s.detach(), [gr.detach() for gr in grads], time.perf_counter() - t0)
    ko, ks, kg, _ = outs["kernel"]
    ro, rs, rg, _ = outs["ref"]
    lo, ls, lg, _ = outs["low"]
    row: dict[str, Any] = {
        "method": method + ("_kda" if kda else ""), "grad": grad, "B": b, "H": h, "N": n, "D": d, "dtype": str(dtype).replace("torch.", ""),
        "chunk": chunk, "finite": bool(torch.isfinite(ko).all()) and all(bool(torch.isfinite(x).all()) for x in kg),
    }  # fmt: skip
    checks = {"out": (ko, ro, lo, 2.0), "state": (ks, rs, ls, 2.0)}
    for nm, a, r, lw in zip(names, kg, rg, lg, strict=True):
        checks[nm] = (a, r, lw, 3.0)
    ok = True
    for nm, (a, r, lw, factor) in checks.items():
        err, err_low, peak = _err(a, r), _err(lw, r), _peak(r)
        bound = factor * err_low + 1e-5 * (1 + peak) + 0.5 * torch.finfo(dtype).eps * peak
        row[nm] = {"err": err, "err_lowp": err_low, "max_ref": peak, "rel": err / max(peak, 1e-30), "bound": bound,
                   "pass": err <= bound}  # fmt: skip
        ok = ok and err <= bound
    row["pass"] = ok and row["finite"]
    row["seconds"] = {label: round(outs[label][3], 2) for label in outs}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds after which no new case starts")
    args = ap.parse_args()
    start = time.perf_counter()
    import triton

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, "checks": [], "timings": []}  # fmt: skip
    bf, f32 = torch.bfloat16, torch.float32
    cases = [
        ("gla", 1, 16, 4096, 128, bf, 64, True),
        ("lightning", 1, 16, 4096, 128, bf, 64, True),
        ("linear", 1, 16, 4096, 128, bf, 64, True),
        ("gated_delta", 1, 16, 4096, 128, bf, 64, True),
        ("gated_delta_kda", 1, 16, 4096, 128, bf, 64, True),
        ("gla", 1, 16, 16384, 128, bf, 64, False),
        ("lightning", 1, 16, 16384, 128, bf, 64, False),
        ("gated_delta", 1, 16, 16384, 128, bf, 64, False),
        ("gla", 1, 2, 1000, 64, f32, 32, True),
        ("gated_delta_kda", 1, 2, 1000, 64, f32, 16, True),
    ]
    for case in cases:
        if time.perf_counter() - start > args.budget:
            result["checks"].append({"skipped": str(case), "why": "budget"})
            continue
        try:
            row = check(*case)
        except Exception as e:
            row = {"case": str(case), "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(row), flush=True)
        result["checks"].append(row)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
