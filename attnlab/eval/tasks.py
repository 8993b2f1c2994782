"""Task accuracy per method, budget, task and length (the core of ``attnlab eval``).

Conventions:

- A method runs where it can: in the prompt's prefill when its family runs prefill calls (dense, static,
  dynamic), in the answer's decode steps when it runs decode calls (dense, static, decode); the other
  phase runs ``softmax`` (see :func:`attnlab.hf.plan.phases_of`). A static method such as ``streaming``
  runs both phases. Linear methods cannot run in a transformers model and are refused.
- Budgets: a method given as ``name`` is run at every parameter set its registration sweeps at that
  length (``spec.bench_params(length)``; ``budgets="first"``: the first only; none: its defaults); as
  ``name:key=value:key=value`` at exactly those parameters.
- ``softmax`` (dense attention through the same path) is always evaluated, first, as the reference row.
- Samples: seeds ``0 .. samples-1`` of :func:`attnlab.organisms.tasks.generate`, haystack from the
  held-out split of the corpus (the organism's own, from its ``training.json``, when that corpus can be
  rebuilt here; else the default corpus). Greedy decoding of at most ``answer tokens + 2`` tokens,
  stopping at a newline or the end-of-text token; exact match of the first line
  (:func:`attnlab.organisms.tasks.score`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attnlab.errors import AttnlabError, did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from attnlab.organisms.corpus import CorpusConfig
    from attnlab.organisms.tasks import TaskContext

#: the reference method, always evaluated first
DENSE = "softmax"


class EvalError(AttnlabError, ValueError):
    """A bad ``attnlab eval`` request: unknown method, task or parameter, a length out of range."""


@dataclass(frozen=True)
class MethodRun:
    """One method at one budget: the method asked for, what runs in prefill and in decode, its params."""

    method: str
    prefill: str
    decode: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``name`` or ``name(key=value, ...)``."""
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.method}({inner})" if inner else self.method

    def use_kwargs(self, device: str = "cuda") -> dict[str, Any]:
        """Keyword arguments of :func:`attnlab.hf.use` for this run. On a CPU the method runs on a backend
        that does not compile (``sdpa_mask``, ``eager`` or ``sdpa``, where it has one): FlexAttention
        compiles for tens of seconds per shape there."""
        params = dict(self.params)
        backends = {}
        if device == "cpu":
            from attnlab.registry import get

            for name in {self.prefill, self.decode}:
                names = [b.name for b in get(name).backends]
                choice = next((c for c in ("sdpa_mask", "eager", "sdpa") if c in names), None)
                if choice is not None:
                    backends[name] = choice
        return {
            "plan": {"backends": backends} if backends else None,
            "prefill": self.prefill,
            "decode": self.decode,
            "prefill_params": params if self.prefill == self.method else None,
            "decode_params": params if self.decode == self.method else None,
        }


def parse_method(text: str) -> tuple[str, dict[str, Any] | None]:
    """``"name"`` -> (name, None); ``"name:k=v:k2=v2"`` -> (name, {k: v, k2: v2}); values read as JSON
    (numbers, true/false) where they parse, else kept as strings."""
    name, *parts = [p.strip() for p in text.split(":")]
    if not parts:
        return name, None
    params: dict[str, Any] = {}
    for part in parts:
        key, sep, raw = part.partition("=")
        if not sep or not key:
            raise EvalError(f"method {text!r}: parameter {part!r} is not key=value (expected name:key=value)")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw.strip()
    return name, params


def method_runs(methods: Sequence[str], length: int, budgets: str = "all") -> list[MethodRun]:
    """The runs of ``methods`` at ``length`` (see the module docstring); ``softmax`` first."""
    from attnlab.hf.plan import MethodRef, PlanError, check_method, phases_of
    from attnlab.registry import methods as registered

    if budgets not in ("all", "first"):
        raise EvalError(f"budgets={budgets!r}: expected 'all' or 'first'")
    runs = [MethodRun(DENSE, DENSE, DENSE)]
    for text in methods:
        name, explicit = parse_method(text)
        if name not in registered():
            raise EvalError(
                f"unknown attention method {name!r}.{did_you_mean(name, registered())} Registered: "
                + ", ".join(registered())
            )
        spec = registered()[name]
        phases = phases_of(spec)
        if spec.family == "linear" or not phases:
            raise EvalError(
                f"method {name!r} ({spec.family}) cannot run inside a transformers causal LM: attnlab.hf runs "
                "dense, static, dynamic (prefill) and decode methods"
            )
        if explicit is not None:
            sets = [explicit]
        else:
            swept = list(spec.bench_params(length)) or [{}]
            sets = swept[:1] if budgets == "first" else swept
        for params in sets:
            run = MethodRun(
                name,
                name if "prefill" in phases else DENSE,
                name if "decode" in phases else DENSE,
                tuple(sorted(params.items())),
            )
            for phase, method in (("prefill", run.prefill), ("decode", run.decode)):
                if method == name:
                    try:
                        check_method(MethodRef(name, run.params), phase, where=f"method {text!r}")
                    except PlanError as e:
                        raise EvalError(str(e)) from None
            if run not in runs:
                runs.append(run)
    return runs


@dataclass
class EvalConfig:
    """What ``attnlab eval`` measures. ``model``: a local checkpoint folder (a Llama causal LM; an
    organism folder or a training folder). ``corpus``: the corpus whose held-out split gives the
    haystack (default: the model's own from its ``training.json`` when it can be rebuilt here, else the
    micro organism's corpus settings)."""

    model: str | Path
    methods: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("passkey", "niah_multikey")
    lengths: tuple[int, ...] = (1024,)
    samples: int = 10
    device: str = "cpu"
    budgets: str = "all"
    corpus: CorpusConfig | None = None
    task_options: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class EvalResult:
    """One row per (method run, task, length): ``correct`` of ``samples``; plus what ran where."""

    rows: list[dict[str, Any]]
    info: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"info": self.info, "rows": self.rows}, indent=1)

    def write(self, path: str | Path) -> Path:
        """Write the result as JSON (folders created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p


def _load(cfg: EvalConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, dict[str, Any] | None]:
    from attnlab.organisms import checkpoint as ckpt
    from attnlab.organisms.errors import CheckpointError

    folder = ckpt.resolve(cfg.model)
    model, tok = ckpt.load_organism(folder, device=cfg.device)  # safetensors only; needs tokenizer.json
    try:
        state: dict[str, Any] | None = ckpt.read_state(folder)
    except CheckpointError:  # a user's checkpoint: its own tokenizer files and special tokens
        from transformers import AutoTokenizer

        state = None
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)  # type: ignore[assignment]
    if next(model.parameters()).device.type == "cpu":
        model = model.float()  # bf16 weights (the small organism) run in fp32 on a CPU
    return model, tok, state


def _haystack(
    cfg: EvalConfig, tok: PreTrainedTokenizerFast, state: dict[str, Any] | None
) -> tuple[TaskContext, str]:
    from attnlab.organisms.corpus import CorpusConfig, build_corpus, prose
    from attnlab.organisms.errors import ConfigError
    from attnlab.organisms.tasks import TaskContext

    corpus = None
    if cfg.corpus is not None:
        corpus = build_corpus(cfg.corpus)
    elif state is not None:
        stored: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in state["config"]["corpus"].items()
        }
        try:
            corpus = build_corpus(CorpusConfig(**stored))
        except (ConfigError, TypeError):  # e.g. a corpus file that is not on this machine
            corpus = None
    if corpus is None:
        corpus = build_corpus(CorpusConfig(max_chars=2_000_000))
    return TaskContext(tok, [d.text for d in prose(corpus.heldout)]), corpus.fingerprint


def evaluate(
    cfg: EvalConfig, advance: Callable[[int], None] | None = None, log: Callable[[str], None] = lambda s: None
) -> EvalResult:
    """Accuracy per method run, task and length (see the module docstring). ``advance(n)`` is called
    after each sample (progress)."""
    import attnlab.hf
    from attnlab.organisms.errors import ConfigError
    from attnlab.organisms.evaluate import greedy
    from attnlab.organisms.tasks import TASKS, generate, score
    from attnlab.organisms.tokenizer import decode, encode

    for t in cfg.tasks:
        if t not in TASKS:
            raise EvalError(f"unknown task {t!r}: expected some of {sorted(TASKS)}.{did_you_mean(t, TASKS)}")
    if cfg.samples < 1:
        raise EvalError(f"samples={cfg.samples}: expected >= 1")
    model, tok, state = _load(cfg)
    max_pos = int(model.config.max_position_embeddings)
    for n in cfg.lengths:
        if not 128 <= n <= max_pos:
            raise EvalError(
                f"length {n}: expected 128 <= length <= the model's max_position_embeddings={max_pos}"
            )
    runs = {n: method_runs(cfg.methods, n, cfg.budgets) for n in cfg.lengths}
    ctx, fingerprint = _haystack(cfg, tok, state)
    stop = sorted({i for i in (tok.eos_token_id, *encode(tok, "\n")) if i is not None})
    rows: list[dict[str, Any]] = []
    for n in cfg.lengths:
        for task in cfg.tasks:
            try:
                samples = [
                    generate(task, ctx, n, seed, **cfg.task_options.get(task, {}))
                    for seed in range(cfg.samples)
                ]
            except ConfigError as e:
                log(f"{task} at {n}: {e}")
                samples = []
            prompts = [encode(tok, s.prompt) for s in samples]
            for run in runs[n]:
                correct, started = 0, time.perf_counter()
                outputs = []
                with attnlab.hf.use(model, **run.use_kwargs(cfg.device)):
                    for s, ids in zip(samples, prompts, strict=True):
                        text = decode(tok, greedy(model, ids, s.answer_tokens + 2, stop))
                        correct += score(s, text)
                        outputs.append(text)
                        if advance:
                            advance(1)
                rows.append(
                    {
                        "method": run.method,
                        "label": run.label,
                        "params": dict(run.params),
                        "prefill": run.prefill,
                        "decode": run.decode,
                        "task": task,
                        "length": n,
                        "samples": len(samples),
                        "correct": correct,
                        "accuracy": correct / len(samples) if samples else math.nan,
                        "seconds": time.perf_counter() - started,
                        "outputs": outputs,
                    }
                )
    info = {
        "model": str(cfg.model),
        "model_name": (state or {}).get("config", {}).get("name"),
        "device": cfg.device,
        "tasks": list(cfg.tasks),
        "lengths": list(cfg.lengths),
        "samples": cfg.samples,
        "haystack_corpus": fingerprint,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    return EvalResult(rows, info)


def planned_samples(cfg: EvalConfig) -> int:
    """How many greedy generations :func:`evaluate` runs (for a progress bar)."""
    runs = sum(len(method_runs(cfg.methods, n, cfg.budgets)) for n in cfg.lengths)
    return runs * len(cfg.tasks) * cfg.samples


def table_rows(result: EvalResult) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(column names ``task@length``, [(run label, cells)]): accuracy as ``0.80 (8/10)``; ``-`` where a
    run has no row (its budgets differ per length) or the task made no sample."""
    cols: list[tuple[str, int]] = []
    cells: dict[str, dict[tuple[str, int], str]] = {}
    for r in result.rows:
        key = (r["task"], r["length"])
        if key not in cols:
            cols.append(key)
        text = f"{r['accuracy']:.2f} ({r['correct']}/{r['samples']})" if r["samples"] else "-"
        cells.setdefault(r["label"], {})[key] = text
    out = [(label, [per.get(c, "-") for c in cols]) for label, per in cells.items()]
    return [f"{t}@{n}" for t, n in cols], out


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy per run label over every task and length (pooled over samples)."""
    tot: dict[str, list[int]] = {}
    for r in rows:
        acc = tot.setdefault(r["label"], [0, 0])
        acc[0] += r["correct"]
        acc[1] += r["samples"]
    return {k: c / n if n else math.nan for k, (c, n) in tot.items()}
