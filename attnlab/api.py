"""The public entry points: ``attnlab.attention(q, k, v, method=..., **params)`` and
``attnlab.prepare(method, **params) -> Op``.

The call a user makes is the product, so the path is built for repeated calls:

- :func:`prepare` validates the method's parameters once. The :class:`Op` it returns keeps, per call
  signature (shapes, dtypes, devices, whether gradients are needed), the resolved :class:`~attnlab.core.Call`
  and the chosen backend; a repeated signature costs a tuple and a dict lookup before the backend runs.
  A new signature is validated in full (every error message of :func:`attnlab.inputs.validate`).
- :func:`attention` keeps a small cache of ops keyed by method, options and parameter values.
- Nothing on this path synchronises with the device: the NaN/Inf scan is opt-in (``check_finite``).
- Inside ``torch.compile`` nothing is cached or mutated: each trace resolves the call afresh.

Packed sequences (FlashAttention's varlen layout: ``cu_seqlens_q=``, ``cu_seqlens_k=``) take one of two
paths, chosen per call signature and packing (:func:`explain` says which): a backend that declares
``varlen`` (the block-sparse executor: static plans per sequence, dynamic estimators on each sequence's
own q and k, plain softmax dense; the Triton kernels of lightning, gla and gated_delta, each sequence from
the initial state, ``result.state`` listing the final states; FlexAttention for the methods in
``attnlab.backends.flex.VARLEN``, only when named, ``dispatch.PACKED_BY_NAME_ONLY``) runs them in one
launch; otherwise each sequence runs separately through
the normal dispatch, with the method's tensor inputs cut to it along their token axes, and the outputs
(and log-sum-exps) are packed back together. Reading ``cu_seqlens`` costs one host synchronisation when
they live on a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal, overload

import torch
from torch import Tensor

from attnlab.backends.varlen import packing_of, sequence_inputs
from attnlab.core import Backend, Call, MethodSpec, Packing, Problem, Result, default_scale
from attnlab.dispatch import Choice, choose, require
from attnlab.errors import BackendError, InputError, ParamError, UnsupportedPatternError
from attnlab.inputs import check_finite_values, check_scale, validate, validate_extra
from attnlab.params import Params
from attnlab.patterns import pattern_of
from attnlab.plans import Plan, static_plan
from attnlab.registry import get
from attnlab.settings import settings

_NO_EXTRA: Mapping[str, Tensor] = {}
#: Call signatures one op remembers, and ops ``attention`` remembers (oldest dropped first).
OP_SIGNATURES = 64
CACHED_OPS = 256
#: Packings (cu_seqlens) one op remembers with their resolved call: few, since each may hold the executor's
#: device tables, and a training loop with a new packing every step would only fill the cache.
PACKED_SIGNATURES = 8
#: Per-sequence signatures of the packed fallback one op remembers, apart from its ordinary calls (so a
#: packing of many lengths neither misses on every call nor evicts the op's plain entries).
SEQUENCE_SIGNATURES = 256


def _split_inputs(spec: MethodSpec, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(method parameters, tensor inputs) of keyword arguments, by the method's declared inputs (and
    ``state`` for a stateful method)."""
    if not spec.input_names and not spec.stateful:
        return kwargs, {}
    names = spec.input_names | {"state"} if spec.stateful else spec.input_names
    tensors = {name: kwargs[name] for name in names if name in kwargs}
    return {k: v for k, v in kwargs.items() if k not in tensors}, tensors


def _inputs_need_grad(inputs: Mapping[str, Any]) -> bool:
    """Whether a tensor input (or a tensor of a tuple/list state) requires grad."""
    for t in inputs.values():
        if isinstance(t, Tensor):
            if t.requires_grad:
                return True
        elif isinstance(t, (tuple, list)) and any(isinstance(x, Tensor) and x.requires_grad for x in t):
            return True
    return False


def _resolve_call(
    spec: MethodSpec,
    params: Params,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float | None,
    want_lse: bool,
    extra_grad: bool = False,
    packing: Packing | None = None,
) -> Call:
    """Validate a call. ``extra_grad``: a tensor input beside q, k, v requires grad (a training call too).
    ``packing``: packed sequences; each sequence's pattern must be one the method defines."""
    problem = validate(q, k, v, causal=causal, scale=scale)
    if extra_grad and not problem.requires_grad and torch.is_grad_enabled():
        problem = replace(problem, requires_grad=True)
    if packing is None:
        patterns = [(problem.pattern, problem.n_q, problem.n_k, "")]
    else:
        patterns = [
            (pattern_of(causal, n_q, n_k), n_q, n_k, f"sequence {s} of the packed call: ")
            for s in range(packing.count)
            for n_q, n_k in [packing.lengths(s)]
            if n_q and n_k
        ]
    for pattern, n_q, n_k, where in patterns:
        if pattern not in spec.patterns:
            allowed = ", ".join(p.value for p in spec.patterns)
            raise UnsupportedPatternError(
                f"{where}method {spec.name!r} does not define the {pattern.value} pattern (N_q={n_q}, "
                f"N_k={n_k}, causal={causal}); it supports: {allowed}"
            )
        try:
            params.check_lengths(n_q, n_k)
        except InputError as e:
            if not where:
                raise
            raise InputError(f"{where}{e}") from None
    if problem.group > 1 and not spec.gqa:
        raise InputError(
            f"method {spec.name!r} does not support grouped-query attention (q has {problem.heads} heads, "
            f"k/v {problem.kv_heads}); repeat k/v heads with k.repeat_interleave({problem.group}, dim=1)"
        )
    return Call(spec, params, problem, default_scale(problem.head_dim, scale), want_lse, packing)


def _plan_of(backend: Backend, q: Tensor, k: Tensor, call: Call, extra: Mapping[str, Tensor]) -> Plan | None:
    """The sparsity plan a call executed, asked for after the run: the backend's own (dynamic executors,
    given the tensor inputs the estimator takes), else the method's static plan (mask methods), else the
    estimator's plan (a dynamic method on a backend that reports none, e.g. the reference, which runs the
    estimator inside), else None (dense methods compute every pair). A dynamic call's plan is taken from
    the run itself where the backend estimates through the spec (:class:`_PlanRecorder`)."""
    plan = backend.plan_for(q, k, call, extra)
    if plan is None and call.spec.mask is not None:
        p = call.problem
        plan = static_plan(call.spec, call.params, p.n_q, p.n_k, p.causal, p.device)
    if plan is None and call.spec.estimate is not None:
        plan = call.spec.estimate_plan(q, k, call, extra)
    return plan


class _PlanRecorder:
    """A dynamic method's estimator that keeps every plan it returns, so that ``return_plan`` gives the
    plans the call executed, estimated once (not once to run and again to report). A call with
    ``return_plan`` runs on a copy of its spec whose ``estimate`` is the recorder (:func:`_recording`);
    backends that estimate through ``call.spec`` (``estimate`` / ``estimate_plan``) are recorded, in the
    order they estimate (a packed call: its non-empty sequences in order)."""

    __slots__ = ("estimate", "plans")

    def __init__(self, estimate: Any) -> None:
        self.estimate = estimate
        self.plans: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        plan = self.estimate(*args, **kwargs)
        self.plans.append(plan)
        return plan


def _recording(call: Call) -> tuple[Call, _PlanRecorder | None]:
    """``call`` on a spec whose estimator records its plans, and the recorder; (call, None) for a method
    without an estimator, or inside ``torch.compile`` (nothing built per call there).

    The copy shares ``call.memo`` (backends keep what they derive per call signature there; seer's
    backends hand their weighted plan to ``return_plan`` through the recorder, not the memo). So nothing may
    memoize a closure over the recording call: a cached op would keep appending to a dead recorder on later
    calls. No backend does today; the recording call lives for this call only."""
    spec = call.spec
    if spec.estimate is None or torch.compiler.is_compiling():
        return call, None
    recorder = _PlanRecorder(spec.estimate)
    return replace(call, spec=replace(spec, estimate=recorder)), recorder


def _state_tensors(state: Any) -> dict[str, Tensor]:
    """A state's float tensors by name, for the NaN/Inf scan (a tensor, or a tuple/list of them; other
    states, such as a decode method's summaries, are the library's own)."""
    if isinstance(state, Tensor):
        return {"state": state} if state.is_floating_point() else {}
    if isinstance(state, (tuple, list)):
        return {
            f"state[{i}]": t for i, t in enumerate(state) if isinstance(t, Tensor) and t.is_floating_point()
        }
    return {}


def _checked_inputs(
    spec: MethodSpec, inputs: Mapping[str, Any], problem: Problem, memo: dict[str, Any] | None = None
) -> Mapping[str, Any]:
    """A call's tensor inputs beside q, k, v (``state`` taken out): no name the method does not take, each
    declared one checked against the call's sizes (:func:`attnlab.inputs.validate_extra`)."""
    if not (inputs or spec.inputs):
        return _NO_EXTRA
    unknown = set(inputs) - spec.input_names  # (a set: dynamo of torch 2.11 traces this form)
    if unknown:
        name = sorted(unknown)[0]
        hint = f" ({name!r} is a parameter: give it to prepare)" if name in spec.param_class.names() else ""
        raise ParamError(
            f"method {spec.name!r} takes no tensor input {name!r}; its tensor inputs: "
            f"{', '.join(sorted(spec.input_names)) or 'none'}{hint}"
        )
    return validate_extra(spec.inputs, inputs, problem, spec.name, memo)


def _execute(
    call: Call,
    backend: Backend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    inputs: dict[str, Any],
    check_finite: bool | None,
    return_plan: bool,
) -> Tensor | Result:
    """Run a resolved call: tensor inputs checked against the method's declaration, the optional NaN/Inf
    scan, then the backend (a Result when more than the output is asked for, or the method is stateful)."""
    spec = call.spec
    state = inputs.pop("state", None) if spec.stateful else None
    extra = _checked_inputs(spec, inputs, call.problem, call.memo)
    if check_finite or (check_finite is None and settings.check_finite):
        check_finite_values({"q": q, "k": k, "v": v, **extra, **_state_tensors(state)})
    if spec.stateful:
        out, new_state = backend.run_state(q, k, v, call, extra, state)
        return Result(out, state=new_state)
    if not (call.want_lse or return_plan):
        return backend.run(q, k, v, call, extra)
    run_call, recorder = _recording(call) if return_plan else (call, None)
    if call.want_lse:
        out, lse = backend.run_lse(q, k, v, run_call, extra)
    else:
        out, lse = backend.run(q, k, v, run_call, extra), None
    if not return_plan:
        return Result(out, lse=lse)
    if recorder is not None and recorder.plans:  # the plan the run estimated (the last, if it asked twice)
        return Result(out, lse=lse, plan=recorder.plans[-1])
    return Result(out, lse=lse, plan=_plan_of(backend, q, k, call, extra))


class Op:
    """A prepared attention call: ``op(q, k, v, **tensor_inputs)``.

    Made by :func:`prepare`; the method, its parameters, ``causal``, ``scale`` and the backend rule are
    fixed. Returns the output (B, H, N_q, D_v), or a :class:`~attnlab.core.Result` when ``return_lse`` or
    ``return_plan`` was asked for or the method is stateful (then pass ``state=`` and read
    ``result.state``).
    """

    __slots__ = (
        "_entries",
        "_fast",
        "_growing",
        "_packed",
        "_plain",
        "_sequences",
        "backend",
        "causal",
        "check_finite",
        "params",
        "return_lse",
        "return_plan",
        "scale",
        "spec",
    )

    def __init__(
        self,
        spec: MethodSpec,
        params: Params,
        *,
        causal: bool,
        scale: float | None,
        backend: str | None,
        check_finite: bool | None,
        return_lse: bool,
        return_plan: bool,
    ) -> None:
        if not isinstance(causal, bool):
            raise InputError(f"causal must be a bool, got {causal!r}")
        check_scale(scale)  # before an op is cached with it
        if backend is not None and backend != "reference":
            spec.backend(backend)  # an unknown name fails here, once
        self.spec = spec
        self.params = params
        self.causal = causal
        self.scale = scale
        self.backend = backend
        self.check_finite = check_finite
        self.return_lse = return_lse
        self.return_plan = return_plan
        self._entries: dict[tuple[Any, ...], tuple[Call, Backend]] = {}
        #: resolved calls of backends with ``length_free_refusals``, by their signature without N_k
        self._growing: dict[tuple[Any, ...], tuple[Call, Backend]] = {}
        #: packed calls (cu_seqlens): their resolution and choice, by signature and packing
        self._packed: dict[tuple[Any, ...], tuple[Call, Choice]] = {}
        #: the packed fallback's per-sequence calls, by signature (apart from ``_entries``)
        self._sequences: dict[tuple[Any, ...], tuple[Call, Backend]] = {}
        #: the output alone, from q, k, v alone: __call__ runs the backend itself (no Result, no inputs)
        self._plain = not (spec.stateful or spec.inputs or return_lse or return_plan)
        #: a stateful op's calls that passed the general path, by :meth:`_fast_key`: (call, backend, the
        #: declared order of the given tensor inputs, or None when the call's own keywords are in it);
        #: None for an op that never takes the fast path (stateless, lse / plan asked for, or a decode-family
        #: method: its key count grows every step, so each step would miss and pay for the key)
        self._fast: dict[tuple[Any, ...], tuple[Call, Backend, tuple[str, ...] | None]] | None = (
            {} if spec.stateful and spec.family == "linear" and not (return_lse or return_plan) else None
        )

    def __repr__(self) -> str:
        return (
            f"Op({self.spec.name}, {self.params!r}, causal={self.causal}, scale={self.scale}, "
            f"backend={self.backend or 'auto'})"
        )

    def resolve(self, q: Tensor, k: Tensor, v: Tensor, *, extra_grad: bool = False) -> tuple[Call, Backend]:
        """Validate these inputs and choose the backend (what a new call signature costs).
        ``extra_grad``: a tensor input beside q, k, v requires grad (a training call)."""
        call = _resolve_call(
            self.spec, self.params, q, k, v, causal=self.causal, scale=self.scale, want_lse=self.return_lse,
            extra_grad=extra_grad,
        )  # fmt: skip
        return call, require(call, self.backend)

    def _entry(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        inputs: Mapping[str, Any] = _NO_EXTRA,
        entries: dict[tuple[Any, ...], tuple[Call, Backend]] | None = None,
    ) -> tuple[Call, Backend]:
        """The resolved call of this signature, from ``entries`` (default: the op's own cache; the packed
        fallback passes its per-sequence cache, which has no decode-growth shortcut)."""
        cache, limit = (self._entries, OP_SIGNATURES) if entries is None else (entries, SEQUENCE_SIGNATURES)
        # (len, not bool(inputs): dynamo of torch 2.11 cannot trace bool() of a dict; a compiled decode step
        # failed on the H100)
        extra_grad = len(inputs) > 0 and torch.is_grad_enabled() and _inputs_need_grad(inputs)
        if torch.compiler.is_compiling():
            return self.resolve(q, k, v, extra_grad=extra_grad)
        try:
            key = (
                q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                extra_grad or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)),
                settings.generation,
            )  # fmt: skip
        except AttributeError:  # not tensors: validation says what is wrong
            return self.resolve(q, k, v)
        entry = cache.get(key)
        if entry is None and entries is None:
            entry = self._grown(q, k, v, key)
        if entry is None:
            if q.is_cuda and torch.cuda.is_current_stream_capturing():
                raise BackendError(
                    f"a new call signature of {self!r} inside CUDA-graph capture ({tuple(q.shape)} x "
                    f"{tuple(k.shape)}): resolving it builds tensors (plans, masks) on the device, which "
                    "capture forbids. Call the op once at this shape before capturing."
                )
            # (the keyword only when set: tests count resolve() calls with the plain signature)
            entry = self.resolve(q, k, v, extra_grad=True) if extra_grad else self.resolve(q, k, v)
            if entry[1].length_free_refusals and entries is None:
                self._growing[_without_n_k(key)] = entry
            if len(cache) >= limit:
                del cache[next(iter(cache))]
            cache[key] = entry
        return entry

    def _grown(self, q: Tensor, k: Tensor, v: Tensor, key: tuple[Any, ...]) -> tuple[Call, Backend] | None:
        """A decode loop's next step: the same signature as a resolved call but for the key length (and
        the same pattern: self or cross), on a backend whose refusals cannot depend on N_k. Its call is
        the resolved one with N_k replaced, without validating again; None if there is none."""
        n_k = k.shape[2]
        if v.shape[2] != n_k or n_k < 1:
            return None  # validation says what is wrong
        known = self._growing.get(_without_n_k(key))
        if known is None:
            return None
        call, backend = known
        if (call.problem.n_k == call.problem.n_q) != (n_k == q.shape[2]):
            return None  # another pattern (self vs cross): resolved in full
        grown = replace(call, problem=replace(call.problem, n_k=n_k))
        if len(self._entries) >= OP_SIGNATURES:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (grown, backend)
        return grown, backend

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        cu_seqlens_q: Tensor | None = None,
        cu_seqlens_k: Tensor | None = None,
        **inputs: Any,
    ) -> Tensor | Result:
        """Run the op: ``op(q, k, v, **tensor_inputs)``; packed sequences with ``cu_seqlens_q=`` (and
        ``cu_seqlens_k=``, default: the same), as :func:`attention` describes."""
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            return self._run_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, inputs)
        fast = self._fast
        if fast is not None:  # a stateful op: a signature that passed before runs the backend at once
            key = self._fast_key(q, k, v, inputs)
            if key is not None:
                hit = fast.get(key)
                if hit is not None:
                    call, backend, order = hit
                    state = inputs.pop("state", None)
                    extra = inputs if order is None else {n: inputs[n] for n in order}
                    out, new_state = backend.run_state(q, k, v, call, extra, state)
                    return Result(out, state=new_state)
                call, backend = self._entry(q, k, v, inputs)
                names = [n for n in inputs if n != "state"]
                given = tuple(s.name for s in self.spec.inputs if inputs.get(s.name) is not None)
                result = _execute(call, backend, q, k, v, inputs, self.check_finite, self.return_plan)
                if len(fast) >= OP_SIGNATURES:
                    del fast[next(iter(fast))]
                fast[key] = (call, backend, None if tuple(names) == given else given)
                return result
        call, backend = self._entry(q, k, v, inputs)
        if self._plain and not inputs:  # the common call: what _execute does for it, without its checks
            check = self.check_finite
            if check or (check is None and settings.check_finite):
                check_finite_values({"q": q, "k": k, "v": v})
            return backend.run(q, k, v, call, _NO_EXTRA)
        return _execute(call, backend, q, k, v, inputs, self.check_finite, self.return_plan)

    def _fast_key(self, q: Tensor, k: Tensor, v: Tensor, inputs: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """A stateful call's signature for the fast path of :meth:`__call__`: q's, k's and v's shapes, dtypes
        and devices, each given tensor input's name, shape, dtype and device in the order given (a None
        value by its name), whether a state is given and its type, and the settings' generation. None when
        the call must take the general path: a NaN/Inf scan asked for, tracing (``torch.compile``), a value
        that is not a plain tensor (validation says what is wrong; subclasses: fake, symbolic), or gradients
        needed (q, k, v, a tensor input or the state requires grad, with grad enabled)."""
        check = self.check_finite
        if check or (check is None and settings.check_finite) or torch.compiler.is_compiling():
            return None
        if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor):
            return None
        grad = torch.is_grad_enabled()
        if grad and (q.requires_grad or k.requires_grad or v.requires_grad):
            return None
        parts: list[Any] = [
            q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            settings.generation,
        ]  # fmt: skip
        for name, t in inputs.items():
            if name == "state":
                parts.append((name, type(t)))
                if grad and _inputs_need_grad({name: t}):
                    return None
            elif t is None:
                parts.append((name, None))
            elif type(t) is Tensor:
                if grad and t.requires_grad:
                    return None
                parts.append((name, t.shape, t.dtype, t.device))
            else:
                return None
        return tuple(parts)

    # -- packed sequences (varlen) ------------------------------------------------------------------
    def _packed_entry(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_q: Tensor | None,
        cu_k: Tensor | None,
        inputs: dict[str, Any],
    ) -> tuple[Call, Choice]:
        """The resolved packed call and its choice (cached per signature and packing)."""
        if cu_q is None:
            raise InputError(
                "cu_seqlens_k was given without cu_seqlens_q: packed sequences need the queries' cumulative "
                "lengths (cu_seqlens_k defaults to cu_seqlens_q for packed self-attention)"
            )
        if self.spec.stateful and inputs.get("state") is not None:
            raise InputError(
                f"method {self.spec.name!r}: a state with packed sequences (cu_seqlens) is not supported: "
                "each sequence would need its own; run the sequences one by one with their states, or pass "
                "state=None (each packed sequence then starts from the initial state and result.state lists "
                "their final states)"
            )
        if not all(isinstance(t, Tensor) for t in (q, k, v)):
            validate(q, k, v, causal=self.causal, scale=self.scale)  # says what is wrong
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise BackendError(
                f"packed sequences (cu_seqlens) through {self!r} inside CUDA-graph capture: reading the "
                "cumulative lengths synchronises with the host, which capture forbids; run packed calls outside "
                "capture"
            )
        packing = packing_of(cu_q, cu_k, q, k)
        grad = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad or _inputs_need_grad(inputs)
        )
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, grad,
               settings.generation, packing)  # fmt: skip
        entry = None if torch.compiler.is_compiling() else self._packed.get(key)
        if entry is None:
            call = _resolve_call(
                self.spec, self.params, q, k, v, causal=self.causal, scale=self.scale,
                want_lse=self.return_lse, extra_grad=grad, packing=packing,
            )  # fmt: skip
            entry = (call, choose(call, self.backend))
            if not torch.compiler.is_compiling():
                if len(self._packed) >= PACKED_SIGNATURES:
                    del self._packed[next(iter(self._packed))]
                self._packed[key] = entry
        return entry

    def _run_packed(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_q: Tensor | None,
        cu_k: Tensor | None,
        inputs: dict[str, Any],
    ) -> Tensor | Result:
        """Packed sequences: in one launch on a backend that declares ``varlen``, else sequence by
        sequence through the normal dispatch (see the module docstring)."""
        spec = self.spec
        call, choice = self._packed_entry(q, k, v, cu_q, cu_k, inputs)
        if spec.stateful:  # (a state other than None was refused above)
            inputs = {n: t for n, t in inputs.items() if n != "state"}
        extra = _checked_inputs(spec, inputs, call.problem)
        if self.check_finite or (self.check_finite is None and settings.check_finite):
            check_finite_values({"q": q, "k": k, "v": v, **extra})
        pk = call.packing
        assert pk is not None
        if choice.backend is not None and spec.stateful:
            out, states_ = choice.backend.run_varlen_state(q, k, v, call, extra)
            return Result(out, plan=[None] * pk.count if self.return_plan else None, state=states_)
        if choice.backend is not None:
            run_call, recorder = _recording(call) if self.return_plan else (call, None)
            out, lse = choice.backend.run_varlen(q, k, v, run_call, extra)
            if not (self.return_lse or self.return_plan or spec.stateful):
                return out
            plans = None
            if self.return_plan:
                plans = _recorded_sequences(pk, recorder)
                if plans is None:  # static or dense plans (kept per packing), or a backend's own estimator
                    plans = choice.backend.varlen_plans(q, k, call, extra)
            return Result(out, lse=lse if self.return_lse else None, plan=plans)
        outs: list[Tensor] = []
        lses: list[Tensor] = []
        plans_: list[Any] = []
        states: list[Any] = []
        for s in range(pk.count):
            q0, q1, k0, k1 = pk.bounds(s)
            if q1 == q0 or k1 == k0:  # no query, or no key: zero rows (lse -inf), no plan, no state
                outs.append(q.new_zeros((1, q.shape[1], q1 - q0, v.shape[3])))
                lses.append(torch.full((1, q.shape[1], q1 - q0), float("-inf"), device=q.device))
                plans_.append(None)
                states.append(None)
                continue
            qs, ks, vs = q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]
            xs = sequence_inputs(spec.inputs, extra, pk, s) if extra else {}
            c, b = self._entry(qs, ks, vs, xs, self._sequences)
            r = _execute(c, b, qs, ks, vs, dict(xs), False, self.return_plan)
            if isinstance(r, Result):
                outs.append(r.out)
                if r.lse is not None:
                    lses.append(r.lse)
                plans_.append(r.plan)
                states.append(r.state)
            else:
                outs.append(r)
        out = torch.cat(outs, 2)
        if not (self.return_lse or self.return_plan or spec.stateful):
            return out
        lse = torch.cat(lses, 2) if self.return_lse else None
        return Result(out, lse=lse, plan=plans_ if self.return_plan else None,
                      state=states if spec.stateful else None)  # fmt: skip

    def explain(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        cu_seqlens_q: Tensor | None = None,
        cu_seqlens_k: Tensor | None = None,
        **inputs: Any,
    ) -> Choice:
        """Which backend this op runs for these inputs, and why the ones before it refused; for packed
        sequences, whether they run in one launch or one by one (and then on which backend each)."""
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            call, choice = self._packed_entry(q, k, v, cu_seqlens_q, cu_seqlens_k, dict(inputs))
            if not choice.per_sequence:
                return choice
            pk = call.packing
            assert pk is not None
            groups: dict[tuple[int, int], list[int]] = {}
            for s in range(pk.count):
                n_q, n_k = pk.lengths(s)
                if n_q and n_k:
                    groups.setdefault((n_q, n_k), []).append(s)
            sequences = []
            for indices in groups.values():
                q0, q1, k0, k1 = pk.bounds(indices[0])
                sub = _resolve_call(
                    self.spec, self.params, q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], causal=self.causal,
                    scale=self.scale, want_lse=self.return_lse, extra_grad=call.problem.requires_grad,
                )  # fmt: skip
                sequences.append((tuple(indices), choose(sub, self.backend)))
            return replace(choice, sequences=tuple(sequences))
        call = _resolve_call(
            self.spec, self.params, q, k, v, causal=self.causal, scale=self.scale, want_lse=self.return_lse,
            extra_grad=torch.is_grad_enabled() and _inputs_need_grad(inputs),
        )  # fmt: skip
        # the tensor inputs as a call would check them (explain names no backend for a call that is refused)
        _checked_inputs(self.spec, {n: t for n, t in inputs.items() if n != "state"}, call.problem)
        return choose(call, self.backend)

    def bind(self, q: Tensor, k: Tensor, v: Tensor, **inputs: Any) -> Any:
        """A zero-argument function that runs this op's backend on these tensors with everything resolved
        beforehand: the executor's own time, without the API's per-call work (the benchmark's "kernel")."""
        call, backend = self.resolve(q, k, v)
        extra = _checked_inputs(self.spec, inputs, call.problem)
        return lambda: backend.run(q, k, v, call, extra)


def _recorded_sequences(packing: Packing, recorder: _PlanRecorder | None) -> list[Any] | None:
    """Each packed sequence's plan as the one-launch run estimated it (None for an empty sequence): the
    recorder's plans, one per non-empty sequence in order; None when it holds another count (no recorder,
    or a backend that estimates in its own way: then the backend reports the plans)."""
    if recorder is None:
        return None
    live = [s for s in range(packing.count) if all(packing.lengths(s))]
    if len(recorder.plans) != len(live):
        return None
    plans: list[Any] = [None] * packing.count
    for s, plan in zip(live, recorder.plans, strict=True):
        plans[s] = plan
    return plans


def _without_n_k(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """An op's signature key with the key length left out of k's and v's shapes."""
    k_shape, v_shape = key[1], key[2]
    return (key[0], (*k_shape[:2], *k_shape[3:]), (*v_shape[:2], *v_shape[3:]), *key[3:])


def prepare(
    method: str = "softmax",
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    check_finite: bool | None = None,
    return_lse: bool = False,
    return_plan: bool = False,
    **params: Any,
) -> Op:
    """A prepared op for ``method`` with these parameters: ``op = prepare("sliding_window", causal=True,
    window=1024); out = op(q, k, v)``. Arguments as in :func:`attention`; parameters are validated now,
    inputs on each new call signature."""
    spec = get(method)
    tensors = sorted(set(params) & (spec.input_names | ({"state"} if spec.stateful else set())))
    if tensors:
        raise ParamError(
            f"{tensors[0]!r} is a tensor input of method {spec.name!r}, given per call: "
            f"op = prepare({spec.name!r}, ...); op(q, k, v, {tensors[0]}=...)"
        )
    return Op(
        spec,
        spec.make_params(params),
        causal=causal,
        scale=scale,
        backend=backend,
        check_finite=check_finite,
        return_lse=return_lse,
        return_plan=return_plan,
    )


_OPS: dict[tuple[Any, ...], Op] = {}
_CONTAINERS = (tuple, frozenset)


def _typed(value: tuple[Any, ...] | frozenset[Any]) -> tuple[Any, ...] | frozenset[Any]:
    """A tuple's (or frozenset's) elements each with its type, nested ones too: the op cache's key of a
    container parameter, so that ``(True, 3.0)`` does not find the op of ``(1, 3)`` (equal, alike hashes)."""
    typed = [(type(x), _typed(x) if isinstance(x, _CONTAINERS) else x) for x in value]
    return frozenset(typed) if isinstance(value, frozenset) else tuple(typed)


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = ...,
    causal: bool = ...,
    scale: float | None = ...,
    backend: str | None = ...,
    check_finite: bool | None = ...,
    return_lse: Literal[False] = ...,
    return_plan: Literal[False] = ...,
    cu_seqlens_q: Tensor | None = ...,
    cu_seqlens_k: Tensor | None = ...,
    **params: Any,
) -> Tensor: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = ...,
    causal: bool = ...,
    scale: float | None = ...,
    backend: str | None = ...,
    check_finite: bool | None = ...,
    return_lse: bool = ...,
    return_plan: bool = ...,
    cu_seqlens_q: Tensor | None = ...,
    cu_seqlens_k: Tensor | None = ...,
    **params: Any,
) -> Result: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = "softmax",
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    check_finite: bool | None = None,
    return_lse: bool = False,
    return_plan: bool = False,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    **params: Any,
) -> Tensor | Result:  # (stateful methods always return a Result: pass ``state=``, read ``.state``)
    """Attention of ``q`` over ``k``/``v`` by ``method``; returns (B, H, N_q, D_v) in the input dtype.

    Args:
        q: (B, H, N_q, D) queries. k: (B, H_kv, N_k, D) keys. v: (B, H_kv, N_k, D_v) values.
            ``H % H_kv == 0`` (grouped-query attention when ``H_kv < H``); float32, bfloat16 or float16.
        method: a registered method name (``attnlab list`` shows them and their parameters).
        causal: query ``i`` sees keys ``j <= i + N_k - N_q`` (bottom-right alignment when N_q != N_k).
        scale: multiplier of ``q . k`` (default ``1 / sqrt(D)``).
        backend: force one backend by name (``"reference"`` runs the fp32 reference); default: the
            first of the method's backends, in priority order, that can run this call.
        check_finite: scan the inputs for NaN/Inf first and raise a clear error (a host synchronisation;
            default: ``attnlab.settings.check_finite``, off unless ``ATTNLAB_CHECK_FINITE=1``).
        return_lse: also return the log-sum-exp per query row (softmax methods): a Result.
        return_plan: also return the sparsity plan the call executed: a Result.
        cu_seqlens_q, cu_seqlens_k: packed sequences, as FlashAttention's ``flash_attn_varlen_func``:
            q (1, H, T_q, D), k/v (1, H_kv, T_k, D) hold S sequences back to back; sequence ``s`` has
            queries ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and keys ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``
            (int32 or int64 tensors of S + 1 cumulative lengths: 0, non-decreasing, ending at T_q / T_k;
            empty sequences allowed; ``cu_seqlens_k`` defaults to ``cu_seqlens_q``). No attention crosses
            a sequence boundary; ``causal`` is bottom-right aligned within each sequence. The output (and
            lse) are packed like q; tensor inputs are packed along their token axes (N_q, N_k) like q
            and k. ``return_plan`` gives a list of each sequence's plan, a stateful method a list of each
            sequence's final state (no state in). :func:`explain` with the same arguments says whether
            the sequences run in one launch (a backend with ``varlen``) or one by one.
        **params: the method's parameters (e.g. ``window=1024`` for ``sliding_window``) and tensor inputs.

    Rows with no allowed key return zeros, never NaN. For repeated calls, :func:`prepare` an op.
    """
    spec = get(method)
    if spec.input_names or spec.stateful:
        params, tensors = _split_inputs(spec, params)
    else:
        tensors = {}
    if not isinstance(causal, bool):  # before the op cache: 1 == True would find the causal=True op
        # (isinstance, not ``causal.__class__ is not bool``: torch 2.11's dynamo evaluates that to True
        # for a constant True inside torch.compile, which refused every compiled call; H100 at 2cffc0a)
        raise InputError(f"causal must be a bool, got {causal!r}")
    if torch.compiler.is_compiling():  # nothing cached or mutated inside a trace
        if cu_seqlens_q is not None or cu_seqlens_k is not None:  # a fresh op, dropped after the call
            op = prepare(method, causal=causal, scale=scale, backend=backend, check_finite=check_finite,
                         return_lse=return_lse, return_plan=return_plan, **params)  # fmt: skip
            return op(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **tensors)
        call = _resolve_call(
            spec, spec.make_params(params), q, k, v, causal=causal, scale=scale, want_lse=return_lse,
            extra_grad=torch.is_grad_enabled() and _inputs_need_grad(tensors),
        )  # fmt: skip
        return _execute(call, require(call, backend), q, k, v, tensors, check_finite, return_plan)
    try:
        # each value with its type: True == 1 and hashes alike, so window=True would find window=1's op
        # (a tuple's elements too, _typed: (True, 3.0) == (1, 3) would find the op of a valid tuple)
        options = (method, scale, backend, check_finite, return_lse, return_plan)
        key = (
            causal,
            *((type(x), x) for x in options),
            *((n, type(x), _typed(x) if isinstance(x, _CONTAINERS) else x) for n, x in params.items()),
        )
        op_ = _OPS.get(key)
        if op_ is not None and op_.spec is not spec:  # the method was re-registered
            op_ = None
    except TypeError:  # an unhashable parameter value: validation below says what is wrong
        key, op_ = None, None
    if op_ is None:
        op_ = prepare(
            method,
            causal=causal,
            scale=scale,
            backend=backend,
            check_finite=check_finite,
            return_lse=return_lse,
            return_plan=return_plan,
            **params,
        )
        if key is not None:
            if len(_OPS) >= CACHED_OPS:
                del _OPS[next(iter(_OPS))]
            _OPS[key] = op_
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        return op_(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **tensors)
    return op_(q, k, v, **tensors)


def resolve(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = "softmax",
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    check_finite: bool | None = None,
    **params: Any,
) -> Call:
    """Validate a call and resolve its method and parameters (everything but the backend choice);
    ``check_finite`` as in :func:`attention`."""
    spec = get(method)
    params, _ = _split_inputs(spec, params)
    call = _resolve_call(
        spec, spec.make_params(params), q, k, v, causal=causal, scale=scale, want_lse=return_lse
    )
    if check_finite or (check_finite is None and settings.check_finite):
        check_finite_values({"q": q, "k": k, "v": v})
    return call


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = "softmax",
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    check_finite: bool | None = None,
    return_lse: bool = False,
    return_plan: bool = False,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    **params: Any,
) -> Choice:
    """Which backend :func:`attention` would run for these arguments (it takes every one of them), and
    why the ones before it refused; for packed sequences (``cu_seqlens_q``), whether they run in one
    launch or one by one, and on which backend each. Prints readably."""
    spec = get(method)
    params, tensors = _split_inputs(spec, params)
    op = Op(
        spec,
        spec.make_params(params),
        causal=causal,
        scale=scale,
        backend=backend,
        check_finite=check_finite,
        return_lse=return_lse,
        return_plan=return_plan,
    )
    return op.explain(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **tensors)
