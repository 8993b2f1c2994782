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
import itertools
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
        # (negated before the expand: the stride-0 gate lightning.py hands the kernels, the scalar-gate path)
        extra["g"] = (-torch.tensor(alibi_slopes(h), device=dev))[None, :, None, None].expand(b, h, n, d)
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


def check_varlen(method: str, lens: list[int], h: int, d: int, chunk: int) -> dict[str, Any]:
    """Packed sequences (bf16): output and per-sequence final states of ``gla_chunk_varlen`` (lightning's
    decays) or ``delta_chunk_varlen`` (per-head gate) against the recurrence run on each sequence alone,
    in fp32 and in bf16 (the 2x rule)."""
    from attnlab.kernels.linear.op import delta_chunk_varlen, gla_chunk_varlen

    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    t = sum(lens)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(1, h, t, d, device=dev, generator=gen) for _ in range(3))
    h0 = torch.randn(len(lens), h, d, d, device=dev, generator=gen)
    beta = torch.sigmoid(torch.randn(1, h, t, device=dev, generator=gen))
    if method == "gated_delta":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = F.logsigmoid(torch.randn(1, h, t, 1, device=dev, generator=gen) + 4.0)
    else:
        g = -torch.tensor(alibi_slopes(h), device=dev)[None, :, None, None].expand(1, h, t, 1)
    qb, kb, vb = (x.to(dt) for x in (q, k, v))
    scale = d**-0.5
    cu_t = torch.tensor(cu, device=dev)
    if method == "gated_delta":
        o, s = delta_chunk_varlen(qb, kb, vb, beta, g, scale, h0, chunk, cu_t)
    else:
        o, s = gla_chunk_varlen(qb, kb, vb, g, scale, h0, chunk, cu_t)
    refs: dict[str, tuple[Tensor, Tensor]] = {}
    for label, cast in (("ref", torch.float32), ("low", dt)):
        outs, states = [], []
        for i, (a, b) in enumerate(itertools.pairwise(cu)):
            qs, ks, vs = (x[:, :, a:b].to(cast) for x in (qb, kb, vb))
            s0 = h0[i : i + 1].to(cast)
            if method == "gated_delta":
                ro, rs = delta_recurrence(
                    qs, ks, vs, beta[:, :, a:b].to(cast), g[:, :, a:b].to(cast), scale, s0
                )
            else:
                ro, rs = gated_recurrence(qs, ks, vs, g[:, :, a:b].to(cast), scale, s0)
            outs.append(ro)
            states.append(rs)
        refs[label] = (torch.cat(outs, 2), torch.cat(states, 0))
    row: dict[str, Any] = {"method": method + "_varlen", "lens": lens, "H": h, "D": d, "chunk": chunk}
    ok = True
    pairs: list[tuple[str, Tensor, Tensor, Tensor]] = [
        ("out", o, refs["ref"][0], refs["low"][0]),
        ("state", s, refs["ref"][1], refs["low"][1]),
    ]
    for nm, got, ref, low in pairs:
        err, err_low, peak = _err(got, ref), _err(low, ref), _peak(ref)
        bound = 2.0 * err_low + 1e-5 * (1 + peak) + 0.5 * torch.finfo(dt).eps * peak
        row[nm] = {"err": err, "err_lowp": err_low, "max_ref": peak, "bound": bound, "pass": err <= bound}
        ok = ok and err <= bound
    row["pass"] = ok
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
    for method in ("lightning", "gated_delta"):
        try:
            row = check_varlen(method, [1000, 63, 4096, 1, 2900], 16, 128, 64)
        except Exception as e:
            row = {"case": method + "_varlen", "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(row), flush=True)
        result["checks"].append(row)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
