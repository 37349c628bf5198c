"""Folders a training script made, walked one name at a time relative to an open parent folder.

A script can nest folders without end and give them names of any length: a path from the workspace down to its
files may be far longer than PATH_MAX, and a tree far deeper than Python's recursion limit. Every call here takes
one name relative to a folder's descriptor, so neither matters, and opens it without following a link: nothing
outside the folder walked is reached, whatever link the script put in it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# A folder, never a link to one: O_NOFOLLOW fails on a link (ELOOP), O_DIRECTORY on anything else (ENOTDIR).
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FolderMoved(OSError):
    """A folder was moved while its tree was removed: its way back up is not the way down any more."""


def open_folder(parent: int | None, name: str) -> int:
    """A descriptor of the folder `name` in `parent` (a path of its own when None)."""
    return os.open(name, FOLDER_FLAGS, dir_fd=parent)


def restore_access(parent: int | None, name: str) -> None:
    """Make the folder `name` in `parent` the worker's to read and change again, through a descriptor of the
    folder itself: no file outside it has its mode changed, whatever link the script put in its place."""
    handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        if stat.S_ISDIR(os.fstat(handle).st_mode):
            os.chmod(f"/proc/self/fd/{handle}", 0o700)
    finally:
        os.close(handle)


def remove_tree(path: Path) -> None:
    """Remove the folder `path` and all under it, however deep and long its names; what its links point to is
    left alone. A folder whose permissions the script took away is given them back first. Nothing when `path`
    is not there; OSError when some of it could not be removed."""
    top = os.open(path.parent, FOLDER_FLAGS)
    try:
        _remove_folder(top, path.name)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise
    finally:
        os.close(top)


def _remove_folder(top: int, name: str) -> None:
    # Depth first, with one folder open at a time and no recursion: a tree of any depth needs no more descriptors
    # nor stack. The way back up is "..", checked to be the folder come down from.
    trail = [(_identity(top), name)]  # each folder come down through, and the name of the next one in it
    folder = _enter(top, name)
    try:
        while trail:
            subfolder = _remove_files(folder)
            if subfolder is None:
                parent, name = trail.pop()
                folder = _replace(folder, _climb(folder, parent))
                os.rmdir(name, dir_fd=folder)
            else:
                trail.append((_identity(folder), subfolder))
                folder = _replace(folder, _enter(folder, subfolder))
    finally:
        os.close(folder)


def _remove_files(folder: int) -> str | None:
    """Remove what `folder` holds but folders; the name of a folder it still holds, if any."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            os.unlink(entry.name, dir_fd=folder)
    return None


def _enter(parent: int, name: str) -> int:
    restore_access(parent, name)  # a script may have taken away what reading it and removing its files need
    return open_folder(parent, name)


def _climb(folder: int, expected: tuple[int, int]) -> int:
    parent = open_folder(folder, "..")
    if _identity(parent) != expected:
        os.close(parent)
        raise FolderMoved("a folder was moved out of the tree being removed")
    return parent


def _identity(handle: int) -> tuple[int, int]:
    status = os.fstat(handle)
    return status.st_dev, status.st_ino


def _replace(old: int, new: int) -> int:
    os.close(old)
    return new
