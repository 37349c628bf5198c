"""The measure of a workspace's disk use: what counts, what is never followed, and how much one step reads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.trainer.disk_usage import MAX_OPEN_FOLDERS, MIN_ENTRY_BYTES, DiskUsage, TooDeep
from shared.folders import remove_tree
from tests.support.trees import nest


def allocated(path: Path) -> int:
    return max(path.lstat().st_blocks * 512, MIN_ENTRY_BYTES)


def test_a_file_counts_once_whatever_its_names_and_links_count_as_themselves(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(os.urandom(8 * 2**20))
    root = tmp_path / "workspace"
    root.mkdir()
    (root / "model.bin").write_bytes(os.urandom(2**20))
    os.link(root / "model.bin", root / "again.bin")
    os.link(root / "model.bin", root / "once-more.bin")
    os.symlink(outside / "big.bin", root / "big.bin")
    os.symlink(outside, root / "outside")

    measured = DiskUsage(root, entries_per_step=100).measure()

    links_and_other_names = 4 * MIN_ENTRY_BYTES
    assert measured == allocated(root) + allocated(root / "model.bin") + links_and_other_names


def test_one_step_reads_a_bounded_number_of_entries_and_a_pass_counts_them_all(tmp_path: Path) -> None:
    for number in range(1000):
        (tmp_path / f"{number}.txt").touch()
    whole = DiskUsage(tmp_path, entries_per_step=10).measure()
    usage = DiskUsage(tmp_path, entries_per_step=10)

    counts = [usage.step() for _ in range(101)]

    assert counts[0] == allocated(tmp_path) + 9 * MIN_ENTRY_BYTES
    assert counts[-1] == whole == allocated(tmp_path) + 1000 * MIN_ENTRY_BYTES
    assert counts == sorted(counts)
    usage.close()


def test_a_folder_made_unreadable_is_counted(tmp_path: Path) -> None:
    """As root, the permissions hold nothing back; as another user, the folder is made readable again."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "rows.bin").write_bytes(os.urandom(2**20))
    before = DiskUsage(tmp_path, entries_per_step=100).measure()
    hidden.chmod(0)

    assert DiskUsage(tmp_path, entries_per_step=100).measure() == before


def make_chain(root: Path, name: str, depth: int) -> tuple[int, int]:
    """Folders `name` nested `depth` deep in `root` with a file of 1 MiB at the bottom; returns what they take and
    the length of the bottom's path."""
    bottom, folders = nest(root, name, depth)
    file = os.open("rows.bin", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=bottom)
    os.write(file, os.urandom(2**20))
    taken = sum(max(status.st_blocks * 512, MIN_ENTRY_BYTES) for status in [*folders, os.fstat(file)])
    os.close(file)
    os.close(bottom)
    return taken, len(str(root)) + depth * (len(name) + 1)


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    """A folder removed after the test by the trainer's own removal: pytest's cannot remove a tree this deep."""
    path = tmp_path / "workspace"
    path.mkdir()
    yield path
    remove_tree(path)


def test_a_tree_deeper_than_the_recursion_limit_with_paths_past_path_max_is_measured(workspace: Path) -> None:
    taken, path_length = make_chain(workspace, "d" * 51, 2000)
    usage = DiskUsage(workspace, entries_per_step=100)

    passes = [usage.step() for _ in range(41)]  # 2,000 folders, 2,000 entries, a file: 41 steps

    assert path_length > 4096 * 20
    assert passes[-1] == allocated(workspace) + taken
    assert usage.step() < passes[-1]  # a new pass has started
    usage.close()


def test_folders_nested_each_beside_another_past_what_a_pass_holds_open_are_too_deep(tmp_path: Path) -> None:
    folder = tmp_path
    for _ in range(2 * MAX_OPEN_FOLDERS):
        # A leaf read after the folder beside it keeps their parent open meanwhile: with three leaves, at about
        # three levels in four, whatever order the file system lists them in.
        for leaf in ("a", "b", "c"):
            (folder / leaf).mkdir()
        folder = folder / "deeper"
        folder.mkdir()

    with pytest.raises(TooDeep):
        DiskUsage(tmp_path, entries_per_step=100).measure()
