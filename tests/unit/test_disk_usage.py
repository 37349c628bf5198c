"""The measure of a workspace's disk use: what counts, what is never followed, and how much one step reads."""

from __future__ import annotations

import os
from pathlib import Path

from services.trainer.disk_usage import MIN_ENTRY_BYTES, DiskUsage


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
