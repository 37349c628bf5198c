"""What a training script's files take on disk, measured a bounded number of entries at a time.

RLIMIT_FSIZE caps each file a script writes, not how many it writes: the sandbox's wait loop (sandbox.py) measures
the script's workspace with a `DiskUsage` between its other looks at the script, and stops it once its files take
more than its quota. No privilege is needed, unlike a size-capped tmpfs (mount) or project quotas (root).

What counts: each file's allocated blocks (st_blocks, so a sparse file counts what it holds, not its length), a file
of several names (hard links) once, a symbolic link as itself and never what it points to, a folder's own blocks,
and at least `MIN_ENTRY_BYTES` per name. Each folder is opened by its name relative to its parent's descriptor, never
following a link (folders.py): what lies outside is never counted, however the script points at it, and no path is
ever too long to measure, however deep the script nests its folders.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from shared.folders import open_folder, restore_access

# st_blocks counts 512-byte units, whatever the file system's block size.
_BLOCK_BYTES = 512
# An empty file or a link takes an inode and a directory entry but may take no block (and tmpfs gives its folders
# none): each name counts at least this, so that a quota also bounds how many names a script makes, and with them
# how many entries a pass over its workspace reads.
MIN_ENTRY_BYTES = 4096
# A folder stays open while subfolders of it wait to be read: a chain of folders holds two at a time, but a tree
# whose every level still has one waiting holds one a level. Past this many it is not measured (TooDeep), rather
# than the worker running out of descriptors.
MAX_OPEN_FOLDERS = 256
# A folder found gone when its turn came, or a link or a file put in its place: nothing of the workspace's.
_NOT_A_FOLDER = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class _Listing(Iterator[os.DirEntry[str]], Protocol):
    """What os.scandir returns."""

    def close(self) -> None: ...


class HiddenFiles(Exception):
    """A folder of the workspace stays unreadable to the worker: the script took its permissions away, and took
    them away again after the worker restored them, so what it holds cannot be measured."""


class TooDeep(Exception):
    """The workspace's folders nest, each beside another still to read, past `MAX_OPEN_FOLDERS`."""


class _Folder:
    """An open folder: the one being read, or one whose subfolders wait to be read, opened relative to it."""

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.waiting = 0


class DiskUsage:
    """The bytes the files under `root` take, counted in passes over the tree. Each `step` reads at most
    `entries_per_step` entries, so one look costs the same however many files the script made; a pass over more
    entries than that takes several steps."""

    def __init__(self, root: Path, *, entries_per_step: int) -> None:
        self._root = str(root.resolve())
        self._entries_per_step = entries_per_step
        self._folders: list[tuple[_Folder | None, str]] = []  # those to read, each with its parent (None: the root)
        self._open: dict[int, _Folder] = {}
        self._reading: tuple[_Folder, _Listing] | None = None
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
        unreadable, TooDeep when folders nest too deep, OSError when the file system fails a look."""
        if not self._passing:
            self._start_pass()
        self._read(self._entries_per_step)
        return self._counted

    def close(self) -> None:
        """Let go of the folders a pass holds open."""
        if self._reading is not None:
            self._reading[1].close()
        for folder in self._open.values():
            os.close(folder.handle)
        self._open = {}
        self._folders = []
        self._reading = None
        self._passing = False

    def _start_pass(self) -> None:
        self.close()
        self._folders = [(None, self._root)]
        self._seen = set()
        self._counted = 0
        self._passing = True

    def _read(self, budget: int) -> None:
        while budget > 0 and self._passing:
            if self._reading is None:
                self._open_next_folder()  # a read too: a tree of empty folders costs a step as much as files do
                budget -= 1
                continue
            folder, listing = self._reading
            entry = next(listing, None)
            if entry is None:
                self._end_listing()
                continue
            self._count(folder, entry)
            budget -= 1

    def _open_next_folder(self) -> None:
        if not self._folders:
            self._passing = False
            return
        parent, name = self._folders.pop()
        if len(self._open) >= MAX_OPEN_FOLDERS:
            raise TooDeep(f"more than {MAX_OPEN_FOLDERS} folders nest, each beside another")
        try:
            handle = _open_folder(parent, name)
        except OSError as error:
            if error.errno in _NOT_A_FOLDER:
                return
            raise
        finally:
            self._let_go(parent)
        self._open[handle] = folder = _Folder(handle)
        self._counted += _entry_bytes(os.fstat(handle))
        self._reading = folder, os.scandir(handle)

    def _end_listing(self) -> None:
        if self._reading is not None:
            folder, listing = self._reading
            self._reading = None
            listing.close()
            if folder.waiting == 0:
                self._close(folder)

    def _let_go(self, parent: _Folder | None) -> None:
        """One subfolder fewer waits on `parent`, which is read no more: once none does, it is closed."""
        if parent is not None:
            parent.waiting -= 1
            if parent.waiting == 0:
                self._close(parent)

    def _close(self, folder: _Folder) -> None:
        del self._open[folder.handle]
        os.close(folder.handle)

    def _count(self, folder: _Folder, entry: os.DirEntry[str]) -> None:
        try:
            status = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return  # removed since its folder was read
        except PermissionError:
            raise HiddenFiles(f"a folder holding {entry.name[:100]!r} was made unreadable while it was read") from None
        if stat.S_ISDIR(status.st_mode):
            folder.waiting += 1
            self._folders.append((folder, entry.name))  # its blocks count when it is read
        elif status.st_nlink > 1 and not self._first_sight(status):
            self._counted += MIN_ENTRY_BYTES  # another name of a file already counted
        else:
            self._counted += _entry_bytes(status)

    def _first_sight(self, status: os.stat_result) -> bool:
        key = (status.st_dev, status.st_ino)
        seen = key in self._seen
        self._seen.add(key)
        return not seen


def _entry_bytes(status: os.stat_result) -> int:
    return max(status.st_blocks * _BLOCK_BYTES, MIN_ENTRY_BYTES)


def _open_folder(parent: _Folder | None, name: str) -> int:
    """A descriptor of the folder `name` in `parent` (the root's own path when None). A script may take the
    folder's permissions away (chmod 0) to hide what it holds: they are restored, once; a folder still unreadable
    then is HiddenFiles."""
    where = None if parent is None else parent.handle
    try:
        return open_folder(where, name)
    except PermissionError:
        restore_access(where, name)
    try:
        return open_folder(where, name)
    except PermissionError:
        raise HiddenFiles(f"{name[:100]!r} stays unreadable") from None
