"""The fork server that runs training scripts: `python -m services.trainer.zygote`, started by sandbox.Sandbox.

Starting `python SCRIPT` costs ~1.7 s here, nearly all of it importing LightGBM and the libraries around it. The
zygote pays that once: it imports them, then forks one child per run, and the child becomes what
`python SCRIPT CONFIG.json` would be, with those modules already loaded. The child gets its own session and
process group, the run's environment and nothing else, resource limits, its output in the run's folder, no
file descriptor of the zygote's but 0, 1 and 2, and (unless the run says otherwise) no network and only its own
files. The zygote is a subreaper: when a run ends, whatever the script left behind, in its group or not, is
killed.

Three rules keep this safe:
- The zygote only imports. Running OpenMP code here (any LightGBM training) would start libgomp's thread pool,
  which a forked child inherits as if alive but without its threads, and LightGBM then hangs in the child.
- It holds no secrets: the Sandbox starts it with a small explicit environment, and it never reads Kiln's settings.
- Libraries read their environment when loaded, which is here: GOMP_SPINCOUNT and PYTHONHASHSEED take effect
  from the zygote's environment, for every script, not from a run's.

Where a script sees a difference from `python SCRIPT`: its process ends when the script does, without running
atexit handlers or waiting for non-daemon threads; and SIGXFSZ kills it at the file-size limit (Python ignores
that signal, which turns an oversize write into an error that a script or a C library may drop).

Protocol, one JSON object per line. On stdin, a run request
    {"script": str, "config": str, "workdir": str, "env": {str: str}, "network": "none" | "host",
     "filesystem": {"read": [str], "write": [str]} | null,
     "limits": {"cpu_s": int, "memory_mb": int, "max_file_mb": int, "max_open_files": int}}
or {"stop": true}, which kills the running script's process group. On stdout, {"started": pid} as soon as the
child exists, then {"exited": pid, "returncode": int | null, "signal": str | null, "cpu_s": float,
"max_rss_mb": float} when it has ended. One run at a time: the next request waits for "exited". EOF on stdin
(the worker is gone) kills a running script and ends the zygote.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import resource
import runpy
import select
import signal
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import suppress
from typing import IO, Any, NoReturn

import numpy

from services.trainer.confinement import confine_files
from services.trainer.syscall_filters import forbid_memory_files_and_user_namespaces, forbid_unix_sockets

PRELOADED = (
    "numpy",
    "pyarrow",
    "pyarrow.parquet",
    "lightgbm",
    "onnx",
    "onnxmltools",
    "onnxmltools.convert.lightgbm",
    # The built-in script's own imports (pydantic, scikit-learn's splitting, onnxruntime): ~0.2 s more per run.
    "shared.schemas",
    "services.trainer.pipeline.train",
    "services.trainer.pipeline.export",
)
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"

_MB = 1024 * 1024
# Past its CPU-time limit a script gets SIGXCPU, which it may catch; this much later, SIGKILL.
_CPU_GRACE_S = 5
_READ_BYTES = 65536
# unshare(2) flags (os.unshare arrives with Python 3.12).
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_CHILD_SUBREAPER = 36

Message = dict[str, Any]


class MessageReader:
    """JSON messages, one per line, from a pipe. One read may bring several, which are kept: wait on the pipe
    with select() only once receive(timeout=0) has returned None."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._partial = b""
        self._ready: deque[Message] = deque()

    def fileno(self) -> int:
        return self._fd

    def receive(self, timeout: float | None) -> Message | None:
        """The next message, waiting up to `timeout` seconds (None: no limit) for the pipe to be readable. None
        when no whole message has come, which may be early if only part of a line did. EOFError once the
        writer has closed the pipe."""
        if not self._ready and select.select([self._fd], [], [], timeout)[0]:
            chunk = os.read(self._fd, _READ_BYTES)
            if not chunk:
                raise EOFError("the pipe's writer has closed it")
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            self._ready.extend(json.loads(line) for line in lines if line.strip())
        return self._ready.popleft() if self._ready else None


def send(stream: IO[bytes], message: Message) -> None:
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


def main() -> None:
    _become_subreaper()
    replies = os.fdopen(os.dup(1), "wb")
    # Anything a library prints goes to stderr, so that stdout carries replies only.
    os.dup2(2, 1)
    for name in PRELOADED:
        importlib.import_module(name)
    # A child's garbage collector would otherwise walk, and so copy page by page, every object imported here.
    gc.freeze()
    serve(MessageReader(0), replies)


def serve(commands: MessageReader, replies: IO[bytes]) -> None:
    """Run one script per request until stdin closes."""
    while (request := _next_request(commands)) is not None:
        child = _spawn(request)
        send(replies, {"started": child})
        worker_gone = not _wait_for_exit(child, commands)
        report = _reap(child)
        if worker_gone:
            return
        send(replies, report)


def _next_request(commands: MessageReader) -> Message | None:
    """The next run request, or None at EOF. A stop that arrives after its script has ended is dropped."""
    with suppress(EOFError):
        while True:
            message = commands.receive(timeout=None)
            if message is not None and "script" in message:
                return message
    return None


def _wait_for_exit(child: int, commands: MessageReader) -> bool:
    """Block until the child has ended, killing its group when asked to. False if stdin closed meanwhile, in
    which case the child was killed too. The child is left unreaped."""
    exited = os.pidfd_open(child)
    try:
        while exited not in select.select([exited, commands.fileno()], [], [])[0]:
            while (message := commands.receive(timeout=0)) is not None:
                if message.get("stop"):
                    _kill_group(child)
    except EOFError:
        _kill_group(child)
        select.select([exited], [], [])
        return False
    finally:
        os.close(exited)
    return True


def _reap(child: int) -> Message:
    # Until it is reaped the child's pid, which is also its group's id, cannot be reused: what it left running in
    # its group is killed now, so that nothing of a run outlives it.
    _kill_group(child)
    _, status, usage = os.wait4(child, 0)
    _kill_strays()
    killed_by = signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else None
    return {
        "exited": child,
        "returncode": None if killed_by else os.WEXITSTATUS(status),
        "signal": killed_by,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mb": usage.ru_maxrss / 1024,
    }


def _become_subreaper() -> None:
    """Processes a script leaves behind come to the zygote when their parent ends, rather than to init: even one
    that left the script's group and session (setsid), which killing the group misses."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"the zygote cannot become a subreaper: {os.strerror(error)}")


def _kill_strays() -> None:
    """Kill and reap everything the zygote's runs left, once a run's script has ended: one run at a time, so each
    descendant is something that run left behind. All of them are killed at once, from one look at the process
    table: killing them a generation at a time took one look per generation, and a chain of 2,500 processes
    outlasted the worker's patience, which then killed the zygote and left most of them running. Killed together,
    the ones whose parents die too come to the zygote (a subreaper) as zombies; the next look reaps those, and
    kills anything forked meanwhile."""
    while strays := _descendants():
        below = {os.getpid(), *strays}
        for pid in strays:
            _kill_if_below(pid, below)
        for pid in set(_children()).intersection(strays):  # not one forked since the look: it lives until the next
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _kill_if_below(pid: int, below: set[int]) -> None:
    """SIGKILL through a pidfd, once the process it holds is seen to have its parent among `below`: a process the
    look saw may have ended since (reaped by its own parent, one of the run's) and its pid gone to another, which
    the pidfd then holds, and whose parent is none of the run's. A zygote's own child cannot be so replaced."""
    try:
        handle = os.pidfd_open(pid)
    except OSError:  # gone
        return
    try:
        if _parent_of(pid) in below:
            signal.pidfd_send_signal(handle, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(handle)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # After the command's closing parenthesis (the command may hold any character): state, ppid.
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descendants() -> list[int]:
    """Every process below the zygote, from one look at /proc."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents():
        children.setdefault(parent, []).append(pid)
    found, below = [], children.get(os.getpid(), [])
    while below:
        found.extend(below)
        below = [child for pid in below for child in children.get(pid, [])]
    return found


def _children() -> list[int]:
    me = os.getpid()
    return [pid for pid, parent in _parents() if parent == me]


def _parents() -> Iterator[tuple[int, int]]:
    """Each process's pid and its parent's; a process gone meanwhile is left out."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (parent := _parent_of(int(entry.name))) is not None:
            yield int(entry.name), parent


def _kill_group(child: int) -> None:
    try:
        os.killpg(child, signal.SIGKILL)
    except ProcessLookupError:
        # Only just forked, the child may not lead a group of its own yet; then it has started nothing else.
        os.kill(child, signal.SIGKILL)


def _spawn(request: Message) -> int:
    # Whatever sits in these buffers would otherwise be written again by the child.
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        _become_script(request)
    return child


def _become_script(request: Message) -> NoReturn:
    """In the child: isolate it, run the script, and exit with its status. Never returns into the zygote's loop."""
    status = 1
    try:
        os.setsid()
        _redirect_files(request["workdir"])
        if request["network"] == "none":
            _leave_the_network()
            forbid_unix_sockets()  # socket files stay reachable from a network namespace
        forbid_memory_files_and_user_namespaces()
        os.chdir(request["workdir"])
        _replace_environment(request["env"])
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        _apply_limits(request["limits"])
        if request["filesystem"] is not None:
            confine_files(request["filesystem"]["read"], request["filesystem"]["write"])
        status = _run_script(request["script"], request["config"])
    except BaseException:
        # A failure to set up the child: it reaches the run's stderr.log, or the worker's log if it came first.
        with suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(status)


def _redirect_files(workdir: str) -> None:
    """stdin from /dev/null, stdout and stderr to the run's log files, and every other descriptor closed."""
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, os.path.join(workdir, STDOUT_LOG), os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, os.path.join(workdir, STDERR_LOG), os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))


def _leave_the_network() -> None:
    """A network namespace of the child's own, whose only interface is a loopback that is down: no connection
    leaves it, not even to this machine's databases. That takes CAP_SYS_ADMIN; without it, a user namespace of the
    child's own grants it there (where the kernel lets unprivileged users make one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) == 0 or libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        return
    error = ctypes.get_errno()
    raise OSError(
        error,
        f"cannot cut the training script off the network ({os.strerror(error)}): this machine allows no network "
        "namespace here; KILN_TRAINING_NETWORK=host lets scripts share the machine's network instead",
    )


def _replace_environment(env: Mapping[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    # gettempdir() remembers its first answer, and an import in the zygote may have asked already.
    tempfile.tempdir = None


def _apply_limits(limits: Mapping[str, int]) -> None:
    cpu_s = limits["cpu_s"]
    for limit, soft, hard in (
        (resource.RLIMIT_CPU, cpu_s, cpu_s + _CPU_GRACE_S),
        (resource.RLIMIT_AS, limits["memory_mb"] * _MB, limits["memory_mb"] * _MB),
        (resource.RLIMIT_FSIZE, limits["max_file_mb"] * _MB, limits["max_file_mb"] * _MB),
        (resource.RLIMIT_NOFILE, limits["max_open_files"], limits["max_open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        # A limit can only be lowered: one above the zygote's own hard limit is held at that limit.
        ceiling = resource.getrlimit(limit)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(limit, (soft, hard))


def _run_script(script: str, config: str) -> int:
    """Run the script as `python SCRIPT CONFIG` would, and return its exit status."""
    sys.argv = [script, config]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    # The global generator's state was copied from the zygote; a fresh interpreter would seed it anew.
    numpy.random.seed()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_request:
        return _exit_status(exit_request.code)
    except BaseException as error:
        _print_traceback(error, script)
        return 1
    finally:
        _flush_output()
    return 0


def _exit_status(code: object) -> int:
    """What Python makes of sys.exit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _print_traceback(error: BaseException, script: str) -> None:
    """The traceback from the script's first frame on, as `python SCRIPT` shows it: the zygote's and runpy's
    frames are left out. A script that does not compile has no frame of its own, and shows just the error."""
    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename != script:
        frames = frames.tb_next
    with suppress(BaseException):
        traceback.print_exception(type(error), error, frames)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    main()
