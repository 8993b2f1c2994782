"""The committed micro organism: it loads (safetensors), its config is the ``micro`` preset, its model card
states the numbers of its training.json, and it has learned something about text."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.organisms.checkpoint import organism_path, read_state
from attnlab.organisms.config import ModelConfig, TrainConfig, preset
from attnlab.organisms.errors import CheckpointError


@pytest.fixture(scope="module")
def micro():  # type: ignore[no-untyped-def]
    from attnlab.organisms.checkpoint import load_organism

    return load_organism(organism_path("micro"))


def test_micro_config_is_the_committed_preset(micro) -> None:  # type: ignore[no-untyped-def]
    model, tok = micro
    state = read_state(organism_path("micro"))
    assert TrainConfig.from_dict(state["config"]) == preset("micro")
    assert ModelConfig.from_llama(model.config) == preset("micro").model
    assert len(tok) == preset("micro").model.vocab_size
    folder = organism_path("micro")
    assert (folder / "model.safetensors").stat().st_size < 4 * 2**20  # a few MB at most
    assert not list(folder.glob("optimizer*"))  # the final folder carries no optimizer state


def test_micro_card_states_its_numbers(micro) -> None:  # type: ignore[no-untyped-def]
    state = read_state(organism_path("micro"))
    card = (organism_path("micro") / "README.md").read_text()
    assert f"Held-out loss: {state['heldout']['loss']:.3f}" in card
    assert f"{len(state['curve'])} steps run of {preset('micro').total_steps} planned" in card
    for task, per in state["task_accuracy"].items():
        assert f"| {task} | " + " | ".join(f"{per[n]:.2f}" for n in sorted(per, key=int)) + " |" in card
    assert max(c["length"] for c in state["curve"]) == 2048  # the curriculum reached 2K tokens


def test_micro_predicts_text_better_than_chance(micro) -> None:  # type: ignore[no-untyped-def]
    from pydoc_data.topics import topics

    from attnlab.organisms.tokenizer import encode

    model, tok = micro
    ids = torch.tensor([encode(tok, topics["assert"])[:512]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    loss = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))
    # well below a uniform guess (ln 1024 = 6.93) and below the ~6.0 that token frequencies alone reach on
    # prose (the card's unigram baseline): it uses context
    assert math.isfinite(loss) and loss < math.log(len(tok)) - 1.5


def test_micro_answers_passkey_at_short_length(micro) -> None:  # type: ignore[no-untyped-def]
    # issue 11: trained on the tasks, the micro must at least retrieve a pass key in a short context
    # (its card: accuracy per task and length; it degrades past 512 tokens)
    from attnlab.organisms.corpus import CorpusConfig, build_corpus, prose
    from attnlab.organisms.evaluate import task_accuracy
    from attnlab.organisms.tasks import TaskContext

    model, tok = micro
    corpus = build_corpus(
        CorpusConfig(max_chars=300_000, sources=("pydoc",), pydoc_share=1.0, heldout_share=0.2)
    )
    ctx = TaskContext(tok, [d.text for d in prose(corpus.heldout)])
    acc = task_accuracy(model, ctx, ("passkey",), (256, 512), samples=4)
    assert acc["passkey"][256] + acc["passkey"][512] >= 1.0, acc
    state = read_state(organism_path("micro"))
    assert max(state["task_accuracy"]["passkey"].values()) >= 0.5


def test_unknown_organism() -> None:
    with pytest.raises(CheckpointError, match="no shipped organism 'nano'"):
        organism_path("nano")
