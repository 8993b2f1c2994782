"""The model card (``README.md``) of a trained organism, written from its ``training.json`` values only."""

from __future__ import annotations

from typing import Any

from attnlab.organisms.config import TrainConfig


def _curve_rows(curve: list[dict[str, Any]], rows: int = 12) -> list[dict[str, Any]]:
    """About ``rows`` points of the loss curve, each the mean over its span of steps."""
    if not curve:
        return []
    span = max(1, len(curve) // rows)
    chunks: list[list[dict[str, Any]]] = []
    for c in curve:  # consecutive steps of one length, at most `span` of them
        if chunks and chunks[-1][-1]["length"] == c["length"] and len(chunks[-1]) < span:
            chunks[-1].append(c)
        else:
            chunks.append([c])
    out = []
    for chunk in chunks:
        mean = lambda key, chunk=chunk: (
            sum(c[key] for c in chunk if c[key] is not None) / n
            if (n := sum(c[key] is not None for c in chunk))
            else None
        )
        out.append(
            {
                "steps": f"{chunk[0]['step']}-{chunk[-1]['step']}",
                "length": chunk[-1]["length"],
                "loss": mean("loss"),
                "corpus_loss": mean("corpus_loss"),
                "task_loss": mean("task_loss"),
                "tokens_per_s": mean("tokens_per_s"),
            }
        )
    return out


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def model_card(cfg: TrainConfig, state: dict[str, Any]) -> str:
    """Markdown: model, data, training (curriculum, steps, time, loss curve), held-out loss, task accuracy
    per task and length, and what the numbers say."""
    m = cfg.model
    data = state["data"]
    env = state.get("environment", {})
    lines = [
        f"# attnlab organism `{cfg.name}`",
        "",
        "A Llama-architecture causal language model trained from scratch by `attnlab train` "
        f"(on {env.get('device', '?')}, {env.get('threads', '?')} threads, torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}). No pretrained weights, no download: the corpus is "
        "text shipped with the Python installation. Load it with "
        "`attnlab.organisms.checkpoint.load_organism(folder)` or `transformers.LlamaForCausalLM"
        ".from_pretrained(folder)` (safetensors).",
        "",
        "## Model",
        "",
        "| layers | hidden | heads | kv heads | head dim | MLP | vocab | RoPE theta | max position | parameters |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {m.layers} | {m.hidden_size} | {m.heads} | {m.kv_heads} | {m.head_dim} | {m.intermediate_size} | "
        f"{m.vocab_size} | {m.rope_theta:g} | {m.max_position} | {state['parameters']:,} |",
        "",
        f"Tokenizer: byte-level BPE of {m.vocab_size} tokens (digits split), trained on the training split.",
        "",
        "## Data",
        "",
        f"Corpus fingerprint `{data['fingerprint']}`: {data['train_documents']} training documents "
        f"({data['train_chars']:,} characters), {data['heldout_documents']} held-out documents "
        f"({data['heldout_chars']:,} characters); {data['duplicates_dropped']} duplicate paragraphs or "
        "documents dropped. Characters per source: "
        + ", ".join(f"{k} {v:,}" for k, v in data["chars_by_source"].items())
        + ".",
        "",
        f"Each batch row is a copy row (8 to {cfg.copy_span} random tokens repeated) with probability "
        f"{cfg.copy_share:.0%} (every row in the first {cfg.copy_warmup} steps), else a task sample with "
        f"probability {cfg.task_share:.0%} ({', '.join(cfg.tasks)}; haystack from the training split), "
        "otherwise a window of the training corpus; every token is a target.",
        "",
        "## Training",
        "",
        "| stage | steps | length | batch | tokens per step |",
        "|---|---|---|---|---|",
    ]
    for i, s in enumerate(cfg.stages):
        lines.append(f"| {i} | {s.steps} | {s.length} | {s.batch} | {s.length * s.batch:,} |")
    stopped = " (stopped early: `max_seconds` ran out)" if state.get("stopped_early") else ""
    skipped = state.get("skipped") or []
    if skipped:
        stopped += (
            f"; the time budget of {cfg.max_seconds:g} s was shared among the stages, which skipped steps "
            + ", ".join(f"{a + 1}-{b}" for a, b in skipped)
        )
    secs = state["train_seconds"]
    lines += [
        "",
        f"{len(state['curve'])} steps run of {cfg.total_steps} planned{stopped}; {state['tokens']:,} tokens in {secs:.0f} s of "
        f"optimiser steps ({state['tokens'] / max(secs, 1e-9):,.0f} tokens/s); AdamW, peak lr {cfg.lr:g}, "
        f"warm-up {cfg.warmup} steps, cosine to {cfg.lr * cfg.min_lr_ratio:g}, weight decay "
        f"{cfg.weight_decay:g}, gradient clip {cfg.grad_clip:g}, seed {cfg.seed}.",
        "",
        "### Loss curve",
        "",
        "Mean per span of steps (spans do not cross a change of length). Task loss: over answer tokens; "
        "corpus loss: over every other token; loss: the optimised sum, corpus loss + "
        f"{cfg.task_loss_weight:g} x task loss.",
        "",
        "| steps | length | loss | corpus loss | task loss | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in _curve_rows(state["curve"]):
        lines.append(
            f"| {r['steps']} | {r['length']} | {_f(r['loss'])} | {_f(r['corpus_loss'])} | "
            f"{_f(r['task_loss'])} | {_f(r['tokens_per_s'], 0)} |"
        )
    held = state.get("heldout")
    if held:
        lines += [
            "",
            f"Held-out loss: {held['loss']:.3f} nats/token (perplexity {held['perplexity']:.1f}) over "
            f"{held['windows']} windows of {held['length']} tokens of held-out prose. Baselines on the same "
            f"tokens: {held['unigram_loss']:.3f} for the training split's token frequencies (no context), "
            f"{held['uniform_loss']:.3f} for a uniform guess.",
        ]
    acc = state.get("task_accuracy")
    if acc:
        lengths = sorted({int(n) for per in acc.values() for n in per})
        lines += [
            "",
            "## Task accuracy",
            "",
            f"Exact match, greedy decoding, {cfg.eval_samples} samples per cell (seeds 0-{cfg.eval_samples - 1}), "
            "haystack from the held-out split; length in tokens.",
            "",
            "| task | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        for task, per in acc.items():
            lines.append(
                f"| {task} | " + " | ".join(f"{per.get(str(n), float('nan')):.2f}" for n in lengths) + " |"
            )
        solved = sorted(t for t, per in acc.items() if min(per.values()) >= 0.9)
        zero = sorted(t for t, per in acc.items() if max(per.values()) == 0.0)
        lines += [""]
        lines.append(
            "Solved (>= 0.90 at every length): " + (", ".join(solved) if solved else "none") + ". "
            "Never right at any length: " + (", ".join(zero) if zero else "none") + "."
        )
    lines.append("")
    return "\n".join(lines)
