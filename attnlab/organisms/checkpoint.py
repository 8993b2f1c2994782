"""Checkpoints: written atomically, loaded through safetensors only (pickles refused unless opted in).

A training folder ``OUT`` holds ``OUT/step-000123/`` folders and a ``OUT/LATEST`` file naming the newest.
Each step folder is written under a temporary name (``OUT/.step-000123.tmp-<pid>``) and renamed when
complete; ``LATEST`` is replaced atomically after that; older step folders are removed last. A run
interrupted at any point therefore leaves every folder named ``step-*`` complete, and ``LATEST`` naming one
of them (or, if the interruption fell between the rename and the pointer update, an older one).

A checkpoint folder holds ``config.json`` + ``model.safetensors`` (``save_pretrained``), the tokenizer
(``tokenizer.json``), ``training.json`` (configuration, step, loss curve, data summary) and, for resuming,
``optimizer.safetensors`` (AdamW moments as tensors; the scalar settings live in ``training.json``). No file
is a pickle. A final model folder (:func:`write_model`) is the same without the optimizer, plus its model
card (``README.md``). It replaces an older ``final/`` by two renames; a run killed between them leaves no
``final/`` (the old one sits in ``.final.old-<pid>``) while every ``step-*`` folder stays loadable.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlab.organisms.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

#: the organisms committed with the package, one folder each (``micro``)
CHECKPOINTS = Path(__file__).parent / "checkpoints"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
LATEST = "LATEST"
STATE = "training.json"
OPTIMIZER = "optimizer.safetensors"


def organism_path(name: str = "micro") -> Path:
    """The folder of an organism shipped with attnlab (load it with :func:`load_organism`)."""
    shipped = sorted(p.name for p in CHECKPOINTS.iterdir() if p.is_dir()) if CHECKPOINTS.is_dir() else []
    if name not in shipped:
        raise CheckpointError(f"no shipped organism {name!r}: expected one of {shipped}")
    return CHECKPOINTS / name


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary folder beside ``target``, then rename it to ``target``.
    An existing ``target`` is swapped out (renamed aside, then removed) only after the new one is
    complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_files(folder: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """``save_pretrained`` of the model (safetensors) and of the tokenizer, into ``folder``."""
    from attnlab.organisms.tokenizer import save_tokenizer

    model.save_pretrained(str(folder))
    save_tokenizer(tokenizer, folder)
    if not (folder / "model.safetensors").is_file():  # transformers 5 writes safetensors only; make sure
        raise CheckpointError(f"save_pretrained wrote no model.safetensors into {folder}")


def optimizer_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's state as flat tensors (``state.<param index>.<name>``) and its param groups (JSON)."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(
    optimizer: torch.optim.Optimizer, folder: Path, param_groups: list[dict[str, Any]]
) -> None:
    """Restore what :func:`optimizer_tensors` saved."""
    from safetensors.torch import load_file

    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(folder / OPTIMIZER)).items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(
    out: Path,
    step: int,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``out/step-<step>`` atomically, point ``out/LATEST`` at it, keep the newest ``keep``."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_model_files(tmp, model, tokenizer)
        tensors, groups = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER))
        (tmp / STATE).write_text(json.dumps({**state, "optimizer_param_groups": groups}, indent=1))

    folder = atomic_dir(Path(out) / f"step-{step:06d}", write)
    _write_text_atomic(Path(out) / LATEST, folder.name + "\n")
    for stale in step_folders(Path(out))[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def step_folders(out: Path) -> list[Path]:
    """The complete ``step-*`` folders of a training folder, oldest first."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.glob("step-*") if p.is_dir() and (p / STATE).is_file())


def latest_checkpoint(out: Path) -> Path | None:
    """The folder ``LATEST`` names, or the newest complete step folder, or None."""
    pointer = Path(out) / LATEST
    if pointer.is_file():
        named = Path(out) / pointer.read_text().strip()
        if (named / STATE).is_file() and (named / "model.safetensors").is_file():
            return named
    folders = step_folders(Path(out))
    return folders[-1] if folders else None


def read_state(folder: Path) -> dict[str, Any]:
    """``training.json`` of a checkpoint or model folder."""
    path = Path(folder) / STATE
    if not path.is_file():
        raise CheckpointError(f"no {STATE} in {str(folder)!r}: expected a folder written by attnlab train")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def resolve(path: str | Path) -> Path:
    """The model folder for ``path``: itself when it holds ``config.json``, else the latest checkpoint of a
    training folder. Only local folders: a hub name is never looked up."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"no folder at {str(path)!r}: expected a local checkpoint folder (attnlab never downloads models)"
        )
    if (p / "config.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(
            f"{str(path)!r} holds no config.json and no step-* checkpoint: expected a folder written by "
            "save_pretrained or attnlab train"
        )
    return latest


def load_organism(
    path: str | Path, allow_pickle: bool = False, device: str = "cpu"
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a Llama causal LM and its tokenizer from a local folder, in eval mode.

    Weights load from ``model.safetensors`` only. A folder with pickled weights alone (``*.bin``, ``*.pt``
    ...) is refused, since unpickling can run code, unless ``allow_pickle=True`` (then transformers loads
    them with ``torch.load(weights_only=True)``). The config must be a valid Llama config (checked with
    the same messages as a training config)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnlab.organisms.config import ModelConfig
    from attnlab.organisms.tokenizer import load_tokenizer

    folder = resolve(path)
    plan = (
        read_state(folder).get("config", {}).get("model", {}).get("attention")
        if (folder / STATE).is_file()
        else None
    )
    if plan:
        raise CheckpointError(
            f"{folder} holds an organism trained with attnlab attention layers ({', '.join(plan)}): a plain "
            "Llama load would drop their input makers' weights and run every layer as softmax. Load it with "
            "attnlab.organisms.architectures.load_organism (its layers do not go through transformers' "
            "attention, so attnlab.use and attnlab eval cannot swap their method)"
        )
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") != "llama":
        raise CheckpointError(
            f"{folder}/config.json has model_type={raw.get('model_type')!r}: expected 'llama' (organisms "
            "are Llama-architecture models)"
        )
    safe = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not safe and not pickled:
        raise CheckpointError(f"no model.safetensors in {folder}: expected weights saved by save_pretrained")
    if not safe and not allow_pickle:
        raise CheckpointError(
            f"{folder} holds pickled weights only ({', '.join(pickled)}): unpickling can run arbitrary code, "
            "so attnlab refuses it. Convert the checkpoint to safetensors, or pass allow_pickle=True "
            "(--allow-pickle) if you trust the file."
        )
    cfg = LlamaConfig.from_pretrained(str(folder), local_files_only=True)
    ModelConfig.from_llama(cfg)  # clear messages for inconsistent shapes
    model = LlamaForCausalLM.from_pretrained(
        str(folder), config=cfg, local_files_only=True, use_safetensors=safe, dtype="auto"
    )
    model.to(torch.device(device))  # type: ignore[arg-type]  # (transformers' decorated .to confuses mypy)
    return model.eval(), load_tokenizer(folder)


def write_model(
    target: Path,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    state: dict[str, Any],
    card: str,
) -> Path:
    """The final model folder, atomically: weights, tokenizer, ``training.json`` and ``README.md``."""

    def write(tmp: Path) -> None:
        save_model_files(tmp, model, tokenizer)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        (tmp / "README.md").write_text(card)

    return atomic_dir(Path(target), write)
