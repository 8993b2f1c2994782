"""``vertical_slash`` (MInference): key columns ("vertical") and diagonals ("slash") estimated from the last
queries, run as token columns plus tiles on the block-sparse executor. Causal prefill only.

Estimator, per batch and query head (fp32)::

    A = softmax(scale * q[-last_q:] k^T) over the keys each of the last ``last_q`` queries may see
    vertical[j] = sum_r A[r, j]                 the first ``sink_columns`` keys always kept
    slash[o]    = sum_r A[r, p_r - o]           o = distance from the query's position p_r; the
                                                max(1, ``local_diagonals``) nearest always kept (the
                                                diagonal o = 0 even when local_diagonals = 0)
    keep the top ``vertical`` columns and the top ``slash`` distances (at most N_k each; MInference also
    raises budgets below 30 / 50 to those values, attnlab takes them as given)

Execution (what MInference's kernel computes): a kept distance o is covered at tile granularity, every
(block x block) tile the line ``key = position - o`` crosses inside a query block is visited, with the
causal rule inside diagonal tiles, so a slash line brings its tile-wide band; a kept column is visited as
one token by every query at or after it (``Plan.columns``), outside the tiles already visited. Positions
are bottom-right aligned (query ``i`` at ``i + N_k - N_q``).

The diagonal (distance 0) is always kept, as one of the ``slash`` distances (``slash`` >= 1), so a plan
never leaves a query that may see a key without one: with ``sink_columns = 0`` and ``local_diagonals = 0``
the top distances and columns alone could miss every key of some rows, whose output would then be zeros.
Every query keeps at least its own position's key (its local block), in the reference (the plan's dense
mask) and on every backend alike. With ``local_diagonals >= 1`` (MInference keeps 100) nothing changes:
``local_diagonals = 0`` reads as 1.

Defaults follow MInference's fallback config for a head without a searched pattern, (1000, 6096), its
``last_q = 64``, 30 sink columns and 100 local diagonals (literature card; MInference per-head configs
from an offline search are not shipped here: pass other budgets per call). Unlike MInference, batch > 1
and GQA (k/v not repeated: each query head estimates with its kv head) work, and the backward runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.backends.block_sparse import BLOCK_SPARSE
from attnlab.backends.sdpa import SdpaMaskBackend
from attnlab.errors import ParamError
from attnlab.params import Params
from attnlab.patterns import Pattern
from attnlab.plans import Plan
from attnlab.reference import masked_softmax_attention
from attnlab.registry import MethodSpec, register

BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class VerticalSlashParams(Params):
    """``vertical``: key columns kept, the sink columns included (>= max(1, sink_columns); default 1000);
    ``slash``: distances kept, the local diagonals included (>= max(1, local_diagonals); default 6096; the
    diagonal, distance 0, is always one of them, local_diagonals = 0 or not);
    ``last_q``: queries that estimate (default 64); ``block``: tile size of the slash bands (16-256,
    default 64 as in MInference); ``sink_columns`` (30) and ``local_diagonals`` (100) always kept."""

    method = "vertical_slash"
    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    block: int = 64
    sink_columns: int = 30
    local_diagonals: int = 100

    def validate(self) -> None:
        for name in ("vertical", "slash", "last_q"):
            self.check_int(name, minimum=1)
        for name in ("sink_columns", "local_diagonals"):
            self.check_int(name, minimum=0)
        self.check_int("block")
        if self.block not in BLOCKS:
            raise ParamError(f"vertical_slash: block={self.block!r}; the executor takes tiles of {BLOCKS}")
        for budget, forced in (("vertical", "sink_columns"), ("slash", "local_diagonals")):
            if getattr(self, budget) < getattr(self, forced):
                raise ParamError(
                    f"vertical_slash: {budget}={getattr(self, budget)} is below {forced}="
                    f"{getattr(self, forced)}: {budget} counts the always-kept {forced}, so it must be at "
                    f"least {forced} (else an arbitrary subset of them would be kept): raise {budget} or "
                    f"lower {forced}"
                )


def _last_probs(q: Tensor, k: Tensor, last_q: int, scale: float) -> tuple[Tensor, Tensor]:
    """(A (B, H, R, N_k) fp32 softmax of the last R queries over the keys they may see, their positions)."""
    h, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    r = min(last_q, n_q)
    kf = k.detach().float().repeat_interleave(h // k.shape[1], dim=1)
    s = (q[:, :, n_q - r :].detach().float() @ kf.transpose(-1, -2)) * scale
    pos = torch.arange(n_q - r, n_q, device=q.device) + (n_k - n_q)
    visible = torch.arange(n_k, device=q.device)[None, :] <= pos[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    a = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no visible key (N_q > N_k) adds nothing
    return a, pos


def estimate(q: Tensor, k: Tensor, params: VerticalSlashParams, *, causal: bool, scale: float) -> Plan:
    """The plan of ``params`` for q (B, H, N_q, D), k (B, H_kv, N_k, D) (see the module docstring)."""
    if not causal:
        raise ParamError("vertical_slash is a causal prefill method; call it with causal=True")
    b, h, n_q = q.shape[:3]
    n_k = k.shape[2]
    dev = q.device
    a, pos = _last_probs(q, k, params.last_q, scale)
    # vertical: column sums, sinks first
    vertical = a.sum(2)
    vertical[..., : params.sink_columns] = float("inf")
    n_v = min(n_k, params.vertical)
    cols = torch.topk(vertical, n_v, dim=-1).indices  # (B, H, V)
    # slash: sums along distances o = p_r - j
    o = torch.arange(n_k, device=dev)
    j = pos[:, None] - o[None, :]  # (R, N_k)
    valid = j >= 0
    slash = (torch.gather(a, 3, j.clamp_min(0).expand(b, h, -1, -1)) * valid).sum(2)  # (B, H, N_k)
    # the local diagonals, and always the diagonal itself (distance 0), within the budget (slash >= 1): no
    # query that may see a key is left without one (sink_columns = local_diagonals = 0 could select none)
    slash[..., : max(1, params.local_diagonals)] = float("inf")
    n_s = min(n_k, params.slash)
    dist = torch.topk(slash, n_s, dim=-1).indices  # (B, H, S) kept distances
    # a distance's band: in query block i (positions i*bs + off ...), key tiles j with j - i in
    # {floor((off - o) / bs), floor((off - o + bs - 1) / bs)} (off = N_k - N_q), the same for every i
    bs = params.block
    nqb, nkb = -(-n_q // bs), -(-n_k // bs)
    u = (n_k - n_q) - dist
    shift = nqb  # e = j - i ranges over [-(nqb - 1), nkb - 1]
    width = nqb + nkb
    diag = torch.zeros(
        b, h, width + 1, dtype=torch.bool, device=dev
    )  # the last slot takes what falls outside
    for e in (torch.div(u, bs, rounding_mode="floor"), torch.div(u + bs - 1, bs, rounding_mode="floor")):
        e = e + shift
        e = torch.where((e >= 0) & (e < width), e, width)
        diag.scatter_(2, e, True)
    diag = diag[..., :width]
    i = torch.arange(nqb, device=dev)[:, None]
    jj = torch.arange(nkb, device=dev)[None, :]
    tiles = diag[:, :, (jj - i + shift)]  # (B, H, NQB, NKB)
    q_first = torch.arange(nqb, device=dev) * bs + (n_k - n_q)
    q_last = torch.clamp((torch.arange(nqb, device=dev) + 1) * bs, max=n_q) - 1 + (n_k - n_q)
    k_first = torch.arange(nkb, device=dev) * bs
    k_last = torch.clamp(k_first + bs, max=n_k) - 1
    allowed = k_first[None, :] <= q_last[:, None]
    whole = k_last[None, :] <= q_first[:, None]
    tiles &= allowed
    offset = n_k - n_q

    def mask_mod(bi: Tensor, hi: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx + offset

    columns = torch.sort(cols, dim=-1).values.to(torch.int32)[:, :, None, :].expand(b, h, nqb, n_v)
    return Plan(n_q, n_k, True, bs, bs, tiles & whole, tiles & ~whole, mask_mod, kind="dynamic",
                columns=columns, rule="causal")  # fmt: skip


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: VerticalSlashParams,
    *,
    causal: bool,
    scale: float,
    upcast: bool = True,
) -> Tensor:
    """Softmax attention over the pairs of :func:`estimate`'s plan (dense, from its token mask; the diagonal
    always among them, so only a query before every key, N_q > N_k, gives zeros)."""
    mask = estimate(q, k, params, causal=causal, scale=scale).dense_mask()
    return masked_softmax_attention(q, k, v, scale=scale, mask=mask, upcast=upcast)


def _bench(n: int) -> list[dict[str, int]]:
    """Budgets growing with n, at least the default sink columns (30) and local diagonals (100) they
    count, then MInference's fallback (1000, 6096)."""
    return [{"vertical": max(30, n // 64), "slash": max(100, n // 16)}, {"vertical": 1000, "slash": 6096}]


SPEC = register(
    MethodSpec(
        name="vertical_slash",
        family="dynamic",
        paper="MInference 1.0 (Jiang et al., 2024)",
        summary="MInference's vertical (key columns) + slash (diagonals) pattern from the last queries",
        param_class=VerticalSlashParams,
        reference=reference,
        backends=(BLOCK_SPARSE, SdpaMaskBackend()),
        patterns=frozenset({Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS}),
        estimate=estimate,
        test_params=(
            {"vertical": 3, "slash": 4, "last_q": 8, "block": 16, "sink_columns": 2, "local_diagonals": 3},
            {"vertical": 5, "slash": 2, "last_q": 4, "block": 16, "sink_columns": 0, "local_diagonals": 0},
        ),
        bench_params=_bench,
    )
)
