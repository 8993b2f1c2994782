"""``neighborhood``: neighborhood attention on a 1-D, 2-D or 3-D token grid, with NATTEN's semantics.

Every query attends to the ``window`` keys around it along each axis (the neighborhood is the Cartesian
product of the per-axis key sets). As in NATTEN (``na1d``/``na2d``/``na3d``), the window does not shrink
at a border: it *shifts* inside the grid, so every query sees exactly ``window`` keys per axis::

    1-D, L=8, window=3 (x = attends)     2-D, shape=(4, 4), window=3: the 9 keys of query (0, 0), (1, 2)
    q0: x x x . . . . .                   (0,0): x x x .      (1,2): . x x x
    q1: x x x . . . . .                          x x x .             . x x x
    q2: . x x x . . . .                          x x x .             . x x x
    q3: . . x x x . . .                          . . . .             . . . .
    ...                                   corner: shifted, not cut      centred
    q7: . . . . . x x x

Per axis (length ``L``, query coordinate ``i``, window ``k``, dilation ``d``, stride ``s``), NATTEN's rule:

- dilation: only keys with ``j % d == i % d`` count; the rule below runs on the group's coordinates
  ``i' = i // d`` in a group of ``L_g = ceil((L - i % d) / d)`` positions;
- stride: the queries ``i'`` with the same ``i' // s`` share one window, that of their *leader*
  ``min(i' // s * s + s // 2, L_g - 1)`` (``s = k`` gives blocked attention);
- non-causal: keys ``[start, start + k)`` with ``start = clamp(leader - k // 2, 0, L_g - k)``
  (an even ``k`` reaches ``k / 2`` back and ``k / 2 - 1`` ahead);
- causal axis (``axis_causal``): keys ``[max(leader - k + 1, 0), i']``, leader
  ``min(i' // s * s + s - 1, L_g - 1)``: the window shrinks at the start instead of shifting.

The grid is in raster order (last axis fastest; see :mod:`attnlab.catalog.structured._grid`). The call's
``causal=True`` further keeps only keys ``j <= i`` in that flattened order (with every axis causal it
changes nothing). Self-attention only (``N_q == N_k == prod(shape)``).

Checked against NATTEN (github.com/SHI-Labs/NATTEN, commit 8c8729f): the reference kernel's mask
``csrc/include/natten/cuda/reference/mask.hpp`` (``get_window_left``/``get_window_right``: ``k // 2`` and
``k // 2 + k % 2 - 1``; ``get_win_start``/``get_win_end``: the stride-group leader, the border shift
``(leader + right >= L) * (L - right - leader - 1)``, the causal ``[max(leader - k + 1, 0), i]``;
``qkv_fix_dilation``: each dilation group's own length; ``NeighborhoodAttentionReferenceMask``: keys of
the query's group only), its FlexAttention mask ``src/natten/backends/flex.py`` ``get_na_flex_mask``
(the same rule as a clamped window centre), and ``src/natten/utils/checks.py``
(``check_args_against_input``: ``window * dilation <= L`` and ``stride <= window`` per axis). Where we
differ: ``window=1`` is allowed (NATTEN asks for >= 2); ``shape=None`` cuts a window longer than a
dilation group instead of refusing it; the call-level ``causal`` above is ours; NATTEN's additional
(cross-attention) keys are not offered.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.catalog.static import EXECUTOR_FIRST
from attnlab.catalog.structured import _grid
from attnlab.core import MethodSpec
from attnlab.masks import MaskContext, MaskMod, mask_for
from attnlab.params import Params
from attnlab.patterns import SELF_PATTERNS
from attnlab.reference import masked_softmax_attention


@dataclass(frozen=True)
class NeighborhoodParams(Params):
    """Neighborhood attention on a grid; ints apply to every axis, tuples give one value per axis.

    - ``shape``: the grid, 1 to 3 axes whose product is N (default None: 1-D over the sequence);
    - ``window``: keys per axis, NATTEN's ``kernel_size`` (>= 1, default 7);
    - ``dilation``: spacing of the keys (>= 1, default 1);
    - ``stride``: queries per shared window along each axis (1 <= stride <= window, default 1);
    - ``axis_causal``: per-axis causality, NATTEN's ``is_causal`` (default False).

    With an explicit ``shape``, ``window * dilation`` must fit in each axis (NATTEN's constraint); with
    ``shape=None`` a window longer than a dilation group is cut to the group (so any N works).
    """

    method = "neighborhood"
    shape: tuple[int, ...] | None = None
    window: int | tuple[int, ...] = 7
    dilation: int | tuple[int, ...] = 1
    stride: int | tuple[int, ...] = 1
    axis_causal: bool | tuple[bool, ...] = False

    def __post_init__(self) -> None:
        for name in ("shape", "window", "dilation", "stride", "axis_causal"):
            object.__setattr__(self, name, _grid.as_tuple(getattr(self, name)))
        super().__post_init__()

    @property
    def n_axes(self) -> int:
        return 1 if self.shape is None else len(self.shape)

    def axes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
        """(window, dilation, stride, axis_causal), one entry per axis."""
        n = self.n_axes
        return (
            _grid.per_axis(self.method, "window", self.window, n),
            _grid.per_axis(self.method, "dilation", self.dilation, n),
            _grid.per_axis(self.method, "stride", self.stride, n),
            _grid.per_axis_bool(self.method, "axis_causal", self.axis_causal, n),
        )

    def validate(self) -> None:
        _grid.check_shape(self.method, self.shape)
        window, dilation, stride, _ = self.axes()
        for axis, (k, s) in enumerate(zip(window, stride, strict=True)):
            if s > k:
                raise self._fail("stride", self.stride, f"at most the window on each axis (axis {axis}: {k})")
        if self.shape is not None:
            spans = tuple(k * d for k, d in zip(window, dilation, strict=True))
            _grid.check_fits(self.method, "window * dilation", spans, self.shape)

    def check_lengths(self, n_q: int, n_k: int) -> None:
        _grid.grid_of(self.method, self.shape, n_q, n_k)


def _axis_ok(qi: Tensor, kj: Tensor, length: Any, k: Any, d: Any, s: Any, causal: Any) -> Tensor:
    """NATTEN's one-axis rule on coordinate tensors (FlexAttention-friendly integer arithmetic)."""
    g = qi % d
    ip, jp = qi // d, kj // d
    lg = (length - g + d - 1) // d
    kk = torch.where(lg < k, lg, k)  # the window, cut to the dilation group (only when shape=None)
    left = kk // 2
    right = kk - left - 1
    lead = (ip // s) * s + s // 2
    lead = torch.where(lead < lg - 1, lead, lg - 1)
    start = (lead - left).clamp(min=0) + torch.where(lead + right >= lg, lg - right - lead - 1, 0)
    full = (jp >= start) & (jp < start + kk)
    lead_c = (ip // s) * s + s - 1
    lead_c = torch.where(lead_c < lg - 1, lead_c, lg - 1)
    back = (jp >= (lead_c - kk + 1).clamp(min=0)) & (jp <= ip)
    if isinstance(causal, int):  # inside torch.compile the context's constants are Python ints
        return (kj % d == g) & (back if causal else full)
    return (kj % d == g) & torch.where(causal == 1, back, full)


def mask(p: NeighborhoodParams, ctx: MaskContext) -> MaskMod:
    shape = _grid.grid_of(p.method, p.shape, ctx.n_q, ctx.n_k)
    window, dilation, stride, causal = p.axes()
    strides = _grid.raster_strides(shape)
    # capped where larger values act alike (the window is cut to the group, a dilation >= L leaves groups
    # of one, a stride >= 2L makes one leader): keeps huge values inside the int32 range of ctx.const
    axes = [
        tuple(
            ctx.const(x)
            for x in (
                shape[a],
                strides[a],
                min(window[a], shape[a]),
                min(dilation[a], shape[a]),
                min(stride[a], 2 * shape[a] + 1),
                int(causal[a]),
            )
        )
        for a in range(len(shape))
    ]

    def neighborhood(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = ctx.causal_ok(ctx.distance(q_idx, kv_idx))
        for length, step, k, d, s, c in axes:
            ok = ok & _axis_ok((q_idx // step) % length, (kv_idx // step) % length, length, k, d, s, c)
        return ok

    return neighborhood


def axis_keys(i: int, length: int, k: int, d: int, s: int, causal: bool) -> list[int]:
    """The key coordinates query coordinate ``i`` sees along one axis (NATTEN's rule, written out)."""
    group = list(range(i % d, length, d))  # the positions of i's dilation group
    ip, lg = i // d, len(group)
    k = min(k, lg)
    if causal:
        leader = min(ip // s * s + s - 1, lg - 1)
        first, last = max(leader - k + 1, 0), ip
    else:
        leader = min(ip // s * s + s // 2, lg - 1)
        first = min(max(leader - k // 2, 0), lg - k)  # shifted inside the group, never cut
        last = first + k - 1
    return group[first : last + 1]


def index_mask(params: NeighborhoodParams, n_q: int, n_k: int, causal: bool) -> Tensor:
    """The (N, N) bool mask from :func:`axis_keys`, independently of :func:`mask`: per axis an (L, L)
    table of which key coordinate each query coordinate sees, ANDed over the axes of every token pair,
    and ``j <= i`` in raster order when ``causal``."""
    shape = _grid.grid_of(params.method, params.shape, n_q, n_k)
    window, dilation, stride, axis_causal = params.axes()
    coords = torch.tensor(list(itertools.product(*(range(n) for n in shape))), dtype=torch.int64).reshape(
        -1, len(shape)
    )
    out = torch.ones(n_q, n_k, dtype=torch.bool)
    for a, length in enumerate(shape):
        table = torch.zeros(length, length, dtype=torch.bool)
        for i in range(length):
            table[i, axis_keys(i, length, window[a], dilation[a], stride[a], axis_causal[a])] = True
        out &= table[coords[:, a][:, None], coords[:, a][None, :]]
    if causal:
        out &= torch.ones(n_q, n_k, dtype=torch.bool).tril()
    return out


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: NeighborhoodParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """Softmax attention of each token over its neighborhood: the keys ``j`` whose coordinates lie in the
    query's NATTEN window on every axis of ``shape`` (raster order; see the module docstring), and
    ``j <= i`` when ``causal``. Needs ``N_q == N_k == prod(shape)``."""
    m = mask_for(mask, params, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_attention(q, k, v, scale=scale, mask=m, upcast=upcast)


def _bench(n: int) -> list[dict[str, Any]]:
    side = 2 ** (math.isqrt(n).bit_length() - 1)  # a power of two near sqrt(n)
    sets: list[dict[str, Any]] = [{"window": max(3, n // 32)}]
    if n % side == 0:
        sets.append({"shape": (n // side, side), "window": max(3, side // 4)})
    return sets


SPEC = MethodSpec(
    name="neighborhood",
    family="static",
    paper="Neighborhood Attention Transformer (Hassani et al., 2023); Generalized Neighborhood Attention "
    "(NATTEN, github.com/SHI-Labs/NATTEN)",
    summary="NATTEN neighborhoods on a 1-D/2-D/3-D grid: window, dilation, stride, causal per axis",
    param_class=NeighborhoodParams,
    reference=reference,
    # the executor first: at 16K on the H100 (cb92118, benchmarks/results/h100-2026-11-24/neighborhoods/) it
    # ran the 2-D and 3-D neighborhoods 4.6-8.3x faster than FlexAttention with the same mask, forward and
    # forward + backward (the 1-D default was not timed)
    backends=EXECUTOR_FIRST,
    patterns=SELF_PATTERNS,
    mask=mask,
    index_mask=index_mask,
    # 1-D only: the registry's parity lengths (1, 17, 63, 257, 1000, ...) share no 2-D grid; the 2-D and
    # 3-D parity cases are in tests/test_structured.py
    test_params=({"window": 5, "dilation": 2}, {"window": 4, "stride": 2, "axis_causal": True}),
    bench_params=_bench,
)
