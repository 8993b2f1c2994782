"""RMS of each layer's attention output (before o_proj) at initialisation, width 64, head dim 32, on one MQAR
batch: softmax, gated_delta and lightning, with and without the output norm. Run from the repository root:
``OMP_NUM_THREADS=1 python benchmarks/results/cpu-2026-11-23-s3/gated-delta-width64/init_rms.py``."""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

sys.path.insert(0, "benchmarks")
import architecture_comparison as ac


def main() -> None:
    torch.set_num_threads(1)
    for norm in (False, True):
        for name in ("softmax", "gated_delta", "lightning"):
            args: Any = types.SimpleNamespace(
                device="cpu", head_dim=32, context=64, pairs=[2, 4, 8], window=16, mqar_rows=48,
                mqar_ids=128, chunk=8, text_rows=0, layers=2, vocab=1024, conv=3, no_output_norm=not norm,
            )  # fmt: skip
            model = ac.build(ac.model_config(args, 64, name), 3, "cpu", 0, None)
            seen: dict[int, tuple[float, float]] = {}
            for i, layer in enumerate(model.model.layers):
                att = layer.self_attn
                run = att._run

                def hook(q, k, v, inputs, i=i, run=run, seen=seen):  # type: ignore[no-untyped-def]
                    out = run(q, k, v, inputs)
                    seen[i] = (float(v.pow(2).mean().sqrt()), float(out.pow(2).mean().sqrt()))
                    return out

                att._run = hook
            batch = ac.make_step(args, types.SimpleNamespace(rows=[]), 0, 0)
            with torch.no_grad():
                model.model(input_ids=batch["mx"])
            cells = ", ".join(f"layer {i}: v {a:.4f} -> out {o:.4f}" for i, (a, o) in seen.items())
            print(f"{'norm' if norm else 'no norm'} {name}: {cells}")


if __name__ == "__main__":
    main()
