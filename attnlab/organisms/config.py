"""Training configuration of an organism: model shape, corpus, length curriculum, optimiser, evaluation.

Every value is checked by ``validate()``, with a message that names the field, the value given and what
is expected. Configurations round-trip through JSON (:meth:`TrainConfig.to_dict` / :meth:`from_dict`), which
is how they are stored beside a checkpoint (``training.json``) and how ``attnlab train --config`` reads
overrides; unknown keys are errors, with a suggestion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnlab.errors import did_you_mean
from attnlab.organisms.corpus import CorpusConfig
from attnlab.organisms.errors import ConfigError
from attnlab.organisms.tokenizer import MIN_VOCAB

if TYPE_CHECKING:
    from transformers import LlamaConfig


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-architecture causal LM (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention).

    ``hidden_size`` is split into ``heads`` heads of ``hidden_size // heads`` dimensions; ``kv_heads``
    key/value heads (GQA: ``heads % kv_heads == 0``). ``max_position``: the longest context in tokens.
    ``attention``: the attnlab method of each layer (``()``: the plain Llama layer with SDPA, the default),
    with ``attention_params`` per method name; see :mod:`attnlab.organisms.architectures`.
    ``linear_output_norm``: a per-head RMSNorm on the output of the plan's lightning, gated_delta and gla
    layers (default True; False is the adapter before 2026-11-23 s3, whose gated_delta did not learn MQAR
    at width 64; :data:`attnlab.organisms.architectures.OUTPUT_NORM`).
    """

    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 10_000.0
    max_position: int = 2048
    tie_embeddings: bool = True
    attention: tuple[str, ...] = ()
    attention_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    linear_output_norm: bool = True

    def validate(self) -> ModelConfig:
        for name in ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model {name}={value!r}: expected a positive integer")
        if not isinstance(self.vocab_size, int) or self.vocab_size < MIN_VOCAB:
            raise ConfigError(f"model vocab_size={self.vocab_size!r}: expected an integer >= {MIN_VOCAB}")
        if self.hidden_size % self.heads:
            raise ConfigError(
                f"model hidden_size={self.hidden_size} is not divisible by heads={self.heads}: expected "
                "hidden_size = heads * head_dim"
            )
        if (self.hidden_size // self.heads) % 2:
            raise ConfigError(
                f"model head_dim={self.hidden_size // self.heads}: expected an even number (RoPE)"
            )
        if self.heads % self.kv_heads:
            raise ConfigError(
                f"model heads={self.heads}, kv_heads={self.kv_heads}: expected heads divisible by kv_heads (GQA)"
            )
        if not isinstance(self.linear_output_norm, bool):
            raise ConfigError(f"model linear_output_norm={self.linear_output_norm!r}: expected true or false")
        if not isinstance(self.rope_theta, int | float) or not self.rope_theta > 0:
            raise ConfigError(f"model rope_theta={self.rope_theta}: expected a positive number")
        from attnlab.organisms.architectures import check_plan

        check_plan(self.attention, self.attention_params, self.layers)
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @classmethod
    def from_llama(cls, cfg: Any) -> ModelConfig:
        """The model config of a ``LlamaConfig`` (validated: a checkpoint's config gets the same checks)."""
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head_dim * cfg.num_attention_heads != cfg.hidden_size:
            raise ConfigError(
                f"model head_dim={head_dim} with heads={cfg.num_attention_heads} and hidden_size="
                f"{cfg.hidden_size}: attnlab organisms expect hidden_size = heads * head_dim"
            )
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = (
            rope.get("rope_theta", getattr(cfg, "rope_theta", 10_000.0)) if isinstance(rope, dict) else 1e4
        )
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            rope_theta=float(theta),
            max_position=cfg.max_position_embeddings,
            tie_embeddings=bool(cfg.tie_word_embeddings),
        ).validate()

    def llama_config(self) -> LlamaConfig:
        """The ``transformers.LlamaConfig`` of this model (SDPA attention, no hub involved)."""
        from transformers import LlamaConfig

        self.validate()
        extra: dict[str, Any] = {"attn_implementation": "sdpa"}
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_embeddings,
            **extra,
        )


@dataclass(frozen=True)
class Stage:
    """One stage of the length curriculum: ``steps`` optimiser steps of ``batch`` sequences of ``length``
    tokens."""

    steps: int
    length: int
    batch: int


@dataclass(frozen=True)
class TrainConfig:
    """What ``attnlab train`` does. ``task_share``: the probability that a batch row is a task sample
    (otherwise a window of the training corpus); the loss over answer tokens is weighted by
    ``task_loss_weight`` against the loss over every other token. ``copy_share``: the probability that a
    batch row is a copy row (8 to ``copy_span`` random tokens repeated to fill the row), drawn before the
    task share; during the first ``copy_warmup`` steps every row is a copy row. Copy rows form the
    induction (match-and-copy) heads that every retrieval task needs: on a CPU budget, task answers alone
    are too sparse a signal for them to appear (issue 11).
    ``lr`` peaks after ``warmup`` steps and decays (cosine) to ``lr * min_lr_ratio``. ``max_seconds``: the time
    budget from the start of the run (data preparation included, final evaluation excluded), shared among
    the stages (see :mod:`attnlab.organisms.train`); None runs every planned step. ``eval_lengths`` /
    ``eval_samples``: task accuracy measured after training, per task and length, on held-out haystack."""

    name: str = "micro"
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(max_chars=2_000_000))
    # planned for an idle 2-core CPU (~14K tokens/s); under load, max_seconds cuts each stage short. Most
    # of the budget goes to short rows: the copy and retrieval circuits form there (issue 11)
    stages: tuple[Stage, ...] = (
        Stage(500, 128, 16),
        Stage(100, 256, 8),
        Stage(30, 512, 4),
        Stage(15, 1024, 2),
        Stage(10, 2048, 1),
    )
    tasks: tuple[str, ...] = ("passkey", "niah_multikey")
    task_share: float = 0.7
    task_loss_weight: float = 1.0
    copy_share: float = 0.15
    copy_warmup: int = 100
    copy_span: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_seconds: float | None = 270.0
    eval_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    eval_samples: int = 10
    #: torch CPU threads while training and evaluating (None: torch's default). The micro uses 1: on a
    #: 2-core machine that other processes share, 2 threads measured 1.1-2.9K tokens/s against 7.5-8K for
    #: 1 (a parallel region waits for its slowest, preempted thread); idle, 2 threads gave 14K against 11K.
    threads: int | None = 1
    #: where the model trains and is evaluated ("cpu", "cuda", "cuda:1"); on CUDA the steps run under bf16
    #: autocast (fp32 master weights)
    device: str = "cpu"
    #: worker processes that build the batches ahead of the training step (0: built in the loop)
    workers: int = 0
    #: the dtype of the final folder's weights ("float32" or "bfloat16"; step checkpoints stay float32)
    save_dtype: str = "float32"

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> Stage:
        """The curriculum stage that optimiser step ``step`` (0-based) belongs to."""
        for s in self.stages:
            if step < s.steps:
                return s
            step -= s.steps
        return self.stages[-1]

    def validate(self) -> TrainConfig:
        from attnlab.organisms.tasks import TASKS

        self.model.validate()
        self.corpus.validate()
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"name={self.name!r}: expected letters, digits, '-' or '_'")
        if not self.stages:
            raise ConfigError("stages=(): expected at least one (steps, length, batch) stage")
        for i, s in enumerate(self.stages):
            if min(s.steps, s.length, s.batch) < 1:
                raise ConfigError(f"stage {i} {s}: expected positive steps, length and batch")
            if s.length > self.model.max_position:
                raise ConfigError(
                    f"stage {i} length={s.length} exceeds the model's max_position={self.model.max_position}: "
                    "raise model.max_position or shorten the stage"
                )
            if self.task_share > 0 and s.length < 128:
                raise ConfigError(f"stage {i} length={s.length}: task samples need length >= 128")
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(
                    f"unknown task {t!r}: expected some of {sorted(TASKS)}.{did_you_mean(t, TASKS)}"
                )
        if not 0.0 <= self.copy_share <= 1.0 or self.copy_warmup < 0 or self.copy_span < 1:
            raise ConfigError(
                f"copy_share={self.copy_share}, copy_warmup={self.copy_warmup}, copy_span={self.copy_span}: "
                "expected a share between 0 and 1, warmup >= 0 steps, span >= 1 token"
            )
        if not 0.0 <= self.task_share <= 1.0:
            raise ConfigError(f"task_share={self.task_share}: expected a share between 0 and 1")
        if self.task_share > 0 and not self.tasks:
            raise ConfigError("task_share > 0 with tasks=(): name the tasks or set task_share=0")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"lr={self.lr}, min_lr_ratio={self.min_lr_ratio}: expected lr > 0, 0 <= ratio <= 1"
            )
        if self.warmup < 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ConfigError(
                f"warmup={self.warmup}, weight_decay={self.weight_decay}, grad_clip={self.grad_clip}: "
                "expected warmup >= 0, weight_decay >= 0, grad_clip > 0"
            )
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError(
                f"checkpoint_every={self.checkpoint_every}, keep_checkpoints={self.keep_checkpoints}: "
                "expected both >= 1"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(
                f"max_seconds={self.max_seconds}: expected a positive number of seconds or None"
            )
        for n in self.eval_lengths:
            if not 128 <= n <= self.model.max_position:
                raise ConfigError(
                    f"eval length {n}: expected 128 <= length <= max_position={self.model.max_position}"
                )
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(
                f"threads={self.threads!r}: expected a positive integer or None (torch's default)"
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r}: expected 'cpu', 'cuda' or 'cuda:<index>'")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"workers={self.workers!r}: expected an integer >= 0")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"save_dtype={self.save_dtype!r}: expected 'float32' or 'bfloat16'")
        if self.eval_samples < 0:
            raise ConfigError(f"eval_samples={self.eval_samples}: expected >= 0 (0 skips the evaluation)")
        return self

    # ------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """A config from ``data`` (as written by :meth:`to_dict`), on top of ``base`` (default: the defaults):
        keys left out keep the base's values. Unknown keys raise :class:`ConfigError`."""
        base = base or cls()
        if not isinstance(data, dict):
            raise ConfigError(f"train config: expected a JSON object, got {type(data).__name__}")
        _check_keys("train config", data, cls)
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "model":
                _check_keys("model", value, ModelConfig)
                value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                values[key] = dataclasses.replace(base.model, **value)
            elif key == "corpus":
                _check_keys("corpus", value, CorpusConfig)
                value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                values[key] = dataclasses.replace(base.corpus, **value)
            elif key == "stages":
                values[key] = tuple(_stage(s) for s in value)
            elif isinstance(value, list):
                values[key] = tuple(value)
            else:
                values[key] = value
        return dataclasses.replace(base, **values).validate()


def _check_keys(where: str, data: Any, kind: type) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {data!r}")
    names = {f.name for f in dataclasses.fields(kind)}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"unknown key {key!r} in {where}: expected some of {sorted(names)}.{did_you_mean(key, names)}"
            )


def _stage(value: Any) -> Stage:
    if isinstance(value, dict):
        _check_keys("stage", value, Stage)
        return Stage(**value)
    if isinstance(value, list | tuple) and len(value) == 3:
        return Stage(*value)
    raise ConfigError(f"stage {value!r}: expected {{'steps', 'length', 'batch'}} or [steps, length, batch]")


def preset(name: str) -> TrainConfig:
    """A named configuration: ``micro`` (the defaults: a 2-core CPU, 270 s from corpus to last step,
    lengths 128 to 2048, trained on passkey and multi-key NIAH) or ``small`` (one CUDA GPU with 12 batch
    workers, 420 s from corpus to last step, lengths 1K to 16K, the four haystack tasks, ~7.9 M
    parameters so that its bf16 weights stay under 16 MB)."""
    if name == "micro":
        return TrainConfig().validate()
    if name == "small":
        return TrainConfig(
            name="small",
            model=ModelConfig(
                vocab_size=4096,
                hidden_size=320,
                layers=6,
                heads=5,
                kv_heads=1,
                intermediate_size=896,
                rope_theta=500_000.0,
                max_position=16384,
            ),
            corpus=CorpusConfig(max_chars=20_000_000),
            stages=(  # ~230 M tokens: ~260 s at the ~0.9 M tokens/s measured on one H100
                Stage(3500, 1024, 32),
                Stage(1500, 4096, 8),
                Stage(1000, 8192, 4),
                Stage(1000, 16384, 2),
            ),
            tasks=("passkey", "niah_multikey", "niah_multivalue", "variable_tracking"),
            task_share=0.6,
            copy_share=0.1,
            copy_warmup=150,
            lr=2e-3,
            warmup=100,
            checkpoint_every=1000,
            eval_lengths=(1024, 4096, 8192, 16384),
            eval_samples=20,
            max_seconds=420.0,
            threads=None,
            device="cuda",
            workers=12,
            save_dtype="bfloat16",
        ).validate()
    raise ConfigError(
        f"unknown preset {name!r}: expected 'micro' or 'small'.{did_you_mean(name, ('micro', 'small'))}"
    )
