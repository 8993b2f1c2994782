"""What every run records: device, library versions, and the commit with a dirty-tree flag.

``python -m attnlab.bench.env`` writes the ``ATTNLAB_COMMIT`` file that a copy of the tree on another
machine (no .git there, or a stale one) reads its revision from; carry it with the tree and delete it after.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


#: file at the repository root holding ``git describe --always --dirty`` of the tree it was copied from;
#: write it when staging a copy for another machine (``python -m attnlab.bench.env``)
COMMIT_FILE = "ATTNLAB_COMMIT"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Revision:
    """Which code ran: ``commit`` (a git describe / sha, without the '-dirty' suffix), ``dirty`` (the tree had
    uncommitted changes to tracked files; None when unknown) and ``source`` (env, git, file or unknown)."""

    commit: str
    dirty: bool | None
    source: str

    @staticmethod
    def parse(text: str, source: str) -> Revision:
        text = text.strip()
        if text.endswith("-dirty"):
            return Revision(text.removesuffix("-dirty"), True, source)
        return Revision(text, False, source)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def describe() -> str:
    """``git describe --always --dirty`` of the checkout (what the commit file holds)."""
    return _git("describe", "--always", "--dirty", "--abbrev=12")


def _from_git() -> Revision | None:
    if not (ROOT / ".git").exists():
        return None
    try:
        sha = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return Revision(sha, dirty, "git")


def _from_file() -> Revision | None:
    path = ROOT / COMMIT_FILE
    if path.is_file() and path.read_text().strip():
        return Revision.parse(path.read_text(), "file")
    return None


def _file_is_newer_than_head() -> bool:
    """Whether the commit file was written after the checkout's HEAD commit was made (a copy staged from a
    later tree than its .git says), rather than left behind by an earlier staging (stale)."""
    try:
        head_time = int(_git("log", "-1", "--format=%ct"))
        return (ROOT / COMMIT_FILE).stat().st_mtime >= head_time
    except (OSError, subprocess.SubprocessError, ValueError):
        return True


def revision() -> Revision:
    """The code's revision: the ``ATTNLAB_COMMIT`` environment variable when set (an override, may end in
    '-dirty'); else the ``ATTNLAB_COMMIT`` file at the checkout's root, written when the tree was staged for
    another machine (whose copy has no .git or a stale one: the lent GPU machines' copies carry a .git at
    the session's first commit), unless git's HEAD is newer than the file (a file left by an earlier
    staging); else git. :func:`environment` records the other source's answer when the two disagree."""
    if os.environ.get("ATTNLAB_COMMIT"):
        return Revision.parse(os.environ["ATTNLAB_COMMIT"], "env")
    file, git = _from_file(), _from_git()
    if file is not None and (git is None or _file_is_newer_than_head()):
        return file
    return git or Revision("unknown", None, "unknown")


def _same_commit(a: Revision, b: Revision) -> bool:
    """A sha and a describe (``v1-3-gabc1234`` or ``abc1234``) name the same commit when one prefixes the other."""
    x, y = a.commit.split("-g")[-1], b.commit.split("-g")[-1]
    return x.startswith(y) or y.startswith(x)


def git_commit() -> str:
    """The revision as one string: the commit, with '-dirty' when the tree had uncommitted changes."""
    rev = revision()
    return rev.commit + ("-dirty" if rev.dirty else "")


def write_commit_file(root: Path = ROOT) -> Path:
    """Write ``git describe --always --dirty`` to ``root / ATTNLAB_COMMIT`` (run before copying the tree)."""
    path = root / COMMIT_FILE
    path.write_text(describe() + "\n")
    return path


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions and commit of this run."""
    import attnlab

    rev = revision()
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "attnlab": attnlab.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": rev.commit,
        "dirty": rev.dirty,
        "commit_source": rev.source,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "threads": torch.get_num_threads(),
    }
    other = _from_file() if rev.source == "git" else _from_git()
    if other is not None and not _same_commit(rev, other):  # a stale file, or a copy's stale .git
        env[f"{other.source}_commit"], env[f"{other.source}_dirty"] = other.commit, other.dirty
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["memory_gb"] = round(props.total_memory / 2**30, 1)
    return env


if __name__ == "__main__":
    print(f"wrote {write_commit_file()}: {describe()}")
