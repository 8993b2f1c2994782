"""benchmarks/summarize.py on the committed results: sources named per table or per cell, the control row
in every table, the merge key with the shape, recall n/a without a plan, and no README write by default."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "benchmarks/results/h100-2026-11-22"


@pytest.fixture(scope="module")
def summarize() -> ModuleType:
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks/summarize.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["summarize"] = module
    spec.loader.exec_module(module)
    return module


def _tables(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(the paragraph above, rows) of every Markdown table."""
    out, rows, above = [], [], ""
    for line in lines:
        if line.startswith("|"):
            rows.append(line)
            continue
        if rows:
            out.append((above, rows))
            rows = []
        if line.strip():
            above = line
    return out


def test_every_table_names_its_run_or_tags_every_cell(summarize: ModuleType) -> None:
    lines = summarize.summary(H100)
    text = "\n".join(lines)
    tables = _tables(lines)
    assert len(tables) >= 5
    for i, (above, rows) in enumerate(tables):
        if "|---" not in rows[1] or "sigmoid_kernel" in above:
            continue
        legend = next((ln for ln in reversed(lines[: lines.index(rows[0])]) if ln.startswith("Source")), "")
        assert "run `" in legend and "commit `" in legend, (i, above)
        tags = re.findall(r"\[([a-z])\] `", legend)
        for r in rows[2:]:
            cells = [c.strip() for c in r.strip("|").split("|")]
            for c in cells[3:]:
                if tags and c not in ("—", "not measured") and re.search(r"\d", c):
                    assert re.search(r"\[[a-z,]+\]", c) or re.search(r"\[[a-z,]+\]", cells[0]), (above, r)
    assert "a difference of two medians" in text  # the subtracted backward is labelled as such


def test_the_control_row_is_in_every_table(summarize: ModuleType) -> None:
    for _, rows in _tables(summarize.summary(H100)):
        body = "\n".join(rows)
        if "| N | causal |" in rows[0]:
            assert "control" in rows[0]
        else:
            assert re.search(r"\| softmax \|", body), rows[0]


def test_merge_key_includes_the_shape_and_recall_is_na_for_sigmoid(summarize: ModuleType) -> None:
    assert {"dtype", "batch", "heads", "kv_heads", "head_dim"} <= set(summarize._KEY)
    cpu = summarize.fidelity_section(ROOT / "benchmarks/results/cpu-2026-11-22", "on CPU")
    sigmoid = [ln for ln in cpu if "| sigmoid |" in ln]
    assert sigmoid and all("| n/a | n/a |" in ln for ln in sigmoid)


def test_headline_is_written_to_the_readme_only_when_asked(
    summarize: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{summarize.README_BEGIN}\nold\n{summarize.README_END}\ny\n")
    out = tmp_path / "SUMMARY.md"
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(H100), "--out", str(out)])
    summarize.main()
    assert "old" in readme.read_text() and out.read_text().startswith("# H100 results")
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(H100), "--out", str(out), "--readme", str(readme)])
    summarize.main()
    block = readme.read_text()
    assert "old" not in block and "| softmax | sdpa |" in block and "commit `" in block
