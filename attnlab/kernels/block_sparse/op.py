"""Launchers, autotune configs and the ``torch.library`` custom ops of the block-sparse executor.

``block_sparse_attention(q, k, v, tables, scale, causal) -> (out, lse)`` is differentiable in q, k, v
(through out and through lse: d lse_i / d s_ij = P_ij, so the lse's gradient enters the backward as
Delta - dlse) and opaque to ``torch.compile`` (``attnlab::block_sparse_fwd`` / ``attnlab::block_sparse_bwd``
with fake rules). ``tables`` are the 13 tensors of :meth:`attnlab.plans.executor.ExecutorTables.as_args`
(the kernels never see a Plan); they say which lengths and causality they were built for
(``n_q``, ``n_k``, ``causal``), which the launchers check against q, k and the call.

Packed sequences (FlashAttention's varlen layout) run through :func:`block_sparse_attention` too: their
block-diagonal plan is built on the plan side, in :func:`attnlab.backends.varlen.block_sparse_varlen`.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from attnlab.kernels.block_sparse import COLUMNS_MIN_WIDTH
from attnlab.kernels.block_sparse.bwd import (
    block_sparse_bwd_delta_kernel,
    block_sparse_bwd_dkdv_kernel,
    block_sparse_bwd_dq_kernel,
)
from attnlab.kernels.block_sparse.dq_reduce import block_sparse_dq_finish_kernel
from attnlab.kernels.block_sparse.fwd import block_sparse_fwd_kernel
from attnlab.kernels.triton_utils import (
    descriptor_scratch,
    fp32_tiles,
    head_block,
    interpreting,
    tma_copyable,
)

#: Whether this module was imported under TRITON_INTERPRET=1 (its kernels then take CPU tensors only).
IMPORTED_INTERPRETED = interpreting()

#: Forward / backward candidates (BLOCK_M, BLOCK_N, warps, stages); a config runs only where BLOCK_M divides
#: the plan's query tile and BLOCK_N its key tile. Under the interpreter one small config.
#: Forward: (BLOCK_M, BLOCK_N, warps, stages[, SPLIT]) (SPLIT 2: two row halves, see the kernel; default 1).
FWD_SHAPES = [
    (128, 64, 4, 2, 2),  # first (autotuning off): with the 3-stage split, the fastest on the H100 (ecbaacd)
    (128, 64, 4, 3, 2),
    (128, 64, 4, 3),
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (64, 32, 4, 2),
    (32, 32, 4, 2),
    (16, 16, 2, 2),
    (32, 32, 8, 2),  # float32 on a GPU (triton_utils.FP32_SHAPE)
]
#: Backward: the same form. The kernels take SPLIT = 2 (the program's own tile, query rows for dQ and key rows
#: for dK/dV, as two halves), but no candidate uses it: compiled for sm_90 offline (Triton 3.6, D=128) the split
#: 128-row tiles take all 255 registers and spill 328-1,720 bytes per thread (the plain candidates 0-976),
#: and on the H100 they ran slower (benchmarks/results/h100-2026-11-24-s17/block_sparse_split/NOTES.md).
DQ_SHAPES = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 2, 2),
             (32, 32, 8, 2)]  # fmt: skip
DKDV_SHAPES = [
    (64, 128, 8, 2),
    (64, 64, 4, 3),
    (32, 128, 4, 3),
    (32, 64, 4, 2),
    (32, 32, 4, 2),
    (16, 16, 2, 2),
    (32, 32, 8, 2),
]
#: The one-pass backward (the dK/dV kernel with FUSED_DQ: each tile pair's scores computed once and dQ added
#: into a float32 buffer, ``dq_reduce.py``) for plans without token columns: the default when True
#: (``fused=`` per call). Off: on the H100 at 32K it was not faster than the two kernels (5-8% slower on random
#: plans, 3-4% faster on a sliding window; benchmarks/results/h100-2026-11-25-s18/fused_bwd/NOTES.md).
FUSED_BWD = False
INTERPRETED_SHAPE = (16, 16, 1, 1)
#: Row offsets (row times row stride, plus D) from this on make the backward's loops compute them in int64.
ROW_OFFSET_LIMIT = 2**31
#: Tiles of a plan the kernels take: powers of two from 16 to 256 (both sides).
TILE_SIZES = (16, 32, 64, 128, 256)


def _configs(shapes: list[tuple[int, ...]], split: bool = False) -> list[triton.Config]:
    """Configs of (BLOCK_M, BLOCK_N, warps, stages[, SPLIT]) shapes; ``split``: the kernel takes SPLIT."""
    if IMPORTED_INTERPRETED:
        shapes = [INTERPRETED_SHAPE]
    configs = []
    for m, n, w, s, *rest in shapes:
        kw = {"BLOCK_M": m, "BLOCK_N": n} | ({"SPLIT": rest[0] if rest else 1} if split else {})
        configs.append(triton.Config(kw, num_warps=w, num_stages=s))
    return configs


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Configs whose tiles divide the plan's tiles (and, in fp32, only
    :data:`attnlab.kernels.triton_utils.FP32_SHAPE`: larger tiles spill)."""
    args = {**named_args, **kwargs}
    bq, bk = int(args["BLOCK_Q"]), int(args["BLOCK_K"])  # type: ignore[call-overload]
    ok = [c for c in configs if bq % c.kwargs["BLOCK_M"] == 0 and bk % c.kwargs["BLOCK_N"] == 0]
    if args.get("FUSED_DQ"):  # the one-pass dK/dV kernel takes whole key tiles only
        ok = [c for c in ok if c.kwargs.get("SPLIT", 1) == 1]
    if args.get("DOT_PREC") == "ieee":
        ok = fp32_tiles(ok) if ok else ok
    if not ok:
        raise ValueError(f"no executor tile divides the plan's ({bq} x {bk}) tiles; plans take {TILE_SIZES}")
    return ok


_KEY = ["HEAD_D", "DOT_PREC", "BLOCK_Q", "BLOCK_K", "PLAN_B"]


def _tuned(kernel, shapes, reset=None, split=False, key=()):  # type: ignore[no-untyped-def]
    """(autotuned, first-fitting-config) launchers of one kernel; ``key``: autotuning key names besides
    ``_KEY``."""
    configs = _configs(shapes, split)
    prune = {"early_config_prune": _prune}
    tuned = triton.autotune(configs, key=[*_KEY, *key], prune_configs_by=prune, reset_to_zero=reset)(kernel)
    return tuned, _FirstFit(kernel, configs)


class _FirstFit:
    """``launcher[grid](*args, **kwargs)`` runs ``kernel`` with the first config that :func:`_prune` keeps
    for the call (autotuning off) and that fits the device: a config the compiler refuses for its resources
    (shared memory, e.g. D > 128 in 16-bit) is skipped, and the skip is remembered per (tiles, precision,
    head block, one-pass form, columns, dtype). Not a Triton autotuner: Triton 3.6's benchmarks even a single pruned config once per
    new key (kernel runs the caller did not ask for, and a hazard inside a CUDA-graph capture)."""

    def __init__(self, kernel, configs: list[triton.Config]) -> None:  # type: ignore[no-untyped-def]
        self.kernel = self.fn = kernel  # (``fn``: the name Triton's autotuner gives its kernel)
        self.configs = configs
        self.skipped: dict[tuple, int] = {}

    def config_for(self, **kwargs: object) -> triton.Config:
        return _prune(self.configs, {}, **kwargs)[0]

    def __getitem__(self, grid):  # type: ignore[no-untyped-def]
        def launch(*args: object, **kwargs: object) -> object:
            from triton.runtime.errors import OutOfResources

            kept = _prune(self.configs, {}, **kwargs)
            key = (
                *(
                    kwargs.get(n)
                    for n in ("BLOCK_Q", "BLOCK_K", "DOT_PREC", "BLOCK_D", "FUSED_DQ", "HAS_COLS")
                ),
                str(getattr(args[0], "dtype", "")),
            )
            for i in range(self.skipped.get(key, 0), len(kept)):
                meta = kept[i].all_kwargs()
                try:
                    return self.kernel[grid(meta) if callable(grid) else grid](*args, **kwargs, **meta)
                except OutOfResources:
                    if i == len(kept) - 1:
                        raise
                    self.skipped[key] = i + 1
            raise RuntimeError("unreachable: _prune keeps at least one config")

        return launch


_FWD = _tuned(block_sparse_fwd_kernel, FWD_SHAPES, split=True)
_FWD_ANY = block_sparse_fwd_kernel  # launched with an explicit config
_DQ = _tuned(block_sparse_bwd_dq_kernel, DQ_SHAPES, reset=["DKC", "DVC"], split=True, key=["HAS_COLS"])
_DKDV = _tuned(
    block_sparse_bwd_dkdv_kernel, DKDV_SHAPES, reset=["DQA"], split=True, key=["FUSED_DQ", "DQ_TMA"]
)
_DQ_ANY = block_sparse_bwd_dq_kernel  # launched with an explicit config
_DKDV_ANY = block_sparse_bwd_dkdv_kernel


def _explicit(config: triton.Config) -> dict:
    """An explicit config's launch arguments (SPLIT 1 unless it says otherwise)."""
    return {"SPLIT": 1, **config.all_kwargs()}


def _pick(variants):  # type: ignore[no-untyped-def]
    from attnlab.settings import settings

    return variants[0] if settings.autotune else variants[1]


def _flags(q: Tensor) -> dict:
    return {
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        "UPCAST": IMPORTED_INTERPRETED and q.dtype == torch.bfloat16,
        "EVEN_D": q.shape[-1] == head_block(q.shape[-1]),
    }


#: The forward moves K/V tiles with tensor descriptors (TMA) where it can, and the one-pass backward adds its dQ
#: tiles by descriptor reductions; False forces pointer loads and element-wise atomics.
USE_TMA = True


def _tma_ready(*ts: Tensor) -> bool:
    """Whether the kernels move these tensors' tiles by tensor descriptors (TMA): allowed (``USE_TMA``) and
    possible (:func:`attnlab.kernels.triton_utils.tma_copyable`)."""
    return USE_TMA and tma_copyable(*ts, interpreted=IMPORTED_INTERPRETED)


def _check_built_for(tables: object, q: Tensor, k: Tensor, causal: bool) -> None:
    """Refuses tables built for other lengths or another causality than q, k and the call's ``causal``.

    Tables from :meth:`attnlab.plans.executor.ExecutorTables.as_args` carry the plan's ``n_q``, ``n_k`` and
    ``causal`` (host ints: no device read); the tile counts alone (:func:`_checked`) let a plan for N = 40
    run on q / k of 45 (the same count of 16-tiles) with the last tiles' patterns of the other length.
    Tables without them (a plain tuple or list, e.g. the custom op's own list) are not checked here."""
    n_q, n_k, plan_causal = (getattr(tables, name, None) for name in ("n_q", "n_k", "causal"))
    if n_q is None or n_k is None or plan_causal is None or q.dim() != 4 or k.dim() != 4:
        return  # (other dims: :func:`_checked` says what is wrong)
    if (n_q, n_k) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"the executor's tables were built for N_q = {n_q}, N_k = {n_k}; q / k have N_q = {q.shape[2]}, "
            f"N_k = {k.shape[2]}: build the plan (and its tables) for these lengths"
        )
    if bool(plan_causal) != bool(causal):
        raise ValueError(
            f"the executor's tables were built for a plan with causal={bool(plan_causal)}; the call has "
            f"causal={bool(causal)}: launch with the plan's causality"
        )


def _checked(q: Tensor, k: Tensor, v: Tensor, tables: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with a unit last stride, after checking the tables against them."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"the executor takes (B, H, N, D) q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")  # fmt: skip
    if len(tables) != 13:
        raise ValueError(f"the executor takes the 13 tables of ExecutorTables.as_args(), got {len(tables)}")
    p_num, patterns = tables[0], tables[12]
    bp, hp, nqb = p_num.shape
    bq, bk = patterns.shape[1:]
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or h % k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v need q's batch, the same "
            "(B, H_kv, N_k), and H a multiple of H_kv"
        )
    if bq not in TILE_SIZES or bk not in TILE_SIZES:
        raise ValueError(f"the plan's tiles are {bq} x {bk}; the executor takes tiles of {TILE_SIZES}")
    if bp not in (1, b) or hp == 0 or h % hp or (hp != 1 and hp != h and hp != k.shape[1]):
        raise ValueError(
            f"the plan is for (batch, heads) = ({bp}, {hp}); q has (B, H) = ({b}, {h}) and k H_kv = "
            f"{k.shape[1]}: a plan's batch is 1 or B and its heads 1, H_kv or H"
        )
    if nqb != -(-n_q // bq) or tables[7].shape[2] != -(-n_k // bk):
        raise ValueError(
            f"the plan has {nqb} query tiles x {tables[7].shape[2]} key tiles of {bq} x {bk}; q/k have "
            f"N_q = {n_q}, N_k = {n_k}, which need {-(-n_q // bq)} x {-(-n_k // bk)}"
        )
    wrong = [i for i, t in enumerate(tables) if t.device != q.device]
    if wrong:
        raise ValueError(
            f"the plan's tables are on {tables[wrong[0]].device}, q is on {q.device}: build the plan on q's device"
        )
    if v.shape[-1] != d:
        raise ValueError(f"the executor needs D_v == D, got D = {d}, D_v = {v.shape[-1]}")
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # type: ignore[return-value]


def block_sparse_fwd_launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tables: tuple[Tensor, ...],
    scale: float,
    causal: bool,
    config: triton.Config | None = None,
) -> tuple[Tensor, Tensor]:
    """(O (B, H, N_q, D) in q's dtype, lse (B, H, N_q) float32) of softmax attention over the tables' pairs.

    q (B, H, N_q, D); k, v (B, H_kv, N_k, D). ``config`` (BLOCK_M, BLOCK_N, warps, stages, and SPLIT: 2
    for two row halves, 1 if absent) bypasses the autotuner (tests, benchmarks)."""
    _check_built_for(tables, q, k, causal)
    q, k, v = _checked(q, k, v, tables)
    b, h, n_q = q.shape[:3]
    o = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    kernel, meta = (_pick(_FWD), {}) if config is None else (_FWD_ANY, _explicit(config))
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)
    with descriptor_scratch(q.device):
        _launch_fwd(kernel, grid, meta, q, k, v, o, lse, tables, scale, causal, _tma_ready(k, v))
    return o, lse


def _launch_fwd(kernel, grid, meta, q, k, v, o, lse, tables, scale, causal, tma):  # type: ignore[no-untyped-def]
    p_num, p_idx, p_pat, f_num, f_idx, c_num, c_idx, *_, patterns = tables
    h, n_q, d = q.shape[1:]
    h_kv, n_k = k.shape[1], k.shape[2]
    bp, hp = p_num.shape[:2]
    kernel[grid](
        q, k, v, o, lse,
        p_num, p_idx, p_pat, f_num, f_idx, c_num, c_idx, patterns,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        p_num.shape[2], p_idx.shape[3], f_num.shape[2], f_idx.shape[3], c_num.shape[2], c_idx.shape[3],
        h, h // h_kv, n_q, n_k, n_k - n_q, d, scale * 1.4426950408889634, hp, h // hp,
        PLAN_B=bp, BLOCK_Q=patterns.shape[1], BLOCK_K=patterns.shape[2], BLOCK_D=head_block(d),
        CAUSAL=causal, EVEN_M=n_q % patterns.shape[1] == 0, TMA=tma, HAS_COLS=c_idx.shape[-1] >= COLUMNS_MIN_WIDTH, **_flags(q),
        **meta,
    )  # fmt: skip


def block_sparse_bwd_launch(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    tables: tuple[Tensor, ...],
    scale: float,
    causal: bool,
    dq_config: triton.Config | None = None,
    dkdv_config: triton.Config | None = None,
    fused: bool | None = None,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dQ, dK, dV) of :func:`block_sparse_fwd_launch`; dK/dV summed over each GQA group. ``dq_config`` /
    ``dkdv_config`` (BLOCK_M, BLOCK_N, warps, stages, and SPLIT, 1 if absent) bypass the autotuner (tests,
    benchmarks). ``fused`` (default :data:`FUSED_BWD`): the one-pass backward for plans without token columns
    (the dK/dV kernel adds dQ too; ``dq_config`` unused, ``dkdv_config`` without SPLIT = 2). ``dlse``
    (B, H, N_q): the gradient of the returned lse, None for none; d lse_i / d s_ij = P_ij, so it enters as
    Delta - dlse (dS = P (dO V^T - Delta + dlse)) on every path: both kernels, the token columns, the
    one-pass backward, the split tiles (rows without keys have P = 0: no contribution)."""
    _check_built_for(tables, q, k, causal)
    q, k, v = _checked(q, k, v, tables)
    do = do if do.stride(-1) == 1 else do.contiguous()
    o = o if o.stride(-1) == 1 else o.contiguous()
    p_num, p_idx, p_pat, f_num, f_idx, c_num, c_idx, tp_num, tp_idx, tp_pat, tf_num, tf_idx, patterns = tables
    b, h, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    bp, hp = p_num.shape[:2]
    delta = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    block = 16 if IMPORTED_INTERPRETED else 64
    block_sparse_bwd_delta_kernel[(triton.cdiv(n_q, block), b * h)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), h, n_q,
        d, BLOCK_M=block, BLOCK_D=head_block(d),
    )  # fmt: skip
    if dlse is not None:  # d lse_i / d s_ij = P_ij: the lse's gradient is Delta's, with the opposite sign
        if dlse.shape != (b, h, n_q):
            raise ValueError(f"dlse has shape {tuple(dlse.shape)}; the lse's is {(b, h, n_q)}")
        delta = (delta - dlse.float()).contiguous()
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    has_cols = c_idx.shape[-1] >= COLUMNS_MIN_WIDTH  # the tables' convention (ExecutorTables.has_columns)
    common = dict(
        PLAN_B=bp, BLOCK_Q=patterns.shape[1], BLOCK_K=patterns.shape[2], BLOCK_D=head_block(d), **_flags(q)
    )
    scalars = (n_q, n_k, n_k - n_q, d, scale * 1.4426950408889634, scale, hp, h // hp)
    # int64 row offsets in the loops only where q's or dO's could pass 2^31 (a view's row stride times N)
    common["WIDE"] = any((t.shape[2] - 1) * t.stride(2) + t.shape[3] >= ROW_OFFSET_LIMIT for t in (q, do))
    one_pass = bool(FUSED_BWD if fused is None else fused) and not has_cols
    # the columns' dK/dV (atomics) and the one-pass dQ go to their own fp32 buffers, which the autotuner
    # zeroes before each timed config; unused, they are 1-element placeholders the kernels never touch
    size = (b, h_kv, n_k, d) if has_cols else (1,)
    dkc = torch.zeros(size, dtype=torch.float32, device=q.device)
    dvc = torch.zeros_like(dkc)
    dqa = torch.zeros((b * h, n_q, d) if one_pass else (1,), dtype=torch.float32, device=q.device)
    dkdv, dkdv_meta = (_pick(_DKDV), {}) if dkdv_config is None else (_DKDV_ANY, _explicit(dkdv_config))
    dq_kernel, dq_meta = (_pick(_DQ), {}) if dq_config is None else (_DQ_ANY, _explicit(dq_config))
    with descriptor_scratch(q.device):
        dkdv[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), b * h_kv)](
            q, k, v, do, lse, delta, dk, dv, dqa,
            tp_num, tp_idx, tp_pat, tf_num, tf_idx, patterns,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            tp_num.shape[2], tp_idx.shape[3], tf_num.shape[2], tf_idx.shape[3],
            h_kv, h // h_kv, *scalars, **common, FUSED_DQ=one_pass, DQ_TMA=one_pass and _dq_tma_ready(q),
            **dkdv_meta,
        )  # fmt: skip
    if one_pass:
        block_sparse_dq_finish_kernel[(triton.cdiv(n_q, block), b * h)](
            dqa, dq, dq.stride(0), dq.stride(1), dq.stride(2), h, n_q, d, scale, BLOCK_M=block,
            BLOCK_D=head_block(d), UPCAST=common["UPCAST"],
        )  # fmt: skip
        return dq, dk, dv
    dq_kernel[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)](
        q, k, v, do, lse, delta, dq, dkc, dvc,
        p_num, p_idx, p_pat, f_num, f_idx, c_num, c_idx, patterns,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        p_num.shape[2], p_idx.shape[3], f_num.shape[2], f_idx.shape[3], c_num.shape[2], c_idx.shape[3],
        h, h // h_kv, *scalars, CAUSAL=causal, HAS_COLS=has_cols, **common, **dq_meta,
    )  # fmt: skip
    if has_cols:
        dk = (dk.float() + dkc).to(k.dtype)
        dv = (dv.float() + dvc).to(v.dtype)
    return dq, dk, dv


def _dq_tma_ready(q: Tensor) -> bool:
    """Whether the one-pass backward adds dQ tiles by tensor-descriptor reductions: where the forward's tiles
    move by descriptors (:func:`_tma_ready`: ``USE_TMA``, compute capability 9+, 16-bit inputs, D <= 128,
    aligned), on a GPU, with a head dim that is its own tile width (the float32 buffer's rows are then
    16-byte multiples)."""
    d = q.shape[-1]
    return _tma_ready(q) and q.is_cuda and d == head_block(d)


@torch.library.custom_op("attnlab::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(
    q: Tensor, k: Tensor, v: Tensor, tables: list[Tensor], scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    return block_sparse_fwd_launch(q, k, v, tuple(tables), scale, causal)


@block_sparse_fwd.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, tables: list[Tensor], scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    q = q if q.stride(-1) == 1 else q.contiguous()
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attnlab::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    tables: list[Tensor],
    scale: float,
    causal: bool,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return block_sparse_bwd_launch(do, q, k, v, o, lse, tuple(tables), scale, causal, dlse=dlse)


@block_sparse_bwd.register_fake
def _(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    tables: list[Tensor],
    scale: float,
    causal: bool,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = (torch.empty_like(t if t.stride(-1) == 1 else t.contiguous()) for t in (q, k, v))
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, tables, scale, causal = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, *tables)
    ctx.args = (scale, causal)
    # an output the loss does not use gets None, not zeros (no Delta - 0 for the common out-only loss)
    ctx.set_materialize_grads(False)


def _backward(ctx, do: Tensor | None, dlse: Tensor | None):  # type: ignore[no-untyped-def]
    q, k, v, o, lse, *tables = ctx.saved_tensors
    if do is None:  # a loss of the lse alone
        do = torch.zeros_like(o)
    dq, dk, dv = block_sparse_bwd(do, q, k, v, o, lse, list(tables), *ctx.args, dlse)
    return dq, dk, dv, [None] * len(tables), None, None


block_sparse_fwd.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, tables: tuple[Tensor, ...], scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """Softmax attention over the pairs of a plan's executor tables: (out (B, H, N_q, D), lse (B, H, N_q)),
    differentiable in q, k, v (through out and lse). Tables that say what they were built for
    (:meth:`~attnlab.plans.executor.ExecutorTables.as_args`) are checked against q, k and ``causal``."""
    _check_built_for(tables, q, k, causal)
    return block_sparse_fwd(q, k, v, list(tables), float(scale), bool(causal))
