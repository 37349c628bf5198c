"""Bookkeeping of one `kiln up`: the stack's files, the processes started so far, and readiness checks."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from deploy.local.processes import StackError, spawn, start_time, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
# A line of the pid file: `name pid start-time`, the start time `-` where unknown (Launch.spawn writes them).
PID_LINE = re.compile(r"(\S+) (\d+) (\d+|-)")


class Recorded(NamedTuple):
    """A spawned process group: its leader's pid and start time (None where unknown, see processes.start_time)."""

    pid: int
    started: int | None


@dataclass(frozen=True)
class StackFiles:
    data_dir: Path

    @property
    def stack_json(self) -> Path:
        return self.data_dir / "stack.json"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "stack.pid"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def recorded(self) -> dict[str, Recorded]:
        """Every process group the last `up` spawned, by name: from the pid file (`name pid start-time` per line),
        written as each one starts, so it also holds those of an `up` that never got as far as writing stack.json.
        The pids of stack.json are not read: they carry no start time, so a stack.json copied or left without its
        pid file could name a reused pid, someone else's group."""
        found: dict[str, Recorded] = {}
        if self.pid_file.exists():
            for line in self.pid_file.read_text().splitlines():
                # A line cut short (the launcher stopped, or the disk full, mid-write) is passed over: its pid may
                # be cut short too, and stopping that group could stop someone else's processes.
                if parsed := PID_LINE.fullmatch(line):
                    name, pid, started = parsed.groups()
                    found[name] = Recorded(int(pid), None if started == "-" else int(started))
        return found

    def reset(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.clear()

    def clear(self) -> None:
        self.stack_json.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)


@dataclass
class Launch:
    """The processes one `up` has started, each recorded in the pid file the moment it exists."""

    files: StackFiles
    timeout_s: float
    ports: set[int] = field(default_factory=set)
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, command: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        process = spawn(command, env=env, cwd=REPO_ROOT, log_path=self.files.log(name))
        self.started[name] = process
        started = start_time(process.pid)
        with self.files.pid_file.open("a") as pid_file:
            pid_file.write(f"{name} {process.pid} {'-' if started is None else started}\n")
        return process

    def wait(self, name: str, ready: Callable[[], bool]) -> None:
        wait_until(ready, name=name, processes=self.started, logs=self.files.log, timeout_s=self.timeout_s)

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.started.items()}


def http_ok(url: str, *, auth: httpx.Auth | None = None) -> Callable[[], bool]:
    def answers() -> bool:
        try:
            return httpx.get(url, auth=auth, timeout=2.0).status_code == httpx.codes.OK
        except httpx.TransportError:
            return False

    return answers


def redis_answers(url: str) -> Callable[[], bool]:
    def answers() -> bool:
        client = redis.Redis.from_url(url, socket_timeout=2.0)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    return answers


def worker_ready(broker_url: str, node: str, pid: int) -> Callable[[], bool]:
    """The worker answers a broadcast through the broker, and it is ours: its reported pid is the one we started.

    Checking the pid matters on a shared broker, where a worker of the same name may belong to another stack.
    """

    def answers() -> bool:
        with _celery_client(broker_url) as client:
            try:
                inspect = client.control.inspect(destination=[node], timeout=1.0, limit=1)
                replies: dict[str, Any] = inspect.stats() or {}
            except OperationalError as error:  # no worker can answer through a broker out of reach: say so now
                raise StackError(f"Redis (KILN_REDIS_URL) cannot be reached: {error}") from None
        return bool(replies.get(node, {}).get("pid") == pid)

    return answers


@contextlib.contextmanager
def _celery_client(broker_url: str) -> Iterator[Celery]:
    client = Celery("kiln-launcher", set_as_current=False)
    client.conf.broker_url = broker_url  # enough to ask workers for their stats
    try:
        yield client
    finally:
        client.close()


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds secrets), replacing any earlier one in a single step."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    partial.replace(path)
