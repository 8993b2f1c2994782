"""Which side is right when a batched decode check disagrees: one decode step of a batch against each of its
rows run alone, for transformers' SDPA (under each SDPA backend torch has) and an attnlab decode method at a
budget covering the whole cache (exact attention).

decode_e2e's 8 x 128K check found every attnlab method (full budget, exact) disagreeing with transformers'
SDPA by the same logit difference, while at 8 x 32K and 1 x 128K all agreed. This script tells which one
moved: a batch's row must give the logits that row gives alone (B=1), whatever the backend.

Steps (a config-built Llama-3-8B-shaped model, random weights, bf16, as decode_e2e): prefill each row alone
(B=1), keep its cache and first greedy token; the batch's cache is the rows' caches concatenated. Then one
greedy step from a copy of a cache, for each side:

- ``sdpa`` (transformers' attention, torch's default SDPA choice), and ``sdpa[<backend>]`` with torch's
  SDPA restricted to one backend (math, flash, efficient, cudnn; a backend that refuses the shape is
  recorded as an error);
- ``attnlab:<method>`` (``attnlab.hf.use(model, decode=method, decode_params={"budget": whole cache})``).

Each side runs on the batch and on every row alone; a row's ``diff`` is the largest absolute difference of
its last-position logits (batched minus alone); ``cross`` compares each batched side with attnlab's row-alone
logits (the reference the others are held to, named in ``reference``; at full budget attnlab's decode
runs the same flash kernel as SDPA restricted to flash, so this is a check of batching and of the
integration, not an independent kernel); ``tokens_equal_reference`` compares each side's batched greedy
tokens with the reference's row-alone ones, beside the reference's own top-2 gap per row (a tie).

GPU (H100, ~1-2 min):  python benchmarks/decode_rows_check.py --out $OUT/decode_rows_check.json
CPU smoke:             python benchmarks/decode_rows_check.py --tiny --context 40 --batch 3 --out /tmp/rc.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_e2e import concat_caches
from hf_bench import build_model

from attnlab.bench.env import environment

SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")


@contextlib.contextmanager
def side(model: Any, name: str, budget: int) -> Iterator[None]:
    """The attention a side runs: ``sdpa``, ``sdpa[<backend>]`` or ``attnlab:<method>``."""
    if name == "sdpa":
        yield
    elif name.startswith("sdpa["):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        which = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}  # fmt: skip
        with sdpa_kernel([which[name[5:-1]]]):
            yield
    else:
        from attnlab.hf import use

        with use(model, decode=name.split(":", 1)[1], decode_params={"budget": budget}):
            yield


@torch.no_grad()
def step(model: Any, cache: Any, token: torch.Tensor, name: str, budget: int) -> torch.Tensor:
    """Last-position logits (fp32) of one decode step from a copy of ``cache``."""
    work = copy.deepcopy(cache)
    with side(model, name, budget):
        out = model(token, past_key_values=work, use_cache=True)
    logits = out.logits[:, -1].float()
    del work, out
    return logits


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama-3 config (CPU smoke)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--method", default="page_topk", help="the attnlab decode method (full budget)")
    args = ap.parse_args(argv)
    from transformers import DynamicCache

    from attnlab.catalog.decode import register_methods

    register_methods()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.tiny, None if args.tiny else args.layers, device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.context), generator=g).to(device)
    caches, tokens = [], []
    with torch.no_grad():
        for r in range(args.batch):
            c = DynamicCache(config=model.config)
            out = model(ids[r : r + 1], past_key_values=c, use_cache=True, logits_to_keep=1)
            caches.append(c)
            tokens.append(out.logits[:, -1:].argmax(-1))
            del out
    token = torch.cat(tokens, dim=0)
    batched = concat_caches([copy.deepcopy(c) for c in caches])
    budget = args.context + 1
    names = ["sdpa", *(f"sdpa[{b}]" for b in SDPA_BACKENDS), f"attnlab:{args.method}"]
    if device.type != "cuda":
        names = ["sdpa", "sdpa[math]", f"attnlab:{args.method}"]
    sides: dict[str, Any] = {}
    reference: str | None = None
    alone_ref: list[torch.Tensor] = []
    for name in reversed(names):  # attnlab first: its row-alone logits are the cross reference
        try:
            both = step(model, batched, token, name, budget)
            alone = [step(model, caches[r], tokens[r], name, budget) for r in range(args.batch)]
        except RuntimeError as e:  # a restricted SDPA backend that refuses the shape
            sides[name] = {"error": str(e).splitlines()[0][:200]}
            continue
        if reference is None:  # (attnlab's side, unless it failed: then the first side that ran)
            reference, alone_ref = name, alone
        ref_tokens = torch.stack([a[0] for a in alone_ref]).argmax(-1)
        sides[name] = {
            "diff": [float((both[r] - alone[r]).abs().max()) for r in range(args.batch)],
            "cross": [float((both[r] - alone_ref[r]).abs().max()) for r in range(args.batch)],
            "alone_cross": [float((alone[r] - alone_ref[r]).abs().max()) for r in range(args.batch)],
            "tokens_equal_alone": bool(torch.equal(both.argmax(-1), torch.stack([a[0] for a in alone]).argmax(-1))),
            "tokens_equal_reference": bool(torch.equal(both.argmax(-1), ref_tokens)),
            # the gap between the reference's top two logits per row: near 0, any side may pick either
            "reference_top2_gap": [float(g[0] - g[1]) for g in (a[0].topk(2).values for a in alone_ref)],
        }  # fmt: skip
        print(name, {k: v if isinstance(v, bool) else [round(x, 3) for x in v] for k, v in sides[name].items()},
              flush=True)  # fmt: skip
    result = {"env": environment(device), "args": vars(args) | {"out": str(args.out)}, "reference": reference,
              "sides": sides}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, default=str, indent=1))
    return result


if __name__ == "__main__":
    main()
