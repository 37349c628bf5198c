"""A run's workspace is removed however deep the script nested its folders, and one that could not be removed is
found and removed by the next sweep. Real folders and a real worker process holding its own."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import workspaces
from shared.workspaces import LOCK_SUFFIX, sweep, workspace
from tests.support.trees import nest
from tests.support.workspaces import workspace_holder


class ScriptFailed(Exception):
    """Stands for the run's own error."""


def fail_in_workspace(root: Path, prepare: Callable[[Path], object]) -> Path:
    """A run in a workspace of `root` that prepared it and then failed with its own error; returns the workspace."""
    made: list[Path] = []
    with pytest.raises(ScriptFailed, match="exited with 4"):
        run_failing(root, prepare, made)
    return made[0]


def run_failing(root: Path, prepare: Callable[[Path], object], made: list[Path]) -> None:
    with workspace(root) as path:
        made.append(path)
        prepare(path)
        raise ScriptFailed("exited with 4")


def nest_with_a_link(root: Path, name: str, depth: int) -> None:
    bottom, _ = nest(root, name, depth)
    os.close(os.open("rows.bin", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=bottom))
    os.symlink(root.parent, "out", dir_fd=bottom)  # removed, never followed
    os.close(bottom)


@pytest.mark.parametrize("name", ["d", "d" * 51], ids=["deep", "past PATH_MAX"])
def test_a_tree_of_any_depth_is_removed_and_the_runs_own_error_stays(tmp_path: Path, name: str) -> None:
    root = tmp_path / "workspaces"
    outside = tmp_path / "outside.txt"
    outside.write_text("not the workspace's")

    def prepare(path: Path) -> None:
        nest_with_a_link(path, name, 2000)
        os.symlink(outside, path / "link")

    fail_in_workspace(root, prepare)

    assert list(root.iterdir()) == []
    assert outside.read_text() == "not the workspace's"


def test_a_file_a_workspace_claims_outside_it_goes_with_the_workspace_and_its_neighbours_stay(tmp_path: Path) -> None:
    """As a restore's store staged beside its target, on the target's filesystem."""
    root, staged, notes = tmp_path / "workspaces", tmp_path / ".p.db.0a1b.restoring", tmp_path / "p.db.partial"
    notes.write_text("the operator's notes")

    def prepare(path: Path) -> None:
        workspaces.claim_outside(path, staged)
        staged.write_bytes(b"an org's records")

    fail_in_workspace(root, prepare)

    assert not staged.exists() and notes.read_text() == "the operator's notes"
    assert list(root.iterdir()) == []


def test_a_workspace_that_could_not_be_removed_keeps_its_lock_for_the_next_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "workspaces"
    with monkeypatch.context() as patch:
        patch.setattr(workspaces, "remove_tree", failing_removal)
        path = fail_in_workspace(root, lambda path: (path / "rows.bin").write_bytes(b"an org's rows"))

    assert (path / "rows.bin").exists() and path.with_name(path.name + LOCK_SUFFIX).exists()
    assert sweep(root) == [path]
    assert list(root.iterdir()) == []


def failing_removal(path: Path) -> None:
    raise OSError(f"the file system failed to remove {path}")


def test_a_workspace_left_without_its_lock_is_swept_and_a_live_runs_kept(tmp_path: Path) -> None:
    """As an earlier worker left one whose removal failed: it took the lock file away, but not the folder."""
    root = tmp_path / "workspaces"
    with workspace_holder(root) as (_live, held):
        left = root / "run-left"
        left.mkdir()
        (left / "rows.bin").write_bytes(b"an org's rows")

        assert sweep(root) == [left]
        assert not left.exists()
        assert (held / "source.parquet").exists()
