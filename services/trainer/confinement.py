"""Confining a training script's process to the files it needs, with Landlock (Linux 5.13 and newer).

Landlock lets any process, without privileges, give up access for itself and everything it starts: after
`confine_files(readable, writable)` the process can read and execute only under `readable`, write only under
`writable`, and nothing else of the file system, whatever the files' permissions say. On a kernel with Landlock
ABI 6 or newer it also cannot signal a process outside its confinement (the worker, another run), nor connect to an
abstract UNIX socket made outside it. Landlock also keeps it from tracing a process outside. None of this can be
undone by the process.

Called in the zygote's child (zygote.py), after fork and before the script runs. The system calls are made through
ctypes: Python has no binding for them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

# System call numbers: the same on every architecture, as the calls came after the tables were unified.
_CREATE_RULESET = 444
_ADD_RULE = 445
_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_EXECUTE = 1 << 0
_WRITE_FILE = 1 << 1
_READ_FILE = 1 << 2
_READ_DIR = 1 << 3
# The access rights each ABI version knows: a ruleset may only name those the running kernel knows.
_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
# Rights that mean something on a file rather than a directory: a rule for a file may grant only these.
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | (1 << 14) | (1 << 15)
_READ = _EXECUTE | _READ_FILE | _READ_DIR
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1
_SCOPES_SINCE_ABI = 6
_WAY_OUT = "KILN_TRAINING_FILESYSTEM=host lets scripts reach the machine's files instead"


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class ConfinementUnavailable(OSError):
    """The kernel has no Landlock, or it is turned off, or a seccomp filter forbids its calls."""


def abi_version() -> int:
    """The Landlock ABI version of the running kernel; ConfinementUnavailable when it has none."""
    libc = ctypes.CDLL(None, use_errno=True)
    version = int(libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)))
    if version < 1:
        error = ctypes.get_errno()
        raise ConfinementUnavailable(
            error,
            f"cannot confine the training script's files: Landlock is not available here ({os.strerror(error)}); "
            f"{_WAY_OUT}",
        )
    return version


def confine_files(readable: Iterable[str], writable: Iterable[str]) -> None:
    """From now on this process, and whatever it starts, reaches only these paths. A path that does not exist is
    skipped."""
    version = abi_version()
    handled = _FS_RIGHTS_BY_ABI[max(known for known in _FS_RIGHTS_BY_ABI if known <= version)]
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if version >= _SCOPES_SINCE_ABI else 0
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _RulesetAttr(handled_access_fs=handled, handled_access_net=0, scoped=scoped)
    ruleset = int(libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), 0))
    if ruleset < 0:
        _fail("create a Landlock ruleset")
    try:
        for path in readable:
            _allow(libc, ruleset, path, _READ)
        for path in writable:
            _allow(libc, ruleset, path, handled)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _fail("set no_new_privs")
        if libc.syscall(_RESTRICT_SELF, ruleset, 0) != 0:
            _fail("restrict itself")
    finally:
        os.close(ruleset)


def _allow(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            _fail(f"allow {path}")
    finally:
        os.close(fd)


def _fail(step: str) -> None:
    error = ctypes.get_errno()
    raise ConfinementUnavailable(
        error, f"cannot confine the training script's files: it could not {step} ({os.strerror(error)}); {_WAY_OUT}"
    )
