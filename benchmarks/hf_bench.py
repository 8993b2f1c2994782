"""Prefill time and per-token decode time of a transformers causal LM under ``attnlab.hf.use`` vs sdpa.

The model is built from a config with random weights (no download): by default Llama-3-8B's shape
(32 layers, hidden 4096, GQA 32:8, head dim 128, vocab 128256), bf16 on CUDA. It is called the way a user
calls it:

- ``prefill``: ``model(ids, use_cache=True, logits_to_keep=1)`` (a fresh DynamicCache each call) inside
  ``use(model, prefill=method)``; the sides (sdpa and each method) take turns call by call (rounds in
  rotating order), each call timed with CUDA events; ``--reps`` calls per side.
- ``decode``: after one untimed prefill of ``context`` tokens, ``--reps`` decode steps
  ``model(next_token, past_key_values=cache)`` inside ``use(model, decode=method)``, each step timed
  with CUDA events (the cache grows by one token per step). A side holds its own KV cache (16 GiB per
  sequence at 128K for the 8B shape), so decode sides run one after another, with the sdpa side timed
  before and after them (``sdpa`` and ``sdpa_after``) to show drift.
- ``generate`` (with ``--generate N``): one ``model.generate(max_new_tokens=N)`` per side, wall clock,
  reported as new tokens per second end to end (prefill included).

Every row: median, min, quartiles and IQR/median of its timed calls, with device, versions and the
commit + dirty flag (``ATTNLAB_COMMIT`` environment variable or file, else git). Before timing, each
method's first prefill logits are compared with sdpa's (max abs difference recorded: a sparse method is
not exact, the number says how far it is).

Usage (GPU):  python benchmarks/hf_bench.py --out hf.json --contexts 32768 131072 \\
                  --prefill streaming:window=4096 vertical_slash block_topk --decode page_topk:budget=4096
CPU smoke:    python benchmarks/hf_bench.py --tiny --contexts 64 --reps 3 --out /tmp/hf.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from attnlab.bench.env import environment
from attnlab.bench.timing import Timing


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:k=v,k=v`` (values parsed as JSON when they parse, else kept as strings)."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad method spec {text!r}: expected name:key=value,key=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return name, params


def build_model(tiny: bool, layers: int | None, device: torch.device, dtype: torch.dtype) -> Any:
    import transformers

    from attnlab.hf import tiny_config

    if tiny:
        cfg = tiny_config("llama3", layers=layers or 2)
    else:  # Llama-3-8B's shape
        cfg = transformers.LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or 32, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


class Clock:
    """Per-call timing: CUDA events on CUDA (read after one synchronisation at the end), wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: dict[str, list[Any]] = {}

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.setdefault(name, []).append((start, end))
        else:
            t = time.perf_counter()
            yield
            self.pending.setdefault(name, []).append((time.perf_counter() - t) * 1e3)

    def results(self) -> dict[str, Timing]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out = {}
        for name, items in self.pending.items():
            ms = [s.elapsed_time(e) for s, e in items] if self.device.type == "cuda" else items
            out[name] = Timing.of(ms)
        self.pending.clear()
        return out


#: the label suffix of a decode side run with attnlab.hf's bound decode step off (``--unbound``): every
#: step goes through the prepared op's per-shape validation and dispatch, as before the bound step
UNBOUND = "@unbound"


def tidal_layers(n_layers: int, params: dict[str, Any]) -> dict[int, Any]:
    """TidalDecode's schedule scaled to ``n_layers``: layers 0-1 full, layer 2 selects, the rest reuse,
    with a re-selection at 13/32 of the depth (layer 13 of Llama-3-8B's 32)."""
    again = max(3, round(13 * n_layers / 32))
    roles = {i: "full" if i < 2 else "select" if i in (2, again) else "reuse" for i in range(n_layers)}
    return {i: {"decode": {"method": "tidal", "params": {**params, "role": r}}} for i, r in roles.items()}


@contextlib.contextmanager
def side_context(model: Any, phase: str, name: str, params: dict[str, Any]) -> Iterator[Any]:
    from attnlab.hf import use

    if name == "sdpa":
        yield None
        return
    if phase == "prefill":
        with use(model, prefill=name, prefill_params=params) as rt:
            yield rt
        return
    base, _, unbound = name.partition(UNBOUND)
    if base == "tidal":
        plan = {"layers": tidal_layers(model.config.num_hidden_layers, params)}
        ctx = use(model, plan=plan)
    else:
        ctx = use(model, decode=base, decode_params=params)
    with ctx as rt:
        rt.bind_decode = not unbound
        yield rt


def row(timing: Timing, **fields: Any) -> dict[str, Any]:
    return {
        **fields, "median_ms": timing.median_ms, "min_ms": timing.min_ms, "q1_ms": timing.q1_ms,
        "q3_ms": timing.q3_ms, "spread": timing.spread, "reps": timing.reps,
    }  # fmt: skip


@torch.no_grad()
def bench_prefill(model: Any, ids: torch.Tensor, sides: dict[str, tuple[str, dict[str, Any]]], reps: int,
                  warmup: int, device: torch.device) -> list[dict[str, Any]]:  # fmt: skip
    def call(label: str) -> Callable[[], Any]:
        name, params = sides[label]

        def run() -> Any:
            with side_context(model, "prefill", name, params):
                return model(ids, use_cache=True, logits_to_keep=1).logits

        return run

    fns = {label: call(label) for label in sides}
    ref = fns["sdpa"]().float()
    diffs = {}
    for label, fn in fns.items():
        for _ in range(warmup):
            out = fn()
        diffs[label] = (fn().float() - ref).abs().max().item()
        del out
    clock = Clock(device)
    labels = list(fns)
    for r in range(reps):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            with clock.time(label):
                fns[label]()
    return [
        row(
            t,
            phase="prefill",
            side=label,
            method=sides[label][0],
            params=sides[label][1],
            max_abs_logit_diff_vs_sdpa=diffs[label],
        )
        for label, t in clock.results().items()
    ]


@torch.no_grad()
def bench_decode(model: Any, ids: torch.Tensor, label: str, name: str, params: dict[str, Any], reps: int,
                 warmup: int, device: torch.device) -> dict[str, Any]:  # fmt: skip
    from transformers import DynamicCache

    clock = Clock(device)
    check: dict[str, Any] = {}
    with side_context(model, "decode", name, params) as rt:
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        del out
        for step in range(warmup + reps):
            if step < warmup:
                out = model(token, past_key_values=cache, use_cache=True)
            else:
                with clock.time(label):
                    out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        if rt is not None:
            check = check_step(model, rt, cache, token)
        if PROFILE_DIR is not None:
            profile_steps(model, cache, token, f"{label}_B{ids.shape[0]}_N{ids.shape[1]}", device)
        del cache, out
    t = clock.results()[label]
    return row(t, phase="decode", side=label, method=name, params=params, check=check)


#: where ``--profile`` writes each decode side's host profile (None: not profiled)
PROFILE_DIR: Path | None = None


def profile_steps(model: Any, cache: Any, token: torch.Tensor, label: str, device: torch.device) -> None:
    """Five more decode steps under cProfile (host time by Python function) and torch.profiler (host time
    by op and CUDA runtime call: a cudaStreamSynchronize / cudaMemcpy there is a host synchronisation),
    written as text tables to ``PROFILE_DIR/profile_<label>.txt``."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    assert PROFILE_DIR is not None
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    pr = cProfile.Profile()
    with profile(activities=acts) as prof:
        pr.enable()
        for _ in range(5):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        pr.disable()
    text = io.StringIO()
    pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(40)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    (PROFILE_DIR / f"profile_{safe}.txt").write_text(
        f"# {label}: 5 decode steps\n## cProfile (tottime)\n{text.getvalue()}\n## torch.profiler\n{table}\n"
    )


@torch.no_grad()
def bench_decode_interleaved(model: Any, ids: torch.Tensor, sides: list[tuple[str, str, dict[str, Any]]],
                             reps: int, warmup: int, device: torch.device) -> list[dict[str, Any]]:  # fmt: skip
    """Decode sides timed step by step in rotating order (a fair A/B where the host's speed drifts): each
    side holds its own cache and its own registered runtime (``attnlab.hf.register`` under a side's name,
    so its per-layer state survives the switches); before each step the model's configs are pointed at
    that side's implementation ("sdpa" for sdpa sides)."""
    from transformers import DynamicCache

    from attnlab.hf import register, unregister
    from attnlab.hf.use import _configs

    configs = _configs(model)
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    impl: dict[str, str] = {}
    state: dict[str, tuple[Any, torch.Tensor]] = {}
    try:
        for i, (label, name, params) in enumerate(sides):
            base, _, unbound = name.partition(UNBOUND)
            if base == "sdpa":
                impl[label] = "sdpa"
            else:
                impl[label] = f"attnlab_bench_{i}"
                plan = (
                    {"layers": tidal_layers(model.config.num_hidden_layers, params)}
                    if base == "tidal"
                    else None
                )
                rt = register(plan, decode=None if plan else base, decode_params=None if plan else params,
                              name=impl[label])  # fmt: skip
                rt.bind_decode = not unbound
            for cfg in configs:
                cfg._attn_implementation_internal = impl[label]
            cache = DynamicCache(config=model.config)
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            state[label] = (cache, out.logits[:, -1:].argmax(-1))
        clock = Clock(device)
        labels = [label for label, _, _ in sides]
        for r in range(warmup + reps):
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                for cfg in configs:
                    cfg._attn_implementation_internal = impl[label]
                cache, token = state[label]
                with clock.time(label) if r >= warmup else contextlib.nullcontext():
                    out = model(token, past_key_values=cache, use_cache=True)
                state[label] = (cache, out.logits[:, -1:].argmax(-1))
        times = clock.results()
    finally:
        for cfg, old in saved:
            cfg._attn_implementation_internal = old
        for name in impl.values():
            if name != "sdpa":
                unregister(name)
    return [row(times[label], phase="decode_interleaved", side=label, method=name, params=params)
            for label, name, params in sides]  # fmt: skip


def check_step(model: Any, rt: Any, cache: Any, token: torch.Tensor) -> dict[str, Any]:
    """One more decode step, with layer 0's attention output compared against the method's reference on the
    same q, k, v (a stateless reference: page_topk, snapkv/h2o/retrieval_heads_kv/recycled/tokenselect take
    their state, so only page_topk is checked; others record nothing)."""
    import attnlab

    got: dict[str, Any] = {}
    run_part = rt._run_part

    def wrapped(part: Any, i: int, layer: int, phase: str, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, rows: Any) -> torch.Tensor:  # fmt: skip
        out = run_part(part, i, layer, phase, q, k, v, rows)
        if layer == 0 and phase == "decode" and part.ref.name == "page_topk" and not got:
            spec = attnlab.methods()[part.ref.name]
            want, _ = spec.reference(
                q, k, v, part.op.params, causal=True, scale=part.op.scale or q.shape[-1] ** -0.5
            )
            got["layer0_vs_reference_max_abs"] = float((out.float() - want.float()).abs().max())
            got["shape"] = [list(q.shape), list(k.shape)]
        return out

    rt._run_part = wrapped
    try:
        model(token, past_key_values=cache, use_cache=True)
    finally:
        del rt._run_part
    return got


@torch.no_grad()
def bench_generate(model: Any, ids: torch.Tensor, label: str, name: str, params: dict[str, Any], phase: str,
                   new: int, device: torch.device) -> dict[str, Any]:  # fmt: skip
    with side_context(model, phase, name, params):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        s = time.perf_counter() - t
    made = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"phase": "generate", "side": label, "method": name, "params": params, "seconds": s,
            "new_tokens": made, "tokens_per_s": made / s}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer Llama-3-shaped model (CPU smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, tiny: 2)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072], help="prompt tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", nargs="*", default=["softmax"], help="methods (name:key=value,...)")
    ap.add_argument("--decode", nargs="*", default=["softmax"], help="methods (name:key=value,...)")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per side (>= 10 for reported numbers)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--generate", type=int, default=0, help="new tokens of an end-to-end generate (0: skip)")
    ap.add_argument(
        "--prefill-reps",
        type=int,
        nargs="*",
        default=None,
        help="timed prefill calls per side, per context (default: --reps)",
    )
    ap.add_argument(
        "--no-prefill-at",
        type=int,
        nargs="*",
        default=[],
        help="contexts whose prefill sides are not timed (decode only)",
    )
    ap.add_argument(
        "--unbound",
        nargs="*",
        default=[],
        help=f"decode methods also run with the bound decode step off (label +'{UNBOUND}')",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="also time the decode sides step by step in rotating order (each with its own cache)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="directory for a host profile of 5 more decode steps per side (cProfile, torch.profiler)",
    )
    args = ap.parse_args(argv)
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    from attnlab.catalog.decode import register_methods

    register_methods()  # the decode family is not registered at import yet
    model = build_model(args.tiny, args.layers, device, dtype)
    prefill: dict[str, tuple[str, dict[str, Any]]] = {"sdpa": ("sdpa", {})}
    prefill |= {m: parse_method(m) for m in args.prefill}
    decode = {m: parse_method(m) for m in args.decode}
    for m in args.unbound:
        name, params = parse_method(m)
        decode[m + UNBOUND] = (name + UNBOUND, params)
    rows: list[dict[str, Any]] = []
    result = {"env": environment(device), "model": model.config.to_dict(), "args": vars(args) | {"out": str(args.out)},
              "rows": rows}  # fmt: skip

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1, default=str))

    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(args.contexts):
        ids = torch.randint(3, model.config.vocab_size, (args.batch, n), generator=g).to(device)
        common = {"context": n, "batch": args.batch}
        p_reps = args.prefill_reps[min(i, len(args.prefill_reps) - 1)] if args.prefill_reps else args.reps
        if n not in args.no_prefill_at:
            for r in bench_prefill(model, ids, prefill, p_reps, min(args.warmup, 1), device):
                rows.append(common | r)
            save()
        order: list[tuple[str, str, dict[str, Any]]] = (
            [("sdpa", "sdpa", {})] + [(m, *decode[m]) for m in decode] + [("sdpa_after", "sdpa", {})]
        )
        for label, name, params in order:
            rows.append(
                common | bench_decode(model, ids, label, name, params, args.reps, args.warmup, device)
            )
            save()
        if args.interleave:
            sides_i: list[tuple[str, str, dict[str, Any]]] = [("sdpa", "sdpa", {})]
            sides_i += [(m, *decode[m]) for m in decode]
            for r in bench_decode_interleaved(model, ids, sides_i, args.reps, args.warmup, device):
                rows.append(common | r)
            save()
        if args.generate:
            sides: list[tuple[str, str, dict[str, Any], str]] = [("sdpa", "sdpa", {}, "prefill")] + [
                (m, *prefill[m], "prefill") for m in args.prefill
            ]
            sides += [(m, *decode[m], "decode") for m in decode]
            for label, name, params, phase in sides:
                rows.append(
                    common | bench_generate(model, ids, label, name, params, phase, args.generate, device)
                )
                save()
    for r in rows:
        text = f"{r['context']:>7} {r['phase']:<8} {r['side']:<32}"
        if "median_ms" in r and r["phase"].startswith("decode"):
            r["tokens_per_s"] = r["batch"] * 1e3 / r["median_ms"]
        print(text + (f" {r['median_ms']:9.3f} ms (IQR/median {r['spread'] or 0:.2f}, {r['reps']} reps)"
                      if "median_ms" in r else "") + (f" {r['tokens_per_s']:9.1f} tokens/s"
                      if "tokens_per_s" in r else ""))  # fmt: skip
    save()
    return result


if __name__ == "__main__":
    main()
