"""KV cache memory and decode speed of eviction that frees the cache (attnlab.hf ``free_kv``) vs masking.

A Llama-3-8B-shaped model (hidden 4096, GQA 32:8, head dim 128, vocab 128256; ``--layers`` layers, default
4) built from its config with random weights, bf16 on CUDA, batch 1, a ``--context`` token prompt (default
32768). Per side (transformers sdpa; attnlab softmax; snapkv and h2o at ``--budget`` tokens, masking and
freeing; retrieval_heads_kv without retrieval heads, sinks + window, masking and freeing):

- ``cache``: after the prefill and the first decode step (where the eviction methods decide and, with
  ``free_kv``, compact): ``attnlab.hf.kv_memory`` per layer (allocated / kept / read bytes, summed) and
  ``torch.cuda.memory_allocated`` minus the model's own bytes (the cache plus whatever generate holds);
  ``peak``: ``torch.cuda.max_memory_allocated`` over that call minus the model's bytes (the prefill's
  activations and its full cache, before any eviction).
- ``decode``: wall time of ``generate(max_new_tokens=1 + S)`` minus ``generate(max_new_tokens=1)`` (same
  prompt, greedy), S = ``--steps``: S decode steps, reported as tokens per second.
- check: the freeing side's greedy tokens and logits against the masking side's at the same budget.

Usage (GPU): python kv_memory_bench.py --out $OUT/kv_memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def build(layers: int, device: torch.device, tiny: bool) -> Any:
    import transformers

    from attnlab.hf import tiny_config

    cfg = tiny_config("llama3", layers=layers, vocab=128000, eos_token_id=None) if tiny else transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=1, eos_token_id=None,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation="sdpa", dtype=torch.bfloat16
        )
    return model.eval()


def sides(budget: int) -> list[tuple[str, dict[str, Any] | None]]:
    snap = {"decode": "snapkv", "decode_params": {"budget": budget}}
    h2o = {"decode": "h2o", "decode_params": {"budget": budget}}
    # sinks + window on every KV head (no retrieval head): StreamingLLM-style decode
    stream = {"decode": "retrieval_heads_kv", "decode_params": {"budget": budget, "sink": 4}}
    return [
        ("sdpa", None),
        ("snapkv_masked", snap),
        ("snapkv_free", {**snap, "free_kv": True}),
        ("h2o_masked", h2o),
        ("h2o_free", {**h2o, "free_kv": True}),
        ("softmax", {}),
        ("retrieval_heads_kv_masked", stream),
        ("retrieval_heads_kv_free", {**stream, "free_kv": True}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timing passes per side (the last is reported)")
    ap.add_argument("--check-context", type=int, default=4096, help="fp32 check: freed vs masked (0: skip)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny Llama-3-shaped model")
    args = ap.parse_args()

    import transformers

    import attnlab.catalog.decode  # noqa: F401  (registers the decode methods)
    from attnlab.hf import kv_memory, use

    cuda = not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    model = build(args.layers, dev, args.tiny)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    empty = torch.cuda.empty_cache if cuda else (lambda: None)
    sync()
    base = allocated()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128000, (1, args.context), generator=g).to(dev)
    warm = ids[:, : min(1024, args.context // 2)]
    out: dict[str, Any] = {
        "commit": os.environ.get("ATTNLAB_COMMIT", "?"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": f"Llama-3-8B-shaped, {args.layers} layers, bf16, random weights",
        "context": args.context,
        "budget": args.budget,
        "decode_steps": args.steps,
        "model_bytes": base,
        "sides": {},
    }
    path = Path(args.out)
    seqs: dict[str, Any] = {}

    def gen(n: int, **kw: Any) -> Any:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, **kw)  # fmt: skip

    for name, kw in sides(args.budget):
        row: dict[str, Any] = {}
        ctx = contextlib.nullcontext(None) if kw is None else use(model, **kw)
        t0 = time.perf_counter()
        with torch.no_grad(), ctx as rt:
            model.generate(warm, max_new_tokens=4, do_sample=False)  # warm-up (kernels, compiles)
            sync()
            row["warmup_s"] = round(time.perf_counter() - t0, 2)
            torch.cuda.reset_peak_memory_stats() if cuda else None
            res = gen(2, return_dict_in_generate=True)
            sync()
            row["cache_cuda_bytes"] = allocated() - base
            row["peak_cuda_bytes"] = peak() - base
            mem = kv_memory(res.past_key_values, rt)
            row["cache_tokens"] = [m.tokens for m in mem]
            row["allocated_bytes"] = sum(m.allocated for m in mem)
            row["kept_bytes"] = sum(m.kept for m in mem)
            row["read_bytes"] = sum(m.read for m in mem)
            row["freed_layers"] = sum(m.freed for m in mem)
            row["logical_length"] = res.past_key_values.get_seq_length()
            del res, mem
            empty()
            rates = []
            for _ in range(args.repeats):  # the first pass may compile kernels for the 32K shapes
                times = {}
                for n in (1, 1 + args.steps):
                    sync()
                    t = time.perf_counter()
                    r = gen(n, return_dict_in_generate=True, output_logits=True)
                    sync()
                    times[n] = time.perf_counter() - t
                rates.append(round(args.steps / (times[1 + args.steps] - times[1]), 1))
            seqs[name] = (r.sequences[0, args.context :].cpu(), torch.stack(r.logits).float().cpu())
            del r
            empty()
        row["prefill_plus_1_s"] = round(times[1], 4)
        row["decode_tokens_per_s"] = rates[-1]
        row["decode_tokens_per_s_passes"] = rates
        out["sides"][name] = row
        path.write_text(json.dumps(out, indent=1))
        print(name, row, flush=True)
    checks: dict[str, Any] = {}
    for m in ("snapkv", "h2o", "retrieval_heads_kv"):
        a, b = seqs.get(f"{m}_masked"), seqs.get(f"{m}_free")
        if a is None or b is None:
            continue
        same = (a[0] == b[0]).tolist()
        first = same.index(False) if False in same else len(same)
        checks[m] = {
            "tokens_equal": all(same),
            "equal_prefix": first,
            "max_logit_diff_before_divergence": float((a[1][: first + 1] - b[1][: first + 1]).abs().max()),
        }
    sd, sm = seqs.get("sdpa"), seqs.get("softmax")
    if sd is not None and sm is not None:
        checks["softmax_vs_sdpa_tokens_equal"] = bool(torch.equal(sd[0], sm[0]))
    out["checks"] = checks
    path.write_text(json.dumps(out, indent=1))
    print("checks", checks, flush=True)
    if args.check_context:
        del model
        empty()
        out["checks_fp32"] = check_fp32(args, dev)
        path.write_text(json.dumps(out, indent=1))
        print("checks_fp32", out["checks_fp32"], flush=True)


def check_fp32(args: Any, dev: torch.device) -> dict[str, Any]:
    """The same model in fp32 at ``--check-context`` tokens, budget a quarter of it: the freed side's greedy
    tokens and logits against the masking side's (bf16 rounding of two different attention paths, the
    selection over kept indices vs exact attention over the compacted cache, flips near-tied tokens of a
    random-weight model; fp32 shows whether the functions agree)."""
    from attnlab.hf import use

    model = build(args.layers, dev, args.tiny).float()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128000, (1, args.check_context), generator=g).to(dev)
    budget = args.check_context // 4
    res = {}
    for method, params in (
        ("snapkv", {"budget": budget}),
        ("h2o", {"budget": budget}),
        ("retrieval_heads_kv", {"budget": budget, "sink": 4}),
    ):
        got = {}
        for free in (False, True):
            with torch.no_grad(), use(model, decode=method, decode_params=params, free_kv=free) as rt:
                r = model.generate(ids, max_new_tokens=17, min_new_tokens=17, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)  # fmt: skip
                got[free] = (r.sequences[0].cpu(), torch.stack(r.logits).float().cpu(), len(rt.compacted))
        (sa, la, _), (sb, lb, compacted) = got[False], got[True]
        res[method] = {
            "context": args.check_context, "budget": budget, "tokens_equal": bool(torch.equal(sa, sb)),
            "max_logit_diff": float((la - lb).abs().max()), "max_logit": float(la.abs().max()),
            "compacted_layers": compacted,
        }  # fmt: skip
    return res


if __name__ == "__main__":
    main()
