"""End-to-end decode rows in one command: prefill time and per-token decode time of a config-built
Llama-3-8B-shaped model at each (context, batch), every decode method vs sdpa, with a full-budget token check.

For each context (default 32K and 128K) and batch (default 1 and 8):

1. **prefill** (sdpa, the prefill every decode side shares: transformers' own attention, as a user's
   ``use(model, decode=...)`` runs it): ``model(ids, use_cache=True, logits_to_keep=1)`` timed with CUDA
   events. Where ``batch x context`` exceeds ``--max-prefill-tokens`` (default 262144 = 8 x 32K; the 8B
   shape's MLP needs ~90 GB of activations for a one-call 8 x 128K prefill), the rows are prefilled one at a
   time (B=1 calls, ``prefill_mode: "rows"``), the row time is the median of those calls and the batch's
   prefill time is reported as ``batch x`` that median (``median_ms``), and the batch's cache is the rows'
   caches concatenated.
2. **decode**: the prefilled cache is copied for each side (so every side starts from the same cache and
   first token), then ``--warmup`` + ``--steps`` greedy steps ``model(token, past_key_values=cache)`` under
   ``attnlab.hf.use(model, decode=method, decode_params=...)``, each timed with CUDA events; sides run one
   after another, sdpa first and again last (``sdpa_after``: transformers' SDPA builds per-shape plans in
   its first steps at a new cache length; the last side shows its warmed speed). tokens/s = batch / step.
   Each row records the peak CUDA memory of its side and its cache length per row after the last step
   (``cache_tokens_after``: the context + the steps, or with ``free_kv=true`` in a method's parameters,
   passed to ``use(..., free_kv=True)``, what the method kept: per-step h2o holds its budget).
   With ``--cache static`` the prefilled tokens are moved into a StaticCache first (each step writes its
   token in place; a DynamicCache copies every layer's keys and values to grow them by one token, 4 GiB
   per layer and step at 8 x 128K), and the ``free_kv`` sides, which shrink a DynamicCache, are left out.
   The sdpa sides then run transformers' SDPA as it runs on a StaticCache: with a mask over every slot,
   which turns off its GQA path (the 8 KV heads repeated to 32 over the whole capacity) and flash, so it
   is slower than on a DynamicCache, while attnlab's sides cut the keys to the filled slots and keep GQA
   (at one host synchronisation per layer call, reading the cache position). Compare a method across the
   two caches, and each cache's methods with that cache's sdpa; not static methods with dynamic sdpa.
3. **check** (``--check-steps`` > 0): every method again from a copy of the same cache with a budget
   covering the whole sequence (exact), ``--check-steps`` greedy steps: ``tokens_equal`` says whether the
   greedy tokens equal sdpa's, ``max_abs_logit_diff`` how far the logits are (bf16 kernels differ: sdpa and
   the exact fallback may run different attention kernels, so a near-tie can flip a token on random
   weights; the logit difference says whether that happened). :func:`divergence` adds the first step whose
   token differs, the logit difference up to it (like for like: both sides decoded the same tokens until
   then) and, per differing row, whether logit differences that small swap the two tokens (a near-tie).

KV memory: ``layers x batch x context x 2 (K, V) x 8 KV heads x 128 x 2 bytes`` = 4 KiB per token and layer:
at 8 x 128K with the default 4 layers, 16 GiB for the prefilled cache and 16 GiB for the side's copy.

Output: compact JSON (``--out``): env, args, and one row per (context, batch, phase, side).

GPU (H100, ~5-8 min):  python benchmarks/decode_e2e.py --out $OUT/decode_e2e.json
CPU smoke:             python benchmarks/decode_e2e.py --tiny --contexts 48 --batches 1 2 --steps 2 \\
                           --warmup 1 --budget 16 --check-steps 2 --max-prefill-tokens 64 --out /tmp/e2e.json
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

from hf_bench import Clock, build_model, parse_method, row, side_context

from attnlab.bench.env import environment

#: every decode method at the budget (``{budget}`` filled in), and per-step H2O beside kvpress's h2o
METHODS = (
    "page_topk:budget={budget}",
    "snapkv:budget={budget}",
    "h2o:budget={budget}",
    "h2o:budget={budget},per_step=true,recent={half},normalize=false",
    "h2o:budget={budget},per_step=true,recent={half},normalize=false,free_kv=true",
    "tidal:budget={budget}",
    "recycled:budget={budget}",
    "tokenselect:budget={budget}",
    "retrieval_heads_kv:budget={budget}",
)
#: what ``--tiny`` adds to a method's parameters (tokenselect's default sinks + window exceed a tiny budget)
TINY_EXTRA = {"tokenselect": ",n_init=2,n_local=2"}


@contextlib.contextmanager
def decode_context(model: Any, name: str, params: dict[str, Any]) -> Iterator[Any]:
    """hf_bench's decode side; a ``free_kv`` parameter goes to ``use`` (the cache freed as the method evicts)."""
    if "free_kv" not in params:
        with side_context(model, "decode", name, params) as rt:
            yield rt
        return
    from attnlab.hf import use

    rest = {k: v for k, v in params.items() if k != "free_kv"}
    with use(model, decode=name, decode_params=rest, free_kv=bool(params["free_kv"])) as rt:
        yield rt


def concat_caches(caches: list[Any]) -> Any:
    """One DynamicCache holding the rows of several (B=1) caches of equal length, in order."""
    out = caches[0]
    for i, layer in enumerate(out.layers):
        layer.keys = torch.cat([c.layers[i].keys for c in caches], dim=0)
        layer.values = torch.cat([c.layers[i].values for c in caches], dim=0)
    return out


def to_static(cache: Any, model: Any, max_len: int) -> Any:
    """A StaticCache of ``max_len`` slots holding ``cache``'s tokens (``--cache static``): the decode steps
    then write each new token in place instead of growing every layer's keys and values by a copy."""
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=max_len)
    for i, layer in enumerate(cache.layers):
        n = layer.keys.shape[2]
        pos = torch.arange(n, device=layer.keys.device)
        static.update(layer.keys, layer.values, i, {"cache_position": pos})
    return static


def cache_tokens(cache: Any) -> int:
    """Tokens per row the cache holds: its keys' length (a DynamicCache; with free_kv what the method kept)
    or, for a StaticCache, the filled slots."""
    from transformers import StaticCache

    if isinstance(cache, StaticCache):
        return int(cache.get_seq_length())
    return int(cache.layers[0].keys.shape[2])


@torch.no_grad()
def prefill(
    model: Any, ids: torch.Tensor, reps: int, max_tokens: int, device: torch.device
) -> tuple[dict[str, Any], Any, torch.Tensor]:
    """Timed sdpa prefill (module docstring); returns (row, the cache of the last call, first greedy token)."""
    from transformers import DynamicCache

    b, n = ids.shape
    clock = Clock(device)
    rows_mode = b * n > max_tokens
    cache: Any = None
    token: torch.Tensor | None = None
    if not rows_mode:
        for _ in range(reps):
            cache = DynamicCache(config=model.config)
            with clock.time("prefill"):
                out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            del out
    else:
        caches, tokens = [], []
        for r in range(b):
            cache_r = DynamicCache(config=model.config)
            with clock.time("prefill"):
                out = model(ids[r : r + 1], past_key_values=cache_r, use_cache=True, logits_to_keep=1)
            caches.append(cache_r)
            tokens.append(out.logits[:, -1:].argmax(-1))
            del out
        cache, token = concat_caches(caches), torch.cat(tokens, dim=0)
        del caches
    t = clock.results()["prefill"]
    fields = row(t, phase="prefill", side="sdpa", method="sdpa", params={})
    fields["prefill_mode"] = "rows" if rows_mode else "batched"
    if rows_mode:  # the batch's prefill: b row calls
        fields["row_median_ms"] = fields["median_ms"]
        fields["median_ms"] = b * t.median_ms
    assert token is not None
    return fields, cache, token


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.no_grad()
def decode_side(
    model: Any, base: Any, token: torch.Tensor, label: str, name: str, params: dict[str, Any],
    steps: int, warmup: int, device: torch.device,
) -> tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """``warmup`` + ``steps`` greedy decode steps of one side from a copy of ``base``; returns (row, tokens
    of every step, last-position logits of every step)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = copy.deepcopy(base)
    clock = Clock(device)
    tokens, logits = [], []
    with decode_context(model, name, params):
        for step in range(warmup + steps):
            if step < warmup:
                out = model(token, past_key_values=cache, use_cache=True)
            else:
                with clock.time(label):
                    out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            logits.append(out.logits[:, -1].float())
            del out
    fields = row(clock.results()[label], phase="decode", side=label, method=name, params=params)
    fields["tokens_per_s"] = token.shape[0] * 1e3 / fields["median_ms"]
    fields["peak_gib"] = peak_gib(device)
    fields["cache_tokens_after"] = cache_tokens(cache)  # per row: physical (free_kv: kept)
    del cache
    return fields, tokens, logits


def divergence(
    tokens: list[torch.Tensor],
    logits: list[torch.Tensor],
    want: list[torch.Tensor],
    dense: list[torch.Tensor],
) -> dict[str, Any]:
    """Where a check's greedy tokens first leave sdpa's, and whether each differing row is a near-tie.

    Up to and including the first step whose token differs, both sides decoded the same tokens, so their
    logits there compare like for like (``logit_diff_before_divergence``, over all rows); after it they
    decode different text and any difference follows. ``noise``: the largest like-for-like difference on
    the rows that did not diverge (the two sides' kernels differing, with nothing wrong). For each row that
    differs at that step (``divergence``): ``dense_gap``, how far sdpa's logit for its own token is above
    its logit for the side's token; ``side_gap``, the reverse in the side's logits; ``row_diff``, the row's
    own like-for-like difference; ``near_tie``: ``dense_gap <= noise`` (sdpa preferred its token by no more
    than the noise between two correct sides; None when every row diverged). ``all_near_ties``: every
    differing row is one."""
    steps = len(tokens)
    first = next((s for s in range(steps) if not torch.equal(tokens[s], want[s])), None)
    upto = steps if first is None else first + 1
    before = max((float((logits[s] - dense[s]).abs().max()) for s in range(upto)), default=0.0)
    out: dict[str, Any] = {"first_divergence_step": first, "logit_diff_before_divergence": before}
    if first is None:
        return out
    differs = (tokens[first] != want[first]).flatten()
    same = (~differs).nonzero().flatten()
    noise = (
        max(float((logits[s][same] - dense[s][same]).abs().max()) for s in range(upto)) if len(same) else None
    )
    rows = []
    for r in differs.nonzero().flatten().tolist():
        w, t = int(want[first].flatten()[r]), int(tokens[first].flatten()[r])
        gap = float(dense[first][r, w] - dense[first][r, t])
        rows.append({"row": r, "dense_token": w, "side_token": t, "dense_gap": gap,
                     "side_gap": float(logits[first][r, t] - logits[first][r, w]),
                     "row_diff": max(float((logits[s][r] - dense[s][r]).abs().max()) for s in range(upto)),
                     "near_tie": None if noise is None else gap <= noise})  # fmt: skip
    out.update(noise=noise, divergence=rows, all_near_ties=all(r["near_tie"] for r in rows))
    return out


def full_budget(name: str, params: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The method's parameters with a budget covering ``tokens`` (exact attention at every step): set
    wherever the method's parameter class has a ``budget`` field, given on the command line or not (a
    method named without parameters runs its default budget, which the check must raise too)."""
    import dataclasses

    import attnlab

    fields = {f.name for f in dataclasses.fields(attnlab.methods()[name].param_class)}
    return {**params, "budget": tokens} if "budget" in fields else params


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--tiny", action="store_true", help="a 2-layer tiny Llama-3-shaped model (CPU smoke test)"
    )
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B shape (default 4 of 32)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget", type=int, default=4096, help="decode budget in tokens (default 4096)")
    ap.add_argument("--methods", nargs="*", default=None, help="name:key=value,... (default: every method)")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prefill-reps", type=int, default=3, help="timed batched prefill calls")
    ap.add_argument("--max-prefill-tokens", type=int, default=8 * 32768, help="above: prefill row by row")
    ap.add_argument(
        "--check-steps", type=int, default=4, help="greedy steps of the full-budget check (0: none)"
    )
    ap.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                    help="the decode cache: transformers' DynamicCache (grows by a copy every step) or the "
                    "prefilled tokens moved into a StaticCache (written in place); free_kv sides need the "
                    "dynamic one and are left out with static")  # fmt: skip
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from attnlab.catalog.decode import register_methods

    register_methods()
    model = build_model(args.tiny, None if args.tiny else args.layers, device, dtype)
    specs = args.methods or [
        m.format(budget=args.budget, half=args.budget // 2)
        + (TINY_EXTRA.get(m.split(":")[0], "") if args.tiny else "")
        for m in METHODS
    ]
    methods = [(m, *parse_method(m)) for m in specs]
    if args.cache == "static":
        methods = [m for m in methods if "free_kv" not in m[2]]
    rows: list[dict[str, Any]] = []
    result = {
        "env": environment(device),
        "model": {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                        "num_key_value_heads", "head_dim", "vocab_size")},
        "args": vars(args) | {"out": str(args.out)},
        "rows": rows,
    }  # fmt: skip

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, default=str, separators=(",", ":")))

    g = torch.Generator().manual_seed(0)
    for n in args.contexts:
        for b in args.batches:
            common = {"context": n, "batch": b, "cache": args.cache}
            ids = torch.randint(3, model.config.vocab_size, (b, n), generator=g).to(device)
            p_row, base, token = prefill(model, ids, args.prefill_reps, args.max_prefill_tokens, device)
            if args.cache == "static":  # room for the longest side (the warm-up and timed steps, the check)
                base = to_static(base, model, n + max(args.warmup + args.steps, args.check_steps) + 2)
            rows.append(common | p_row)
            print(f"{n:>7} B={b} prefill {p_row['median_ms']:10.2f} ms ({p_row['prefill_mode']})", flush=True)
            del ids
            sides = [("sdpa", "sdpa", {}), *methods, ("sdpa_after", "sdpa", {})]
            dense_tokens: list[torch.Tensor] = []
            dense_logits: list[torch.Tensor] = []
            for label, name, params in sides:
                try:
                    r, toks, logits = decode_side(model, base, token, label, name, params, args.steps,
                                                  args.warmup, device)  # fmt: skip
                except torch.cuda.OutOfMemoryError as e:
                    r = {
                        "phase": "decode",
                        "side": label,
                        "method": name,
                        "params": params,
                        "error": str(e)[:200],
                    }
                    torch.cuda.empty_cache()
                    toks, logits = [], []
                rows.append(common | r)
                if label == "sdpa":
                    dense_tokens, dense_logits = toks, logits
                if "median_ms" in r:
                    print(f"{n:>7} B={b} {label:<60} {r['median_ms']:9.3f} ms {r['tokens_per_s']:9.1f} tok/s",
                          flush=True)  # fmt: skip
                save()
            if args.check_steps and len(dense_tokens) >= args.check_steps:  # (not when sdpa's side failed)
                total = n + args.warmup + args.steps + 1
                want = dense_tokens[: args.check_steps]
                for label, name, params in methods:
                    full = full_budget(name, params, total)
                    try:
                        _, toks, logits = decode_side(model, base, token, label, name, full, args.check_steps,
                                                      0, device)  # fmt: skip
                    except torch.cuda.OutOfMemoryError as e:
                        rows.append(common | {"phase": "check", "side": label, "error": str(e)[:200]})
                        torch.cuda.empty_cache()
                        continue
                    equal = all(torch.equal(a, w) for a, w in zip(toks, want, strict=True))
                    diff = max(float((a - w).abs().max()) for a, w in zip(logits, dense_logits, strict=False))
                    rows.append(common | {"phase": "check", "side": label, "method": name, "params": full,
                                          "steps": args.check_steps, "tokens_equal": equal,
                                          "max_abs_logit_diff": diff,
                                          **divergence(toks, logits, want, dense_logits)})  # fmt: skip
                    print(
                        f"{n:>7} B={b} check {label:<54} tokens_equal={equal} logit diff {diff:.3g}",
                        flush=True,
                    )
                    save()
            del base, token
            if device.type == "cuda":
                torch.cuda.empty_cache()
    save()
    return result


if __name__ == "__main__":
    main()
