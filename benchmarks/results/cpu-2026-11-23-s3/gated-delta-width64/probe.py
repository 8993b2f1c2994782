"""The 250-step CPU probes behind the output norm (run at 0fb3f93, before the norm was in the adapter).

Same setup as ``benchmarks/results/cpu-2026-11-23/architectures-mqar`` (width 64, head dim 32, 2 layers,
64 tokens, MQAR with 2/4/8 pairs, 48 rows a step, 128 key and 128 value ids, chunk 8, lr 3e-3, short conv
3), ``STEPS`` steps, one thread. ``base``: the adapter as it was; ``onorm``: a per-head ``nn.RMSNorm`` (eps
1e-5, gain 1) on every non-softmax layer's attention output, as ``ModelConfig.linear_output_norm`` now
does (``gain=G``: its gain initialised to G, default 1); ``gnorm``: that norm times ``silu(g_proj(x))``, fla's default gated form (``FusedRMSNormGated``). At a commit with the norm in the adapter, ``base`` needs ``no_output_norm=True`` (set below).

Run: ``OMP_NUM_THREADS=1 python probe.py VARIANT STEPS [name=lightning]`` from the repository root.
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any

import torch
from torch import nn

sys.path.insert(0, "benchmarks")
import architecture_comparison as ac

from attnlab.organisms import architectures as arch


def main() -> None:
    variant, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    args: Any = types.SimpleNamespace(
        device="cpu", head_dim=32, context=64, pairs=[2, 4, 8], eval_pairs=[4, 8, 16], window=16,
        mqar_rows=48, mqar_ids=128, chunk=8, text_rows=0, eval_mqar_rows=256, layers=2, vocab=1024, conv=3,
        lr=3e-3, lm_weight=0.25, gate_bias=None, name="gated_delta", no_output_norm=True, gain=1.0,
    )  # fmt: skip
    for extra in sys.argv[3:]:
        key, value = extra.split("=")
        setattr(args, key, value)
    torch.manual_seed(0)
    model = ac.build(ac.model_config(args, 64, args.name), args.conv, "cpu", 0, args.gate_bias)
    if variant in ("onorm", "gnorm"):
        for layer in model.model.layers:
            att = layer.self_attn
            if isinstance(att, arch.MethodAttention) and att.method != "softmax":
                att.o_norm = nn.RMSNorm(att.head_dim, eps=1e-5)
                nn.init.constant_(att.o_norm.weight, float(args.gain))
                run = att._run
                att._run = lambda q, k, v, inputs, att=att, run=run: att.o_norm(run(q, k, v, inputs))
            if isinstance(att, arch.MethodAttention) and att.method != "softmax" and variant == "gnorm":
                # fla's default: o_norm(o) * silu(g_proj(x)), g_proj (hidden -> heads * head_dim), no bias
                att.g_out = nn.Linear(64, att.heads * att.head_dim, bias=False)
                nn.init.normal_(att.g_out.weight, std=0.02)
                make = att._inputs

                def inputs_of(x: torch.Tensor, att: Any = att, make: Any = make) -> dict[str, torch.Tensor]:
                    b, n, _ = x.shape
                    att.gate_now = att.g_out(x).view(b, n, att.heads, att.head_dim).transpose(1, 2)
                    return make(x)  # type: ignore[no-any-return]

                att._inputs = inputs_of
                normed = att._run
                att._run = lambda q, k, v, inputs, att=att, normed=normed: (
                    normed(q, k, v, inputs) * (nn.functional.silu(att.gate_now))
                )
    none = types.SimpleNamespace(rows=[], tasks=[])
    curve, secs = ac.train(model, args, lambda s: ac.make_step(args, none, 0, s), steps, print)
    res = ac.evaluate(model, args, none, 0)
    out = {
        "variant": variant,
        "method": args.name,
        "gain": float(args.gain),
        "steps": steps,
        "mqar": res["mqar"],
        "train_s": round(secs),
    }
    print(json.dumps({**out, "loss_every_10": curve}), flush=True)


if __name__ == "__main__":
    main()
