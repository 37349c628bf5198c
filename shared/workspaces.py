"""Private folders that hold an org's data in the clear while a process works in them: the folders training scripts
run in (an org's rows), and those a backup or restore opens a store's snapshot in.

Each is made under one folder of the process's user (`default_root()`), with a lock file beside it that its
process holds (flock) for as long as it uses it. A process that ends normally removes both; one that was killed
leaves them, and its lock with it: the sweep at the next worker's start, backup, restore or rewrap removes every
workspace whose lock no live process holds, and leaves those of the processes still running on the machine. A
workspace that could not be removed keeps its lock file, for the next sweep to try again: a workspace's lock file
is there whenever its folder is. A file a process must keep outside its workspace (a restore's store, staged on its
target's filesystem) is claimed by its workspace (claim_outside, a link beside the workspace) and removed with it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from shared.errors import KilnError
from shared.folders import remove_tree

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
# tempfile.mkstemp's names for the lock files, and so for the workspaces beside them.
_PREFIX = "run-"
# What follows a workspace's name in the names of its claims: links beside it (never in it, where a training script
# could make one) to the files outside it that it claims.
_CLAIM_INFIX = ".outside-"


class WorkspaceError(KilnError):
    """The folder of workspaces cannot be trusted with the rows a run puts there."""


def default_root() -> Path:
    """One folder per user of the machine, so that workers of different users never sweep each other's."""
    return Path(tempfile.gettempdir()) / f"kiln-workspaces-{os.getuid()}"


@contextmanager
def workspace(root: Path) -> Iterator[Path]:
    """A fresh folder in `root` only this user can enter; removed afterwards, however the run ended."""
    with _held_lock(_own_folder(root)) as lock:
        path = lock.with_suffix("")
        path.mkdir(mode=0o700)
        try:
            yield path
        finally:
            _remove_or_leave(path)  # never raises: the run's own error, if any, is what the caller sees


def claim_outside(folder: Path, path: Path) -> None:
    """Make `path`, a file not made yet outside the workspace `folder`, part of that workspace: whoever removes the
    workspace (its process, or a sweep once that process was killed) removes `path` first. Claimed before it is made,
    so that no moment finds the file there and its claim not."""
    folder.with_name(f"{folder.name}{_CLAIM_INFIX}{secrets.token_hex(8)}").symlink_to(path)


def sweep(root: Path) -> list[Path]:
    """Remove the workspaces in `root` that no live process holds, and return them."""
    if not root.exists():
        return []
    folder = _own_folder(root)
    locked = [lock.with_suffix("") for lock in sorted(folder.glob("*" + LOCK_SUFFIX)) if _swept(lock)]
    return locked + [path for path in _lockless(folder) if _remove_or_leave(path)]


def _remove_or_leave(path: Path) -> bool:
    """Remove a workspace; whether it did. When it cannot, its lock file stays, for the next sweep to find."""
    try:
        _remove_claimed(path)
        remove_tree(path)
    except OSError:
        log.exception("could not remove the workspace %s; the next sweep will try again", path)
        return False
    return True


def _remove_claimed(path: Path) -> None:
    """Remove the files outside the workspace `path` that it claims, then its claims: before the workspace itself,
    so that a claim is there only while its workspace (and so its lock file) is."""
    for claim in path.parent.glob(path.name + _CLAIM_INFIX + "*"):
        Path(os.readlink(claim)).unlink(missing_ok=True)
        claim.unlink()


def _lockless(root: Path) -> list[Path]:
    """Workspaces without a lock file: no run holds them (a run's lock is made before its folder and removed
    after it), and none but a worker before this one's could leave them so."""
    return [
        path
        for path in sorted(root.glob(_PREFIX + "*"))
        if path.is_dir() and not path.with_name(path.name + LOCK_SUFFIX).exists()
    ]


def _own_folder(root: Path) -> Path:
    """`root`, made if need be. In a shared temporary folder another user could have made it first, to read the
    rows put there: it must be this user's folder, which no one else may enter."""
    with suppress(FileExistsError):
        root.mkdir(mode=0o700)
    status = root.lstat()
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise WorkspaceError(f"{root} is not a folder of this user's that only this user can enter")
    return root


@contextmanager
def _held_lock(root: Path) -> Iterator[Path]:
    """A new lock file in `root`, locked by this process until the block ends, and then removed unless its
    workspace is still there."""
    while True:
        handle, name = tempfile.mkstemp(prefix=_PREFIX, suffix=LOCK_SUFFIX, dir=root)
        fcntl.flock(handle, fcntl.LOCK_EX)
        if _still_there(handle):
            break
        os.close(handle)  # a sweep found it between its making and its locking, and removed it
    try:
        yield Path(name)
    finally:
        if not os.path.lexists(Path(name).with_suffix("")):
            os.unlink(name)  # before the lock is let go: no sweep may find it free
        os.close(handle)


def _swept(lock: Path) -> bool:
    """Remove the workspace of `lock` when no process holds the lock; whether it did."""
    try:
        handle = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False  # its run has just ended
    try:
        if not _lock_if_free(handle) or not _remove_or_leave(lock.with_suffix("")):
            return False
        lock.unlink()
        return True
    finally:
        os.close(handle)


def _lock_if_free(handle: int) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live worker's run
    return _still_there(handle)  # else its run ended between the look and the lock


def _still_there(handle: int) -> bool:
    return os.fstat(handle).st_nlink > 0
