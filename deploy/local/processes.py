"""Child processes of the local stack: each in its own process group, logged to a file, stopped as a group.

Liveness is judged per process group and ignores zombies: a stopped child whose parent never reaps it (the
launcher that started it has exited, and PID 1 on some machines does not reap) must not count as running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

POLL_S = 0.2
# How long a group SIGKILLed may take to be gone, whatever the grace before it (which may be 0): the signal cannot be
# refused, but a process holding much memory takes a moment to release it.
REAP_AFTER_KILL_S = 5.0
_PROC = Path("/proc")
# Index of /proc/PID/stat's field 22, starttime, among the fields after `pid (comm)`.
_START_TIME = 19


class StackError(RuntimeError):
    """A step of bringing the stack up or down that failed; the message says which and why."""


def spawn(command: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start `command` as the leader of a new session, so that stopping its group reaches every descendant."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until(
    ready: Callable[[], bool],
    *,
    name: str,
    processes: Mapping[str, subprocess.Popen[bytes]],
    logs: Callable[[str], Path],
    timeout_s: float,
) -> None:
    """Poll `ready` until `name` is up; fail with a log's last lines if any of `processes` dies or time runs out.

    Watching every process, not just the awaited one, reports a crash at once instead of after the others' waits.
    """
    deadline = time.monotonic() + timeout_s
    while not ready():
        for other, process in processes.items():
            if process.poll() is not None:
                raise StackError(f"{other} exited with code {process.returncode} while starting\n{tail(logs(other))}")
        if time.monotonic() > deadline:
            raise StackError(f"{name} was not ready after {timeout_s:.0f} s\n{tail(logs(name))}")
        time.sleep(POLL_S)


def tail(log_path: Path, lines: int = 25) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return f"(no log at {log_path})"
    last = "\n".join(text.splitlines()[-lines:])
    return f"--- last lines of {log_path} ---\n{last}"


def group_alive(pgid: int, *, started: int | None = None) -> bool:
    """Whether any process of the group is still running (zombies excluded where /proc can tell).

    Given `started` (the leader's start_time), a leader that started at another time holds a reused pid: after a
    reboot, say. That group is someone else's, and counts as not running.
    """
    if started is not None and start_time(pgid) not in {None, started}:
        return False
    if not _PROC.is_dir():
        return _answers_signal_zero(os.killpg, pgid)
    return any(_group_of(stat) == pgid for stat in _running_stats())


def pid_alive(pid: int) -> bool:
    if not _PROC.is_dir():
        return _answers_signal_zero(os.kill, pid)
    stat = _read_stat(_PROC / str(pid) / "stat")
    return stat is not None and _is_running(stat)


def start_time(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (None if unknown): with the pid, it names one process."""
    stat = _read_stat(_PROC / str(pid) / "stat")
    return int(stat[_START_TIME]) if stat is not None else None


def _answers_signal_zero(send: Callable[[int, int], None], target: int) -> bool:
    try:
        send(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def stop_groups(pgids: Collection[int], *, grace_s: float) -> None:
    """SIGTERM every group, give them `grace_s` to exit together, then SIGKILL whatever is left and wait for it to
    go (REAP_AFTER_KILL_S at most)."""
    _signal_groups(pgids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _reap_and_list_alive(pgids) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    survivors = _reap_and_list_alive(pgids)
    if not survivors:
        return
    _signal_groups(survivors, signal.SIGKILL)
    deadline = time.monotonic() + REAP_AFTER_KILL_S
    while _reap_and_list_alive(survivors):
        if time.monotonic() > deadline:
            raise StackError(f"process groups {sorted(survivors)} survived SIGKILL")
        time.sleep(POLL_S)


def _signal_groups(pgids: Iterable[int], signum: signal.Signals) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)


def _reap_and_list_alive(pgids: Iterable[int]) -> list[int]:
    """Collect the exit status of those that are our own children (else they linger as zombies), then list the rest."""
    for pgid in pgids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, os.WNOHANG)
    return [pgid for pgid in pgids if group_alive(pgid)]


def _running_stats() -> Iterable[list[str]]:
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            stat = _read_stat(entry / "stat")
            if stat is not None and _is_running(stat):
                yield stat


def _read_stat(path: Path) -> list[str] | None:
    """The fields after `pid (comm)` of /proc/PID/stat: state, ppid, pgrp, ... (comm may hold spaces)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _is_running(stat: list[str]) -> bool:
    return stat[0] not in {"Z", "X"}


def _group_of(stat: list[str]) -> int:
    return int(stat[2])


DEFAULT_PORTS = {"api": 8000, "predictor": 8001, "flower": 5555}


def pick_port(preferred: int, taken: Collection[int]) -> int:
    """`preferred` if it is free on 127.0.0.1 (0 means no preference), else any free port not in `taken`."""
    if preferred and preferred not in taken and _port_is_free(preferred):
        return preferred
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in taken:
            return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
