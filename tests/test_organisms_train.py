"""attnlab train: a tiny run, its resume, atomic checkpoints, safe loading, config errors, and the
committed micro organism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from attnlab.organisms import checkpoint as ckpt
from attnlab.organisms.config import ModelConfig, TrainConfig, preset
from attnlab.organisms.errors import CheckpointError, ConfigError
from attnlab.organisms.train import train

TINY = {
    "name": "tiny",
    "model": {
        "vocab_size": 500,
        "hidden_size": 32,
        "layers": 1,
        "heads": 2,
        "kv_heads": 1,
        "intermediate_size": 64,
        "max_position": 256,
    },
    "corpus": {"max_chars": 60_000, "sources": ["pydoc"], "pydoc_share": 1.0, "heldout_share": 0.1},
    "tasks": ["passkey", "mqar"],
    "stages": [[2, 256, 2]],
    "copy_warmup": 1,  # step 1: copy rows; step 2: task samples and corpus windows
    "copy_share": 0.0,
    "eval_lengths": [256],
    "eval_samples": 1,
    "checkpoint_every": 1,
    "max_seconds": None,
}


def tiny(**changes: object) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **changes})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    train(tiny(), out, resume=False)
    return out


def test_two_step_run_writes_checkpoints_and_final_model(two_steps: Path) -> None:
    assert [p.name for p in ckpt.step_folders(two_steps)] == ["step-000001", "step-000002"]
    assert ckpt.latest_checkpoint(two_steps) == two_steps / "step-000002"
    final = two_steps / "final"
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json", "README.md"} <= names
    assert not [n for n in names if n.endswith(ckpt.PICKLE_SUFFIXES)]
    state = ckpt.read_state(final)
    assert state["step"] == 2 and len(state["curve"]) == 2
    assert state["tokens"] == 2 * 2 * 256
    assert all(math.isfinite(c["loss"]) for c in state["curve"])
    assert set(state["task_accuracy"]) == {"passkey", "mqar"}
    card = (final / "README.md").read_text()
    assert "| passkey |" in card and f"{state['heldout']['loss']:.3f}" in card
    model, tok = ckpt.load_organism(final)
    assert ModelConfig.from_llama(model.config) == tiny().model
    assert len(tok) == 500
    assert torch.equal(model.model.embed_tokens.weight.detach(), _weights(final)["model.embed_tokens.weight"])


def test_resume_matches_an_uninterrupted_run(two_steps: Path, tmp_path: Path) -> None:
    # two more steps on the two-step run's checkpoint ...
    longer = tiny(stages=[[2, 256, 2], [2, 256, 2]])
    train(longer, two_steps, resume=True)
    resumed = ckpt.read_state(two_steps / "final")
    assert resumed["step"] == 4 and [c["step"] for c in resumed["curve"]] == [1, 2, 3, 4]
    # ... equal four steps in one go (batches are drawn per step; the optimizer state was restored)
    straight_dir = tmp_path / "straight"
    train(longer, straight_dir, resume=False)
    straight = ckpt.read_state(straight_dir / "final")
    assert [c["loss"] for c in straight["curve"]] == pytest.approx(
        [c["loss"] for c in resumed["curve"]], rel=1e-5
    )
    a, b = _weights(two_steps / "final"), _weights(straight_dir / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_another_model(two_steps: Path) -> None:
    other = TrainConfig.from_dict({**TINY, "model": {**TINY["model"], "hidden_size": 64}})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="its config's 'model'"):
        train(other, two_steps, resume=True)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(tiny(), two_steps, resume=False)


def test_interrupted_write_leaves_the_last_checkpoint(two_steps: Path) -> None:
    before = ckpt.latest_checkpoint(two_steps)

    def crash(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_dir(two_steps / "step-000099", crash)
    (two_steps / ".step-000098.tmp-1").mkdir()  # a temporary folder a killed process left behind
    assert not (two_steps / "step-000099").exists()
    assert ckpt.latest_checkpoint(two_steps) == before
    (two_steps / ckpt.LATEST).write_text("step-000099\n")  # a pointer to a folder that never completed
    assert ckpt.latest_checkpoint(two_steps) == before
    model, _ = ckpt.load_organism(two_steps)  # a training folder resolves to its latest checkpoint
    assert model.config.model_type == "llama"


def test_pickled_checkpoints_are_refused(two_steps: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((two_steps / "final" / name).read_bytes())
    torch.save(_weights(two_steps / "final"), folder / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"pickled weights only \(pytorch_model.bin\).*allow_pickle=True"
    ):
        ckpt.load_organism(folder)
    model, _ = ckpt.load_organism(folder, allow_pickle=True)  # opted in
    assert torch.equal(
        model.lm_head.weight.detach(), _weights(two_steps / "final")["model.embed_tokens.weight"]
    )


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no folder at 'org/model'.*never downloads"):
        ckpt.load_organism("org/model")
    with pytest.raises(CheckpointError, match="no config.json and no step-"):
        ckpt.load_organism(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type='gpt2': expected 'llama'"):
        ckpt.load_organism(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        ckpt.load_organism(tmp_path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"learning_rate": 1e-3}, "unknown key 'learning_rate' in train config"),
        ({"model": {"hidden": 64}}, "unknown key 'hidden' in model.*Did you mean 'hidden_size'"),
        ({"model": {"heads": 3}}, "hidden_size=128 is not divisible by heads=3"),
        ({"model": {"heads": 4, "kv_heads": 3}}, "heads=4, kv_heads=3: expected heads divisible by kv_heads"),
        ({"model": {"vocab_size": 10}}, "vocab_size=10: expected an integer >= 468"),
        ({"stages": [[10, 4096, 1]]}, "length=4096 exceeds the model's max_position=2048"),
        ({"stages": [[10, 512]]}, r"expected \{'steps', 'length', 'batch'\}"),
        ({"tasks": ["passkee"]}, "unknown task 'passkee'.*Did you mean 'passkey'"),
        ({"task_share": 2}, "task_share=2: expected a share between 0 and 1"),
        ({"eval_lengths": [8192]}, "eval length 8192"),
        ({"max_seconds": -1}, "max_seconds=-1"),
        ({"corpus": {"heldout_share": 0.9}}, "heldout_share=0.9"),
    ],
)
def test_bad_configs_get_clear_errors(data: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_presets_round_trip_and_unknown_preset() -> None:
    for name in ("micro", "small"):
        cfg = preset(name)
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown preset 'mikro'.*Did you mean 'micro'"):
        preset("mikro")


def test_cli_train_reports_config_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from attnlab.cli import app

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"heads": 3}}))
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), "--config", str(bad)])
    assert result.exit_code == 2
    assert "not divisible by heads=3" in result.output
    assert not (tmp_path / "run").exists()


def test_cli_train_runs_and_resumes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from attnlab.cli import app

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    args = ["train", "--out", str(tmp_path / "run"), "--config", str(config), "--eval-samples", "0"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "2 steps run, 1,024 tokens" in first.output and "loss" in first.output
    state = ckpt.read_state(tmp_path / "run" / "final")
    assert "task_accuracy" not in state and state["config"]["eval_samples"] == 0
    again = CliRunner().invoke(app, args)  # everything is done: it resumes at step 2 and rewrites final/
    assert again.exit_code == 0 and "resuming from" in again.output
