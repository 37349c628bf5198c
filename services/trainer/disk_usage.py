"""What a training script's files take on disk, measured a bounded number of entries at a time.

RLIMIT_FSIZE caps each file a script writes, not how many it writes: the sandbox's wait loop (sandbox.py) measures
the script's workspace with a `DiskUsage` between its other looks at the script, and stops it once its files take
more than its quota. No privilege is needed, unlike a size-capped tmpfs (mount) or project quotas (root).

What counts: each file's allocated blocks (st_blocks, so a sparse file counts what it holds, not its length), a file
of several names (hard links) once, a symbolic link as itself and never what it points to, a folder's own blocks,
and at least `MIN_ENTRY_BYTES` per name. No link is followed, and a folder is read only once its descriptor shows it
is inside the workspace: what lies outside is never counted, however the script points at it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

# st_blocks counts 512-byte units, whatever the file system's block size.
_BLOCK_BYTES = 512
# An empty file or a link takes an inode and a directory entry but may take no block (and tmpfs gives its folders
# none): each name counts at least this, so that a quota also bounds how many names a script makes, and with them
# how many entries a pass over its workspace reads.
MIN_ENTRY_BYTES = 4096


class _Listing(Iterator[os.DirEntry[str]], Protocol):
    """What os.scandir returns."""

    def close(self) -> None: ...


class HiddenFiles(Exception):
    """A folder of the workspace stays unreadable to the worker: the script took its permissions away, and took
    them away again after the worker restored them, so what it holds cannot be measured."""


class DiskUsage:
    """The bytes the files under `root` take, counted in passes over the tree. Each `step` reads at most
    `entries_per_step` entries, so one look costs the same however many files the script made; a pass over more
    entries than that takes several steps."""

    def __init__(self, root: Path, *, entries_per_step: int) -> None:
        self._root = str(root.resolve())
        self._folder = self._root
        self._entries_per_step = entries_per_step
        self._folders: list[str] = []
        self._listing: _Listing | None = None
        self._handle: int | None = None  # the folder being read: its entries are looked at relative to it
        self._seen: set[tuple[int, int]] = set()
        self._counted = 0
        self._passing = False

    def measure(self) -> int:
        """A whole pass at once: for a folder known to hold few entries (a workspace before its script starts)."""
        self._start_pass()
        while self._passing:
            self._read(self._entries_per_step)
        return self._counted

    def step(self) -> int:
        """Read up to `entries_per_step` more entries, and return the bytes counted so far in the current pass,
        or its total when it ended here (the next step starts a new one). HiddenFiles when a folder stays
        unreadable."""
        if not self._passing:
            self._start_pass()
        self._read(self._entries_per_step)
        return self._counted

    def close(self) -> None:
        """Let go of the folder a pass was reading."""
        self._close_folder()
        self._passing = False

    def _start_pass(self) -> None:
        self.close()
        self._folders = [self._root]
        self._seen = set()
        self._counted = 0
        self._passing = True

    def _read(self, budget: int) -> None:
        while budget > 0 and self._passing:
            if self._listing is None:
                self._open_next_folder()  # a read too: a tree of empty folders costs a step as much as files do
                budget -= 1
                continue
            entry = next(self._listing, None)
            if entry is None:
                self._close_folder()
                continue
            self._count(entry)
            budget -= 1

    def _open_next_folder(self) -> None:
        if not self._folders:
            self._passing = False
            return
        self._folder = self._folders.pop()
        try:
            handle = _open_folder(self._folder, self._root)
        except (FileNotFoundError, NotADirectoryError, _Outside):
            return  # gone, or a link put in its place since its parent was read: nothing of the workspace's
        self._handle = handle
        self._counted += _entry_bytes(os.fstat(handle))
        self._listing = os.scandir(handle)

    def _close_folder(self) -> None:
        if self._listing is not None:
            self._listing.close()
            self._listing = None
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None

    def _count(self, entry: os.DirEntry[str]) -> None:
        try:
            status = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return  # removed since its folder was read
        except PermissionError:
            raise HiddenFiles(f"{self._folder} was made unreadable while it was read") from None
        if stat.S_ISDIR(status.st_mode):
            self._folders.append(os.path.join(self._folder, entry.name))  # its blocks count when it is read
        elif status.st_nlink > 1 and not self._first_sight(status):
            self._counted += MIN_ENTRY_BYTES  # another name of a file already counted
        else:
            self._counted += _entry_bytes(status)

    def _first_sight(self, status: os.stat_result) -> bool:
        key = (status.st_dev, status.st_ino)
        seen = key in self._seen
        self._seen.add(key)
        return not seen


class _Outside(Exception):
    """A path of the workspace leads out of it, through a link the script put there."""


def _entry_bytes(status: os.stat_result) -> int:
    return max(status.st_blocks * _BLOCK_BYTES, MIN_ENTRY_BYTES)


def _open_folder(folder: str, root: str) -> int:
    """A descriptor of the folder, read through it from now on: its entries are looked at relative to it, so a
    link the script puts on its path later is not followed. A script may take the folder's permissions away
    (chmod 0) to hide what it holds: they are restored, once; a folder still unreadable then is HiddenFiles."""
    try:
        return _open_inside(folder, root, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        _restore_access(folder, root)
    try:
        return _open_inside(folder, root, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        raise HiddenFiles(f"{folder} stays unreadable") from None


def _open_inside(path: str, root: str, flags: int) -> int:
    """Open `path`, not following a link at its end; _Outside if it is not under `root` (a link on its way)."""
    try:
        handle = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _Outside(path) from None
        raise
    where = os.readlink(f"/proc/self/fd/{handle}")
    if where != root and not where.startswith(root + "/"):
        os.close(handle)
        raise _Outside(path)
    return handle


def _restore_access(folder: str, root: str) -> None:
    """Make the folder the worker's to read again, through a descriptor of the folder itself: no file outside the
    workspace has its mode changed, whatever link the script put in its place meanwhile."""
    handle = _open_inside(folder, root, os.O_PATH)
    try:
        if stat.S_ISDIR(os.fstat(handle).st_mode):
            os.chmod(f"/proc/self/fd/{handle}", 0o700)
    finally:
        os.close(handle)
