"""Running a training script, `python SCRIPT CONFIG.json`, so that nothing it does can harm the worker.

Each script runs in a child of a zygote (zygote.py: a fork server that has LightGBM and friends imported, so a
script starts in milliseconds, not 1.7 s) and gets:
- its own session and process group, all of which is killed when the run ends, however it ends, with whatever
  left them (setsid): orphans come to the zygote, a subreaper, which kills them;
- an environment of a few variables chosen here, never the worker's (so no KILN_* setting or secret);
- limits on CPU time, address space, file size and open files, and a wall-clock timeout kept from here;
- a disk quota on what it writes in its workspace, measured from here while it runs (`_DiskQuota`);
- a private folder from `workspace()`, with its own tmp/ as HOME and TMPDIR, removed afterwards (or, when the
  worker was killed, by the sweep at the next worker's start: workspaces.py);
- unless the worker is told otherwise (KILN_TRAINING_NETWORK=host), a network namespace of its own with no way
  out: a script cannot send the rows it reads anywhere, nor reach the databases and brokers beside it;
- unless told otherwise (KILN_TRAINING_FILESYSTEM=host), a Landlock confinement (confinement.py): it reads only
  the system's libraries, Python and its packages, Kiln's code and its own script's folder, writes only in its
  workspace, and cannot signal or trace the worker or another run. The embedded stack's database and object
  folder, other runs' workspaces and the worker's /proc entries (its environment) are out of its reach.

A script that loops, allocates without bound, crashes or is cancelled ends its run with a ScriptResult saying
why; `run` raises only when the zygote itself cannot run a script.

Not covered: a script runs as the worker's user, and with KILN_TRAINING_FILESYSTEM=host it can read what that
user can read (files, and /proc/<pid>/environ of the worker's processes unless they are made non-dumpable). Where
scripts are not trusted, give them their own user or container as well.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, Literal

from pydantic.alias_generators import to_camel

from services.trainer.disk_usage import DiskUsage, HiddenFiles, TooDeep
from services.trainer.zygote import STDERR_LOG, STDOUT_LOG, Message, MessageReader, send
from shared import workspaces
from shared.errors import InvalidInput, TransientError
from shared.schemas import OrgConfig
from shared.settings import Settings

log = logging.getLogger(__name__)

# Where `services` is imported from, from a checkout or installed: the zygote starts there.
_IMPORT_ROOT = Path(__file__).resolve().parents[2]
_SEARCH_PATH = f"{Path(sys.executable).parent}:/usr/bin:/bin"
# How often an OpenMP thread with nothing to do spins before it sleeps. libgomp's default (300,000) made fits 20-60x
# slower beside any other busy process on a 2-core machine. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) made a lone
# 1M-row fit 1.5x slower than a short spin (3.05 s against 2.06 s): LightGBM's threads meet hundreds of times a
# tree. 1,000 spins keep that speed and cost 10-20% beside a busy process (bench/openmp_spin.py; by hand, 300
# spins: 2.88 s alone; 4,000: 2.7x slower beside one).
OPENMP_SPINCOUNT = "1000"
# What both the zygote and every script see. libgomp reads GOMP_SPINCOUNT once, when the zygote loads it.
_BASE_ENVIRONMENT = {"PATH": _SEARCH_PATH, "LANG": "C.UTF-8", "GOMP_SPINCOUNT": OPENMP_SPINCOUNT, "PYTHONHASHSEED": "0"}

# What a confined script may read besides Python, its packages, Kiln's code and its own folder: what a process
# needs of the system (libraries, the loader's cache, users, time zones, CPU and memory figures, its own /proc
# entry), and no more of /etc, where a deployment may keep Kiln's own configuration.
_SYSTEM_READABLE = (
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/ssl",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/self",  # opened in the script's process: its own entry, not the worker's
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
)
_SYSTEM_WRITABLE = ("/dev/null",)

_POLL_S = 0.1
_MB = 1024 * 1024
# How many entries of a script's workspace one look reads to measure its disk use: ~5 ms here (2.4 us an entry), at
# each look at the script (every 0.1-0.2 s). A workspace of more entries is measured over several looks.
_DISK_ENTRIES_PER_CHECK = 2000
# The zygote imports LightGBM and friends before it reads its first request: ~1.7 s here, more on a busy machine.
_START_TIMEOUT_S = 60.0
# After a stop, the zygote reports the exit within milliseconds; past this it is taken to be stuck.
_STOP_GRACE_S = 10.0
_CLOSE_TIMEOUT_S = 5.0
_STDERR_TAIL_BYTES = 4096
_REASON_LINES = 4
_MAX_REASON_LINES = 12
_MAX_LINE_BYTES = 64 * 1024
_CHUNK_BYTES = 1024 * 1024
# After the script ended, what it printed and was not read yet is read for this long at most: the rest is dropped.
_LAST_READ_S = 1.0
_MEMORY_ERRORS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory")
# A script killed outright with its peak memory this close to the limit is taken to have run out of memory.
_NEAR_LIMIT = 0.9


class SandboxError(TransientError):
    """The zygote could not run a script: a fault of the platform, not of the script."""


@dataclass(frozen=True)
class Limits:
    """What one run of a script may use. Memory is address space (RLIMIT_AS), which counts reservations too."""

    timeout_s: float
    cpu_s: int
    memory_mb: int
    max_file_mb: int
    max_open_files: int
    disk_mb: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            timeout_s=settings.training_timeout_s,
            cpu_s=settings.training_cpu_s,
            memory_mb=settings.training_memory_mb,
            max_file_mb=settings.training_max_file_mb,
            max_open_files=settings.training_max_open_files,
            disk_mb=settings.training_disk_mb,
        )

    @classmethod
    def for_org(cls, settings: Settings, org_config: OrgConfig) -> Limits:
        """The workers' limits with the org's own (`config.training`) in their place."""
        return cls.from_settings(settings).with_overrides(org_config.training.limit_overrides())

    def with_overrides(self, overrides: Mapping[str, object]) -> Limits:
        """These limits with some replaced, named in camelCase as an org's config names them (e.g. "timeoutS")."""
        names = {to_camel(limit.name): limit.name for limit in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in names:
                raise InvalidInput(
                    f"unknown limit {key!r}; known limits are {', '.join(sorted(names))}", field="limits"
                )
            changes[names[key]] = _positive(key, value, whole=isinstance(getattr(self, names[key]), int))
        return replace(self, **changes)

    def for_zygote(self) -> dict[str, int]:
        return {
            "cpu_s": self.cpu_s,
            "memory_mb": self.memory_mb,
            "max_file_mb": self.max_file_mb,
            "max_open_files": self.max_open_files,
        }


def _positive(key: str, value: object, *, whole: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidInput(f"limit {key!r} needs a positive number, not {value!r}", field="limits")
    if whole and value != int(value):
        raise InvalidInput(f"limit {key!r} needs a whole number, not {value!r}", field="limits")
    return int(value) if whole else float(value)


@dataclass(frozen=True)
class ScriptResult:
    """How a run of a script ended. returncode and signal are both None only when the zygote was lost mid-run."""

    returncode: int | None
    signal: str | None
    timed_out: bool
    cancelled: bool
    over_disk_quota: bool
    duration_s: float
    cpu_s: float
    max_rss_mb: float
    stderr_tail: str
    limits: Limits = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not (self.timed_out or self.cancelled or self.over_disk_quota)

    def reason(self) -> str:
        """What happened, in a sentence fit for the run's error; the last lines of stderr when the script failed."""
        limits = self.limits
        if self.cancelled:
            return "cancelled"
        if self.timed_out:
            return f"timed out after {limits.timeout_s:g} s (the org's limit)"
        if self.over_disk_quota:
            return f"filled its workspace past the disk quota (limit {limits.disk_mb} MB)"
        if self.ok:
            return "finished"
        if self.signal == "SIGXCPU" or (self.signal == "SIGKILL" and self.cpu_s >= limits.cpu_s):
            return f"killed by {self.signal}: used its {limits.cpu_s} s of CPU time"
        if self._out_of_memory():
            return f"ran out of memory (limit {limits.memory_mb} MB)"
        if self.signal == "SIGXFSZ":
            return f"wrote a file over {limits.max_file_mb} MB (SIGXFSZ)"
        if self.signal is not None:
            return f"killed by {self.signal}"
        if self.returncode is None:
            return "lost: the sandbox's zygote ended during the run, and the script was killed"
        return f"exited with {self.returncode}: {_failure_lines(self.stderr_tail)}"

    def _out_of_memory(self) -> bool:
        if any(marker in self.stderr_tail for marker in _MEMORY_ERRORS):
            return True
        return self.signal in ("SIGKILL", "SIGSEGV") and self.max_rss_mb >= _NEAR_LIMIT * self.limits.memory_mb


def _failure_lines(stderr: str) -> str:
    """From a traceback, its last frame and the exception; from anything else, its last lines."""
    lines = [line.strip() for line in stderr.splitlines()]
    # Blank lines, and the carets Python 3.11 puts under a failing expression, are noise in a reason.
    lines = [line for line in lines if line.strip("^~ ")]
    frames = [index for index, line in enumerate(lines) if line.startswith('File "')]
    start = frames[-1] if frames else len(lines) - _REASON_LINES
    return "\n".join(lines[max(start, len(lines) - _MAX_REASON_LINES, 0) :]) or "(nothing on stderr)"


class Sandbox:
    """Runs scripts one at a time through a zygote of its own; one per worker process, made after Celery forks.

    The zygote starts at `start()` or the first run, and again whenever it has died.
    """

    def __init__(
        self,
        *,
        network: Literal["none", "host"] = "none",
        filesystem: Literal["private", "host"] = "private",
        workspaces_root: Path | None = None,
    ) -> None:
        """`network`: "none" runs each script cut off every network (KILN_TRAINING_NETWORK), "host" on the
        machine's. `filesystem`: "private" confines each script to the files it needs (KILN_TRAINING_FILESYSTEM),
        "host" lets it reach what the worker's user can. `workspaces_root`: the folder of the scripts' workspaces,
        by default the user's own in the temporary folder (workspaces.default_root)."""
        self._zygote: _Zygote | None = None
        self._network = network
        self._filesystem = filesystem
        self._workspaces = workspaces_root or workspaces.default_root()

    def run(
        self,
        script: Path,
        config: Path,
        workdir: Path,
        limits: Limits,
        *,
        should_stop: Callable[[], bool],
        on_output: Callable[[str], None],
        env: Mapping[str, str] | None = None,
    ) -> ScriptResult:
        """Run `python script config` in `workdir` and wait for it to end, calling `on_output` with each line it
        prints to stdout, between looks at whether to stop it: each call must be quick. It is killed at
        `limits.timeout_s` of wall-clock time (counted from its start, not the zygote's), or soon after
        `should_stop()` turns true, however much it prints; lines still unread a second after it ended, or once
        it was stopped, are dropped. `env` adds to the script's few variables."""
        tmp = str(_private_tmp(workdir))
        request = {
            "script": str(script),
            "config": str(config),
            "workdir": str(workdir),
            "env": {**_BASE_ENVIRONMENT, "HOME": tmp, "TMPDIR": tmp, **(env or {})},
            "limits": limits.for_zygote(),
            "network": self._network,
            "filesystem": _confinement(script, workdir) if self._filesystem == "private" else None,
        }
        output = _OutputTail(workdir / STDOUT_LOG, on_output)
        quota = _DiskQuota(workdir, limits.disk_mb)
        try:
            zygote, pid = self._start(request)
            started = time.monotonic()
            stop = _StopRule(deadline=started + limits.timeout_s, should_stop=should_stop, exceeds_quota=quota.exceeded)
            report = self._await_exit(zygote, pid, stop, output)
        except BaseException:
            # Whatever went wrong here, the script must not outlive the run: the zygote kills it on EOF.
            self._discard()
            raise
        finally:
            quota.close()
        if stop.stopped_at is None:  # a stopped script's last words are of no use, and would hold up its end
            output.read(_LAST_READ_S, final=True)
        return ScriptResult(
            returncode=report.get("returncode"),
            signal=report.get("signal"),
            timed_out=stop.timed_out,
            cancelled=stop.cancelled,
            over_disk_quota=stop.over_disk_quota,
            duration_s=time.monotonic() - started,
            cpu_s=report.get("cpu_s", 0.0),
            max_rss_mb=report.get("max_rss_mb", 0.0),
            stderr_tail=_file_tail(workdir / STDERR_LOG),
            limits=limits,
        )

    def start(self) -> None:
        """Start the zygote unless it is running, and return at once: it loads LightGBM and friends (~1.7 s) while
        the caller prepares the run, instead of while the run waits."""
        self._live_zygote()

    @contextmanager
    def workspace(self) -> Iterator[Path]:
        """A fresh folder only this user can enter, with a tmp/ inside; removed afterwards, however the run ended
        (and by `sweep_workspaces` when this process was killed first)."""
        with workspaces.workspace(self._workspaces) as path:
            _private_tmp(path)
            yield path

    def sweep_workspaces(self) -> list[Path]:
        """Remove the workspaces that no live process holds any more, left by workers killed mid-run: they hold
        orgs' rows. Those of the other workers running here are left alone. Returns the ones removed."""
        return workspaces.sweep(self._workspaces)

    def close(self) -> None:
        """Stop the zygote, and with it any script still running."""
        self._discard()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _start(self, request: Message) -> tuple[_Zygote, int]:
        """Hand the request to a live zygote; return it and the script's pid."""
        with suppress(EOFError):
            return self._start_on_live_zygote(request)
        # The zygote was found dead before it started the script (killed between runs, say). Nothing of the run
        # has happened yet, so a fresh one may take it.
        self._discard()
        try:
            return self._start_on_live_zygote(request)
        except EOFError:
            returncode = self._discard()
            raise SandboxError(
                f"the zygote exited with {returncode} before starting the script; its error is in this worker's log"
            ) from None

    def _start_on_live_zygote(self, request: Message) -> tuple[_Zygote, int]:
        zygote = self._live_zygote()
        return zygote, zygote.start(request)

    def _live_zygote(self) -> _Zygote:
        if self._zygote is None or self._zygote.returncode is not None:
            self._discard()
            self._zygote = _Zygote()
        return self._zygote

    def _await_exit(self, zygote: _Zygote, pid: int, stop: _StopRule, output: _OutputTail) -> Message:
        while True:
            try:
                message = zygote.receive(_POLL_S)
            except EOFError:
                # The zygote died mid-run (a script can kill its parent): the script is an orphan now.
                self._discard()
                _kill_group(pid)
                return {}
            if message is not None and "exited" in message:
                return message
            output.read(_POLL_S)
            if stop.due():
                zygote.send({"stop": True})
            elif stop.overdue():
                _kill_group(pid)
                raise SandboxError(f"the zygote did not report the end of script {pid} after stopping it")

    def _discard(self) -> int | None:
        """Close the zygote, if there is one, and return its exit status."""
        zygote, self._zygote = self._zygote, None
        return None if zygote is None else zygote.close()


class _Zygote:
    """The zygote process and the two pipes Kiln speaks to it over."""

    def __init__(self) -> None:
        # Its own session, so that a signal meant for the worker's terminal or group does not reach it; it ends
        # when its stdin closes.
        self._process = subprocess.Popen(
            [sys.executable, "-m", "services.trainer.zygote"],
            env=_BASE_ENVIRONMENT,
            cwd=_IMPORT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self._requests: IO[bytes] = _pipe(self._process.stdin)
        self._replies = MessageReader(_pipe(self._process.stdout).fileno())

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    def start(self, request: Message) -> int:
        """Send a run request and return the script's pid. EOFError if the zygote is gone."""
        try:
            self.send(request)
        except BrokenPipeError:
            raise EOFError("the zygote has exited") from None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            message = self.receive(deadline - time.monotonic())
            if message is not None and "started" in message:
                return int(message["started"])
        raise SandboxError(f"the zygote did not start the script within {_START_TIMEOUT_S:g} s")

    def send(self, message: Message) -> None:
        send(self._requests, message)

    def receive(self, timeout: float) -> Message | None:
        return self._replies.receive(timeout)

    def close(self) -> int:
        """Close its stdin, which ends it and any script it runs; kill it if it does not end promptly. Returns its
        exit status."""
        with suppress(BrokenPipeError):
            self._requests.close()
        try:
            self._process.wait(_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        _pipe(self._process.stdout).close()
        return self._process.returncode


def _pipe(stream: IO[bytes] | None) -> IO[bytes]:
    if stream is None:
        raise SandboxError("the zygote was started without its pipes")
    return stream


@dataclass
class _StopRule:
    """When to stop a script: at its wall-clock deadline, once the caller asks, or once its files take more than
    its disk quota."""

    deadline: float
    should_stop: Callable[[], bool]
    exceeds_quota: Callable[[], bool]
    timed_out: bool = False
    cancelled: bool = False
    over_disk_quota: bool = False
    stopped_at: float | None = None

    def due(self) -> bool:
        """True once: at the first check at which the script should be stopped."""
        if self.stopped_at is not None:
            return False
        self.timed_out = time.monotonic() >= self.deadline
        self.cancelled = not self.timed_out and self.should_stop()
        self.over_disk_quota = not (self.timed_out or self.cancelled) and self.exceeds_quota()
        if self.timed_out or self.cancelled or self.over_disk_quota:
            self.stopped_at = time.monotonic()
        return self.stopped_at is not None

    def overdue(self) -> bool:
        return self.stopped_at is not None and time.monotonic() - self.stopped_at > _STOP_GRACE_S


class _DiskQuota:
    """Whether a script's files take more than `limit_mb` in its workspace, beyond what the worker put there before
    it started (its rows, its config). Checked at each look at the script, `_DISK_ENTRIES_PER_CHECK` entries at a
    time (disk_usage.py says what counts). What it writes past the quota before it is stopped: whatever it writes
    between two looks (0.1-0.2 s) or, in a workspace of more entries than a look reads, during one pass over them
    (entries / 2,000 looks; each name counts 4 KiB at least, so a workspace within the quota holds at most
    quota / 4 KiB of them); plus files it deleted but holds open, which no measure of the folder sees: at most
    max_open_files x max_file_mb per process (RLIMIT_NOFILE, RLIMIT_FSIZE), freed when the run ends."""

    def __init__(self, workdir: Path, limit_mb: int) -> None:
        self._workdir = workdir
        self._usage = DiskUsage(workdir, entries_per_step=_DISK_ENTRIES_PER_CHECK)
        self._allowed = self._usage.measure() + limit_mb * _MB

    def exceeded(self) -> bool:
        try:
            return self._usage.step() > self._allowed
        except (HiddenFiles, TooDeep, OSError):
            # A script that hides its files from the measure, or nests them past what it reads, is taken to be
            # over its quota; so is one whose files the file system fails to measure, rather than the worker
            # failing the run (and its zygote) with an error of its own.
            log.warning("the workspace %s could not be measured", self._workdir, exc_info=True)
            return True

    def close(self) -> None:
        self._usage.close()


class _OutputTail:
    """Passes on each new complete line of a file that a script is writing, which may not exist yet."""

    def __init__(self, path: Path, on_line: Callable[[str], None]) -> None:
        self._path = path
        self._on_line = on_line
        self._offset = 0
        self._partial = b""
        self._lines: deque[bytes] = deque()

    def read(self, budget_s: float, *, final: bool = False) -> None:
        """Pass on what was written since the last read, for about `budget_s` at most: however much a script
        prints, the worker goes on watching it. It holds a chunk of the file at a time, so that a flood of output
        cannot fill the worker's memory either. `final`: the script has ended, so a last line without a newline
        is complete too."""
        until = time.monotonic() + budget_s
        while self._has_line():
            self._on_line(self._lines.popleft().decode(errors="replace"))
            if time.monotonic() >= until:
                return
        if final and self._partial:
            self._on_line(self._partial.decode(errors="replace"))
            self._partial = b""

    def _has_line(self) -> bool:
        """Whether a complete line waits, reading on in the file while none does."""
        while not self._lines:
            chunk = self._next_chunk()
            if not chunk:
                return False
            self._split(chunk)
        return True

    def _next_chunk(self) -> bytes:
        file = _open_log(self._path)
        if file is None:
            return b""
        with file:
            file.seek(self._offset)
            chunk = file.read(_CHUNK_BYTES)
        self._offset += len(chunk)
        return chunk

    def _split(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        # A script that never ends its line is still heard, in pieces, without this holding all it wrote.
        if len(self._partial) >= _MAX_LINE_BYTES:
            lines.append(self._partial)
            self._partial = b""
        self._lines.extend(lines)


def _file_tail(path: Path) -> str:
    """The end of a file, from its first whole line within the last few KB."""
    file = _open_log(path)
    if file is None:
        return ""
    with file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - _STDERR_TAIL_BYTES))
        text = file.read(_STDERR_TAIL_BYTES).decode(errors="replace")
        return text if size <= _STDERR_TAIL_BYTES else text.partition("\n")[2]


def _open_log(path: Path) -> BinaryIO | None:
    """A log the script writes, in the folder it may write: opened only while it is still a regular file, never
    through a link (the worker would read, into the run's error, any file it may: its secret key), a FIFO (it
    would wait on it for good) or a device (/dev/zero, without end). None for a log missing or so replaced."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        return None
    return os.fdopen(descriptor, "rb")


def _confinement(script: Path, workdir: Path) -> dict[str, list[str]]:
    """What a confined script may read and write. Kiln's packages are named one by one, not the folder holding
    them, where the embedded stack keeps its data (.kiln/) by default."""
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sysconfig.get_paths().values()}
    kiln = {str(_IMPORT_ROOT / "services"), str(_IMPORT_ROOT / "shared")}
    readable = [*_SYSTEM_READABLE, *sorted(python), *sorted(kiln), str(script.resolve().parent)]
    return {"read": readable, "write": [*_SYSTEM_WRITABLE, str(workdir)]}


def _private_tmp(workdir: Path) -> Path:
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    return tmp


def _kill_group(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
