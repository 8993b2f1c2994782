"""Probe forward-kernel schedules on the GPU that the library kernel does not use (yet), against cuDNN.

    python benchmarks/sigmoid_probe.py --out probe.json

A stand-alone non-causal FlashSigmoid forward (same math as attnlab.kernels.sigmoid.fwd: tanh-form
sigmoid, fp32 accumulator; full tiles only, so N must be a multiple of every block size) with three knobs:

- SPLIT: the query tile is processed as SPLIT independent row halves per key block, written so that one
  half's sigmoid can run while the other half's matrix product is in flight (FlashAttention-3's
  intra-warpgroup overlap, left to Triton's scheduler);
- WS: Triton's automatic warp specialization of the key loop (``tl.range(..., warp_specialize=True)``,
  a producer partition for the copies, consumer partitions for the math);
- DEVICE_DESC: tensor descriptors built on the host (0), in the kernel (``tl.make_tensor_descriptor``) over
  all B*H*N rows (1), or in the kernel per head as the library kernel builds them (2).

Each variant's output is compared with the library kernel's; all variants, the library kernel and cuDNN
SDPA softmax are timed in interleaved rounds (bf16, D=128, H=32, B=1). Results decide whether a knob goes
into the library kernel; the run's JSON and log are kept under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend
from triton.tools.tensor_descriptor import TensorDescriptor

from attnlab.bench.env import environment
from attnlab.bench.timing import attention_flops, measure_interleaved
from attnlab.kernels.sdpa import sdpa_dense
from attnlab.kernels.sigmoid import op
from attnlab.kernels.sigmoid.common import sigmoid_of


@triton.jit
def _tile_math(q, k, v, acc, half_scale, half_bias, FAST: tl.constexpr):
    s = tl.dot(q, k.T)
    p = sigmoid_of(s * half_scale + half_bias, FAST)
    return tl.dot(p.to(v.dtype), v, acc)


@triton.jit
def probe_fwd_kernel(
    Q, K, V, Out, ROWS, N, stride_n, half_scale, half_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, WS: tl.constexpr,
    DEVICE_DESC: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = BLOCK_M // SPLIT
    row0 = tl.program_id(1) * N
    if DEVICE_DESC == 2:  # per head, as the library kernel: int64 base offset, runtime shape and stride
        base = tl.program_id(1).to(tl.int64) * N * stride_n
        q_d = tl.make_tensor_descriptor(Q + base, shape=[N, D], strides=[stride_n, 1], block_shape=[HALF, D])
        k_d = tl.make_tensor_descriptor(
            K + base, shape=[N, D], strides=[stride_n, 1], block_shape=[BLOCK_N, D]
        )
        v_d = tl.make_tensor_descriptor(
            V + base, shape=[N, D], strides=[stride_n, 1], block_shape=[BLOCK_N, D]
        )
        o_d = tl.make_tensor_descriptor(
            Out + base, shape=[N, D], strides=[stride_n, 1], block_shape=[HALF, D]
        )
        row0 = 0
    elif DEVICE_DESC == 1:
        q_d = tl.make_tensor_descriptor(Q, shape=[ROWS, D], strides=[D, 1], block_shape=[HALF, D])
        k_d = tl.make_tensor_descriptor(K, shape=[ROWS, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        v_d = tl.make_tensor_descriptor(V, shape=[ROWS, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        o_d = tl.make_tensor_descriptor(Out, shape=[ROWS, D], strides=[D, 1], block_shape=[HALF, D])
    else:
        q_d = Q
        k_d = K
        v_d = V
        o_d = Out
    row_m = row0 + tl.program_id(0) * BLOCK_M
    if SPLIT == 1:
        q = q_d.load([row_m, 0])
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for start_n in tl.range(0, N, BLOCK_N, warp_specialize=WS):
            k = k_d.load([row0 + start_n, 0])
            v = v_d.load([row0 + start_n, 0])
            acc = _tile_math(q, k, v, acc, half_scale, half_bias, FAST)
        o_d.store([row_m, 0], acc.to(q.dtype))
    else:
        q0 = q_d.load([row_m, 0])
        q1 = q_d.load([row_m + HALF, 0])
        acc0 = tl.zeros([HALF, D], dtype=tl.float32)
        acc1 = tl.zeros([HALF, D], dtype=tl.float32)
        for start_n in tl.range(0, N, BLOCK_N, warp_specialize=WS):
            k = k_d.load([row0 + start_n, 0])
            v = v_d.load([row0 + start_n, 0])
            s0 = tl.dot(q0, k.T)
            s1 = tl.dot(q1, k.T)
            p0 = sigmoid_of(s0 * half_scale + half_bias, FAST)
            acc0 = tl.dot(p0.to(v.dtype), v, acc0)
            p1 = sigmoid_of(s1 * half_scale + half_bias, FAST)
            acc1 = tl.dot(p1.to(v.dtype), v, acc1)
        o_d.store([row_m, 0], acc0.to(q0.dtype))
        o_d.store([row_m + HALF, 0], acc1.to(q0.dtype))


def launch(q, k, v, o, cfg: dict) -> None:  # type: ignore[no-untyped-def]
    b, h, n, d = q.shape
    bm, bn = cfg["bm"], cfg["bn"]
    half = bm // cfg["split"]
    flat = [t.view(-1, d) for t in (q, k, v, o)]
    if cfg["device_desc"]:
        args = flat
    else:
        args = [
            TensorDescriptor(t, list(t.shape), list(t.stride()), [r, d])
            for t, r in zip(flat, (half, bn, bn, half), strict=True)
        ]
    probe_fwd_kernel[(n // bm, b * h)](
        *args, b * h * n, n, d, 0.5 * d**-0.5, -0.5 * math.log(n),
        BLOCK_M=bm, BLOCK_N=bn, D=d, SPLIT=cfg["split"], WS=cfg["ws"], DEVICE_DESC=cfg["device_desc"], FAST=q.is_cuda,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )  # fmt: skip


def variants() -> list[dict]:
    out = []
    for split in (1, 2):
        for ws in (False, True):
            for device_desc in (0, 1, 2):  # host descriptors, device ones over all rows, device ones per head
                if device_desc and not ws and split == 1:
                    continue  # descriptors alone: the library kernel already measures host ones
                for bm, bn, warps, stages in (
                    (128, 64, 4, 2),
                    (128, 64, 8, 2),
                    (128, 128, 8, 2),
                    (256, 64, 8, 2),
                ):
                    if split == 2 and bm // 2 < 16 * warps // 4:
                        continue
                    out.append(
                        {"split": split, "ws": ws, "device_desc": device_desc, "bm": bm, "bn": bn}
                        | {"warps": warps, "stages": stages}
                    )
    return out


def name(cfg: dict) -> str:
    return (
        f"split{cfg['split']}{'_ws' if cfg['ws'] else ''}{['', '_dev', '_head'][cfg['device_desc']]}"
        f"_{cfg['bm']}x{cfg['bn']}_w{cfg['warps']}s{cfg['stages']}"
    )


def probe(n: int, heads: int, d: int, only: list[str], target_s: float) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    scale, bias = d**-0.5, -math.log(n)
    flops = attention_flops(1, heads, n, n, d, d, None, "fwd")
    ref = op.sigmoid_attention(q, k, v, scale, bias, False)
    fns = {
        "cudnn_softmax": lambda: sdpa_dense(
            q, k, v, causal=False, scale=scale, kernels=[SDPBackend.CUDNN_ATTENTION]
        ),
        "library": lambda: op.sigmoid_attention(q, k, v, scale, bias, False),
    }
    for shape in op.FWD_SHAPES[:3]:  # the library kernel with explicit schedules
        m, bn, w, st, split, ws = shape
        cfg = triton.Config(
            {"BLOCK_M": m, "BLOCK_N": bn, "SPLIT": split, "WS": ws}, num_warps=w, num_stages=st
        )
        key = f"library_{m}x{bn}_w{w}s{st}_split{split}{'_ws' if ws else ''}"
        fns[key] = lambda cfg=cfg: op.sigmoid_fwd_launch(q, k, v, scale, bias, False, config=cfg)
    rows: dict[str, dict] = {}
    for cfg in variants():
        if only and name(cfg) not in only:
            continue
        o = torch.empty_like(q)
        row = {"n": n, "variant": name(cfg), **cfg}
        try:
            launch(q, k, v, o, cfg)
            torch.cuda.synchronize()
            err = (o.float() - ref.float()).abs().max().item()
            row.update(max_diff=err, wrong=err > 2e-2)
            if not row["wrong"]:
                fns[row["variant"]] = lambda o=o, cfg=cfg: launch(q, k, v, o, cfg)
        except Exception as e:  # compile failures, shared memory overflow
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows[row["variant"]] = row
        print(n, row["variant"], row.get("error") or f"max diff {row['max_diff']:.2e}", flush=True)
    times = measure_interleaved(
        fns, torch.device("cuda"), warmup=2, target_s=target_s, min_reps=5, max_reps=60
    )
    t_cudnn = times["cudnn_softmax"].median_ms
    out = []
    for key, t in times.items():
        row = rows.get(key, {"n": n, "variant": key})
        row.update(ms=t.median_ms, tflops=flops / t.median_ms / 1e9, ratio=t_cudnn / t.median_ms)
        out.append(row)
    for row in rows.values():
        if "ms" not in row:
            out.append(row)
    for row in sorted((r for r in out if "ms" in r), key=lambda r: r["ms"]):
        print(
            f"  n={n} {row['variant']:<32} {row['ms']:8.3f} ms {row['tflops']:6.0f} TF/s ratio {row['ratio']:.3f}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sigmoid_probe.json")
    ap.add_argument("--lengths", default="32768,8192,16384")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated probe variant names (default: all)")
    ap.add_argument("--target-s", type=float, default=4.0, help="seconds of interleaved rounds per length")
    args = ap.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    env = environment(torch.device("cuda"))
    rows: list[dict] = []
    for n in (int(x) for x in args.lengths.split(",")):
        rows += probe(n, args.heads, args.head_dim, [x for x in args.only.split(",") if x], args.target_s)
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
