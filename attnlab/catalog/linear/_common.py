"""What the linear-family methods share: input and state checks, and the two token-by-token recurrences
that their references are written with.

Conventions of the whole family (each method's docstring repeats what applies to it):

- Layout (B, H, N, D) like every attnlab method. The recurrence runs over the N tokens of one call;
  queries and keys are the same tokens, so only self patterns exist (``N_q == N_k``); decode is a call
  with N = 1 (or a few tokens) that passes the state of the previous call.
- GQA: k and v (and everything derived from them) are shared by the ``H / H_kv`` query heads of a group,
  as if repeated (``k.repeat_interleave(H // H_kv, dim=1)``). Gates, beta and the state are per query
  head: the state is (B, H, K, V) whatever H_kv is.
- The state S is key-major, (B, H, K, V), float32 (fla's default layout, ``state_v_first=False``), where
  K is the feature dim of the keys (D, or a feature map's size) and V = D_v. It is returned after every
  call and may be passed back as ``state=``; ``state=None`` starts from zeros.
- Step order (fla's): decay the state, write token t, then read: ``o_t`` uses ``S_t``, which includes
  token t. Gates are natural-log decays ``g <= 0`` (decay ``exp(g)`` in (0, 1]), finite in their own
  dtype (the checks below). The chunked backends floor them at ``naive.GATE_FLOOR`` (-128) in float32
  before their chunk-local cumsum (a float64 gate below float32's range, or float32's min, would make it
  -inf, and -inf - (-inf) NaN); exp(g) is 0 in float32 at the floor as below it, so nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import InputError
from attnlab.patterns import Pattern
from attnlab.settings import settings

CAUSAL_ONLY: frozenset[Pattern] = frozenset({Pattern.CAUSAL_SELF})
SELF_ONLY: frozenset[Pattern] = frozenset({Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF})


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def expand_heads(t: Tensor, heads: int) -> Tensor:
    """(B, H_kv, ...) -> (B, H, ...): each kv head repeated for the ``H / H_kv`` query heads of its group."""
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def check_tensor_state(
    method: str, what: str, state: Any, shape: tuple[int, ...], device: torch.device
) -> Tensor:
    """``state`` checked against the shape ``(B, H, K, V)`` (or ``(B, H, K)``) the call needs."""
    if not isinstance(state, Tensor):
        raise InputError(
            f"method {method!r}: {what} must be a torch.Tensor of shape {shape}, got {type(state).__name__}"
        )
    if tuple(state.shape) != shape:
        raise InputError(
            f"method {method!r}: {what} has shape {_shape(state)}; this call needs {shape} "
            "(batch, query heads, key features, value dim). Pass the state the previous call of the same "
            "method, shapes and parameters returned, or None to start from zeros."
        )
    if not state.dtype.is_floating_point:
        raise InputError(f"method {method!r}: {what} has dtype {state.dtype}; expected a floating dtype")
    if state.device != device:
        raise InputError(f"method {method!r}: {what} is on {state.device}, but q, k, v are on {device}")
    return state


def check_state(
    method: str, state: Any, b: int, h: int, k: int, v: int, device: torch.device, *, with_sum: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(S, z) from a user's ``state``: S (B, H, K, V); with ``with_sum`` a pair ``(S, z)``, z (B, H, K) the
    running key sum of a normalised method. None gives (None, None)."""
    if state is None:
        return None, None
    if with_sum:
        if not (isinstance(state, tuple | list) and len(state) == 2):
            raise InputError(
                f"method {method!r} (normalised) carries the state (S, z): S ({b}, {h}, {k}, {v}) and the "
                f"running key sum z ({b}, {h}, {k}); got {type(state).__name__}"
            )
        s = check_tensor_state(method, "state S", state[0], (b, h, k, v), device)
        z = check_tensor_state(method, "state z", state[1], (b, h, k), device)
        return s, z
    if isinstance(state, tuple | list):
        raise InputError(
            f"method {method!r} carries one state tensor S ({b}, {h}, {k}, {v}); got a "
            f"{type(state).__name__} of {len(state)} (a pair (S, z) is the state of normalised linear attention)"
        )
    return check_tensor_state(method, "state", state, (b, h, k, v), device), None


def check_log_decay(method: str, name: str, g: Tensor) -> None:
    """Gates are log-decays: every value must be finite and ``<= 0`` (decay exp(g) in (0, 1]).

    One reduction and a host synchronisation; skipped inside ``torch.compile`` and CUDA-graph capture.
    """
    if torch.compiler.is_compiling() or (g.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    ok = torch.isfinite(g) & (g <= 0)
    if bool(ok.all()):
        return
    nan = int(torch.isnan(g).sum())
    pos = int((g > 0).sum())
    neg_inf = int((g == float("-inf")).sum())
    pos_inf = int((g == float("inf")).sum())
    parts = [
        f"{n} {what}"
        for n, what in (
            (nan, "NaN"),
            (pos, "positive (decay exp(g) > 1)"),
            (neg_inf, "-inf (decay 0)"),
            (pos_inf, "+inf"),
        )
        if n
    ]
    raise InputError(
        f"method {method!r}: {name} holds {', '.join(parts)} value(s); {name} is the natural log of a decay "
        f"in (0, 1], so every value must be finite and <= 0 (e.g. {name} = F.logsigmoid(x))"
    )


def check_finite_input(method: str, name: str, t: Tensor) -> None:
    """NaN/Inf in a method input (beta) is an error (one host synchronisation; skipped when compiling)."""
    if torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"method {method!r}: {name} holds {bad} NaN/Inf value(s); expected finite values")


def check_gate_inputs(method: str, *, g: Tensor | None = None, beta: Tensor | None = None) -> None:
    """``check_log_decay(method, "g", g)`` and ``check_finite_input(method, "beta", beta)`` with one host
    synchronisation for both (a decode step pays one): the min and max of each tensor (NaN propagates)
    are read at once; only when one is out of range do the detailed checks run, to raise their errors.
    Skipped inside ``torch.compile`` and CUDA-graph capture, like them, and when
    ``attnlab.settings.check_values`` is off (a decode loop saving the synchronisation)."""
    finish = start_gate_check(method, g=g, beta=beta, defer=False)
    if finish is not None:
        finish()


def start_gate_check(
    method: str, *, g: Tensor | None = None, beta: Tensor | None = None, defer: bool = True
) -> Callable[[], None] | None:
    """:func:`check_gate_inputs` in two halves, so that a prefill need not wait for it before launching
    its kernels: this launches the min / max reductions and (on a GPU, ``defer``) an asynchronous copy of
    their values to pinned host memory, and returns ``finish``, which waits for that copy only (not for
    work launched after it), then raises as :func:`check_gate_inputs` does. The caller launches its
    kernels between the two and calls ``finish`` before it returns anything (a call with bad gates still
    raises; its outputs are never seen). None: no check runs (as :func:`check_gate_inputs` skips)."""
    if not settings.check_values or torch.compiler.is_compiling():
        return None
    ts = [t for t in (g, beta) if t is not None and t.numel() > 0]
    if not ts:
        return None
    if ts[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    ext = [torch.stack(torch.aminmax(t.detach())) for t in ts]
    vals = ext[0] if len(ext) == 1 else torch.cat([x.float() for x in ext])
    host, done = vals, None
    if defer and vals.is_cuda:
        try:
            pinned = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=True)
        except RuntimeError:  # no pinned memory to be had: the synchronous read below
            pinned = None
        if pinned is not None:
            with torch.cuda.device(vals.device):  # the copy and its event on the gates' device's stream
                pinned.copy_(vals, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(vals.device))
            host = pinned

    def finish() -> None:
        if done is not None:
            done.synchronize()
        lst = host.tolist()
        i = 0
        if g is not None and g.numel() > 0:
            lo, hi = lst[0], lst[1]
            i = 2
            if not (lo > float("-inf") and hi <= 0.0):  # False for NaN
                check_log_decay(method, "g", g)
        if beta is not None and beta.numel() > 0:
            lo, hi = lst[i], lst[i + 1]
            if not (abs(lo) < float("inf") and abs(hi) < float("inf")):  # False for NaN
                check_finite_input(method, "beta", beta)

    return finish


def checks_in_step_kernel(n: int, *ts: Tensor | None) -> bool:
    """Whether a Triton call on ``n`` tokens with inputs ``ts`` (q, k, v, gates, beta, state) should leave
    the gate / beta range check to the recurrent step kernel (decode): ``settings.check_values`` on, the
    call takes the step kernel (few tokens, no gradients), and not inside ``torch.compile`` or CUDA-graph
    capture (where no check runs). The kernel counts the bad values as it reads them, the host reads the
    counts once after the launch: no reduction launched before it (``check_gate_inputs`` launches
    several, then synchronises). On a bad value the caller's ``check_gate_inputs`` runs to raise."""
    if not settings.check_values or torch.compiler.is_compiling():
        return False
    q = ts[0]
    if q is not None and q.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(linear_kernels().takes_step(n, *ts))


_KERNELS: list[ModuleType] = []


def linear_kernels() -> ModuleType:
    """``attnlab.kernels.linear.op``, imported on first use (it imports Triton) and then kept: the
    runners call this rather than an import statement per call (microseconds of a decode step). (Not
    ``functools.cache``: torch.compile traces the runners and warns at every cache wrapper.)"""
    if not _KERNELS:
        from attnlab.kernels.linear import op

        _KERNELS.append(op)
    return _KERNELS[0]


def gated_recurrence(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The gated linear recurrence, one token at a time, in the dtype of q::

        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        (S_0 = state, or zeros)
        o_t = scale * S_t^T q_t

    q, k (B, H, N, K); v (B, H, N, V); g None (no decay) or broadcastable to (B, H, N, K); state
    (B, H, K, V). Returns (o (B, H, N, V), S_N (B, H, K, V)), both in q's dtype.
    """
    b, h, n, kd = q.shape
    s = q.new_zeros(b, h, kd, v.shape[-1]) if state is None else state.to(q.dtype)
    if g is not None:
        g = g.to(q.dtype).expand(b, h, n, kd)
    outs = []
    for t in range(n):
        if g is not None:
            s = s * torch.exp(g[:, :, t])[..., None]
        s = s + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], s))
    return torch.stack(outs, 2), s


def delta_recurrence(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, scale: float, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The gated delta rule, one token at a time, in the dtype of q::

        S'_t = diag(exp(g_t)) S_{t-1}                    (decay; g per channel, or one value per head)
        u_t  = beta_t (v_t - S'_t^T k_t)                 (the delta: new value minus the one stored at k_t)
        S_t  = S'_t + k_t u_t^T = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
        o_t  = scale * S_t^T q_t

    q, k (B, H, N, K); v (B, H, N, V); beta (B, H, N); g None (plain DeltaNet) or broadcastable to
    (B, H, N, K); state (B, H, K, V). With one gate value per head, diag(exp(g_t)) = alpha_t I commutes
    with (I - beta k k^T), and this is Gated DeltaNet; with a gate per channel it is Kimi Delta Attention.
    Returns (o (B, H, N, V), S_N (B, H, K, V)) in q's dtype.
    """
    b, h, n, kd = q.shape
    s = q.new_zeros(b, h, kd, v.shape[-1]) if state is None else state.to(q.dtype)
    if g is not None:
        g = g.to(q.dtype).expand(b, h, n, kd)
    beta = beta.to(q.dtype)
    outs = []
    for t in range(n):
        if g is not None:
            s = s * torch.exp(g[:, :, t])[..., None]
        kt = k[:, :, t]
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", s, kt))
        s = s + kt[..., None] * u[..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], s))
    return torch.stack(outs, 2), s


# -- valid random tensor inputs (TensorInput.sample: the parity tests and the benchmark draw with these) --


def sample_log_decay(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Natural-log decays ``g = logsigmoid(x + 2)``, x standard normal: decays mostly in 0.5..1 (realistic
    gates; a decay near 0 would erase the state every token)."""
    return torch.nn.functional.logsigmoid(torch.randn(shape, generator=generator) + 2.0)


def sample_unit(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Uniform in [0, 1) (beta, the delta rule's writing strength)."""
    return torch.rand(shape, generator=generator)


def sample_decay(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Uniform in [0.3, 1) (a per-head decay factor in (0, 1])."""
    return 0.3 + 0.7 * torch.rand(shape, generator=generator)
