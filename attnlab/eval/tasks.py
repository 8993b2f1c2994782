"""Task accuracy, perplexity, density and step time per method and budget (the core of ``attnlab eval``).

Conventions:

- A method runs where it can: in the prompt's prefill when its family runs prefill calls (dense, static,
  dynamic), in the answer's decode steps when it runs decode calls (dense, static, decode); the other
  phase runs ``softmax`` (see :func:`attnlab.hf.plan.phases_of`). A static method such as ``streaming``
  runs both phases. Linear methods and methods with required tensor inputs cannot run in a transformers
  model and are refused; ``all`` names every registered method that can. ``tidal`` gets per-layer roles
  (:func:`attnlab.eval.density.tidal_roles`).
- Budgets: a method given as ``name`` is run at the parameter sets ``budgets`` names: ``all`` (every set
  its registration sweeps at that length, ``spec.bench_params(length)``), ``first`` (the first of them),
  ``default`` (its defaults) or ``default+tight`` (its defaults and the lowest-density candidate below
  the defaults' density; candidates are the swept sets and, for methods with a ``budget`` in tokens,
  budgets of length/8 and length/4; density as :mod:`attnlab.eval.density` measures it; no second run
  when no candidate is below the defaults). As ``name:key=value:key=value``: exactly those parameters.
- Dense score variants run with no tensor input (attnlab.hf passes none, and a model that never learned a
  gate, a temperature or sink logits has nothing to compute them from), so each runs at its documented
  default without it: ``gated`` without a gate, ``selective`` without a temperature and ``affine_scaled``
  without alpha/beta are softmax itself (their rows check the code path); ``sink`` is the off-by-one
  softmax (sink logit ``logit``, default 0, for every head) and ``softplus`` its own function, both
  different from what the model learned. Each run's row records this (``function``,
  :func:`function_check`) and the backends forced on a CPU (``backends``, :data:`CPU_BACKENDS`).
- ``softmax`` (dense attention through the same path) is always evaluated, first, as the reference row.
- Samples: seeds ``0 .. samples-1`` of :func:`attnlab.organisms.tasks.generate`, haystack from the
  held-out split of the corpus (the organism's own, from its ``training.json``, when that corpus can be
  rebuilt here; else the default corpus). Greedy decoding of at most ``answer tokens + 2`` tokens,
  stopping at a newline or the end-of-text token; exact match of the first line
  (:func:`attnlab.organisms.tasks.score`).
- Per run and length (``EvalResult.methods``): prefill and decode density (:mod:`attnlab.eval.density`),
  the median prefill forward time and decode step time of the model over the run's samples (the first
  sample of a run, which compiles, is left out when there are others, and timed when it is the run's only
  one; the model's whole forward pass, so the attnlab.hf overhead is included), and the held-out prefill/decode losses
  (:mod:`attnlab.eval.perplexity`, ``perplexity`` windows). A run that raises is recorded with its error
  (``error``) and the evaluation goes on.
- Decode-only runs (prefill ``softmax``) reuse the softmax run's prefill of each prompt and perplexity
  window (``share_prefill``; the same computation, so the same cache): only their decode steps run, and
  their prefill time is not measured (``shared_prefill`` in their row).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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


#: the backends a method runs on in ``attnlab eval`` on a CPU, in order of preference: the masked SDPA of
#: sparse methods, SDPA (``gated`` and ``affine_scaled``: torch SDPA then the variant's output transform,
#: the speed of softmax), then the eager N x N path (the other dense variants: 14-24 s per 4K prefill of
#: the small organism). ``sdpa`` came after ``eager`` before 2026-11-23 (s3), which put ``gated`` and
#: ``affine_scaled`` on the eager path.
CPU_BACKENDS = ("sdpa_mask", "sdpa", "eager")


@dataclass(frozen=True)
class MethodRun:
    """One method at one budget: the method asked for, what runs in prefill and in decode, its params."""

    method: str
    prefill: str
    decode: str
    params: tuple[tuple[str, Any], ...] = ()
    #: how the budget was chosen: "explicit", "swept", "default" or "tight"
    budget: str = "default"

    @property
    def label(self) -> str:
        """``name`` or ``name(key=value, ...)``."""
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.method}({inner})" if inner else self.method

    def use_kwargs(self, device: str = "cuda", num_layers: int | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`attnlab.hf.use` for this run. On a CPU the method runs on the first
        backend of :data:`CPU_BACKENDS` it has (none compiles: FlexAttention compiles for tens of seconds
        per shape there); a method with none of them keeps its default order. ``tidal`` needs
        ``num_layers`` (its per-layer roles, :func:`attnlab.eval.density.tidal_roles`)."""
        from attnlab.eval.density import tidal_roles

        params = dict(self.params)
        plan: dict[str, Any] = {}
        backends = {}
        if device == "cpu":
            from attnlab.registry import get

            for name in {self.prefill, self.decode}:
                names = [b.name for b in get(name).backends]
                choice = next((c for c in CPU_BACKENDS if c in names), None)
                if choice is not None:
                    backends[name] = choice
        if backends:
            plan["backends"] = backends
        if self.decode == "tidal":
            if num_layers is None:
                raise EvalError("method 'tidal' needs the model's number of layers (its per-layer roles)")
            plan["layers"] = {
                i: {"decode": {"method": "tidal", "params": {**params, "role": role}}}
                for i, role in tidal_roles(num_layers).items()
            }
        return {
            "plan": plan or None,
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


BUDGETS = ("all", "first", "default", "default+tight")

#: the max |difference| below which :func:`function_check` calls a method's output softmax's
SAME_AS_SOFTMAX = 1e-5


def function_check(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """What a dense-family method (a score variant) computes in ``attnlab eval``, where no tensor input is
    ever given (attnlab.hf has nothing to compute a gate, a temperature or sink logits from in a model that
    never learned them): ``{"absent": [its optional tensor inputs, each left out], "softmax_max_diff": max
    |out - softmax's out|, "same_as_softmax": that <= SAME_AS_SOFTMAX}``, both outputs from the fp32
    reference on one small random causal problem (B=1, H=2, N=64, D=16, seed 0; ``params`` as run). So
    ``gated`` without a gate, ``selective`` without a temperature and ``affine_scaled`` without alpha/beta
    are softmax itself (their accuracy checks the code path only), while ``sink`` (sink logit 0 per head,
    the off-by-one softmax) and ``softplus`` compute other functions than the model learned. None for
    methods outside the dense family and for ``softmax``."""
    import attnlab
    from attnlab.registry import get

    spec = get(name)
    if name == DENSE or spec.family != "dense":
        return None
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(3))
    out = attnlab.attention(q, k, v, method=name, causal=True, backend="reference", **dict(params or {}))
    ref = attnlab.attention(q, k, v, method=DENSE, causal=True, backend="reference")
    diff = float((out.float() - ref.float()).abs().max())
    return {
        "absent": [t.name for t in spec.inputs],
        "softmax_max_diff": diff,
        "same_as_softmax": diff <= SAME_AS_SOFTMAX,
    }


def runnable_methods() -> list[str]:
    """Every registered method that can run inside a transformers causal LM (what ``all`` names): not
    linear, runs in prefill or decode, no required tensor inputs; in registry order, the dense family (score
    variants) last. ``softmax`` excluded (always run)."""
    from attnlab.hf.plan import phases_of
    from attnlab.registry import methods as registered

    names = [
        n
        for n, s in registered().items()
        if n != DENSE and s.family != "linear" and phases_of(s) and not any(t.required for t in s.inputs)
    ]
    return sorted(names, key=lambda n: registered()[n].family == "dense")  # sparse methods first


def tight_candidates(name: str, length: int) -> list[dict[str, Any]]:
    """The parameter sets ``default+tight`` chooses from (see the module docstring), in order, each
    validated (invalid ones, e.g. a budget below a method's fixed parts, are left out)."""
    from attnlab.errors import ParamError
    from attnlab.registry import get

    spec = get(name)
    defaults = spec.make_params({}).as_dict()
    out: list[dict[str, Any]] = []
    cands = spec.distinct_bench_params(length)
    if "budget" in defaults:
        cands += [{"budget": length // 8}, {"budget": length // 4}]
    for c in cands:
        try:
            spec.make_params(c)
        except (ParamError, ValueError):
            continue
        if c and c not in out and {**defaults, **c} != defaults:
            out.append(c)
    return out


def method_runs(
    methods: Sequence[str],
    length: int,
    budgets: str = "all",
    density: Callable[[str, Mapping[str, Any]], float] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[MethodRun]:
    """The runs of ``methods`` at ``length`` (see the module docstring); ``softmax`` first. ``all`` in
    ``methods`` names :func:`runnable_methods`. ``density(name, params)`` (the density of the phase the
    method runs) picks the tight budget of ``default+tight``; without it the first candidate stands in
    (to count runs)."""
    from attnlab.hf.plan import MethodRef, PlanError, check_method, phases_of
    from attnlab.registry import methods as registered

    if budgets not in BUDGETS:
        raise EvalError(f"budgets={budgets!r}: expected one of {', '.join(BUDGETS)}")
    names = [m for t in methods for m in (runnable_methods() if t.strip() == "all" else [t])]
    runs = [MethodRun(DENSE, DENSE, DENSE)]
    for text in names:
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
        sets: list[tuple[dict[str, Any], str]]
        if explicit is not None:
            sets = [(explicit, "explicit")]
        elif budgets in ("all", "first"):
            swept = spec.distinct_bench_params(length) or [{}]
            sets = [(dict(p), "swept") for p in (swept[:1] if budgets == "first" else swept)]
        else:
            sets = [({}, "default")]
            cands = tight_candidates(name, length) if budgets == "default+tight" else []
            if cands and density is None:
                sets.append((cands[0], "tight"))
            elif cands and density is not None:
                try:
                    base = density(name, {})
                    scored = [(density(name, c), i, c) for i, c in enumerate(cands)]
                except Exception as e:  # a density that cannot be measured: no tight run, said why
                    if log is not None:
                        log(f"{name} at {length}: no tight budget (density: {type(e).__name__}: {e})")
                    scored, base = [], math.inf
                below = [x for x in scored if x[0] < base]
                if below:
                    sets.append((min(below, key=lambda x: (x[0], x[1]))[2], "tight"))
        for params, how in sets:
            if name == "tidal":
                params = {k: v for k, v in params.items() if k != "role"}  # roles come per layer
            run = MethodRun(
                name,
                name if "prefill" in phases else DENSE,
                name if "decode" in phases else DENSE,
                tuple(sorted(params.items())),
                how,
            )
            for phase, method in (("prefill", run.prefill), ("decode", run.decode)):
                if method == name:
                    try:
                        check_method(MethodRef(name, run.params), phase, where=f"method {text!r}")
                    except PlanError as e:
                        raise EvalError(str(e)) from None
            if all((r.method, r.params) != (run.method, run.params) for r in runs):
                runs.append(run)
    return runs


@dataclass
class EvalConfig:
    """What ``attnlab eval`` measures. ``model``: a local checkpoint folder (a Llama causal LM; an
    organism folder or a training folder). ``corpus``: the corpus whose held-out split gives the
    haystack and the perplexity text (default: the model's own from its ``training.json`` when it can be
    rebuilt here, else the micro organism's corpus settings). ``perplexity``: held-out windows per length
    (0: none), each with ``decode_tokens`` teacher-forced decode steps. ``max_seconds``: no new run
    starts after this many seconds (the result says which were left out)."""

    model: str | Path
    methods: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("passkey", "niah_multikey")
    lengths: tuple[int, ...] = (1024,)
    samples: int = 10
    device: str = "cpu"
    budgets: str = "all"
    corpus: CorpusConfig | None = None
    task_options: dict[str, dict[str, int]] = field(default_factory=dict)
    perplexity: int = 0
    decode_tokens: int = 16
    max_seconds: float | None = None
    #: a run still going after this many seconds is stopped and recorded as an error (main thread, POSIX)
    run_seconds: float | None = None
    #: decode-only runs reuse softmax's prefill of each prompt and perplexity window (the same computation;
    #: their prefill time is then not measured)
    share_prefill: bool = True


@dataclass
class EvalResult:
    """``rows``: one per (method run, task, length), ``correct`` of ``samples``; ``methods``: one per
    (method run, length) with densities, step times and perplexities; ``info``: what ran where."""

    rows: list[dict[str, Any]]
    info: dict[str, Any]
    methods: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"info": self.info, "rows": self.rows, "methods": self.methods}, indent=1)

    def write(self, path: str | Path) -> Path:
        """Write the result as JSON (folders created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p

    @classmethod
    def read(cls, path: str | Path) -> EvalResult:
        """A result written by :meth:`write` (files without ``methods`` rows, from older versions, load
        with none)."""
        p = Path(path)
        if not p.is_file():
            raise EvalError(f"no eval result file at {str(p)!r}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise EvalError(f"{str(p)!r} is not JSON: {e}") from None
        if not isinstance(data, dict) or "rows" not in data or "info" not in data:
            raise EvalError(f"{str(p)!r}: expected an attnlab eval result (keys 'info', 'rows', 'methods')")
        return cls(list(data["rows"]), dict(data["info"]), list(data.get("methods") or []))

    @classmethod
    def merge(cls, parts: Sequence[EvalResult]) -> EvalResult:
        """One result from several runs of one evaluation split across processes (e.g. two GPU commands,
        each under a time limit): the same model, device, tasks, lengths, samples, budgets, haystack corpus,
        perplexity windows, decode tokens and commit, each method run (label and length) in one part only. Each part runs the softmax reference; the first part's softmax rows are
        kept and every part's softmax accuracies are recorded in ``info["softmax_per_part"]``, with
        ``info["softmax_parts_agree"]`` (the same seeds give the same prompts, so they agree unless the
        runs differ). A run a part left out by its time limit
        but another part ran is no longer listed as left out."""
        if not parts:
            raise EvalError("merge: no results given")
        first = parts[0]
        keys = (
            "model",
            "device_name",
            "tasks",
            "lengths",
            "samples",
            "haystack_corpus",
            "budgets",
            "perplexity_windows",
            "decode_tokens",
            "commit",
        )
        for i, part in enumerate(parts[1:], 1):
            diff = [k for k in keys if part.info.get(k) != first.info.get(k)]
            if diff:
                got = {k: part.info.get(k) for k in diff}
                want = {k: first.info.get(k) for k in diff}
                raise EvalError(
                    f"merge: part {i} differs from part 0 in {got} (part 0: {want}); merge only the parts "
                    "of one evaluation (one commit, the same settings), or report the results separately"
                )
        rows, methods = list(first.rows), list(first.methods)
        seen = {(m["label"], m["length"]) for m in first.methods}
        softmax: list[dict[str, Any]] = []
        for i, part in enumerate(parts):
            softmax.append(
                {f"{r['task']}@{r['length']}": r["correct"] for r in part.rows if r["method"] == DENSE}
            )
            if i == 0:
                continue
            labels = {(m["label"], m["length"]) for m in part.methods if m["method"] != DENSE}
            again = sorted(f"{lb}@{n}" for lb, n in labels if (lb, n) in seen)
            if again:
                raise EvalError(
                    f"merge: part {i} runs {', '.join(again)} again (each run in one part only); drop it "
                    "from one of the parts"
                )
            rows += [r for r in part.rows if r["method"] != DENSE]
            methods += [m for m in part.methods if m["method"] != DENSE]
            seen |= labels
        ran = {f"{m['label']}@{m['length']}" for m in methods}
        skipped = [s for part in parts for s in part.info.get("skipped", []) if s not in ran]
        info = {**first.info, "skipped": list(dict.fromkeys(skipped)), "parts": len(parts),
                "softmax_per_part": softmax, "softmax_parts_agree": all(x == softmax[0] for x in softmax)}  # fmt: skip
        return cls(rows, info, methods)


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
    model.eval()
    return model, tok, state


def _haystack(
    cfg: EvalConfig, tok: PreTrainedTokenizerFast, state: dict[str, Any] | None
) -> tuple[TaskContext, str, list[str]]:
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
    texts = [d.text for d in prose(corpus.heldout)]
    return TaskContext(tok, texts), corpus.fingerprint, texts


class RunTimeout(EvalError):
    """A run went past ``EvalConfig.run_seconds``."""


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`RunTimeout` in the block after ``seconds`` (SIGALRM; a no-op without it, off the main
    thread, or with None)."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    fired = []

    def stop(signum: int, frame: Any) -> None:
        fired.append(True)
        raise RunTimeout(f"the run took more than run_seconds={seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))  # type: ignore[arg-type]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if fired:  # the alarm's exception was swallowed by code in the block (a broad except): still a timeout
        raise RunTimeout(f"the run took more than run_seconds={seconds} s")


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


class _Densities:
    """Densities at one length (:mod:`attnlab.eval.density`), with Q/K captured once from the model on
    the first ``n`` held-out tokens when a dynamic method needs them."""

    def __init__(
        self, model: PreTrainedModel, heldout: list[int], n: int, num_layers: int, kv_heads: int
    ) -> None:
        self.model, self.heldout, self.n = model, heldout, n
        self.num_layers, self.kv_heads = num_layers, kv_heads
        self.device = next(model.parameters()).device
        self._qk: list[tuple[torch.Tensor, torch.Tensor, float]] | None = None

    def qk(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        from attnlab.organisms.capture import capture_qkv

        if self._qk is None:
            if len(self.heldout) < self.n:
                raise EvalError(f"the held-out text has {len(self.heldout)} tokens; {self.n} are needed")
            layers = capture_qkv(self.model, torch.tensor([self.heldout[: self.n]]))
            self._qk = [(c.q, c.k, c.scale) for c in layers]
        return self._qk

    def prefill(self, name: str, params: Mapping[str, Any]) -> float:
        from attnlab.eval.density import prefill_density
        from attnlab.registry import get

        spec = get(name)
        # no tensor inputs: the model's attention gets none (attnlab.hf passes none; methods that require
        # one are refused), so an estimator that takes inputs (seer's w_q, w_k) runs without them there
        # too, and this is the plan the run executes (tests/test_review_s8.py pins it)
        return prefill_density(spec, params, self.n, self.qk() if spec.estimate else None, self.device)

    def decode(self, name: str, params: Mapping[str, Any]) -> float:
        from attnlab.eval.density import decode_density
        from attnlab.registry import get

        return decode_density(get(name), params, self.n, self.num_layers, self.kv_heads, self.device)

    def phase(self, name: str, params: Mapping[str, Any]) -> float:
        """The density of the phase the method runs (decode for decode-only methods, else prefill)."""
        from attnlab.registry import get

        return self.decode(name, params) if get(name).family == "decode" else self.prefill(name, params)

    def both(self, name: str, params: Mapping[str, Any]) -> tuple[float, float]:
        return self.prefill(name, params), self.decode(name, params)


def evaluate(
    cfg: EvalConfig,
    advance: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
    on_run: Callable[[EvalResult], None] | None = None,
) -> EvalResult:
    """Accuracy, densities, step times and perplexities per method run and length (see the module
    docstring). ``advance(n)`` is called after each sample (progress); ``on_run(result so far)`` after
    each run (e.g. to write partial results)."""
    import attnlab.hf
    from attnlab.eval.perplexity import phase_loss, windows
    from attnlab.organisms.errors import ConfigError
    from attnlab.organisms.evaluate import greedy
    from attnlab.organisms.tasks import TASKS, generate, score
    from attnlab.organisms.tokenizer import decode, encode, encode_batch
    from attnlab.registry import get

    for t in cfg.tasks:
        if t not in TASKS:
            raise EvalError(f"unknown task {t!r}: expected some of {sorted(TASKS)}.{did_you_mean(t, TASKS)}")
    if cfg.samples < 1:
        raise EvalError(f"samples={cfg.samples}: expected >= 1")
    if cfg.perplexity < 0 or cfg.decode_tokens < 1:
        raise EvalError(
            f"perplexity={cfg.perplexity}, decode_tokens={cfg.decode_tokens}: expected >= 0 windows and >= 1 "
            "decode tokens"
        )
    began = time.perf_counter()
    method_runs(cfg.methods, max(cfg.lengths, default=1024), cfg.budgets)  # bad names fail before loading
    model, tok, state = _load(cfg)
    max_pos = int(model.config.max_position_embeddings)
    num_layers = int(model.config.num_hidden_layers)
    kv_heads = int(getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads)
    for n in cfg.lengths:
        if not 128 <= n <= max_pos:
            raise EvalError(
                f"length {n}: expected 128 <= length <= the model's max_position_embeddings={max_pos}"
            )
        if cfg.perplexity and cfg.decode_tokens >= n:
            raise EvalError(f"decode_tokens={cfg.decode_tokens}: expected fewer than the length {n}")
    ctx, fingerprint, texts = _haystack(cfg, tok, state)
    heldout: list[int] = []
    for ids in encode_batch(tok, texts):
        heldout += [*ids, tok.eos_token_id]
    stop = sorted({i for i in (tok.eos_token_id, *encode(tok, "\n")) if i is not None})
    device = next(model.parameters()).device
    result = EvalResult([], {}, [])
    skipped: list[str] = []
    setup: dict[
        int, tuple[dict[str, list[Any]], dict[str, list[list[int]]], list[list[int]], _Densities]
    ] = {}
    for n in cfg.lengths:
        samples: dict[str, list[Any]] = {}
        for task in cfg.tasks:
            try:
                samples[task] = [
                    generate(task, ctx, n, seed, **cfg.task_options.get(task, {}))
                    for seed in range(cfg.samples)
                ]
            except ConfigError as e:
                log(f"{task} at {n}: {e}")
                samples[task] = []
        prompts = {t: [encode(tok, s.prompt) for s in ss] for t, ss in samples.items()}
        wins = windows(heldout, n, cfg.perplexity) if cfg.perplexity else []
        if cfg.perplexity and len(wins) < cfg.perplexity:
            log(f"perplexity at {n}: the held-out text holds {len(wins)} windows of {n + 1} tokens")
        setup[n] = (samples, prompts, wins, _Densities(model, heldout, n, num_layers, kv_heads))
    runs_at = {n: method_runs(cfg.methods, n, cfg.budgets, setup[n][3].phase, log) for n in cfg.lengths}
    # method by method (every length of a method, then the next method): a time limit leaves whole methods out
    order = list(dict.fromkeys(r.method for n in cfg.lengths for r in runs_at[n]))
    todo = [(n, run) for name in order for n in cfg.lengths for run in runs_at[n] if run.method == name]
    # decode-only runs reuse the dense prefill of each prompt and window (the same computation: softmax
    # through attnlab.hf), kept from the softmax run of that length
    kept_gen: dict[tuple[int, str], list[tuple[torch.Tensor, Any]]] = {}
    kept_ppl: dict[int, list[Any]] = {}
    reuse_at = {
        n: cfg.share_prefill and any(r.prefill == DENSE and r.method != DENSE for r in runs_at[n])
        for n in cfg.lengths
    }
    for n, run in todo:
        samples, prompts, wins, dens_at = setup[n]
        if cfg.max_seconds is not None and time.perf_counter() - began > cfg.max_seconds:
            skipped.append(f"{run.label}@{n}")
            continue
        error = None
        per_task: dict[str, tuple[int, list[str]]] = {}
        prefill_s: list[float] = []
        decode_s: list[float] = []
        loss = None
        keeping = reuse_at[n] and run.method == DENSE
        reusing = reuse_at[n] and run.method != DENSE and run.prefill == DENSE
        shared = reusing and all(len(kept_gen.get((n, t), [])) == len(samples[t]) for t in cfg.tasks)
        started = time.perf_counter()
        try:
            with (
                _time_limit(cfg.run_seconds),
                attnlab.hf.use(model, **run.use_kwargs(cfg.device, num_layers)) as runtime,
            ):
                # the run's first sample compiles: left out of the step times unless it is the only one
                first, alone = True, sum(len(samples[t]) for t in cfg.tasks) == 1
                for task in cfg.tasks:
                    correct, outputs = 0, []
                    keep = kept_gen.setdefault((n, task), []) if keeping else None
                    for i, (s, ids) in enumerate(zip(samples[task], prompts[task], strict=True)):
                        times: list[float] = []
                        pre = kept_gen[(n, task)][i] if shared else None
                        if pre is not None:  # no prefill call resets stateful methods' state: reset it here
                            runtime.reset()
                        new = greedy(model, ids, s.answer_tokens + 2, stop, times, prefilled=pre, keep=keep)
                        text = decode(tok, new)
                        if not first or alone:
                            if pre is None:
                                prefill_s.append(times[0])
                            decode_s += times[0 if pre is not None else 1 :]
                        first = False
                        correct += score(s, text)
                        outputs.append(text)
                        if advance:
                            advance(1)
                    per_task[task] = (correct, outputs)
                if wins:
                    ppl_keep = kept_ppl.setdefault(n, []) if keeping else None
                    ppl_shared = kept_ppl.get(n) if shared and len(kept_ppl.get(n, [])) == len(wins) else None
                    loss = phase_loss(
                        model, wins, cfg.decode_tokens, ppl_shared, ppl_keep, before_window=runtime.reset
                    )
        except Exception as e:  # a run that fails is recorded, and the others still run
            error = f"{type(e).__name__}: {e}"
            log(f"{run.label} at {n}: {error}")
        seconds = time.perf_counter() - started
        for task in cfg.tasks:
            correct, outputs = per_task.get(task, (0, []))
            count = len(samples[task]) if task in per_task else 0
            result.rows.append(
                {
                    "method": run.method,
                    "label": run.label,
                    "params": dict(run.params),
                    "budget": run.budget,
                    "prefill": run.prefill,
                    "decode": run.decode,
                    "task": task,
                    "length": n,
                    "samples": count,
                    "correct": correct,
                    "accuracy": correct / count if count else math.nan,
                    "outputs": outputs,
                    "error": error,
                }
            )
        dens: dict[str, float | None] = {"prefill_density": None, "decode_density": None}
        try:
            dens["prefill_density"], dens["decode_density"] = dens_at.both(run.method, dict(run.params))
        except Exception as e:  # e.g. a shape-bound mask that does not fit n
            log(f"{run.label} at {n}: density: {type(e).__name__}: {e}")
        result.methods.append(
            {
                "method": run.method,
                "label": run.label,
                "params": dict(run.params),
                "budget": run.budget,
                "family": get(run.method).family,
                "prefill": run.prefill,
                "decode": run.decode,
                "length": n,
                **dens,
                "prefill_ms": None if (m := _median(prefill_s)) is None else 1e3 * m,
                "decode_ms": None if (m := _median(decode_s)) is None else 1e3 * m,
                "timed_prefills": len(prefill_s),
                "shared_prefill": shared,
                "timed_steps": len(decode_s),
                "prefill_loss": loss.prefill_loss if loss else None,
                "decode_loss": loss.decode_loss if loss else None,
                "ppl_windows": len(wins) if loss else 0,
                "ppl_prefill_tokens": loss.prefill_tokens if loss else 0,
                "ppl_decode_tokens": loss.decode_tokens if loss else 0,
                "seconds": seconds,
                "error": error,
                "backends": (run.use_kwargs(cfg.device, num_layers)["plan"] or {}).get("backends"),
                "function": _function(run),
            }
        )
        if on_run:
            result.info = _info(cfg, state, fingerprint, device, skipped)
            on_run(result)
    result.info = _info(cfg, state, fingerprint, device, skipped)
    return result


def _function(run: MethodRun) -> dict[str, Any] | None:
    """:func:`function_check` of the run's method, or where it fails the error (recorded, not raised)."""
    try:
        return function_check(run.method, dict(run.params))
    except Exception as e:  # a check that cannot run must not lose the run's row
        return {"error": f"{type(e).__name__}: {e}"}


def _info(
    cfg: EvalConfig, state: dict[str, Any] | None, fingerprint: str, device: torch.device, skipped: list[str]
) -> dict[str, Any]:
    import transformers

    return {
        "model": str(cfg.model),
        "model_name": (state or {}).get("config", {}).get("name"),
        "device": cfg.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tasks": list(cfg.tasks),
        "lengths": list(cfg.lengths),
        "samples": cfg.samples,
        "budgets": cfg.budgets,
        "perplexity_windows": cfg.perplexity,
        "decode_tokens": cfg.decode_tokens,
        "haystack_corpus": fingerprint,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "skipped": list(skipped),
    }


def planned_samples(cfg: EvalConfig) -> int:
    """How many greedy generations :func:`evaluate` runs (for a progress bar; ``default+tight`` counts
    a tight run for every method with a candidate)."""
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
