"""What a benchmark run measures. ``BenchConfig.preset(device)`` gives the defaults of ``attnlab bench``."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from attnlab.bench.host import MALLOC_POLICIES
from attnlab.patterns import Pattern

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "fwd_bwd")
BUDGETS = ("first", "all")
WORKLOADS = ("minilm", "organism", "random")
#: ``attnlab bench`` on a CPU times these by default (one or two per family, so that the main job fits a
#: 2-core machine in minutes); ``--methods all`` times every registered method, as the CUDA preset does.
CPU_METHODS: tuple[str, ...] = (
    "softmax",
    "sigmoid",
    "sliding_window",
    "streaming",
    "block_topk",
    "vertical_slash",
    "softcap",
    "gla",
)


#: the timing passes of a CPU run by default (``BenchConfig.processes`` = 0; :mod:`attnlab.bench.passes`)
CPU_TIMING_PROCESSES = 7


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run.

    Efficiency is timed at each length in ``lengths`` for each pattern and mode: self patterns use
    N_q = N_k = n; cross patterns use N_q = n // 4 queries over N_k = n keys (chunked prefill).
    ``budgets``: "all" times every parameter set a method's ``bench_params(n)`` gives, "first" one.
    Every row is timed in interleaved rounds with the dense baseline (see :mod:`attnlab.bench.efficiency`).
    Fidelity runs on ``workloads`` ("minilm": Q/K/V captured from the MiniLM encoder, for non-causal rows;
    "organism": from the small organism, a causal LM, for causal rows, at ``fidelity_length`` tokens;
    "random" at ``fidelity_length`` tokens), with the same ``budgets`` as the speed sweep.
    """

    device: str = "cpu"
    lengths: tuple[int, ...] = (512, 1024, 2048)
    methods: tuple[str, ...] | None = None
    patterns: tuple[Pattern, ...] = (Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF)
    modes: tuple[str, ...] = MODES
    dtype: str = "float32"
    batch: int = 1
    heads: int = 4
    kv_heads: int | None = None
    head_dim: int = 64
    budgets: str = "first"
    peers: bool = True
    efficiency: bool = True
    fidelity: bool = True
    workloads: tuple[str, ...] = ("minilm", "organism", "random")
    fidelity_length: int = 1024
    fidelity_heads: int = 4
    #: seconds of timed rounds to aim for per row (at least ``timing.MIN_REPS`` rounds, at most ``max_reps``)
    target_s: float = 0.3
    max_reps: int = 30
    #: the C allocator while the CPU efficiency rows are warmed and timed: "keep" (glibc keeps freed memory
    #: in the process, so that a warmed call does not page-fault: :func:`attnlab.bench.host.kept_freed_memory`)
    #: or "default" (glibc's own policy, whose page faults depend on what the process ran before);
    #: ``ATTNLAB_BENCH_MALLOC`` in the environment sets the default
    malloc: str = field(default_factory=lambda: os.environ.get("ATTNLAB_BENCH_MALLOC", "keep"))
    #: how many times a CPU row timed while other processes took the machine is timed again (0: never;
    #: :mod:`attnlab.bench.efficiency`); ``ATTNLAB_BENCH_RETIMES`` in the environment sets the default (the
    #: test suite sets 0: its parallel workers always share the machine)
    retimes: int = field(default_factory=lambda: int(os.environ.get("ATTNLAB_BENCH_RETIMES", "2")))
    #: processes the timing phase runs in, one after another (:mod:`attnlab.bench.passes`): 0 means 7 on a
    #: CPU (where one process's or one period's level moved rows by 10-30%: with 3, two odd passes of a row
    #: still moved its median in 1-12 rows of 108 between two runs) and 1 on CUDA;
    #: ``ATTNLAB_BENCH_PROCESSES`` in the environment sets the default (the test suite sets 1)
    processes: int = field(default_factory=lambda: int(os.environ.get("ATTNLAB_BENCH_PROCESSES", "0")))
    seed: int = 0
    out: Path = field(default_factory=lambda: Path("attnlab-results"))

    def __post_init__(self) -> None:
        bad_modes = [m for m in self.modes if m not in MODES]
        if bad_modes or not self.modes:
            raise ValueError(f"modes={','.join(self.modes)}: expected some of {', '.join(MODES)}")
        if self.budgets not in BUDGETS:
            raise ValueError(f"budgets={self.budgets!r}: expected one of {', '.join(BUDGETS)}")
        bad_workloads = [w for w in self.workloads if w not in WORKLOADS]
        if bad_workloads:
            raise ValueError(f"workloads={','.join(self.workloads)}: expected some of {', '.join(WORKLOADS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise ValueError(f"lengths={self.lengths}: expected positive token counts")
        for name in ("batch", "heads", "head_dim", "fidelity_length", "fidelity_heads", "max_reps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive int")
        if self.kv_heads is not None and (self.kv_heads <= 0 or self.heads % self.kv_heads):
            raise ValueError(f"kv_heads={self.kv_heads}: expected a positive divisor of heads={self.heads}")
        if self.malloc not in MALLOC_POLICIES:
            raise ValueError(f"malloc={self.malloc!r}: expected one of {', '.join(MALLOC_POLICIES)}")
        if self.retimes < 0:
            raise ValueError(f"retimes={self.retimes}: expected an int >= 0")
        if self.processes < 0:
            raise ValueError(f"processes={self.processes}: expected an int >= 0 (0: 3 on a CPU, 1 on CUDA)")

    @staticmethod
    def preset(device: str) -> BenchConfig:
        """Defaults: CPU fits a 2-core machine in minutes; CUDA is the H100 protocol (bf16, D=128, H=32)."""
        if device.startswith("cuda"):
            return BenchConfig(
                device=device,
                lengths=(4096, 8192, 16384, 32768, 65536),
                dtype="bfloat16",
                heads=32,
                head_dim=128,
                budgets="all",
                fidelity_length=4096,
                fidelity_heads=8,
                target_s=0.5,
                max_reps=30,
            )
        return BenchConfig(device=device, methods=CPU_METHODS)

    def with_(self, **changes: Any) -> BenchConfig:
        """These changes, leaving a field as it is where its change is None; ``methods=("all",)`` means
        every registered method."""
        cfg = replace(self, **{k: v for k, v in changes.items() if v is not None})
        return replace(cfg, methods=None) if cfg.methods == ("all",) else cfg

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def timing_processes(self) -> int:
        """Processes the timing phase runs in (``processes``, with 0 resolved for the device)."""
        if self.processes:
            return self.processes
        return CPU_TIMING_PROCESSES if self.torch_device.type == "cpu" else 1

    @staticmethod
    def from_json(d: dict[str, Any]) -> BenchConfig:
        """The config :meth:`as_json` wrote."""
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return BenchConfig(
            **{**d, **tuples, "patterns": tuple(Pattern(p) for p in d["patterns"]), "out": Path(d["out"])}
        )

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["patterns"] = [p.value for p in self.patterns]
        d["out"] = str(self.out)
        return d


def shapes(pattern: Pattern, n: int) -> tuple[int, int]:
    """(N_q, N_k) of a benchmark point at length n."""
    return (max(1, n // 4), n) if pattern.cross else (n, n)
