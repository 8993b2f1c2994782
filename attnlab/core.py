"""The shared types every layer uses: a call's shape, what a backend can do, a resolved call, its result,
and a method's specification. They sit below the registry, the backends and the API, and import nothing
of those (layers point down only).

- :class:`Problem`: the shapes, dtype, device and pattern of one call (what decides which backend can run).
- :class:`TensorInput`: a tensor a method takes beside q, k, v (gates, biases, cache statistics), declared
  by the method with its shape in symbols and validated like q, k, v.
- :class:`Capabilities`: what a backend declares it can run; :meth:`Capabilities.reasons` returns every
  reason it refuses a call (xFormers' ``not_supported_reasons``), to which a backend adds its own.
- :class:`Backend`: a way to run a method (an adapter from a :class:`Call` to an executor in ``kernels``).
- :class:`Packing`: packed sequences (FlashAttention's varlen layout): cumulative lengths of q's and k's.
- :class:`Call`: one resolved call (method, validated parameters, problem, scale, what to return).
- :class:`Result`: the output and, on request, the log-sum-exp, the sparsity plan used and the state.
- :class:`MethodSpec`: everything attnlab knows about one method (the registry holds them).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ParamError, did_you_mean
from attnlab.params import Params
from attnlab.patterns import ALL_PATTERNS, Pattern, pattern_of

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
Verdict = tuple[bool, str]


@dataclass(frozen=True, slots=True)
class Problem:
    """The shape of one attention call: everything a backend needs to decide whether it can run it."""

    batch: int
    heads: int
    kv_heads: int
    n_q: int
    n_k: int
    head_dim: int
    v_dim: int
    causal: bool
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.heads // self.kv_heads

    @property
    def pattern(self) -> Pattern:
        return pattern_of(self.causal, self.n_q, self.n_k)

    @property
    def dense_elements(self) -> int:
        """Elements of the full score matrix over all heads: B * H * N_q * N_k."""
        return self.batch * self.heads * self.n_q * self.n_k

    def symbols(self) -> dict[str, int]:
        """The sizes that :class:`TensorInput` shapes name."""
        return {
            "B": self.batch,
            "H": self.heads,
            "H_kv": self.kv_heads,
            "N_q": self.n_q,
            "N_k": self.n_k,
            "D": self.head_dim,
            "D_v": self.v_dim,
        }

    def describe(self) -> str:
        return (
            f"q (B={self.batch}, H={self.heads}, N_q={self.n_q}, D={self.head_dim}), "
            f"k/v (H_kv={self.kv_heads}, N_k={self.n_k}, D_v={self.v_dim}), {self.dtype}, "
            f"{self.device}, {self.pattern.value}"
        )


@dataclass(frozen=True)
class TensorInput:
    """A tensor a method takes beside q, k, v, passed by name: ``attention(q, k, v, method=m, gate=g)``.

    ``shape`` names each dim with a symbol of :meth:`Problem.symbols` (``"B"``, ``"H"``, ``"H_kv"``,
    ``"N_q"``, ``"N_k"``, ``"D"``, ``"D_v"``), a fixed int, or a free symbol of the method's own (any other
    name, e.g. ``"R"`` for a low-rank factor's rank): its size is taken from the first input that has it,
    and every other input naming it must agree. With ``broadcast``, any dim may also be 1.

    ``kind`` is what the tensor holds: ``"float"`` (the default: any floating dtype, or q's dtype with
    ``same_dtype``; checked for NaN/Inf with q, k, v when ``check_finite`` is on; may carry gradients),
    ``"bool"`` (``torch.bool``, e.g. a key mask) or ``"int"`` (``torch.int32`` or ``torch.int64``, e.g.
    sequence offsets). Bool and int inputs never carry gradients. It must be on q's device.

    ``sample(shape, generator) -> Tensor``: a valid random value of the full shape (CPU; float32 for a
    float input), for the parity tests and the benchmark (e.g. log-decays <= 0 for a gate); default:
    standard normal for float, all True for bool. An int input must declare one.
    """

    name: str
    shape: tuple[str | int, ...]
    doc: str
    required: bool = True
    broadcast: bool = False
    same_dtype: bool = False
    sample: Callable[[tuple[int, ...], torch.Generator], Tensor] | None = field(default=None, compare=False)
    kind: str = "float"

    def __post_init__(self) -> None:
        if self.kind not in TENSOR_KINDS:
            raise ValueError(f"TensorInput {self.name!r}: kind {self.kind!r}; expected one of {TENSOR_KINDS}")
        if self.sample is None and self.kind == "int":
            raise ValueError(
                f"TensorInput {self.name!r} (int) needs a sample function: no default value is valid"
            )
        if self.same_dtype and self.kind != "float":
            raise ValueError(f"TensorInput {self.name!r}: same_dtype applies to float inputs only")

    def expected(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape at these sizes; a free symbol not (yet) in ``sizes`` gives -1."""
        return tuple(sizes.get(s, -1) if isinstance(s, str) else s for s in self.shape)

    def free_symbols(self) -> tuple[str, ...]:
        """The symbols of ``shape`` that are not sizes of the call (:meth:`Problem.symbols`)."""
        return tuple(s for s in self.shape if isinstance(s, str) and s not in PROBLEM_SYMBOLS)

    def random(
        self,
        sizes: Mapping[str, int],
        generator: torch.Generator,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> Tensor:
        """A valid random value at the call's sizes (``Problem.symbols()``), on ``device``; a float input in
        ``dtype``, a bool or int input in its own dtype. A free symbol absent from ``sizes`` is
        ``FREE_SIZE``."""
        shape = tuple(FREE_SIZE if x == -1 else x for x in self.expected(sizes))
        if self.sample is not None:
            t = self.sample(shape, generator)
        elif self.kind == "bool":
            t = torch.ones(shape, dtype=torch.bool)
        else:
            t = torch.randn(shape, generator=generator)
        return t.to(device=device, dtype=dtype) if self.kind == "float" else t.to(device=device)

    def describe(self) -> str:
        dims = ", ".join(str(s) for s in self.shape)
        return f"{self.name} ({dims}{'; 1 broadcasts' if self.broadcast else ''}): {self.doc}"


#: what a :class:`TensorInput` may hold
TENSOR_KINDS = ("float", "bool", "int")
#: the sizes of a call that :class:`TensorInput` shapes may name (:meth:`Problem.symbols`)
PROBLEM_SYMBOLS = ("B", "H", "H_kv", "N_q", "N_k", "D", "D_v")
#: a free symbol's size in drawn test values (:meth:`TensorInput.random`)
FREE_SIZE = 4


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it can run. :meth:`reasons` turns a call into every refusal at once.

    ``plan_kinds``: the sparsity plans it executes ("static": from a mask, "dynamic": estimated from
    q and k); a method with a plan needs a backend that takes its kind (dense methods have none).
    ``varlen``: it runs packed sequences (``cu_seqlens_q``/``cu_seqlens_k``) in one launch
    (:meth:`Backend.run_varlen`); a packed call no backend takes runs each sequence separately.
    ``where``: how the support matrix describes its devices (default: from ``devices``).
    """

    devices: tuple[str, ...] = ("cuda", "cpu")
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    min_head_dim: int = 1
    max_head_dim: int | None = None
    same_v_dim: bool = False
    patterns: frozenset[Pattern] = ALL_PATTERNS
    gqa: bool = True
    backward: bool = True
    lse: bool = False
    stateful: bool = False
    plan_kinds: frozenset[str] = frozenset()
    varlen: bool = False
    where: str = ""

    def where_text(self) -> str:
        return self.where or "/".join("GPU" if d == "cuda" else d.upper() for d in self.devices)

    def reasons(self, call: Call) -> list[str]:
        """Every declared capability ``call`` needs that this backend lacks (empty: it can run it)."""
        p = call.problem
        out = []
        if p.device.type not in self.devices:
            out.append(f"runs on {'/'.join(self.devices)}, not {p.device.type}")
        if p.dtype not in self.dtypes:
            out.append(f"takes {', '.join(_dtype_name(d) for d in self.dtypes)}, not {_dtype_name(p.dtype)}")
        if p.head_dim < self.min_head_dim or p.v_dim < self.min_head_dim:
            out.append(f"needs head dims >= {self.min_head_dim}, got D={p.head_dim}, D_v={p.v_dim}")
        if self.max_head_dim is not None and max(p.head_dim, p.v_dim) > self.max_head_dim:
            out.append(f"takes head dims up to {self.max_head_dim}, got D={p.head_dim}, D_v={p.v_dim}")
        if self.same_v_dim and p.head_dim != p.v_dim:
            out.append(f"needs D_v == D, got D={p.head_dim}, D_v={p.v_dim}")
        if p.pattern not in self.patterns:
            out.append(f"does not run the {p.pattern.value} pattern")
        if p.group > 1 and not self.gqa:
            out.append(f"has no grouped-query attention (H={p.heads}, H_kv={p.kv_heads})")
        if p.requires_grad and not self.backward:
            out.append("has no backward and an input requires grad")
        if call.want_lse and not self.lse:
            out.append("cannot return the log-sum-exp (return_lse=True)")
        if call.spec.stateful and not self.stateful:
            out.append("cannot carry the method's recurrent state")
        kind = call.spec.plan_kind
        if kind is not None and kind not in self.plan_kinds:
            out.append(f"does not execute {kind} sparsity plans")
        if call.packing is not None and not self.varlen:
            out.append("cannot run packed sequences (cu_seqlens) in one launch")
        return out


@dataclass(frozen=True, slots=True)
class Packing:
    """Packed sequences, FlashAttention's varlen layout: q is (1, H, T_q, D) and k, v (1, H_kv, T_k, D)
    with S sequences back to back; sequence ``s`` has queries ``cu_q[s]:cu_q[s+1]`` and keys
    ``cu_k[s]:cu_k[s+1]`` (``cu_q[0] == cu_k[0] == 0``, non-decreasing, ending at T_q and T_k; empty
    sequences allowed). Attention never crosses a sequence boundary; causal is bottom-right aligned
    within each sequence (query ``t`` of a sequence sits at ``t + n_k - n_q``)."""

    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]

    @property
    def count(self) -> int:
        """S, the number of sequences."""
        return len(self.cu_q) - 1

    def bounds(self, s: int) -> tuple[int, int, int, int]:
        """(q start, q end, k start, k end) of sequence ``s``."""
        return self.cu_q[s], self.cu_q[s + 1], self.cu_k[s], self.cu_k[s + 1]

    def lengths(self, s: int) -> tuple[int, int]:
        """(N_q, N_k) of sequence ``s``."""
        return self.cu_q[s + 1] - self.cu_q[s], self.cu_k[s + 1] - self.cu_k[s]

    def describe(self) -> str:
        lens = [self.lengths(s) for s in range(self.count)]
        shown = ", ".join(f"{a}" if a == b else f"{a}x{b}" for a, b in lens[:8])
        return f"{self.count} packed sequence(s) of lengths [{shown}{', ...' if len(lens) > 8 else ''}]"


@dataclass(frozen=True)
class Call:
    """One resolved call: the method, its validated parameters, the shapes, the scale and what to return.

    Made once per call signature (a prepared op caches it); tensors are passed to :meth:`Backend.run`
    separately, so a Call never holds data.
    """

    spec: MethodSpec
    params: Params
    problem: Problem
    scale: float
    want_lse: bool = False
    #: packed sequences (``cu_seqlens``): ``problem`` then describes the packed tensors (B = 1, N = total)
    packing: Packing | None = None
    #: what backends derive once per call signature and keep (a plan's BlockMask, a dense mask, ...)
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Result:
    """What a call returns when more than the output is asked for.

    - ``out``: (B, H, N_q, D_v) in the input dtype.
    - ``lse``: (B, H, N_q) float32, natural-log sum of exp(score) over the allowed keys (softmax methods;
      -inf for rows with no allowed key; a softmax variant's scores are its transformed logits, a sink's
      term included: :attr:`MethodSpec.reference_lse`), with ``return_lse=True``.
    - ``plan``: the :class:`attnlab.plans.Plan` the call executed, with ``return_plan=True`` (None for
      methods without a sparsity plan).
    - ``state``: the recurrent state after the call (stateful methods; None otherwise).

    With packed sequences (``cu_seqlens_q``/``cu_seqlens_k``), ``out`` and ``lse`` are packed like q;
    ``plan`` is a list with each sequence's plan in its own coordinates (None for an empty sequence or a
    dense one) and ``state`` a list with each sequence's final state (None for an empty one).
    """

    out: Tensor
    lse: Tensor | None = None
    plan: Any = None
    state: Any = None


class Backend(ABC):
    """A way to run a method. Subclasses set ``name``, ``summary`` and ``caps``, implement :meth:`run`
    (and :meth:`run_lse` when ``caps.lse``), and add backend-specific refusals in :meth:`reasons`."""

    name: str = "?"
    summary: str = ""
    caps: Capabilities = Capabilities()
    #: a Triton kernel: on a CPU it runs only in Triton's interpreter (tests give it tiny shapes)
    triton: bool = False
    #: its refusals never depend on N_k, so a call resolved once may run again as only the key length
    #: grows (a decode loop; :mod:`attnlab.hf` binds such calls once per layer)
    length_free_refusals: bool = False

    def reasons(self, call: Call) -> list[str]:
        """Refusals beyond the declared capabilities (e.g. a device-specific limit). Default: none."""
        return []

    def param_refusals(self, params: Params) -> list[str]:
        """Refusals that depend on the method's parameters alone, by design (e.g. a kernel without a
        window refusing ``window=``): never on the device, shapes or dtype. The test suite leaves such
        (backend, parameters) pairs out of its parity cases. Default: none."""
        return []

    def dtype_refusals(self, params: Params, dtype: torch.dtype) -> list[str]:
        """Refusals that depend on the parameters and the input dtype alone, by design (e.g. a kernel
        whose unnormalised float16 output would overflow): never on the device or shapes. The test suite
        leaves such (backend, parameters, dtype) cases out of its parity cases. Default: none."""
        return []

    def refusals(self, call: Call) -> list[str]:
        """Every reason this backend cannot run ``call`` (declared capabilities first, then the
        parameter and dtype refusals, then :meth:`reasons`)."""
        return (
            self.caps.reasons(call)
            + self.param_refusals(call.params)
            + self.dtype_refusals(call.params, call.problem.dtype)
            + self.reasons(call)
        )

    def can_use(self, call: Call) -> Verdict:
        """(True, "") if this backend can run ``call``, else (False, every reason, joined)."""
        why = self.refusals(call)
        return (not why, "; ".join(why))

    @abstractmethod
    def run(self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Tensor:
        """The attention output (B, H, N_q, D_v) in the input dtype. ``extra``: the method's declared
        tensor inputs beyond q, k, v (validated)."""

    def run_lse(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(output, lse (B, H, N_q) float32); only for backends whose ``caps.lse`` is True."""
        raise NotImplementedError(f"backend {self.name} cannot return the log-sum-exp")

    def run_state(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor], state: Any
    ) -> tuple[Tensor, Any]:
        """(output, state after the call) of a stateful method, from ``state`` (None: the initial state);
        only for backends whose ``caps.stateful`` is True."""
        raise NotImplementedError(f"backend {self.name} carries no state")

    def run_varlen(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        """Packed sequences in one launch (``call.packing``; only for backends whose ``caps.varlen`` is
        True): (output (1, H, T_q, D_v), lse (1, H, T_q) float32, or None when ``call.want_lse`` is False).
        Tensor inputs in ``extra`` are packed like q and k along their token axes."""
        raise NotImplementedError(f"backend {self.name} cannot run packed sequences")

    def run_varlen_state(
        self, q: Tensor, k: Tensor, v: Tensor, call: Call, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, list[Any]]:
        """A stateful method's packed sequences in one launch (``caps.varlen`` and ``caps.stateful``), each
        from the initial state: (output (1, H, T_q, D_v), each sequence's final state, None for an empty
        one), e.g. the linear kernels' op-level varlen."""
        raise NotImplementedError(f"backend {self.name} cannot run a stateful method's packed sequences")

    def varlen_plans(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> list[Any]:
        """Each packed sequence's plan, in its own coordinates, as :meth:`run_varlen` executes it (None:
        empty or dense). Default: none."""
        return [None] * (call.packing.count if call.packing is not None else 0)

    def plan(self, q: Tensor, k: Tensor, call: Call) -> Any:
        """The sparsity plan this backend executes for ``call`` (None: it runs no plan)."""
        return None

    def plan_for(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Any:
        """:meth:`plan` given the call's tensor inputs too (what a dynamic estimator with
        ``estimate_inputs`` needs); default: :meth:`plan`."""
        return self.plan(q, k, call)

    @property
    def devices(self) -> tuple[str, ...]:
        return self.caps.devices

    @property
    def backward(self) -> bool:
        return self.caps.backward

    def where_text(self) -> str:
        """Where it runs, for the support matrix."""
        return self.caps.where_text()

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


#: ``reference(q, k, v, params, *, causal, scale, upcast=True, **tensor_inputs) -> out`` (stateful methods:
#: ``state=`` in, ``(out, state)`` out): the method's specification, plain PyTorch, fp32 when ``upcast``.
ReferenceFn = Callable[..., Any]


FAMILIES = ("dense", "static", "dynamic", "decode", "linear")


@dataclass(frozen=True)
class MethodSpec:
    """Everything attnlab knows about one method.

    - ``reference``: plain PyTorch, fp32 by default; the specification every backend must match.
    - ``backends``: fast paths in priority order (the chooser takes the first that can run a call).
    - ``training_backends``: backend names tried first, in this order, when an input requires grad (a
      training call): for methods whose fastest forward and fastest forward + backward are different
      backends. Empty: one order for inference and training.
    - ``patterns``: which of the four CAB patterns the method defines.
    - ``mask``: for mask-defined methods, the factory of the token mask (see :mod:`attnlab.masks`);
      such a method has a static sparsity plan (``plan_kind == "static"``).
    - ``index_mask``: the same mask as plain index arithmetic over a dense grid (independent of ``mask``);
      a test checks that the two agree.
    - ``estimate``: for dynamic sparse methods, ``estimate(q, k, params, *, causal, scale) -> Plan``, the
      plan computed from the inputs (``plan_kind == "dynamic"``); backends that execute plans run it
      (:meth:`estimate_plan`), passing the tensor inputs named in ``estimate_inputs``.
    - ``inputs``: tensors the method takes beside q, k, v.
    - ``reference_lse``: the reference's output and the method's own log-sum-exp, where its normaliser is
      over transformed logits (the softmax variants); the ``reference`` backend and the parity check use it.
    - ``stateful``: whether the method carries a recurrent state from call to call.
    - ``test_params``: parameter sets the parity tests run (small values that make the mask bite).
    - ``bench_params(n)``: parameter sets the benchmark sweeps at length ``n`` (budgets, i.e. densities).
    """

    name: str
    family: str
    paper: str
    summary: str
    param_class: type[Params]
    reference: ReferenceFn
    backends: tuple[Backend, ...]
    patterns: frozenset[Pattern]
    test_params: tuple[Mapping[str, Any], ...]
    bench_params: Callable[[int], list[dict[str, Any]]]
    gqa: bool = True
    mask: Callable[[Any, Any], Any] | None = None
    index_mask: Callable[[Any, int, int, bool], Tensor] | None = None
    estimate: Callable[..., Any] | None = None
    inputs: tuple[TensorInput, ...] = ()
    stateful: bool = False
    #: whether the weights are softmax-normalised over the allowed keys (then a log-sum-exp exists)
    softmax_normalized: bool = True
    #: ``reference_lse(q, k, v, params, *, causal, scale, upcast=True, **tensor_inputs) -> (out, lse)``: the
    #: reference's output and the method's own log-sum-exp (float32 (B, H, N_q), natural log), for a method
    #: whose normaliser is not plain softmax's over the pairs it allows: the log of its normaliser over its
    #: transformed logits (soft-capped, biased, ...; a sink's term included). The ``reference`` backend
    #: returns it (also where ``softmax_normalized`` is False) and the parity check compares every backend's
    #: lse with it. None: plain softmax's lse where ``softmax_normalized``, else none.
    reference_lse: ReferenceFn | None = None
    training_backends: tuple[str, ...] = ()
    #: the tensor inputs ``estimate`` takes as keyword arguments (e.g. a learned gate's weights)
    estimate_inputs: tuple[str, ...] = ()
    input_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_names", frozenset(t.name for t in self.inputs))
        names = [b.name for b in self.backends]
        twice = sorted({n for n in self.training_backends if self.training_backends.count(n) > 1})
        if twice:
            raise ValueError(
                f"method {self.name!r}: training_backends {list(self.training_backends)} names {twice} more "
                "than once; name each backend once, in the order to try them"
            )
        unknown = [n for n in self.training_backends if n not in names]
        if unknown:
            raise ValueError(
                f"method {self.name!r}: training_backends {unknown} are not among its backends {names}"
            )
        missing = [n for n in self.estimate_inputs if n not in self.input_names]
        if self.estimate_inputs and self.estimate is None:
            raise ValueError(
                f"method {self.name!r}: estimate_inputs {list(self.estimate_inputs)} given but the method has no "
                "estimate; pass estimate= or drop estimate_inputs"
            )
        if missing:
            raise ValueError(
                f"method {self.name!r}: estimate_inputs {missing} are not declared tensor inputs "
                f"(declared: {sorted(self.input_names)}); declare them in inputs= or drop them"
            )

    def estimate_plan(self, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Any:
        """``estimate`` for ``call``, given the call's tensor inputs that the estimator takes."""
        assert self.estimate is not None, f"method {self.name!r} has no estimator"
        kw = {n: extra[n] for n in self.estimate_inputs if extra.get(n) is not None}
        return self.estimate(q, k, call.params, causal=call.problem.causal, scale=call.scale, **kw)

    def backends_for(self, requires_grad: bool) -> tuple[Backend, ...]:
        """The backends in the order the chooser asks them: ``training_backends`` first when a gradient
        is needed, then the rest in ``backends`` order."""
        if not (requires_grad and self.training_backends):
            return self.backends
        first = [self.backend(n) for n in self.training_backends]
        return (*first, *(b for b in self.backends if b.name not in self.training_backends))

    @property
    def params(self) -> Params:
        """The method's parameters with their defaults, e.g. ``SlidingWindowParams(window=1024)`` (the
        class is ``param_class``; its docstring says what each one means)."""
        return self.param_class()

    @property
    def has_lse(self) -> bool:
        """Whether the method has a log-sum-exp: its own (``reference_lse``) or plain softmax's
        (``softmax_normalized``)."""
        return self.reference_lse is not None or self.softmax_normalized

    @property
    def backward(self) -> bool:
        """Whether some backend of the method has a backward."""
        return any(b.caps.backward for b in self.backends)

    @property
    def plan_kind(self) -> str | None:
        """The kind of sparsity plan the method executes ("static" for mask methods, "dynamic" for
        methods with an estimator), or None."""
        if self.estimate is not None:
            return "dynamic"
        return "static" if self.mask is not None else None

    def distinct_bench_params(self, n: int) -> list[dict[str, Any]]:
        """``bench_params(n)`` without repeats, in order: two sets are the same when their validated
        parameters are (at short lengths budgets clamp, e.g. two windows to the same size, and a set may
        equal another only once defaults are filled in). What the benchmark, fidelity, verify and eval
        sweep, so no configuration is timed twice."""
        seen: dict[Any, dict[str, Any]] = {}
        for p in self.bench_params(n):
            key: Any
            try:
                key = self.make_params(p)
            except ValueError:  # invalid at this length: kept as given, for the caller to skip or report
                key = ("invalid", repr(sorted(p.items())))
            else:
                try:
                    hash(key)
                except TypeError:  # a parameter value that does not hash (a list): compared by repr
                    key = ("repr", repr(key))
            seen.setdefault(key, dict(p))
        return list(seen.values())

    def make_params(self, kwargs: Mapping[str, Any]) -> Params:
        """Validated parameters from keyword arguments (defaults fill the rest)."""
        try:
            return self.param_class.from_kwargs(dict(kwargs))
        except TypeError as e:  # e.g. a positional-only mistake inside the dataclass
            raise ParamError(f"method {self.name!r}: {e}") from None

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        names = [b.name for b in self.backends]
        raise ParamError(
            f"method {self.name!r} has no backend {name!r}.{did_you_mean(name, names)} "
            f"Its backends are: {', '.join(names)} (and 'reference')"
        )


def default_scale(head_dim: int, scale: float | None) -> float:
    """The softmax scale: ``scale`` if given, else ``1 / sqrt(D)``."""
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
