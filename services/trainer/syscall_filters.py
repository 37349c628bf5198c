"""Seccomp filters the zygote's child installs before it runs a training script: off the machine's UNIX sockets
when the script has no network, and off memory-backed files and new user namespaces always.

A network namespace of its own cuts the script off every TCP/IP network, but not off socket files: a database, a
broker or a container runtime listening on one (/var/run/postgresql/.s.PGSQL.5432, /var/run/docker.sock) stays
reachable by path, and Landlock does not govern connecting to one. After `forbid_unix_sockets()` the process, and
whatever it starts, cannot make a UNIX socket at all (socket(2) fails with EACCES), nor set up io_uring, which
could make one without the system call. Pipes and socketpair(2), which reach nothing outside, still work.

A file made by memfd_create(2) lives in memory that no address-space limit counts: three of 1 GB each held 3 GB
of a machine's memory under a script limited to 300 MB. A SysV shared memory segment, once detached, is not
counted either, and outlives the script (until ipcrm). After `forbid_memory_files_and_user_namespaces()` both
calls, memfd_create and shmget, fail with EACCES. (The script's other files are on the workspace's disk, measured
against its quota; /dev/shm is out of its reach with KILN_TRAINING_FILESYSTEM=private.)

A user namespace of its own would make the script root there: free to mount a tmpfs (memory no limit counts, where
Landlock does not forbid mounting) and to reach kernel code that only root reaches otherwise. The same filter makes
unshare(2) and clone(2) fail with EPERM when asked for one, as a kernel that allows no user namespaces does, and
setns(2) too (joining another process's namespaces, which a script never needs); clone3(2) fails with ENOSYS: its
flags are in memory, out of a filter's sight, and the C library falls back to clone(2) on a kernel without it.
Threads and processes are made as before.

Nothing the process does can lift a filter. The calls go through ctypes: Python has no binding for seccomp.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_REFUSE = _SECCOMP_RET_ERRNO | errno.EACCES
_REFUSE_NAMESPACE = _SECCOMP_RET_ERRNO | errno.EPERM
_UNKNOWN_CALL = _SECCOMP_RET_ERRNO | errno.ENOSYS
_AF_UNIX = 1
_IO_URING_SETUP = 425  # the same on every architecture, as it came after the tables were unified
_CLONE3 = 435  # so too
_CLONE_NEWUSER = 0x10000000
# x86-64's system calls of the x32 ABI carry this bit: the same calls by other numbers, refused whole.
_X32_SYSCALL_BIT = 0x40000000
# By machine: the audit architecture a system call of its native ABI reports, and the numbers of socket(2),
# memfd_create(2), shmget(2), unshare(2), clone(2) (whose first argument, on both, is the flags) and setns(2) there.
_NATIVE = {"x86_64": (0xC000003E, 41, 319, 29, 272, 56, 308), "aarch64": (0xC00000B7, 198, 279, 194, 97, 220, 268)}

# Classic BPF, as seccomp runs it over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}.
_LOAD_WORD = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JUMP_IF_EQUAL = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JUMP_IF_AT_LEAST = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JUMP_IF_ANY_BIT = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RETURN = 0x06  # BPF_RET | BPF_K
_NR, _ARCH, _FIRST_ARGUMENT = 0, 4, 16  # the first argument's low 32 bits: little-endian machines only


class _Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Instruction))]


class FilterUnavailable(OSError):
    """This machine's kind, or its kernel, takes no such filter."""


def forbid_unix_sockets() -> None:
    """From now on this process, and whatever it starts, can make no UNIX socket; FilterUnavailable if the filter
    cannot be installed."""
    arch, socket_call, *_ = _native_calls("UNIX socket")
    _install(_unix_sockets_program(arch, socket_call), "cannot keep the training script off UNIX sockets")


def forbid_memory_files_and_user_namespaces() -> None:
    """From now on this process, and whatever it starts, can make no memfd_create(2) file, SysV shared memory
    segment nor user namespace; FilterUnavailable if the filter cannot be installed."""
    arch, _, memfd_call, shmget_call, *namespace_calls = _native_calls("memory file")
    program = _memory_files_and_user_namespaces_program(arch, memfd_call, shmget_call, *namespace_calls)
    _install(program, "cannot keep the training script off memory files and user namespaces")


def _native_calls(what: str) -> tuple[int, int, int, int, int, int, int]:
    machine = platform.machine()
    if machine not in _NATIVE:
        raise FilterUnavailable(errno.ENOSYS, f"no {what} filter for {machine} machines")
    return _NATIVE[machine]


def _install(program: list[_Instruction], failure: str) -> None:
    instructions = (_Instruction * len(program))(*program)
    compiled = _Program(len(instructions), instructions)
    libc = ctypes.CDLL(None, use_errno=True)
    # Without it only a process holding CAP_SYS_ADMIN may install a filter; the script gains no privilege later.
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(
        _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(compiled), 0, 0
    ):
        error = ctypes.get_errno()
        raise FilterUnavailable(error, f"{failure}: {os.strerror(error)}")


def _memory_files_and_user_namespaces_program(
    arch: int, memfd_call: int, shmget_call: int, unshare_call: int, clone_call: int, setns_call: int
) -> list[_Instruction]:
    """Refuse memfd_create, shmget, unshare and clone asking for a user namespace, setns (joining one of another
    process's), clone3, x32 calls and calls of another ABI (where they have other numbers); allow the rest."""
    return [
        *_native_calls_only(arch),  # 0 to 3
        _Instruction(_JUMP_IF_AT_LEAST, 9, 0, _X32_SYSCALL_BIT),  # 4: x32: 14
        _Instruction(_JUMP_IF_EQUAL, 8, 0, memfd_call),  # 5: memfd_create: 14
        _Instruction(_JUMP_IF_EQUAL, 7, 0, shmget_call),  # 6: shmget: 14
        _Instruction(_JUMP_IF_EQUAL, 8, 0, _CLONE3),  # 7: clone3: 16
        _Instruction(_JUMP_IF_EQUAL, 6, 0, setns_call),  # 8: setns: 15
        _Instruction(_JUMP_IF_EQUAL, 1, 0, unshare_call),  # 9: unshare: 11
        _Instruction(_JUMP_IF_EQUAL, 0, 2, clone_call),  # 10: clone: 11, else 13
        _Instruction(_LOAD_WORD, 0, 0, _FIRST_ARGUMENT),  # 11: the flags
        _Instruction(_JUMP_IF_ANY_BIT, 2, 0, _CLONE_NEWUSER),  # 12: a user namespace: 15, else 13
        _Instruction(_RETURN, 0, 0, _SECCOMP_RET_ALLOW),  # 13
        _Instruction(_RETURN, 0, 0, _REFUSE),  # 14
        _Instruction(_RETURN, 0, 0, _REFUSE_NAMESPACE),  # 15
        _Instruction(_RETURN, 0, 0, _UNKNOWN_CALL),  # 16
    ]


def _unix_sockets_program(arch: int, socket_call: int) -> list[_Instruction]:
    """Refuse socket(AF_UNIX, ...), io_uring_setup, x32 calls and calls of another ABI (32-bit ones on a 64-bit
    kernel, which have their own numbers); allow the rest."""
    return [
        *_native_calls_only(arch),  # 0 to 3
        _Instruction(_JUMP_IF_AT_LEAST, 4, 0, _X32_SYSCALL_BIT),  # 4: x32: 9
        _Instruction(_JUMP_IF_EQUAL, 3, 0, _IO_URING_SETUP),  # 5: 9
        _Instruction(_JUMP_IF_EQUAL, 0, 3, socket_call),  # 6: socket: 7, else 10
        _Instruction(_LOAD_WORD, 0, 0, _FIRST_ARGUMENT),  # 7
        _Instruction(_JUMP_IF_EQUAL, 0, 1, _AF_UNIX),  # 8: AF_UNIX: 9, else 10
        _Instruction(_RETURN, 0, 0, _REFUSE),  # 9
        _Instruction(_RETURN, 0, 0, _SECCOMP_RET_ALLOW),  # 10
    ]


def _native_calls_only(arch: int) -> list[_Instruction]:
    """The start of each program: a call of another ABI is refused, and a native one's number loaded. A jump's
    offsets count from the next instruction."""
    return [
        _Instruction(_LOAD_WORD, 0, 0, _ARCH),  # 0
        _Instruction(_JUMP_IF_EQUAL, 1, 0, arch),  # 1: native: 3, else 2
        _Instruction(_RETURN, 0, 0, _REFUSE),  # 2
        _Instruction(_LOAD_WORD, 0, 0, _NR),  # 3
    ]
