"""Which code ran: the commit and the dirty flag, from the environment, git, or a staged file."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnlab.bench import env
from attnlab.bench.env import COMMIT_FILE, Revision, describe, git_commit, revision, write_commit_file


def test_an_explicit_commit_wins_over_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNLAB_COMMIT", "abc1234-dirty")
    assert revision() == Revision("abc1234", True, "env")
    assert git_commit() == "abc1234-dirty"
    monkeypatch.setenv("ATTNLAB_COMMIT", "abc1234")
    assert revision() == Revision("abc1234", False, "env")
    monkeypatch.delenv("ATTNLAB_COMMIT")
    monkeypatch.setattr(env, "_from_file", lambda: None)  # whatever a staging left at the root
    rev = revision()
    assert rev.source == "git" and rev.commit != "abc1234" and isinstance(rev.dirty, bool)


def test_a_staged_file_wins_over_a_stale_git_and_a_stale_file_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lent GPU machines' copies carry a .git at the session's first commit; a checkout may keep a file
    from an earlier staging. The newer of the two names the code; the other's answer is recorded."""
    import torch

    monkeypatch.delenv("ATTNLAB_COMMIT", raising=False)
    monkeypatch.setattr(env, "_from_file", lambda: Revision("0123456789ab", False, "file"))
    git = env._from_git()
    assert git is not None
    monkeypatch.setattr(env, "_file_is_newer_than_head", lambda: True)  # staged after HEAD: a copy
    assert revision() == Revision("0123456789ab", False, "file")
    recorded = env.environment(torch.device("cpu"))
    assert recorded["commit"] == "0123456789ab" and recorded["commit_source"] == "file"
    assert recorded["git_commit"] == git.commit
    monkeypatch.setattr(env, "_file_is_newer_than_head", lambda: False)  # left behind, HEAD moved on
    assert revision() == git
    recorded = env.environment(torch.device("cpu"))
    assert recorded["commit_source"] == "git" and recorded["file_commit"] == "0123456789ab"


def test_a_copy_without_git_reads_the_staged_commit_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ATTNLAB_COMMIT", raising=False)
    staged = write_commit_file(tmp_path)  # what staging does in the checkout, here into a bare folder
    described = describe()
    assert staged.read_text().strip() == described
    monkeypatch.setattr(env, "ROOT", tmp_path)  # a copy of the tree: no .git, the file at its root
    rev = revision()
    assert rev.source == "file" and described.startswith(rev.commit)
    assert rev.dirty == described.endswith("-dirty")
    (tmp_path / COMMIT_FILE).unlink()
    assert revision() == Revision("unknown", None, "unknown")
