"""``attnlab train``: a Llama-architecture causal LM trained from scratch on the offline corpus mixed with
the long-context tasks, with a length curriculum.

- The model is built from a ``transformers.LlamaConfig`` (:meth:`ModelConfig.llama_config`), never
  downloaded; so the Hugging Face path that evaluation uses is the real one.
- Each step's batch is drawn from ``random.Random(f"{seed}:batch:{step}")``: a resumed run sees the same
  batches as an uninterrupted one, and no random state needs saving.
- Copy rows (``copy_share``, every row during the first ``copy_warmup`` steps) are 8 to ``copy_span``
  random tokens (special tokens excluded; the span drawn per row, so that no fixed offset predicts the
  copy) repeated to fill the row: a dense match-and-copy signal.
- Corpus rows are windows of the training split's token stream (documents separated by the end-of-text
  token); task rows are samples at the stage's length with haystack from the training split, followed
  by the answer and the end-of-text token. Every token is a next-token target; the loss is the mean
  cross-entropy over the answer tokens (answers and their end-of-text token: ``task_loss``) times
  ``task_loss_weight``, plus the mean over all other tokens (``corpus_loss``: corpus windows and task
  prompts alike).
- A time budget (``max_seconds``) is spread over the curriculum: at the start of each stage, the time
  left is shared among it and the stages after it in proportion to their planned tokens, and a stage that has used its share
  ends early (its remaining steps are skipped: the step counter, hence the batch seeds and the learning
  rate schedule, jumps to the next stage's first step). So every stage, the longest lengths included,
  is trained whatever the machine's speed; the steps skipped are recorded (``skipped``). Without
  ``max_seconds`` every planned step runs and a run is reproducible step for step.
- Checkpoints every ``checkpoint_every`` steps, at the end and when ``max_seconds`` runs out (see
  :mod:`attnlab.organisms.checkpoint`); resuming reloads the latest, with its tokenizer and optimizer.
- At the end: task accuracy per task and length on held-out haystack, held-out loss, and the final
  folder ``OUT/final`` (weights, tokenizer, ``training.json``, model card ``README.md``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attnlab.organisms import checkpoint as ckpt
from attnlab.organisms.config import TrainConfig
from attnlab.organisms.corpus import Corpus, build_corpus, prose
from attnlab.organisms.errors import CheckpointError, ConfigError
from attnlab.organisms.evaluate import TRAIN_SEED_BASE, heldout_loss, task_accuracy
from attnlab.organisms.tasks import TaskContext, generate
from attnlab.organisms.tokenizer import encode, encode_batch, load_tokenizer, train_tokenizer

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

#: (config, data) for the batch workers, set before they fork
_WORK: tuple[TrainConfig, Data] | None = None
#: fields of a config that a resumed run must share with its checkpoint (the rest may change)
FIXED_ON_RESUME = ("model", "corpus", "tasks", "seed")
IGNORE = -100


@dataclass
class Data:
    corpus: Corpus
    tokenizer: PreTrainedTokenizerFast
    train_ids: torch.Tensor
    heldout_ids: list[int]
    train_ctx: TaskContext
    eval_ctx: TaskContext
    #: per training length, the tasks whose sample fits it (a too-short stage trains the others)
    fits: dict[int, tuple[str, ...]]


@dataclass
class TrainResult:
    """Where the final model went, and what ``training.json`` holds."""

    folder: Path
    state: dict[str, Any]


def prepare_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast | None = None) -> Data:
    """Build the corpus, train the tokenizer (unless given), tokenize, and set up the task haystacks."""
    corpus = build_corpus(cfg.corpus)
    if tokenizer is None:
        tokenizer = train_tokenizer((d.text for d in corpus.train), cfg.model.vocab_size)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in encode_batch(tokenizer, [d.text for d in corpus.train]):
        stream += ids
        stream.append(eos)
    heldout: list[int] = []
    for ids in encode_batch(tokenizer, [d.text for d in prose(corpus.heldout)]):
        heldout += [*ids, eos]
    train_ctx = TaskContext(tokenizer, [d.text for d in prose(corpus.train)])
    fits = {s.length: tuple(t for t in cfg.tasks if task_fits(train_ctx, t, s.length)) for s in cfg.stages}
    return Data(
        corpus,
        tokenizer,
        torch.tensor(stream, dtype=torch.long),
        heldout,
        train_ctx,
        TaskContext(tokenizer, [d.text for d in prose(corpus.heldout)]),
        fits,
    )


def task_fits(ctx: TaskContext, task: str, length: int) -> bool:
    """Whether ``task`` can make a sample of ``length`` tokens (its fixed text fits, the haystack suffices)."""
    try:
        generate(task, ctx, length, TRAIN_SEED_BASE)
    except ConfigError:
        return False
    return True


def make_batch(cfg: TrainConfig, data: Data, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, next-token labels with -100 on padding, answer-target flags) for ``step``, each
    (batch, length)."""
    stage = cfg.stage_at(step)
    rng = random.Random(f"{cfg.seed}:batch:{step}")
    b, n = stage.batch, stage.length
    tasks = data.fits[n] if n in data.fits else tuple(t for t in cfg.tasks if task_fits(data.train_ctx, t, n))
    x = torch.full((b, n), data.tokenizer.pad_token_id, dtype=torch.long)
    y = torch.full((b, n), IGNORE, dtype=torch.long)
    answer = torch.zeros((b, n), dtype=torch.bool)
    for row in range(b):  # a copy row, a task sample (probability task_share) or a corpus window
        if step < cfg.copy_warmup or (cfg.copy_share and rng.random() < cfg.copy_share):
            span = rng.randint(
                min(8, cfg.copy_span), min(cfg.copy_span, n)
            )  # varied: no fixed-offset shortcut
            seg = torch.tensor([rng.randrange(2, len(data.tokenizer)) for _ in range(span)])
            copy = seg.repeat(n // len(seg) + 2)[: n + 1]
            x[row] = copy[:-1]
            y[row] = copy[1:]
        elif tasks and rng.random() < cfg.task_share:
            task = tasks[rng.randrange(len(tasks))]
            s = generate(task, data.train_ctx, n, TRAIN_SEED_BASE + rng.randrange(10**9))
            prompt = encode(data.tokenizer, s.prompt)
            seq = prompt + encode(data.tokenizer, s.answer) + [data.tokenizer.eos_token_id]
            m = len(seq) - 1
            x[row, :m] = torch.tensor(seq[:-1])
            y[row, :m] = torch.tensor(seq[1:])
            answer[row, len(prompt) - 1 : m] = True
        else:
            start = rng.randrange(len(data.train_ids) - n - 1)
            x[row] = data.train_ids[start : start + n]
            y[row] = data.train_ids[start + 1 : start + n + 1]
    return x, y, answer


def _init_worker() -> None:
    torch.set_num_threads(1)


def _work(step: int) -> tuple[Any, Any, Any]:
    assert _WORK is not None
    x, y, answer = make_batch(*_WORK, step)
    return x.numpy(), y.numpy(), answer.numpy()


class Prefetcher:
    """Batches built ahead by ``workers`` forked processes (``make_batch`` is deterministic per step, so
    the batches are those the loop would build). Create it before CUDA is initialised."""

    def __init__(self, cfg: TrainConfig, data: Data, workers: int, depth: int | None = None) -> None:
        import multiprocessing
        import os

        global _WORK
        _WORK = (cfg, data)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cfg, self.depth = cfg, depth or 2 * workers
        self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker)
        self.pending: dict[int, Any] = {}

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of ``step``; queues the next ``depth`` steps."""
        for s in range(step, min(step + self.depth, self.cfg.total_steps)):
            if s not in self.pending:
                self.pending[s] = self.pool.apply_async(_work, (s,))
        for s in [s for s in self.pending if s < step]:  # steps skipped by the time budget
            del self.pending[s]
        x, y, answer = self.pending.pop(step).get()
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(answer)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def unigram_loss(data: Data, tokens: int) -> float:
    """The baseline a model that ignores context can reach: cross-entropy (nats/token) of the first
    ``tokens`` held-out tokens under the training split's token frequencies (add-one smoothed)."""
    vocab = len(data.tokenizer)
    counts = torch.bincount(data.train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    held = torch.tensor(data.heldout_ids[: tokens + 1][1:], dtype=torch.long)
    return float(-logp[held].mean()) if len(held) else math.nan


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.total_steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def losses(
    model: LlamaForCausalLM, x: torch.Tensor, y: torch.Tensor, answer: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(corpus loss, task loss): mean cross-entropy over the non-answer targets and over the answer
    targets (None when the batch has none of that kind). Logits are computed only where a label is."""
    hidden = model.model(input_ids=x).last_hidden_state
    out: list[torch.Tensor | None] = []
    for kind in (~answer, answer):
        mask = (y != IGNORE) & kind
        if not bool(mask.any()):
            out.append(None)
            continue
        logits = model.lm_head(hidden[mask]).float()
        out.append(torch.nn.functional.cross_entropy(logits, y[mask]))
    return out[0], out[1]


def build_model(cfg: TrainConfig) -> LlamaForCausalLM:
    """The untrained model: a Llama causal LM whose layers run ``cfg.model.attention``'s methods (plain
    SDPA layers when it is empty; see :mod:`attnlab.organisms.architectures`)."""
    from transformers import LlamaForCausalLM

    from attnlab.organisms.architectures import apply

    torch.manual_seed(cfg.seed)
    return apply(LlamaForCausalLM(cfg.model.llama_config()), cfg.model)


def _load_adapted(cfg: TrainConfig, folder: Path) -> LlamaForCausalLM:
    """A checkpoint of an organism with an attention plan: built from ``cfg`` (the plan's layers and input
    makers), weights from the folder's ``model.safetensors`` (every key must match; tied embeddings
    aside)."""
    from safetensors.torch import load_file

    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    missing = [m for m in missing if not (cfg.model.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: weights do not match the attention plan {list(cfg.model.attention)}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    if cfg.model.tie_embeddings:
        model.tie_weights()
    return model.to(torch.device(cfg.device))  # type: ignore[arg-type]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _check_resume(cfg: TrainConfig, stored: dict[str, Any], folder: Path) -> None:
    now = cfg.to_dict()
    for key in FIXED_ON_RESUME:
        if json.loads(json.dumps(now[key])) != stored["config"][key]:
            raise CheckpointError(
                f"cannot resume from {folder}: its config's {key!r} is {stored['config'][key]!r}, this run's "
                f"is {now[key]!r}; use the same {key}, or a fresh --out folder"
            )


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = True,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> TrainResult:
    """Train (or resume) the organism described by ``cfg`` into the folder ``out``; see the module
    docstring. ``max_seconds`` counts from this call (data preparation included, final evaluation
    excluded). ``progress``: draw a progress bar with the loss and tokens/s. ``cfg.threads`` applies
    for the call (torch's thread count is restored on return)."""
    cfg = cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, Path(out), resume, progress, log)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig, out: Path, resume: bool, progress: bool, log: Callable[[str], None]
) -> TrainResult:
    from attnlab.organisms.card import model_card

    started = time.perf_counter()
    latest = ckpt.latest_checkpoint(out) if resume else None
    if latest is None and ckpt.step_folders(out):
        raise CheckpointError(f"{out} already holds checkpoints; resume, or choose a fresh --out folder")
    state: dict[str, Any]
    device = torch.device(cfg.device)
    if latest is not None:
        stored = ckpt.read_state(latest)
        _check_resume(cfg, stored, latest)
        log(f"resuming from {latest} (step {stored['step']})")
        data = prepare_data(cfg, load_tokenizer(latest))
        if data.corpus.fingerprint != stored["data"]["fingerprint"]:
            raise CheckpointError(
                f"cannot resume from {latest}: the corpus built here (fingerprint {data.corpus.fingerprint}) "
                f"differs from the one it was trained on ({stored['data']['fingerprint']}); the installed "
                "packages changed. Train into a fresh --out folder."
            )
        prefetch = Prefetcher(cfg, data, cfg.workers) if cfg.workers else None
        if cfg.model.attention:
            model = _load_adapted(cfg, latest)
        else:
            model, _ = ckpt.load_organism(latest, device=cfg.device)
        model.float().train()
        optimizer = build_optimizer(cfg, model)
        ckpt.load_optimizer(optimizer, latest, stored.pop("optimizer_param_groups"))
        state = {**stored, "config": cfg.to_dict()}
    else:
        data = prepare_data(cfg)
        prefetch = Prefetcher(cfg, data, cfg.workers) if cfg.workers else None
        model = build_model(cfg).to(device)  # type: ignore[arg-type]  # (transformers' decorated .to)
        optimizer = build_optimizer(cfg, model)
        state = {
            "config": cfg.to_dict(),
            "step": 0,
            "tokens": 0,
            "train_seconds": 0.0,
            "curve": [],
            "data": data.corpus.summary(),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    log(
        f"corpus {data.corpus.fingerprint}: {len(data.train_ids)} training tokens, "
        f"{len(data.heldout_ids)} held-out tokens; prepared in {time.perf_counter() - started:.1f} s"
    )
    try:
        stopped = _loop(cfg, data, model, optimizer, state, out, started, progress, prefetch, log)
    finally:
        if prefetch is not None:
            prefetch.close()
    if stopped:
        log(f"stopped at step {state['step']} of {cfg.total_steps}: max_seconds={cfg.max_seconds} ran out")
    state["stopped_early"] = stopped
    model.eval()
    if cfg.eval_samples:
        state["task_accuracy"] = _evaluate(cfg, data, model, progress)
    ctx_len = max(s.length for s in cfg.stages)
    loss = heldout_loss(model, data.heldout_ids, ctx_len, windows=8)
    state["heldout"] = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "length": ctx_len,
        "windows": 8,
        "unigram_loss": unigram_loss(data, ctx_len * 8),
        "uniform_loss": math.log(len(data.tokenizer)),
    }
    state["environment"] = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if cfg.save_dtype == "bfloat16":
        model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    folder = ckpt.write_model(out / "final", model, data.tokenizer, state, model_card(cfg, state))
    return TrainResult(folder, state)


def _loop(
    cfg: TrainConfig,
    data: Data,
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    out: Path,
    started: float,
    progress: bool,
    prefetch: Prefetcher | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> bool:
    """Run the remaining steps; True when ``max_seconds`` stopped it early. Every ``log_every`` steps (or
    50), a line to ``log``: step, length, losses (mean since the last line), tokens/s, elapsed."""
    bar, task = _bar(progress, "train", cfg.total_steps, state["step"])
    model.train()
    stopped = False
    shares: list[float] = []
    stage_index, stage_started = -1, 0.0
    state.setdefault("skipped", [])
    try:
        while state["step"] < cfg.total_steps:
            step = state["step"]
            t0 = time.perf_counter()
            if _stage_index(cfg, step) != stage_index:  # a new stage: share out the time left
                stage_index, stage_started = _stage_index(cfg, step), t0
                shares = _stage_budgets(cfg, step, started)
            x, y, answer = prefetch.get(step) if prefetch is not None else make_batch(cfg, data, step)
            device = next(model.parameters()).device
            x, y, answer = (t.to(device, non_blocking=True) for t in (x, y, answer))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                corpus_loss, task_loss = losses(model, x, y, answer)
            parts = [
                p
                for p in (corpus_loss, None if task_loss is None else cfg.task_loss_weight * task_loss)
                if p is not None
            ]
            loss = torch.stack(parts).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["tokens"] += x.numel()
            state["train_seconds"] += dt
            state["curve"].append(
                {
                    "step": step + 1,
                    "length": x.shape[1],
                    "loss": float(loss.detach()),
                    "corpus_loss": None if corpus_loss is None else float(corpus_loss.detach()),
                    "task_loss": None if task_loss is None else float(task_loss.detach()),
                    "tokens_per_s": x.numel() / dt,
                }
            )
            if state["step"] % 50 == 0:
                recent = state["curve"][-50:]
                mean = lambda key, recent=recent: _mean([c[key] for c in recent])
                log(
                    f"step {state['step']} length {x.shape[1]}: loss {mean('loss'):.3f} corpus "
                    f"{mean('corpus_loss'):.3f} task {mean('task_loss'):.3f}, {mean('tokens_per_s'):,.0f} tok/s, "
                    f"{time.perf_counter() - started:.0f} s"
                )
            if bar is not None:
                bar.update(task, advance=1, loss=f"{float(loss.detach()):.3f}", tps=f"{x.numel() / dt:,.0f}")
            over = cfg.max_seconds is not None and time.perf_counter() - started > cfg.max_seconds
            end = _stage_end(cfg, stage_index)
            if (
                shares
                and not over
                and time.perf_counter() - stage_started > shares[stage_index]
                and state["step"] < end
            ):
                state["skipped"].append([state["step"], end])  # this stage's time share is spent
                if bar is not None:
                    bar.update(task, advance=end - state["step"])
                state["step"] = end
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.total_steps or over:
                ckpt.save_checkpoint(
                    out, state["step"], model, data.tokenizer, optimizer, state, cfg.keep_checkpoints
                )
            if over and state["step"] < cfg.total_steps:
                stopped = True
                break
    finally:
        if bar is not None:
            bar.stop()
    return stopped


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else math.nan


def _stage_index(cfg: TrainConfig, step: int) -> int:
    for i in range(len(cfg.stages)):
        if step < _stage_end(cfg, i):
            return i
    return len(cfg.stages) - 1


def _stage_end(cfg: TrainConfig, index: int) -> int:
    """The first step after stage ``index``."""
    return sum(s.steps for s in cfg.stages[: index + 1])


def _stage_budgets(cfg: TrainConfig, step: int, started: float) -> list[float]:
    """Seconds each stage may take: the time left of ``max_seconds`` shared in proportion to the tokens
    each stage has left from ``step`` on ([] without a time budget)."""
    if cfg.max_seconds is None:
        return []
    left = max(0.0, cfg.max_seconds - (time.perf_counter() - started))
    tokens = []
    for i, s in enumerate(cfg.stages):
        begin = _stage_end(cfg, i) - s.steps
        tokens.append(max(0, _stage_end(cfg, i) - max(step, begin)) * s.length * s.batch)
    total = sum(tokens) or 1
    return [left * t / total for t in tokens]


def _evaluate(
    cfg: TrainConfig, data: Data, model: LlamaForCausalLM, progress: bool
) -> dict[str, dict[str, float]]:
    total = len(cfg.tasks) * len(cfg.eval_lengths) * cfg.eval_samples
    bar, task = _bar(progress, "evaluate", total, 0)
    try:
        acc = task_accuracy(
            model,
            data.eval_ctx,
            cfg.tasks,
            cfg.eval_lengths,
            cfg.eval_samples,
            advance=(lambda: bar.advance(task)) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.stop()
    return {t: {str(n): a for n, a in per.items()} for t, per in acc.items()}


def _bar(show: bool, name: str, total: int, done: int) -> tuple[Any, Any]:
    if not show:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(name),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
    )
    task = bar.add_task(name, total=total, completed=done, loss="-", tps="-")
    bar.start()
    return bar, task


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """``cfg`` with ``changes`` (validated)."""
    return dataclasses.replace(cfg, **changes).validate()
