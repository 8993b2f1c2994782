"""Choose a stratified sample of test_parity's CUDA cases for a time-limited GPU run.

On a GPU, ``tests/test_parity.py`` collects every CUDA case of every method and backend (about 4700);
one device call cannot run them all. This script lists, for each (method, backend), up to ``--per-pair``
cases that together cover as many distinct case features as possible (pattern, GQA ratio, lengths, head
dim, dtype, parameters, optional inputs), leaving out test ids given in ``--skip`` files (cases that
already ran on a GPU). Pairs are interleaved round-robin, so a run stopped by its time limit has covered
every pair once before it covers any pair twice. Writes pytest node ids, one per line (``pytest
@ids.txt`` reads them).

    python benchmarks/gpu/parity_sample.py --per-pair 6 --skip ran.txt --out ids.txt
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from attnlab.testing import Case, parity_cases

NODE = "tests/test_parity.py::test_backend_matches_reference"


def node_id(method: str, backend: str, case: Case) -> str:
    return f"{NODE}[{method}-{backend}-{case.label()}]"


def features(case: Case) -> set[str]:
    """The values a case is made of, each a separate feature to cover."""
    return {
        f"pattern={case.pattern.value}",
        f"group={case.heads // case.kv_heads}",
        f"n={case.n_q}x{case.n_k}",
        f"d={case.head_dim}",
        f"dtype={case.dtype}",
        f"params={sorted(case.params.items())}",
        f"inputs={bool(case.optional_inputs)}",
    }


def pick(cases: list[Case], k: int) -> list[Case]:
    """Greedy: each pick adds the most features not covered yet (ties: the earlier case)."""
    chosen: list[Case] = []
    covered: set[str] = set()
    left = list(cases)
    while left and len(chosen) < k:
        best = max(range(len(left)), key=lambda i: (len(features(left[i]) - covered), -i))
        case = left.pop(best)
        covered |= features(case)
        chosen.append(case)
    return chosen


def sample(per_pair: int, skip: set[str]) -> list[str]:
    pairs: dict[tuple[str, str], list[Case]] = collections.defaultdict(list)
    for method, backend, case in parity_cases(True):
        if node_id(method, backend, case) not in skip:
            pairs[(method, backend)].append(case)
    picked = {pair: pick(cases, per_pair) for pair, cases in pairs.items()}
    ids: list[str] = []
    for rank in range(per_pair):  # round-robin over the pairs
        for (method, backend), cases in picked.items():
            if rank < len(cases):
                ids.append(node_id(method, backend, cases[rank]))
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-pair", type=int, default=6)
    ap.add_argument("--skip", type=Path, nargs="*", default=[], help="files of test ids that already ran")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    skip = {line.strip() for f in args.skip for line in f.read_text().splitlines() if line.strip()}
    ids = sample(args.per_pair, skip)
    args.out.write_text("\n".join(ids) + "\n")
    print(f"{len(ids)} test ids ({len(skip)} skipped as already run) -> {args.out}")


if __name__ == "__main__":
    main()
