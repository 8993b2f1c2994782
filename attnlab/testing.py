"""The accuracy rule, and the parity check shared by the test suite and ``attnlab verify``.

Rule (FlashAttention's): a backend's error against the fp32 reference may be at most ``FWD_FACTOR`` (2x)
the error of the same math run by the reference in the input precision (``upcast=False``), forward, and
``BWD_FACTOR`` (3x) for each gradient; plus a floor for rounding that no implementation can avoid:
``FLOOR_REL x (1 + max|ref|)`` (fp32 inputs, whose low-precision run *is* the reference) and half the
dtype's epsilon x max|ref| (the final rounding of a bf16/fp16 result). Errors are max-abs.

The log-sum-exp (``return_lse=True``; checked for every backend that returns one, the method's tensor inputs
passed). Its reference is the method's own where it has one (``MethodSpec.reference_lse``: a softmax
variant's normaliser over its transformed logits, a sink's term included), else plain softmax's over the
allowed pairs (``ReferenceBackend.run_lse``). The error is the max absolute difference in nats over the rows
whose reference lse is finite; the bound:

- with ``reference_lse``: the output rule with the lse's own dtype, float32: ``FWD_FACTOR`` x the error of
  ``reference_lse`` run in the input precision (``upcast=False``) + ``FLOOR_REL x (1 + max|lse|)`` + half
  float32's epsilon x max|lse| (in bf16 about 2x the bf16 logits' rounding, a few 1e-3 nats; in fp32 about
  1e-5 x (1 + max|lse|));
- without: ``LSE_ULPS`` (8) x the input dtype's epsilon x ``(1 + max|lse|)`` (an lse is about the largest
  logit plus ``log N``, so its error follows the logits' rounding; the input-precision run is not there).

The lse must be float32 (B, H, N_q), and every row whose reference lse is not finite (-inf: no key; a sink's
+inf) must hold the same value, else the error is NaN.

Also the test suite's shared setup (the device under test, random inputs, the parity cases, mask
drawings), so that no test module imports another. Nothing here runs at import.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnlab.api import attention
from attnlab.backends.eager import REFERENCE
from attnlab.core import Call, MethodSpec, Result, default_scale
from attnlab.dispatch import choose
from attnlab.errors import InputError
from attnlab.inputs import validate
from attnlab.params import Params
from attnlab.patterns import Pattern, pattern_of
from attnlab.registry import methods

FWD_FACTOR = 2.0
BWD_FACTOR = 3.0
FLOOR_REL = 1e-5
#: the lse rule's allowance for a method without ``reference_lse``: this many of the input dtype's epsilon
#: x (1 + max|lse|) (see the module docstring)
LSE_ULPS = 8.0


@dataclass(frozen=True)
class Case:
    """One parity case: shapes, dtype, pattern and method parameters."""

    batch: int
    heads: int
    kv_heads: int
    n_q: int
    n_k: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    params: Mapping[str, Any] = field(default_factory=dict)
    #: pass the method's optional tensor inputs too (its required ones are always passed)
    optional_inputs: bool = False

    @property
    def pattern(self) -> Pattern:
        return pattern_of(self.causal, self.n_q, self.n_k)

    def label(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in self.params.items())
        dt = str(self.dtype).replace("torch.", "")
        return (
            f"{self.pattern.value}-B{self.batch}H{self.heads}/{self.kv_heads}-{self.n_q}x{self.n_k}-"
            f"D{self.head_dim}-{dt}" + (f"-{p}" if p else "") + ("-inputs" if self.optional_inputs else "")
        )

    def inputs(self, device: torch.device | str, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape_q = (self.batch, self.heads, self.n_q, self.head_dim)
        shape_kv = (self.batch, self.kv_heads, self.n_k, self.head_dim)
        q, k, v = (
            torch.randn(s, generator=g).to(device=device, dtype=self.dtype)
            for s in (shape_q, shape_kv, shape_kv)
        )
        return q, k, v

    def tensor_inputs(self, spec: MethodSpec, device: torch.device | str, seed: int = 0) -> dict[str, Tensor]:
        """The method's tensor inputs for this case, each drawn by its declared sampler (valid values):
        the required ones, and the optional ones with ``optional_inputs``."""
        g = torch.Generator(device="cpu").manual_seed(seed + 7)
        sizes = {"B": self.batch, "H": self.heads, "H_kv": self.kv_heads, "N_q": self.n_q, "N_k": self.n_k,
                 "D": self.head_dim, "D_v": self.head_dim}  # fmt: skip
        return {
            t.name: t.random(sizes, g, device=device, dtype=self.dtype)
            for t in spec.inputs
            if t.required or self.optional_inputs
        }


def state_tensors(state: Any) -> list[Tensor]:
    """A recurrent state as a flat list of tensors (a tensor, or a tuple/list of them). Other states (None,
    the decode family's selection objects, whose integer choices their own tests compare) give none: the
    registry parity compares only their outputs."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for part in state for t in state_tensors(part)]
    return []


@dataclass
class Check:
    """Outcome of one parity check; ``errors`` maps 'out', 'lse', 'dq', 'dk', 'dv' (and a state's, a tensor
    input's gradient) to (error, bound)."""

    method: str
    backend: str
    case: Case
    skipped: str = ""
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: an exception raised by the backend (a failed check)
    crash: str = ""

    @property
    def passed(self) -> bool:
        return (
            not self.skipped and not self.crash and all(err <= bound for err, bound in self.errors.values())
        )

    def summary(self) -> str:
        if self.skipped:
            return f"skipped ({self.skipped})"
        if self.crash:
            return f"FAIL {self.crash}"
        parts = [f"{name} {err:.2e}/{bound:.2e}" for name, (err, bound) in self.errors.items()]
        return ("PASS " if self.passed else "FAIL ") + " ".join(parts)


def max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def bound(err_lowp: float, ref: Tensor, factor: float, dtype: torch.dtype) -> float:
    """The largest error the rule allows, given the low-precision run's error ``err_lowp``."""
    scale = float(ref.detach().float().abs().max()) if ref.numel() else 0.0
    return factor * err_lowp + FLOOR_REL * (1.0 + scale) + 0.5 * torch.finfo(dtype).eps * scale


def _leaves(ts: tuple[Tensor, ...], grad: bool) -> tuple[Tensor, ...]:
    """Fresh copies; the floating ones require grad when ``grad`` (bool and int inputs never do)."""
    return tuple(t.detach().clone().requires_grad_(grad and t.is_floating_point()) for t in ts)


def check_parity(
    spec: MethodSpec,
    backend: str,
    case: Case,
    device: torch.device | str,
    *,
    backward: bool = True,
    seed: int = 0,
) -> Check:
    """Run ``backend`` on ``case`` and compare with the reference under the accuracy rule.

    The backward is checked when ``backward`` and the backend can run with gradients; the log-sum-exp
    (:func:`lse_error`) when the method has one and the backend returns it for the call; a backend that
    refuses the call (``can_use``) gives a skipped Check carrying its reason.
    """
    result = Check(spec.name, backend, case)
    q0, k0, v0 = case.inputs(device, seed)
    x0 = case.tensor_inputs(spec, device, seed)
    params = spec.make_params(case.params)
    problem = validate(q0, k0, v0, causal=case.causal, scale=None)
    scale = default_scale(problem.head_dim, None)
    fwd_choice = choose(Call(spec, params, problem, scale), backend)
    if fwd_choice.backend is None:
        result.skipped = "; ".join(fwd_choice.refusals[0][1])
        return result
    grad = backward and spec.backward and fwd_choice.backend.backward
    if grad:
        grad_problem = validate(
            *_leaves((q0, k0, v0), True), causal=case.causal, scale=None, check_finite=False
        )
        grad = choose(Call(spec, params, grad_problem, scale), backend).backend is not None
    names = tuple(x0)

    def leaves() -> tuple[Tensor, ...]:
        return _leaves((q0, k0, v0, *x0.values()), grad)

    def reference(ts: tuple[Tensor, ...], upcast: bool) -> tuple[Tensor, list[Tensor]]:
        got = spec.reference(*ts[:3], params, causal=case.causal, scale=scale, upcast=upcast,
                             **dict(zip(names, ts[3:], strict=True)))  # fmt: skip
        return (got[0], state_tensors(got[1])) if spec.stateful else (got, [])

    xs = leaves()
    kwargs: dict[str, Any] = {**case.params, **dict(zip(names, xs[3:], strict=True))}
    res = attention(xs[0], xs[1], xs[2], method=spec.name, causal=case.causal, backend=backend, **kwargs)
    out, state = (res.out, state_tensors(res.state)) if isinstance(res, Result) else (res, [])
    xr, xl = leaves(), leaves()
    ref, ref_state = reference(xr, True)
    low, low_state = reference(xl, False)
    result.errors["out"] = (max_abs(out, ref), bound(max_abs(low, ref), ref, FWD_FACTOR, case.dtype))
    if not torch.isfinite(out).all():
        result.errors["out"] = (float("nan"), result.errors["out"][1])
    if len(state) != len(ref_state):
        result.crash = f"the backend's state has {len(state)} tensors, the reference's {len(ref_state)}"
        return result
    for i, (s_got, s_ref, s_low) in enumerate(zip(state, ref_state, low_state, strict=True)):
        label = "state" if len(state) == 1 else f"state{i}"
        err = max_abs(s_got, s_ref) if torch.isfinite(s_got).all() else float("nan")
        result.errors[label] = (err, bound(max_abs(s_low, s_ref), s_ref, FWD_FACTOR, case.dtype))
    lse_call = Call(spec, params, problem, scale, want_lse=True)
    if spec.has_lse and choose(lse_call, backend).backend is not None:
        with torch.no_grad():  # the log-sum-exp the backend returns, against the method's reference lse
            lse_kwargs: dict[str, Any] = {**case.params, **x0}
            lse_res = attention(q0, k0, v0, method=spec.name, causal=case.causal, backend=backend,
                                return_lse=True, **lse_kwargs)  # fmt: skip
        assert isinstance(lse_res, Result) and lse_res.lse is not None
        got_lse, lse_shape = lse_res.lse, (case.batch, case.heads, case.n_q)
        if got_lse.dtype != torch.float32 or tuple(got_lse.shape) != lse_shape:
            result.crash = (
                f"the lse is {got_lse.dtype} {tuple(got_lse.shape)}; expected torch.float32 {lse_shape}"
            )
        else:
            result.errors["lse"] = lse_error(lse_call, (q0, k0, v0), x0, got_lse)
    if grad:
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
        diff = [i for i, t in enumerate(xs) if t.requires_grad]  # not the bool / int inputs
        labels = [("dq", "dk", "dv", *(f"d{n}" for n in names))[i] for i in diff]

        def grads(y: Tensor, ts: tuple[Tensor, ...], dy: Tensor) -> tuple[Tensor | None, ...]:
            return torch.autograd.grad(y, [ts[i] for i in diff], dy, allow_unused=True)

        got, want = grads(out, xs, dout), grads(ref, xr, dout.float().to(ref.dtype))
        lowg = grads(low, xl, dout)
        for name, a, r, lo in zip(labels, got, want, lowg, strict=True):
            if r is None:  # the output does not depend on this input (e.g. an unused option)
                continue
            if a is None or lo is None:
                err = float("nan")  # the backend gives no gradient where the method has one
            else:
                err = max_abs(a, r) if torch.isfinite(a).all() else float("nan")
            result.errors[name] = (
                err,
                bound(max_abs(lo, r) if lo is not None else 0.0, r, BWD_FACTOR, case.dtype),
            )
    return result


def lse_error(
    call: Call, qkv: tuple[Tensor, Tensor, Tensor], inputs: Mapping[str, Tensor], got: Tensor
) -> tuple[float, float]:
    """(error, bound) of a backend's log-sum-exp ``got`` (float32 (B, H, N_q)) for ``call`` under the lse
    rule (see the module docstring). The reference is the method's own lse (``spec.reference_lse``, given
    the tensor inputs; else plain softmax's over the allowed pairs: :meth:`ReferenceBackend.run_lse`). The
    error is NaN where a row whose reference is not finite (-inf: no key) differs, or a finite one is not
    finite."""
    spec, (q, k, v) = call.spec, qkv
    causal, scale = call.problem.causal, call.scale
    with torch.no_grad():
        _, want = REFERENCE.run_lse(q, k, v, call, dict(inputs))
        low: Tensor | None = None
        if spec.reference_lse is not None:  # the same lse computed in the input precision
            _, low = spec.reference_lse(
                q, k, v, call.params, causal=causal, scale=scale, upcast=False, **inputs
            )
    rows = torch.isfinite(want)
    # rows without a finite lse (no key: -inf) must be the same value on both sides
    same = torch.equal(rows, torch.isfinite(got)) and torch.equal(got[~rows], want[~rows].to(got.dtype))
    err = max_abs(got[rows], want[rows]) if same else float("nan")
    if low is not None:  # the output rule, the lse being float32 (no final rounding to q's dtype)
        both = rows & torch.isfinite(low)
        return err, bound(max_abs(low[both], want[both]), want[rows], FWD_FACTOR, torch.float32)
    peak = float(want[rows].abs().max()) if bool(rows.any()) else 0.0
    return err, LSE_ULPS * torch.finfo(q.dtype).eps * (1.0 + peak)


def cases_for(
    spec: MethodSpec,
    *,
    lengths: tuple[tuple[int, int], ...],
    head_dims: tuple[int, ...],
    groups: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...],
    heads: int = 4,
    batch: int = 1,
    all_params: bool = True,
) -> Iterator[Case]:
    """Parity cases over the method's supported patterns and its ``test_params``; a head dim above what a
    parameter set takes (:meth:`Params.head_dim_limit`), or lengths it refuses (:meth:`Params.check_lengths`:
    e.g. a decode method's query bound, a grid that does not hold N), get no case."""
    param_sets = spec.test_params if all_params else spec.test_params[:1]
    for n_q, n_k in lengths:
        for causal in (False, True):
            if pattern_of(causal, n_q, n_k) not in spec.patterns:
                continue
            for d in head_dims:
                for group in groups:
                    for dtype in dtypes:
                        for params in param_sets:
                            made = spec.make_params(params)
                            limit = made.head_dim_limit()
                            if limit is not None and d > limit:
                                continue  # a head dim these parameters refuse by design (based's Taylor)
                            if not _lengths_taken(made, n_q, n_k):
                                continue  # lengths these parameters refuse by design
                            yield Case(batch, heads, heads // group, n_q, n_k, d, dtype, causal, dict(params))


def _lengths_taken(params: Params, n_q: int, n_k: int) -> bool:
    try:
        params.check_lengths(n_q, n_k)
    except InputError:
        return False
    return True


# -- the test suite's setup ---------------------------------------------------------------------------
# (named so that pytest does not collect them as tests when a test module imports them)


@functools.cache
def on_cuda() -> bool:
    """Whether the tests run on a CUDA GPU (else on CPU, with Triton kernels in the interpreter)."""
    return torch.cuda.is_available()


def device_under_test() -> torch.device:
    """``cuda`` where a GPU is available, else ``cpu``."""
    return torch.device("cuda" if on_cuda() else "cpu")


def random_qkv(
    batch: int,
    heads: int,
    kv_heads: int,
    n_q: int,
    n_k: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    *,
    grad: bool = False,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """``[q, k, v]`` from the global RNG: q ``(batch, heads, n_q, head_dim)``, k and v
    ``(batch, kv_heads, n_k, head_dim)``, on ``device`` (default: :func:`device_under_test`), as leaves
    that require grad when ``grad``."""
    device = device_under_test() if device is None else device
    shapes = ((heads, n_q), (kv_heads, n_k), (kv_heads, n_k))
    ts = [torch.randn(batch, h, n, head_dim, device=device, dtype=dtype) for h, n in shapes]
    return [t.requires_grad_(grad) for t in ts]


def draw_mask(mask: Tensor) -> list[str]:
    """A 2-D bool mask as rows of ``x`` (attends) and ``.``, as the method docstrings draw them."""
    return ["".join("x" if b else "." for b in row) for row in mask.tolist()]


PARITY_LENGTHS = ((1, 1), (63, 63), (257, 257), (1000, 1000), (63, 257), (257, 63), (1, 1000))
PARITY_TRITON_LENGTHS = ((1, 1), (17, 17), (20, 45), (45, 20), (1, 33))


#: Methods whose full parity set also runs on a CPU (one of each executor and plan kind: dense SDPA, the
#: sigmoid Triton kernel, a static mask on Flex / the block-sparse executor / SDPA, dynamic plans, token
#: columns). On a CPU the others run :func:`compact_cpu_cases` (a CPU's compiled FlexAttention costs 10-90 s
#: per new score function and shape, and the suite must run in minutes on 2 cores); each method's own test
#: module checks its backends on a CPU, and the full set runs on CUDA.
CPU_FULL_PARITY = frozenset({"softmax", "sigmoid", "sliding_window", "block_topk", "vertical_slash"})


def compact_cpu_cases(spec: MethodSpec) -> list[tuple[str, str, Case]]:
    """A CPU's parity cases for methods outside :data:`CPU_FULL_PARITY`: tiny odd shapes over every pattern
    the method defines (every parameter set on the first shape), GQA 2:1, fp32, plus one bf16 case and one
    with the optional
    tensor inputs, for each backend except compiled FlexAttention (none on a CPU: see above); interpreted
    Triton kernels get one self and one cross shape with the first parameter set."""
    out = []
    for backend in spec.backends:
        if backend.name == "flex":
            continue
        decode = spec.family == "decode"  # a few queries against a longer cache
        if backend.triton:  # interpreted: one self and one cross shape (its kernel tests cover the rest)
            lengths: tuple[tuple[int, int], ...] = ((1, 40), (4, 45)) if decode else ((17, 17), (20, 45))
            cases = list(cases_for(spec, lengths=lengths, head_dims=(16,), groups=(2,),
                                   dtypes=(torch.float32,), heads=2, batch=1, all_params=False))  # fmt: skip
        else:
            first, more = (((1, 40),), ((4, 45), (16, 16))) if decode else (((17, 17),), ((20, 45), (45, 20)))
            cases = [  # every parameter set on one shape, the first set on the others
                *cases_for(spec, lengths=first, head_dims=(16,), groups=(2,),
                           dtypes=(torch.float32,), heads=4, batch=2),
                *cases_for(spec, lengths=more, head_dims=(16,), groups=(2,),
                           dtypes=(torch.float32,), heads=4, batch=2, all_params=False),
                *cases_for(spec, lengths=((2, 33) if decode else (33, 33),), head_dims=(16,), groups=(2,),
                           dtypes=(torch.bfloat16,), heads=2, batch=1, all_params=False),
            ]  # fmt: skip
        if any(not t.required for t in spec.inputs):
            cases.append(dataclasses.replace(cases[0], optional_inputs=True))
        out += [(spec.name, backend.name, c) for c in cases if c.pattern in backend.caps.patterns]
    return out


def parity_cases(cuda: bool) -> list[tuple[str, str, Case]]:
    """The test suite's (method, backend, case) parity cases, for every backend of every registered method.

    Odd shapes over every supported pattern with each method's first parameter set (head dims 64 and 128,
    GQA 4:1 and 1:1), plus every parameter set and dtype on one self and one cross shape. Off CUDA
    (``cuda=False``), Triton runs in its CPU interpreter and gets tiny shapes, and methods outside
    :data:`CPU_FULL_PARITY` get :func:`compact_cpu_cases`.
    """
    out = []
    for name, spec in methods().items():
        if not cuda and name not in CPU_FULL_PARITY:
            out += compact_cpu_cases(spec)
            continue
        for backend in spec.backends:
            interp = backend.triton and not cuda
            if interp:  # Triton's CPU interpreter is slow: few tiny cases (the full set runs on CUDA)
                cases = [
                    *cases_for(
                        spec,
                        lengths=PARITY_TRITON_LENGTHS,
                        head_dims=(16,),
                        groups=(2,),
                        dtypes=(torch.float32,),
                        heads=2,
                        batch=2,
                        all_params=False,
                    ),
                    *cases_for(
                        spec,
                        lengths=((17, 17),),
                        head_dims=(24,),
                        groups=(1,),
                        dtypes=(torch.bfloat16,),
                        heads=2,
                        batch=1,
                        all_params=False,
                    ),
                ]
            else:  # both head dims and both GQA ratios, paired (each compiled kernel costs time)
                main = torch.bfloat16 if cuda else torch.float32
                cases = [
                    *cases_for(
                        spec,
                        lengths=PARITY_LENGTHS,
                        head_dims=(64,),
                        groups=(4,),
                        dtypes=(main,),
                        all_params=False,
                    ),
                    *cases_for(
                        spec,
                        # compiled FlexAttention on a CPU compiles per shape: the second head dim on
                        # half the lengths there (all of them on CUDA)
                        lengths=PARITY_LENGTHS if cuda or backend.name != "flex" else PARITY_LENGTHS[::2],
                        head_dims=(128,),
                        groups=(1,),
                        dtypes=(main,),
                        all_params=False,
                    ),
                ]
            out += [(name, backend.name, c) for c in cases]
            # every parameter set, and every dtype, on one self and one cross shape (interpreted: one
            # self shape in fp32)
            lowp = (torch.bfloat16, torch.float16) if cuda or backend.name != "flex" else (torch.bfloat16,)
            extra: list[Case]
            if interp:
                extra = list(
                    cases_for(
                        spec,
                        lengths=((17, 17),),
                        head_dims=(16,),
                        groups=(2,),
                        dtypes=(torch.float32,),
                        heads=2,
                        batch=1,
                    )
                )
            else:
                cpu_flex = not cuda and backend.name == "flex"  # every parameter set, fewer compiles
                extra = list(
                    cases_for(
                        spec,
                        lengths=((130, 130), (70, 200)),
                        head_dims=(64,),
                        groups=(2,),
                        dtypes=(torch.float32,) if cpu_flex else (torch.float32, *lowp),
                        heads=4,
                        batch=2,
                    )
                )
                if cpu_flex:  # the low precision on one shape
                    extra = [*extra, *cases_for(spec, lengths=((130, 130),), head_dims=(64,), groups=(2,),
                                                dtypes=lowp, heads=4, batch=2, all_params=False)]  # fmt: skip
            if any(not t.required for t in spec.inputs):  # the optional tensor inputs, on the first shape
                with_inputs = [dataclasses.replace(c, optional_inputs=True) for c in extra
                               if c.params == dict(spec.test_params[0]) and c.n_q == extra[0].n_q]  # fmt: skip
                extra = [*extra, *with_inputs]
            out += [(name, backend.name, c) for c in extra]
    # a backend that declares fewer patterns than its method defines is not run on the others, nor with
    # parameters (or parameters in a dtype) it refuses by design (its param_refusals, dtype_refusals)
    return [(m, b, c) for m, b, c in out if _runs_by_design(methods()[m], b, c)]


def _runs_by_design(spec: MethodSpec, backend: str, case: Case) -> bool:
    """Whether ``backend`` takes ``case``'s pattern, parameters and dtype (declared, not device-dependent)."""
    b = spec.backend(backend)
    params = spec.make_params(case.params)
    return (
        case.pattern in b.caps.patterns
        and not b.param_refusals(params)
        and not b.dtype_refusals(params, case.dtype)
    )


class KernelLaunches:
    """Records which of a module's Triton kernels are launched: each named kernel attribute of ``module``
    is replaced (through ``monkeypatch``) by a wrapper that appends its name to :attr:`seen` and launches
    the kernel."""

    def __init__(self, monkeypatch: Any, module: Any, names: list[str]) -> None:
        self.seen: list[str] = []
        for name in names:
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name: str, kernel: Any) -> Any:
        seen = self.seen

        class Counted:
            def __getitem__(self, grid: object) -> Any:
                seen.append(name)
                return kernel[grid]

        return Counted()
