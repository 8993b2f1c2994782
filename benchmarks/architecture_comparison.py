"""Architecture comparison (issue 11, scope 5; zoology-style): MQAR and needle retrieval against decode state.

Trains one small model per attention architecture (``softmax``, ``sliding_window``, ``lightning``,
``gated_delta``, ``based``, and a hybrid of gated_delta layers with one softmax layer) at one or more
widths, every model of a width with the same Llama skeleton (the parameter counts differ only by the small
per-layer input makers of gated_delta / based; they are reported), the same batches and the same number of
optimiser steps. Then measures, at the training length:

- MQAR accuracy (zoology's metric: the share of queried keys whose value is the argmax, teacher-forced),
  per number of key-value pairs, on fresh rows;
- passkey and multi-key NIAH exact match, teacher-forced: a sample counts when the argmax at every answer
  token and at the end-of-text token after it is right (what greedy decoding would emit, answer then end);
- the decode state per sequence of each architecture at that length (KV cache bytes for the softmax
  family, recurrent-state bytes for the linear layers; fp32; plus the short convolution's last inputs).

What makes retrieval learnable here (found on the CPU at small scale, see the results' NOTES):

- MQAR rows in token space (:func:`attnlab.organisms.architectures.mqar_batch`): one token per key and per
  value, loss on the queried values only, a mix of pair counts per batch (zoology trains on several);
- a short causal convolution before every attention layer (:func:`~attnlab.organisms.architectures.
  add_short_conv`, kernel 3), as zoology's MQAR models and Based / Gated DeltaNet have: without it a
  2-layer softmax model stayed at chance (1/P) on MQAR for thousands of steps on the CPU;
- a per-head RMSNorm on the output of the lightning and gated_delta layers (``ModelConfig.
  linear_output_norm``, as fla's GatedDeltaNet ``o_norm``; ``--no-output-norm`` turns it off): without
  it gated_delta's output is ~18x smaller than softmax's at initialisation and width 64 stayed at chance
  on MQAR (results before 2026-11-23 s3 ran without it; ``benchmarks/results/cpu-2026-11-23-s3/
  gated-delta-width64/``);
- passkey / multi-key NIAH rows (a quarter of each batch) from a pool of samples drawn once from the
  training haystack; their loss is the answer tokens' plus a quarter of the prompt tokens' (language model).

``--budget`` (seconds of training in all) sets the steps: after a few timed steps of every model
(``--calibrate``, which also compiles the kernels), every model trains the same number of steps
``min(--steps, budget / sum of step times)``. Each model's record is written to ``--out`` as soon as it is
evaluated (``results.json``, ``results.md``, ``accuracy_vs_state.png``), so a run stopped early keeps them.

Usage::

    python benchmarks/architecture_comparison.py --device cuda --widths 64 256 --budget 340 \\
        --out benchmarks/results/h100-2026-11-23-s2/architectures
    python benchmarks/architecture_comparison.py --replot --out ...   # results.md and plot from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from attnlab.organisms import architectures as arch
from attnlab.organisms.config import ModelConfig, Stage, TrainConfig
from attnlab.organisms.corpus import CorpusConfig
from attnlab.organisms.evaluate import TRAIN_SEED_BASE
from attnlab.organisms.tasks import TaskContext, generate
from attnlab.organisms.tokenizer import encode
from attnlab.organisms.train import IGNORE, Data, prepare_data

TEXT_TASKS = ("passkey", "niah_multikey")
NAMES = ("softmax", "sliding_window", "lightning", "gated_delta", "based", "hybrid")


def architectures(
    layers: int, window: int, chunk: int | None = None
) -> dict[str, tuple[tuple[str, ...], dict[str, dict[str, Any]]]]:
    """name -> (per-layer plan, per-method params). The hybrid runs softmax in its last layer only.
    ``chunk``: the chunk length of lightning / gated_delta (the same recurrence evaluated in chunks of that
    many tokens: a speed setting, not a model change; None keeps the methods' default, 64)."""
    c = {} if chunk is None else {"chunk": chunk}
    return {
        "softmax": (arch.uniform("softmax", layers), {}),
        "sliding_window": (arch.uniform("sliding_window", layers), {"sliding_window": {"window": window}}),
        "lightning": (arch.uniform("lightning", layers), {"lightning": c} if c else {}),
        "gated_delta": (arch.uniform("gated_delta", layers), {"gated_delta": c} if c else {}),
        "based": (arch.uniform("based", layers), {}),
        "hybrid": (arch.hybrid("gated_delta", layers, [layers - 1]), {"gated_delta": c} if c else {}),
    }


def model_config(args: argparse.Namespace, hidden: int, name: str) -> ModelConfig:
    plan, params = architectures(args.layers, args.window, args.chunk)[name]
    return ModelConfig(
        vocab_size=args.vocab,
        hidden_size=hidden,
        layers=args.layers,
        heads=max(1, hidden // args.head_dim),
        kv_heads=max(1, hidden // args.head_dim),
        intermediate_size=2 * hidden,
        max_position=args.context,
        attention=plan,
        attention_params=params,
        linear_output_norm=not args.no_output_norm,
    ).validate()


def build(cfg: ModelConfig, conv: int, device: str, seed: int, gate_bias: float | None = None) -> Any:
    """The untrained model (seeded): Llama skeleton, attention plan, short convolutions. ``gate_bias``:
    the initial bias of gated_delta's decay gate (g = logsigmoid(x W + b); the adapter's default b = 3 is a
    decay of ~0.95 per token), for every gated_delta layer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = arch.apply(LlamaForCausalLM(cfg.llama_config()), cfg)
    if gate_bias is not None:
        for layer in model.model.layers:
            att = layer.self_attn
            if (
                isinstance(att, arch.MethodAttention)
                and att.method == "gated_delta"
                and att.gate_proj is not None
            ):
                torch.nn.init.constant_(att.gate_proj.bias, gate_bias)
    if conv:
        arch.add_short_conv(model, conv)
    return model.to(device)  # type: ignore[arg-type]


def token_ranges(vocab: int, ids: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """MQAR key and value token ids: ``ids`` keys from id 4 up (ids below 4 are the tokenizer's special
    tokens) and ``ids`` values after them; ``ids=None``: the vocabulary from 4 up split in two halves."""
    n = (vocab - 4) // 2 if ids is None else ids
    if not 1 <= n <= (vocab - 4) // 2:
        raise ValueError(f"--mqar-ids {ids}: expected 1 <= ids <= {(vocab - 4) // 2} at vocab {vocab}")
    return (4, 4 + n), (4 + n, 4 + 2 * n)


class TextPool:
    """Task samples (passkey, multi-key NIAH) at one length, tokenized once: each a (ids, answer start)
    pair, ids = prompt + answer + end-of-text."""

    def __init__(self, data: Data, ctx: TaskContext, length: int, count: int, seed_base: int) -> None:
        tok = data.tokenizer
        self.rows: list[tuple[list[int], int]] = []
        self.tasks: list[str] = []
        for i in range(count):
            task = TEXT_TASKS[i % len(TEXT_TASKS)]
            s = generate(task, ctx, length, seed_base + i // len(TEXT_TASKS))
            prompt = encode(tok, s.prompt)
            self.rows.append((prompt + encode(tok, s.answer) + [tok.eos_token_id], len(prompt)))
            self.tasks.append(task)


def text_tensors(
    rows: list[tuple[list[int], int]], length: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, next-token labels, answer flags), each (len(rows), length); labels IGNORE after the end."""
    x = torch.full((len(rows), length), pad, dtype=torch.long)
    y = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    answer = torch.zeros((len(rows), length), dtype=torch.bool)
    for r, (ids, start) in enumerate(rows):
        m = len(ids) - 1
        x[r, :m] = torch.tensor(ids[:-1])
        y[r, :m] = torch.tensor(ids[1:])
        answer[r, start - 1 : m] = True
    return x, y, answer


def make_step(args: argparse.Namespace, pool: TextPool, pad: int, step: int) -> dict[str, torch.Tensor]:
    """The batch of ``step`` (the same for every model): MQAR rows, one group per pair count, then text rows."""
    keys, values = token_ranges(args.vocab, args.mqar_ids)
    gen = torch.Generator().manual_seed(10_000 + step)
    per = args.mqar_rows // len(args.pairs)
    xs, ys = zip(
        *(arch.mqar_batch(gen, per, args.context, p, keys, values, pad) for p in args.pairs), strict=True
    )
    rng = random.Random(f"text:{step}")
    picks = [pool.rows[rng.randrange(len(pool.rows))] for _ in range(args.text_rows)]
    tx, ty, ta = text_tensors(picks, args.context, pad)
    groups = torch.tensor(len(args.pairs))
    return {"mx": torch.cat(xs), "my": torch.cat(ys), "tx": tx, "ty": ty, "ta": ta, "groups": groups}


def step_loss(model: Any, batch: dict[str, torch.Tensor], lm_weight: float) -> torch.Tensor:
    """MQAR answer loss (the mean over the pair-count groups of each group's mean) + text answer loss + ``lm_weight`` x text prompt (language model) loss: each a mean
    cross-entropy over its targets; one forward pass over all rows."""
    x = torch.cat([batch["mx"], batch["tx"]])
    hidden = model.model(input_ids=x).last_hidden_state
    m, groups = batch["mx"].shape[0], int(batch["groups"])
    per = m // groups
    parts: list[torch.Tensor] = []
    for g in range(groups):  # each pair count weighs the same: the easy ones lead the way out of the plateau
        y = batch["my"][g * per : (g + 1) * per]
        logits = model.lm_head(hidden[g * per : (g + 1) * per][y != IGNORE]).float()
        parts.append(torch.nn.functional.cross_entropy(logits, y[y != IGNORE]) / groups)
    for h, y, w in (
        (hidden[m:], torch.where(batch["ta"], batch["ty"], IGNORE), 1.0),
        (hidden[m:], torch.where(batch["ta"], IGNORE, batch["ty"]), lm_weight),
    ):
        mask = y != IGNORE
        if w and bool(mask.any()):
            logits = model.lm_head(h[mask]).float()
            parts.append(w * torch.nn.functional.cross_entropy(logits, y[mask]))
    return torch.stack(parts).sum()


def lr_at(args: argparse.Namespace, step: int, steps: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of ``--lr``."""
    import math

    warm = max(1, steps // 20)
    if step < warm:
        return args.lr * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train(
    model: Any, args: argparse.Namespace, batches: Any, steps: int, log: Any
) -> tuple[list[float], float]:
    """``steps`` AdamW steps (weight decay 0.1 on matrices, betas 0.9/0.95, grad clip 1); returns the loss
    every 10 steps and the training seconds."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    curve: list[float] = []
    sync(args.device)
    started = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step, steps)
        loss = step_loss(model, to(batches(step), args.device), args.lm_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            curve.append(round(float(loss.detach()), 4))
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  step {step + 1}/{steps}: loss {curve[-1]:.3f}, {time.perf_counter() - started:.0f} s")
    sync(args.device)
    return curve, time.perf_counter() - started


@torch.no_grad()
def evaluate(model: Any, args: argparse.Namespace, eval_pool: TextPool, pad: int) -> dict[str, Any]:
    """MQAR accuracy per pair count and text-task exact match (teacher-forced; see the module docstring)."""
    model.eval()
    keys, values = token_ranges(args.vocab, args.mqar_ids)
    gen = torch.Generator().manual_seed(7)  # evaluation rows: a generator seed no training step uses
    mqar: dict[str, float] = {}
    for p in args.eval_pairs:
        right = total = 0
        for _ in range(args.eval_mqar_rows // 64):
            x, y = arch.mqar_batch(gen, 64, args.context, p, keys, values, pad)
            x, y = x.to(args.device), y.to(args.device)
            pred = model(input_ids=x).logits.argmax(-1)
            mask = y != IGNORE
            right += int((pred[mask] == y[mask]).sum())
            total += int(mask.sum())
        mqar[str(p)] = right / total
    text: dict[str, float] = {}
    token: dict[str, float] = {}
    for task in TEXT_TASKS:
        rows = [r for r, t in zip(eval_pool.rows, eval_pool.tasks, strict=True) if t == task]
        if not rows:  # --eval-text 0: MQAR only
            continue
        exact = tok_right = tok_total = 0
        for i in range(0, len(rows), 32):
            x, y, ans = (t.to(args.device) for t in text_tensors(rows[i : i + 32], args.context, pad))
            ok = (model(input_ids=x).logits.argmax(-1) == y) | ~ans
            exact += int(ok.all(-1).sum())
            tok_right += int((ok & ans).sum())
            tok_total += int(ans.sum())
        text[task] = exact / len(rows)
        token[task] = tok_right / tok_total
    return {"mqar": mqar, "text_exact": text, "text_answer_tokens": token}


def conv_state_bytes(cfg: ModelConfig, conv: int) -> int:
    """Bytes the short convolutions keep to decode the next token: the last ``conv - 1`` normed inputs of
    every layer (fp32)."""
    return 4 * cfg.layers * (conv - 1) * cfg.hidden_size if conv else 0


def write_outputs(out: Path, meta: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    pairs = [str(p) for p in meta["eval_pairs"]]
    lines = [
        f"{meta['device']}: {meta['steps']} steps x ({meta['mqar_rows']} MQAR + {meta['text_rows']} text rows) x "
        f"{meta['context']} tokens per model, {meta['layers']} layers, short conv {meta['conv']}, commit "
        f"{meta['commit']}.",
        "",
        "MQAR: accuracy per number of key-value pairs (teacher-forced, share of queries right). passkey / NIAH: "
        "exact match (teacher-forced; answer-token accuracy in parentheses). State: bytes per sequence (fp32, "
        f"all layers) to decode the next token at {meta['context']} tokens.",
        "",
        "| model | width | layers | parameters | train s | "
        + " | ".join(f"MQAR {p} pairs" for p in pairs)
        + " | passkey | multi-key NIAH | state bytes |",
        "|---|---:|---|---:|---:|" + "---:|" * (len(pairs) + 3),
    ]
    for key, r in runs.items():
        mq = " | ".join(f"{r['mqar'][p]:.3f}" for p in pairs)
        tx = " | ".join(
            f"{r['text_exact'][t]:.2f} ({r['text_answer_tokens'][t]:.2f})" if t in r["text_exact"] else "-"
            for t in TEXT_TASKS
        )
        lines.append(
            f"| {key} | {r['hidden']} | {r['label']} | {r['parameters']:,} | {r['train_seconds']:.0f} | {mq} | {tx} | "
            f"{r['state_bytes_total']:,} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        plot(out / "accuracy_vs_state.png", meta, runs)
    except ImportError as exc:  # a machine without matplotlib: --replot draws it from results.json
        print(f"no plot ({exc}); run with --replot where matplotlib is installed", flush=True)


def plot(path: Path, meta: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = [(f"MQAR, {p} pairs", "mqar", str(p)) for p in meta["eval_pairs"]]
    panels += [
        (f"{t} (exact match)", "text_exact", t)
        for t in TEXT_TASKS
        if any(t in r["text_exact"] for r in runs.values())
    ]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), sharey=True, squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(NAMES)}
    markers = {w: m for w, m in zip(sorted({r["hidden"] for r in runs.values()}), "os^D", strict=False)}
    for ax, (title, key, sub) in zip(grid.flat, panels, strict=False):
        for name in NAMES:  # one line per architecture across widths
            pts = sorted(
                (r["state_bytes_total"], r[key][sub], r["hidden"]) for r in runs.values() if r["name"] == name
            )
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[name], alpha=0.5)
            for sx, sy, w in pts:
                ax.scatter(sx, sy, color=colors[name], marker=markers[w], s=40)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{title} @ {meta['context']} tokens", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.set_xlabel("decode state per sequence (bytes, fp32)", fontsize=8)
    for ax in grid.flat[len(panels) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[n], marker="o", ls="-", label=n) for n in NAMES]
    handles += [
        plt.Line2D([], [], color="gray", marker=m, ls="", label=f"width {w}") for w, m in markers.items()
    ]
    fig.legend(handles=handles, loc="lower center", fontsize=8, ncol=len(handles))
    fig.suptitle(
        f"{meta['device']}: {meta['steps']} steps, {meta['layers']} layers, widths {meta['widths']}, "
        f"commit {meta['commit']}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/h100-2026-11-23-s2/architectures"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--only", nargs="*", choices=NAMES, help="train only these architectures")
    ap.add_argument("--steps", type=int, default=3000, help="at most this many steps (the budget may cut)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of training for all models")
    ap.add_argument("--calibrate", type=int, default=6, help="timed steps per model to size the budget")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument(
        "--pairs", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64], help="MQAR pair counts trained"
    )
    ap.add_argument("--eval-pairs", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--mqar-rows", type=int, default=96)
    ap.add_argument("--mqar-ids", type=int, default=None, help="key ids and value ids each (default: half)")
    ap.add_argument("--text-rows", type=int, default=32)
    ap.add_argument("--text-pool", type=int, default=1000, help="training text samples drawn once")
    ap.add_argument("--eval-text", type=int, default=100, help="evaluation samples per text task")
    ap.add_argument("--eval-mqar-rows", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--head-dim", type=int, default=64, help="heads = width / head dim (zoology: 1 head at 64)"
    )
    ap.add_argument("--conv", type=int, default=3, help="short convolution kernel (0: none)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--window", type=int, default=64, help="sliding_window's keys per query")
    ap.add_argument(
        "--chunk", type=int, default=None, help="lightning / gated_delta chunk (CPU: 8 is fastest)"
    )
    ap.add_argument(
        "--gate-bias", type=float, default=None, help="gated_delta's initial gate bias (default 3)"
    )
    ap.add_argument(
        "--no-output-norm",
        action="store_true",
        help="no per-head output RMSNorm on lightning / gated_delta layers (the adapter before 2026-11-23 s3)",
    )
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lm-weight", type=float, default=0.25)
    ap.add_argument("--corpus-chars", type=int, default=400_000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--replot", action="store_true", help="rewrite results.md and the plot from results.json")
    args = ap.parse_args()
    if args.replot:
        stored = json.loads((args.out / "results.json").read_text())
        write_outputs(args.out, stored["meta"], stored["runs"])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if 4 * max(args.pairs + args.eval_pairs) > args.context:
        ap.error(f"--pairs/--eval-pairs up to {max(args.pairs + args.eval_pairs)}: expected <= context/4")
    if args.mqar_rows % len(args.pairs):
        ap.error(f"--mqar-rows {args.mqar_rows}: expected a multiple of the {len(args.pairs)} pair counts")
    commit = (
        os.environ.get("ATTNLAB_COMMIT")
        or subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout
    )
    t0 = time.perf_counter()
    base = TrainConfig(
        name="arch",
        model=ModelConfig(
            vocab_size=args.vocab, hidden_size=64, heads=2, kv_heads=2, max_position=max(128, args.context)
        ),
        corpus=CorpusConfig(max_chars=args.corpus_chars),
        stages=(Stage(1, max(128, args.context), 1),),
        tasks=TEXT_TASKS,
        max_seconds=None,
        eval_lengths=(max(128, args.context),),
    ).validate()
    data = prepare_data(base)
    pad = int(data.tokenizer.pad_token_id)
    pool = TextPool(data, data.train_ctx, args.context, args.text_pool, TRAIN_SEED_BASE)
    eval_pool = TextPool(data, data.eval_ctx, args.context, args.eval_text * len(TEXT_TASKS), 0)
    print(f"data and text pools in {time.perf_counter() - t0:.0f} s", flush=True)
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def batches(step: int) -> dict[str, torch.Tensor]:
        if step not in cache:
            cache[step] = make_step(args, pool, pad, step)
        return cache[step]

    names = [n for n in NAMES if not args.only or n in args.only]
    jobs = [(w, n) for w in args.widths for n in names]
    steps = args.steps
    calibration: dict[str, float] = {}
    if args.budget:
        for w, n in jobs:  # a few steps of each model: compiles the kernels, times a step
            model = build(model_config(args, w, n), args.conv, args.device, 0, args.gate_bias)
            train(model, args, batches, 2, None)
            _, secs = train(model, args, batches, args.calibrate, None)
            calibration[f"{n}@{w}"] = secs / args.calibrate
            del model
        per_step = sum(calibration.values())
        steps = max(1, min(args.steps, int(args.budget / per_step)))
        print(f"calibration (s/step): {calibration}; {steps} steps per model", flush=True)
    meta = {
        "commit": commit.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "steps": steps,
        "budget_s": args.budget,
        "calibration_s_per_step": calibration,
        **{
            k: getattr(args, k)
            for k in ("context", "pairs", "eval_pairs", "mqar_rows", "mqar_ids", "text_rows", "layers")
        },
        **{
            k: getattr(args, k)
            for k in (
                "head_dim",
                "conv",
                "vocab",
                "window",
                "chunk",
                "gate_bias",
                "no_output_norm",
                "lr",
                "lm_weight",
                "widths",
            )
        },
        **{k: getattr(args, k) for k in ("text_pool", "eval_text", "eval_mqar_rows", "corpus_chars")},
        "state_dtype": "float32",
    }
    runs: dict[str, dict[str, Any]] = {}
    previous = args.out / "results.json"
    if args.only and previous.is_file():  # --only: keep the other architectures' records of the same setup
        stored = json.loads(previous.read_text())
        free = ("commit", "date", "calibration_s_per_step", "chunk", "widths")  # chunk: speed only
        same = {k: v for k, v in stored["meta"].items() if k not in free and v is not None}
        if same != {k: v for k, v in meta.items() if k not in free and v is not None}:  # None: unset
            print(f"{previous}: another setup; its records are replaced", flush=True)
        else:
            runs = {k: v for k, v in stored["runs"].items() if (v["hidden"], v["name"]) not in jobs}
            meta["widths"] = sorted({*stored["meta"]["widths"], *args.widths})
            commits = stored["meta"]["commit"].split(" + ")
            meta["commit"] = " + ".join(commits + [meta["commit"]] * (meta["commit"] not in commits))
    for w, n in jobs:
        cfg = model_config(args, w, n)
        model = build(cfg, args.conv, args.device, 0, args.gate_bias)
        print(f"{n} @ width {w}: {arch.describe(cfg.attention)}", flush=True)
        curve, secs = train(model, args, batches, steps, lambda s: print(s, flush=True))
        t1 = time.perf_counter()
        result = evaluate(model, args, eval_pool, pad)
        states = arch.plan_state_bytes(cfg, args.context)
        runs[f"{n}@{w}"] = {
            "name": n,
            "hidden": w,
            "head_dim": cfg.head_dim,
            "plan": list(cfg.attention),
            "params": {k: dict(v) for k, v in cfg.attention_params.items()},
            "label": arch.describe(cfg.attention),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(secs, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1),
            **result,
            "state_bytes_per_layer": states,
            "conv_state_bytes": conv_state_bytes(cfg, args.conv),
            "state_bytes_total": sum(states) + conv_state_bytes(cfg, args.conv),
            "loss_every_10": curve,
        }
        print(
            f"  {json.dumps({k: runs[f'{n}@{w}'][k] for k in ('mqar', 'text_exact', 'train_seconds')})}",
            flush=True,
        )
        write_outputs(args.out, meta, runs)  # after every model: a stopped run keeps its results
        del model
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
