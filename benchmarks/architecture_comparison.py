"""Architecture comparison (issue 11, scope 5; zoology-style), CPU micro scale.

Trains one small organism per attention architecture (``softmax``, ``sliding_window``, ``lightning``,
``gated_delta``, ``based``, and a hybrid: linear layers with one softmax layer) on the same data, for the
same number of optimiser steps of the same batches (so the same token budget), with the same Llama
skeleton (the parameter counts differ only by the small per-layer input makers of gated_delta / based;
they are reported). Then measures exact-match accuracy on MQAR, passkey and multi-key NIAH at the training
context, and the per-sequence decoding state of each architecture at that context (KV cache bytes for the
softmax family, recurrent-state bytes for the linear layers; fp32). Writes ``results.json``,
``results.md`` and ``accuracy_vs_state.png`` under ``--out``.

Usage::

    python benchmarks/architecture_comparison.py --steps 300 --out benchmarks/results/cpu-2026-11-23/architectures

Every model trains with ``torch.set_num_threads(1)`` (the CPU is shared). The data (corpus, tokenizer,
tasks) is prepared once and shared by every model; batch ``s`` is the same for every architecture.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from attnlab.organisms import architectures as arch
from attnlab.organisms.config import ModelConfig, Stage, TrainConfig
from attnlab.organisms.corpus import CorpusConfig
from attnlab.organisms.evaluate import heldout_loss, task_accuracy
from attnlab.organisms.tasks import generate
from attnlab.organisms.tokenizer import encode
from attnlab.organisms.train import (
    IGNORE,
    build_model,
    build_optimizer,
    losses,
    lr_at,
    make_batch,
    prepare_data,
)

TASKS = ("mqar", "passkey", "niah_multikey")
#: the training mix: task rows draw from this list uniformly, so MQAR is half of them
TRAIN_TASKS = ("mqar", "mqar", "passkey", "niah_multikey")


def architectures(layers: int, window: int) -> dict[str, tuple[tuple[str, ...], dict[str, dict[str, Any]]]]:
    """name -> (per-layer plan, per-method params)."""
    soft_layer = [layers // 2]  # one softmax layer mid-stack (zoology's hybrids put a few there)
    return {
        "softmax": (arch.uniform("softmax", layers), {}),
        "sliding_window": (arch.uniform("sliding_window", layers), {"sliding_window": {"window": window}}),
        "lightning": (arch.uniform("lightning", layers), {}),
        "gated_delta": (arch.uniform("gated_delta", layers), {}),
        "based": (arch.uniform("based", layers), {}),
        "hybrid": (arch.hybrid("gated_delta", layers, soft_layer), {}),
    }


def base_config(args: argparse.Namespace) -> TrainConfig:
    model = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.heads,
        intermediate_size=3 * args.hidden,
        max_position=args.context,
    )
    return TrainConfig(
        name="arch",
        model=model,
        corpus=CorpusConfig(max_chars=args.corpus_chars),
        stages=(Stage(args.steps, args.context, args.batch),),
        tasks=TRAIN_TASKS,
        task_share=0.8,
        copy_share=0.15,
        copy_warmup=args.copy_warmup,
        lr=args.lr,
        warmup=20,
        max_seconds=None,
        eval_lengths=(args.context,),
        eval_samples=args.samples,
        threads=1,
    ).validate()


@torch.no_grad()
def answer_token_accuracy(model: Any, ctx: Any, length: int, samples: int) -> dict[str, float]:
    """Per task: the share of answer tokens the model predicts right (argmax) given the prompt and the
    answer's earlier tokens (teacher-forced; evaluation seeds 0..samples-1, as exact match uses). A graded
    signal beside exact match: MQAR's answer is 4 values of 3 digits, passkey's 5 digits."""
    tok = ctx.tokenizer
    out: dict[str, float] = {}
    for task in TASKS:
        right = total = 0
        for seed in range(samples):
            s = generate(task, ctx, length, seed)
            prompt = encode(tok, s.prompt)
            answer = encode(tok, s.answer)
            ids = torch.tensor([prompt + answer])
            pred = model(input_ids=ids[:, :-1]).logits[0, len(prompt) - 1 :].argmax(-1)
            right += int((pred == ids[0, len(prompt) :]).sum())
            total += len(answer)
        out[task] = right / total
    return out


def train_one(cfg: TrainConfig, data: Any, log: Any) -> dict[str, Any]:
    """Train ``cfg``'s model for every planned step on ``data``; evaluate; return the record."""
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(cfg, model)
    curve: list[float] = []
    tokens = 0
    started = time.perf_counter()
    model.train()
    for step in range(cfg.total_steps):
        x, y, answer = make_batch(cfg, data, step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        corpus_loss, task_loss = losses(model, x, y, answer)
        loss = torch.stack([p for p in (corpus_loss, task_loss) if p is not None]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        curve.append(float(loss.detach()))
        tokens += int((y != IGNORE).sum())
        if (step + 1) % 50 == 0:
            log(f"  step {step + 1}: loss {sum(curve[-50:]) / 50:.3f}, {time.perf_counter() - started:.0f} s")
    train_s = time.perf_counter() - started
    model.eval()
    t0 = time.perf_counter()
    acc = task_accuracy(model, data.eval_ctx, TASKS, cfg.eval_lengths, cfg.eval_samples)
    ctx = cfg.eval_lengths[0]
    token_acc = answer_token_accuracy(model, data.eval_ctx, ctx, cfg.eval_samples)
    held = heldout_loss(model, data.heldout_ids, ctx, windows=8)
    eval_s = time.perf_counter() - t0
    states = arch.plan_state_bytes(cfg.model, ctx)
    return {
        "plan": list(cfg.model.attention),
        "params": dict(cfg.model.attention_params),
        "label": arch.describe(cfg.model.attention),
        "parameters": params,
        "steps": cfg.total_steps,
        "tokens": tokens,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "final_loss_mean_last_20": sum(curve[-20:]) / len(curve[-20:]),
        "heldout_loss": held,
        "accuracy": {t: {str(n): a for n, a in per.items()} for t, per in acc.items()},
        "answer_token_accuracy": {t: {str(ctx): a} for t, a in token_acc.items()},
        "state_bytes_per_layer": states,
        "state_bytes_total": sum(states),
        "curve_every_10": curve[::10],
    }


def write_outputs(out: Path, meta: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    ctx = str(meta["context"])
    lines = [
        f"CPU micro-scale comparison: {meta['steps']} steps x {meta['batch']} x {meta['context']} tokens per "
        f"architecture, 1 thread, commit {meta['commit']}. Accuracy: exact match over {meta['samples']} samples "
        f"at {meta['context']} tokens. State: bytes per sequence (fp32, all layers) to decode the next token.",
        "",
        "Exact match (EM) and, in parentheses, teacher-forced answer-token accuracy (argmax).",
        "",
        "| architecture | layers | parameters | train s | held-out loss | MQAR | passkey | multi-key NIAH | state bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        a, t = r["accuracy"], r["answer_token_accuracy"]
        cells = " | ".join(f"{a[k][ctx]:.2f} ({t[k][ctx]:.2f})" for k in TASKS)
        lines.append(
            f"| {name} | {r['label']} | {r['parameters']:,} | {r['train_seconds']:.0f} | {r['heldout_loss']:.3f} | "
            f"{cells} | {r['state_bytes_total']:,} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out / "accuracy_vs_state.png", meta, runs)


def plot(path: Path, meta: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ctx = str(meta["context"])
    rows = [("accuracy", "exact-match accuracy"), ("answer_token_accuracy", "answer-token accuracy")]
    fig, grid = plt.subplots(len(rows), len(TASKS), figsize=(5 * len(TASKS), 7.5), sharey=True, sharex=True)
    for row, (key, what) in enumerate(rows):
        for ax, task in zip(grid[row], TASKS, strict=True):
            for i, (name, r) in enumerate(runs.items()):  # labels staggered: equal states overlap
                acc = r[key][task][ctx]
                ax.scatter(r["state_bytes_total"], acc, s=50)
                ax.annotate(
                    name,
                    (r["state_bytes_total"], acc),
                    textcoords="offset points",
                    xytext=(4, 4 + 11 * (i % 3)),
                    fontsize=8,
                )
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            if row == len(rows) - 1:
                ax.set_xlabel("decode state per sequence (bytes, fp32, all layers)")
            ax.set_title(f"{task} @ {ctx} tokens: {what}", fontsize=9)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        grid[row][0].set_ylabel(what)
    fig.suptitle(
        f"CPU micro scale: {meta['steps']} steps x {meta['batch']}x{meta['context']} tokens, "
        f"~{meta['parameters_min'] // 1000}K params, commit {meta['commit']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu-2026-11-23/architectures"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--window", type=int, default=64, help="sliding_window's keys per query")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--copy-warmup", type=int, default=50)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--corpus-chars", type=int, default=600_000)
    ap.add_argument("--only", nargs="*", help="train only these architectures")
    ap.add_argument("--replot", action="store_true", help="rewrite results.md and the plot from results.json")
    args = ap.parse_args()
    if args.replot:
        stored = json.loads((args.out / "results.json").read_text())
        write_outputs(args.out, stored["meta"], stored["runs"])
        return
    torch.set_num_threads(1)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    base = base_config(args)
    t0 = time.perf_counter()
    data = prepare_data(base)
    print(
        f"data prepared in {time.perf_counter() - t0:.0f} s; tasks fitting {args.context}: {data.fits}",
        flush=True,
    )
    runs: dict[str, dict[str, Any]] = {}
    previous = args.out / "results.json"
    if args.only and previous.is_file():  # keep the other architectures' records
        runs = json.loads(previous.read_text())["runs"]
    for name, (plan, params) in architectures(args.layers, args.window).items():
        if args.only and name not in args.only:
            continue
        cfg = dataclasses.replace(
            base, model=dataclasses.replace(base.model, attention=plan, attention_params=params)
        )
        cfg = cfg.validate()
        print(f"{name}: {arch.describe(plan)}", flush=True)
        runs[name] = train_one(cfg, data, lambda s: print(s, flush=True))
        r = runs[name]
        print(
            f"  {r['parameters']:,} params, {r['train_seconds']:.0f} s train, {r['eval_seconds']:.0f} s eval, "
            f"accuracy {r['accuracy']}, state {r['state_bytes_total']:,} B",
            flush=True,
        )
        meta = {
            "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, shared 2-core CPU, torch threads 1",
            "torch": torch.__version__,
            "context": args.context,
            "steps": args.steps,
            "batch": args.batch,
            "samples": args.samples,
            "model": {
                k: v for k, v in dataclasses.asdict(base.model).items() if not k.startswith("attention")
            },
            "tasks": list(TASKS),
            "train_tasks": list(TRAIN_TASKS),
            "task_share": base.task_share,
            "copy_share": base.copy_share,
            "copy_warmup": base.copy_warmup,
            "lr": base.lr,
            "corpus_chars": args.corpus_chars,
            "window": args.window,
            "parameters_min": min(r["parameters"] for r in runs.values()),
            "state_dtype": "float32",
        }
        write_outputs(args.out, meta, runs)  # after every model: a partial run keeps its results


if __name__ == "__main__":
    main()
