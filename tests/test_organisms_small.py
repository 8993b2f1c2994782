"""The committed small organism (trained on one H100): it loads (bf16 safetensors under 16 MiB), its config
is the ``small`` preset, its card states the numbers of its training.json, and on this CPU it answers
passkey and multi-key NIAH at 1K tokens with dense attention, as its card says it does up to 16K."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from attnlab.organisms.checkpoint import organism_path, read_state
from attnlab.organisms.config import ModelConfig, TrainConfig, preset
from attnlab.organisms.corpus import CorpusConfig


@pytest.fixture(scope="module")
def small():  # type: ignore[no-untyped-def]
    from attnlab.organisms.checkpoint import load_organism

    return load_organism(organism_path("small"))


def test_small_is_the_committed_preset(small) -> None:  # type: ignore[no-untyped-def]
    model, tok = small
    state = read_state(organism_path("small"))
    cfg = TrainConfig.from_dict(state["config"])
    # trained on the corpus built here and carried to the GPU as a file (see the results README)
    assert cfg.corpus.file is not None
    assert dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, file=None)) == preset("small")
    assert ModelConfig.from_llama(model.config) == preset("small").model
    assert next(model.parameters()).dtype == torch.bfloat16 and len(tok) == 4096
    assert (organism_path("small") / "model.safetensors").stat().st_size < 16 * 2**20
    assert state["environment"]["device"].startswith("NVIDIA")
    assert max(c["length"] for c in state["curve"]) == 16384 and not state["stopped_early"]


def test_small_card_states_its_numbers() -> None:
    state = read_state(organism_path("small"))
    card = (organism_path("small") / "README.md").read_text()
    assert f"Held-out loss: {state['heldout']['loss']:.3f}" in card
    for task, per in state["task_accuracy"].items():
        assert f"| {task} | " + " | ".join(f"{per[n]:.2f}" for n in sorted(per, key=int)) + " |" in card
    # the bar: passkey and multi-key NIAH at 8K+ with dense attention
    for task in ("passkey", "niah_multikey"):
        assert state["task_accuracy"][task]["8192"] >= 0.9 and state["task_accuracy"][task]["16384"] >= 0.9


def test_small_answers_at_1k_on_cpu(small) -> None:  # type: ignore[no-untyped-def]
    from attnlab.organisms.corpus import build_corpus, prose
    from attnlab.organisms.evaluate import task_accuracy
    from attnlab.organisms.tasks import TaskContext

    model, tok = small
    corpus = build_corpus(
        CorpusConfig(max_chars=300_000, sources=("pydoc",), pydoc_share=1.0, heldout_share=0.2)
    )
    ctx = TaskContext(tok, [d.text for d in prose(corpus.heldout)])  # haystack it never saw
    acc = task_accuracy(copy.deepcopy(model).float(), ctx, ("passkey", "niah_multikey"), (1024,), samples=2)
    assert acc["passkey"][1024] == 1.0 and acc["niah_multikey"][1024] == 1.0
