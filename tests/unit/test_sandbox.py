"""The sandbox contains what a training script does: each misbehaviour ends its run with the reason, and the same
Sandbox then runs a good script. Real processes throughout: a zygote, and one child per script."""

from __future__ import annotations

import json
import os
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from services.trainer.sandbox import Limits, Sandbox, ScriptResult
from shared.errors import InvalidInput
from shared.schemas import LIMIT_MAXIMA, OrgConfig, TrainingPolicyInput
from shared.settings import Settings
from shared.workspaces import WorkspaceError
from tests.support.polling import eventually
from tests.support.workspaces import workspace_holder

LIMITS = Limits(timeout_s=30, cpu_s=30, memory_mb=2048, max_file_mb=10, max_open_files=64, disk_mb=1024)
SECRET = "KILN_SECRET_KEY"
# A cancelled run must stop its script well within this.
STOP_WITHIN_S = 5.0
RAISES = """
    def train():
        raise ValueError("no rows to train on")

    train()
"""


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    # The worker's environment holds Kiln's settings and secrets: no script may see them.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET, "not-for-scripts")
        with Sandbox() as sandbox:
            yield sandbox


@dataclass(frozen=True)
class Outcome:
    result: ScriptResult
    lines: list[str]
    workdir: Path


def run(
    sandbox: Sandbox,
    folder: Path,
    source: str,
    *,
    limits: Limits = LIMITS,
    should_stop: Callable[[], bool] = lambda: False,
    on_output: Callable[[str, Path], None] = lambda line, workdir: None,
) -> Outcome:
    lines: list[str] = []
    with sandbox.workspace() as workdir:

        def collect(line: str) -> None:
            lines.append(line)
            on_output(line, workdir)

        result = run_in(sandbox, folder, workdir, source, limits=limits, should_stop=should_stop, on_output=collect)
    return Outcome(result, lines, workdir)


def run_in(
    sandbox: Sandbox,
    folder: Path,
    workdir: Path,
    source: str,
    *,
    limits: Limits = LIMITS,
    should_stop: Callable[[], bool] = lambda: False,
    on_output: Callable[[str], None] = lambda line: None,
) -> ScriptResult:
    """Run the script in a workspace the caller holds."""
    script = folder / "script.py"
    script.write_text(textwrap.dedent(source))
    config = workdir / "config.json"
    config.write_text("{}")
    return sandbox.run(script, config, workdir, limits, should_stop=should_stop, on_output=on_output)


def assert_runs_a_good_script(sandbox: Sandbox, folder: Path) -> None:
    outcome = run(sandbox, folder, 'print("trained")')
    assert outcome.result.ok, outcome.result.reason()
    assert outcome.lines == ["trained"]


MISBEHAVIOURS = {
    "loops": ("while True: pass", replace(LIMITS, timeout_s=1), "timed out after 1 s (the org's limit)"),
    "burns CPU": (
        "while True: pass",
        replace(LIMITS, cpu_s=1),
        "killed by SIGXCPU: used its 1 s of CPU time",
    ),
    "allocates without bound": (
        """
        hoard = []
        while True:
            hoard.append(bytearray(64 * 2**20))
        """,
        replace(LIMITS, memory_mb=1024),
        "ran out of memory (limit 1024 MB)",
    ),
    "writes too big a file": (
        """
        with open("big.bin", "wb") as file:
            while True:
                file.write(bytes(2**20))
        """,
        replace(LIMITS, max_file_mb=3),
        "wrote a file over 3 MB (SIGXFSZ)",
    ),
    "writes too many files": (
        """
        import os, tempfile
        for number in range(200):  # 200 MB: enough to be stopped, little enough to end if not
            with open(os.path.join(tempfile.gettempdir(), f"part-{number}.bin"), "wb") as file:
                file.write(os.urandom(2**20))
        """,
        replace(LIMITS, max_file_mb=2, disk_mb=20),
        "filled its workspace past the disk quota (limit 20 MB)",
    ),
    "holds memory in a memory file": (  # which no address-space limit counts
        """
        import os, sys
        try:
            os.memfd_create("hoard")
        except PermissionError as error:
            sys.exit(f"refused: {error.strerror}")
        """,
        LIMITS,
        "exited with 1: refused: Permission denied",
    ),
    "holds memory in a SysV segment": (  # which outlives the script, too
        """
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        segment = libc.shmget(0, 2**20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
        if segment == -1:
            sys.exit(f"refused: {os.strerror(ctypes.get_errno())}")
        libc.shmctl(segment, 0, None)  # IPC_RMID: the test leaves nothing behind
        """,
        LIMITS,
        "exited with 1: refused: Permission denied",
    ),
    "makes a user namespace": (  # root there, it could mount memory no limit counts
        """
        import ctypes, os, platform, sys, threading
        thread = threading.Thread(target=print)  # made through clone(2), once clone3(2) is refused
        thread.start()
        thread.join()
        libc = ctypes.CDLL(None, use_errno=True)
        clone = {"x86_64": 56, "aarch64": 220}[platform.machine()]
        child = libc.syscall(clone, 0x10000000 | 17, 0, 0, 0, 0)  # CLONE_NEWUSER | SIGCHLD
        if child == 0:
            os._exit(0)
        clone_error = os.strerror(ctypes.get_errno())
        if child > 0:
            os.waitpid(child, 0)
        # Joining its own network namespace would fail only for want of the privilege: refused first, whatever it is.
        with open("/proc/self/ns/net") as namespace:
            joined = libc.setns(namespace.fileno(), 0)
        setns_error = os.strerror(ctypes.get_errno())
        # clone first: unshared into a namespace with no user mapped, a process can make no other in it.
        unshared = libc.unshare(0x10000000)  # CLONE_NEWUSER
        unshare_error = os.strerror(ctypes.get_errno())
        setns = f"setns: {joined} ({setns_error})"
        sys.exit(f"unshare: {unshared} ({unshare_error}), clone: {child} ({clone_error}), {setns}")
        """,
        LIMITS,
        "exited with 1: unshare: -1 (Operation not permitted), clone: -1 (Operation not permitted), "
        "setns: -1 (Operation not permitted)",
    ),
    "segfaults": ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", LIMITS, "killed by SIGSEGV"),
    "raises": (RAISES, LIMITS, "exited with 1: "),
    "exits with a message": ("import sys\nsys.exit('bad config')", LIMITS, "exited with 1: bad config"),
}


@pytest.mark.parametrize(("source", "limits", "reason"), MISBEHAVIOURS.values(), ids=MISBEHAVIOURS.keys())
def test_a_misbehaving_script_fails_its_run_with_the_reason(
    sandbox: Sandbox, tmp_path: Path, source: str, limits: Limits, reason: str
) -> None:
    outcome = run(sandbox, tmp_path, source, limits=limits)

    assert not outcome.result.ok
    assert outcome.result.reason().startswith(reason)
    assert_runs_a_good_script(sandbox, tmp_path)


def test_a_traceback_is_the_scripts_own(sandbox: Sandbox, tmp_path: Path) -> None:
    result = run(sandbox, tmp_path, RAISES).result

    assert result.stderr_tail.startswith(f'Traceback (most recent call last):\n  File "{tmp_path / "script.py"}"')
    assert "zygote" not in result.stderr_tail
    assert "runpy" not in result.stderr_tail
    last_frame = 'in train\nraise ValueError("no rows to train on")\nValueError: no rows to train on'
    assert result.reason().endswith(last_frame)


def test_a_script_sees_only_the_variables_it_is_given(sandbox: Sandbox, tmp_path: Path) -> None:
    assert os.environ[SECRET]
    source = """
        import json, os, tempfile
        print(json.dumps({"env": dict(os.environ), "tmp": tempfile.gettempdir()}))
    """
    outcome = run(sandbox, tmp_path, source)
    seen = json.loads(outcome.lines[0])
    private_tmp = str(outcome.workdir / "tmp")

    assert not [name for name in seen["env"] if name.startswith("KILN_")]
    assert seen["env"] == {
        "PATH": seen["env"]["PATH"],
        "HOME": private_tmp,
        "TMPDIR": private_tmp,
        "LANG": "C.UTF-8",
        "GOMP_SPINCOUNT": "1000",
        "PYTHONHASHSEED": "0",
    }
    assert seen["tmp"] == private_tmp


def test_a_script_runs_alone_in_its_session_with_its_limits_and_no_inherited_files(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    source = """
        import json, os, resource, sys
        print(json.dumps({
            "group_leader": os.getpgid(0) == os.getpid(),
            "session_leader": os.getsid(0) == os.getpid(),
            "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
            "stdin": os.readlink("/proc/self/fd/0"),
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "limits": {name: resource.getrlimit(getattr(resource, name))
                       for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")},
        }))
    """
    outcome = run(sandbox, tmp_path, source)
    seen = json.loads(outcome.lines[0])
    mb = 2**20

    assert seen["group_leader"]
    assert seen["session_leader"]
    assert seen["fds"] == [0, 1, 2, 3]  # 3: the listing of /proc/self/fd itself
    assert seen["stdin"] == os.devnull
    assert seen["argv"] == [str(tmp_path / "script.py"), str(outcome.workdir / "config.json")]
    assert seen["cwd"] == str(outcome.workdir)
    assert seen["limits"] == {
        "RLIMIT_CPU": [LIMITS.cpu_s, LIMITS.cpu_s + 5],
        "RLIMIT_AS": [LIMITS.memory_mb * mb] * 2,
        "RLIMIT_FSIZE": [LIMITS.max_file_mb * mb] * 2,
        "RLIMIT_NOFILE": [LIMITS.max_open_files] * 2,
        "RLIMIT_CORE": [0, 0],
    }


CONNECT = """
    import socket
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
        print("connected")
    except OSError as error:
        print(f"refused: {error}")
"""


def test_a_script_reaches_no_network_unless_the_worker_allows_it(sandbox: Sandbox, tmp_path: Path) -> None:
    """A listener on this machine's loopback, as a database beside the worker would be: the default sandbox's
    script cannot connect to it, one with network "host" can."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        connect = CONNECT.replace("PORT", str(listener.getsockname()[1]))
        cut_off = run(sandbox, tmp_path, connect)
        with Sandbox(network="host") as on_the_host:
            connected = run(on_the_host, tmp_path, connect)

    assert cut_off.result.ok and connected.result.ok, cut_off.result.reason() + connected.result.reason()
    assert cut_off.lines[0].startswith("refused:") and "unreachable" in cut_off.lines[0]
    assert connected.lines == ["connected"]


UNIX_CONNECT = """
    import socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(2)
            client.connect("SOCKET")
        print("connected")
    except OSError as error:
        print(f"refused: {type(error).__name__}")
    left, right = socket.socketpair()
    left.sendall(b"x")
    print("socketpair", right.recv(1).decode())
    import ctypes, errno
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(425, 1, None)  # io_uring_setup, which could make a socket without socket(2)
    print("io_uring", errno.errorcode[ctypes.get_errno()])
"""


def test_a_script_without_the_network_reaches_no_unix_socket_file_either(sandbox: Sandbox, tmp_path: Path) -> None:
    """A service listening on a socket file, as a database or a container runtime beside the worker would be: a
    network namespace does not cut it off, the filter does; a socketpair, which reaches nothing, still works."""
    path = tmp_path / "service.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        connect = UNIX_CONNECT.replace("SOCKET", str(path))
        cut_off = run(sandbox, tmp_path, connect)
        with Sandbox(network="host") as on_the_host:
            connected = run(on_the_host, tmp_path, connect)

    assert cut_off.result.ok and connected.result.ok, cut_off.result.reason() + connected.result.reason()
    assert cut_off.lines == ["refused: PermissionError", "socketpair x", "io_uring EACCES"]
    assert connected.lines[:2] == ["connected", "socketpair x"] and connected.lines[2] != "io_uring EACCES"


REACH = """
    import json, os, signal
    def attempt(action):
        try:
            action()
            return "allowed"
        except OSError as error:
            return type(error).__name__
    print(json.dumps({
        "data": attempt(lambda: open("DATA", "rb").read()),
        "worker environment": attempt(lambda: open("/proc/WORKER/environ", "rb").read()),
        "signal the zygote": attempt(lambda: os.kill(os.getppid(), 0)),
        "signal the worker": attempt(lambda: os.kill(WORKER, 0)),
        "own /proc entry": attempt(lambda: open("/proc/self/status", "rb").read()),
        "write the workspace": attempt(lambda: open("model.txt", "w").write("trees")),
        "write its tmp": attempt(lambda: open(os.path.join(os.environ["TMPDIR"], "scratch"), "w").write("x")),
    }))
"""


def test_a_script_reaches_only_its_own_files_unless_the_worker_allows_more(
    sandbox: Sandbox, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The embedded stack's database (here a file beside the script's folder, as .kiln/kiln.db sits beside
    Kiln's code), the worker's environment under /proc, and signals to the zygote or the worker are out of a
    confined script's reach; with filesystem "host" all of them are reachable."""
    data = tmp_path_factory.mktemp("kiln-data") / "kiln.db"
    data.write_bytes(b"SQLite format 3\x00 every org's records")
    reach = REACH.replace("DATA", str(data)).replace("WORKER", str(os.getpid()))

    confined = run(sandbox, tmp_path, reach)
    with Sandbox(filesystem="host") as on_the_host:
        unconfined = run(on_the_host, tmp_path, reach)

    assert confined.result.ok and unconfined.result.ok, confined.result.reason() + unconfined.result.reason()
    assert json.loads(confined.lines[0]) == {
        "data": "PermissionError",
        "worker environment": "PermissionError",
        "signal the zygote": "PermissionError",
        "signal the worker": "PermissionError",
        "own /proc entry": "allowed",
        "write the workspace": "allowed",
        "write its tmp": "allowed",
    }
    assert set(json.loads(unconfined.lines[0]).values()) == {"allowed"}


def test_progress_lines_arrive_while_the_script_runs(sandbox: Sandbox, tmp_path: Path) -> None:
    # The script goes on only once the test has seen its first line.
    source = """
        import os, time
        print("waiting", flush=True)
        while not os.path.exists("seen"):
            time.sleep(0.05)
        print("done", end="")
    """

    def answer(line: str, workdir: Path) -> None:
        if line == "waiting":
            (workdir / "seen").touch()

    outcome = run(sandbox, tmp_path, source, limits=replace(LIMITS, timeout_s=10), on_output=answer)

    assert outcome.result.ok, outcome.result.reason()
    assert outcome.lines == ["waiting", "done"]


def test_should_stop_kills_a_running_script_and_all_it_started(sandbox: Sandbox, tmp_path: Path) -> None:
    source = """
        import subprocess, time
        helper = subprocess.Popen(["sleep", "600"])
        print(helper.pid, flush=True)
        time.sleep(600)
    """
    helpers: list[int] = []
    asked_at: list[float] = []

    def stop() -> bool:
        if helpers and not asked_at:
            asked_at.append(time.monotonic())
        return bool(asked_at)

    outcome = run(sandbox, tmp_path, source, should_stop=stop, on_output=lambda line, _: helpers.append(int(line)))

    assert outcome.result.cancelled
    assert outcome.result.reason() == "cancelled"
    assert time.monotonic() - asked_at[0] < STOP_WITHIN_S
    assert _gone(helpers[0])
    assert_runs_a_good_script(sandbox, tmp_path)


FLOOD = """
    import sys, time
    for i in range(200_000):
        sys.stdout.write('{"stage": "s%d"}\\n' % i)
    sys.stdout.flush()
    time.sleep(600)
"""


def slow_reader(lines: list[str]) -> Callable[[str, Path], None]:
    """A caller that takes a millisecond over each line, as one writing each to a database would."""

    def read(line: str, _workdir: Path) -> None:
        lines.append(line)
        time.sleep(0.001)

    return read


def test_a_flood_of_output_does_not_keep_a_script_from_being_stopped(sandbox: Sandbox, tmp_path: Path) -> None:
    lines: list[str] = []
    asked_at: list[float] = []

    def stop() -> bool:
        if lines and not asked_at:
            asked_at.append(time.monotonic())
        return bool(asked_at)

    outcome = run(sandbox, tmp_path, FLOOD, should_stop=stop, on_output=slow_reader(lines))

    assert outcome.result.cancelled
    assert time.monotonic() - asked_at[0] < STOP_WITHIN_S
    assert_runs_a_good_script(sandbox, tmp_path)


def test_a_flood_of_output_does_not_keep_a_script_past_its_timeout(sandbox: Sandbox, tmp_path: Path) -> None:
    started = time.monotonic()

    outcome = run(sandbox, tmp_path, FLOOD, limits=replace(LIMITS, timeout_s=2), on_output=slow_reader([]))

    assert outcome.result.reason() == "timed out after 2 s (the org's limit)"
    assert time.monotonic() - started < 2 + STOP_WITHIN_S


WORKER_SECRET = "worker-only-0123456789"
LOG_REPLACEMENTS = {
    "stderr-link-to-a-worker-file": ("stderr.log", "os.symlink({secret!r}, 'stderr.log')"),
    "stdout-link-to-a-worker-file": ("stdout.log", "os.symlink({secret!r}, 'stdout.log')"),
    "stderr-fifo": ("stderr.log", "os.mkfifo('stderr.log')"),
    "stdout-fifo": ("stdout.log", "os.mkfifo('stdout.log')"),
    "stderr-link-to-dev-zero": ("stderr.log", "os.symlink('/dev/zero', 'stderr.log')"),
    "stdout-link-to-dev-zero": ("stdout.log", "os.symlink('/dev/zero', 'stdout.log')"),
}


@pytest.mark.parametrize(("log", "replacement"), LOG_REPLACEMENTS.values(), ids=LOG_REPLACEMENTS.keys())
def test_a_log_the_script_replaces_is_read_as_no_output(
    sandbox: Sandbox, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, log: str, replacement: str
) -> None:
    """The worker read the script's logs by their names, in the folder the script writes: a link had it read any
    file it may into the run's error (its secret key), a FIFO held it for good, /dev/zero filled its memory."""
    secret = tmp_path_factory.mktemp("worker") / "secret_key"  # beside, not beneath, the script's readable folder
    secret.write_text(WORKER_SECRET + "\n")
    source = f"""
        import os, sys
        print("started", flush=True)
        os.remove({log!r})
        {replacement.format(secret=str(secret))}
        sys.exit(3)
    """
    finished: list[Outcome] = []
    running = threading.Thread(target=lambda: finished.append(run(sandbox, tmp_path, source)), daemon=True)
    running.start()
    running.join(LIMITS.timeout_s + STOP_WITHIN_S)

    assert finished, "the worker was still reading the script's log"
    assert finished[0].result.reason() == "exited with 3: (nothing on stderr)"
    assert WORKER_SECRET not in str(finished[0])
    assert_runs_a_good_script(sandbox, tmp_path)


def test_nothing_a_script_started_outlives_its_run(sandbox: Sandbox, tmp_path: Path) -> None:
    source = """
        import subprocess
        print(subprocess.Popen(["sleep", "600"]).pid)
    """
    outcome = run(sandbox, tmp_path, source)

    assert outcome.result.ok
    assert _gone(int(outcome.lines[0]))


def test_what_a_script_started_in_a_session_of_its_own_does_not_outlive_the_run_either(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """setsid() takes a process out of the script's group, which killing the group misses; its parent ending hands
    it to the zygote (a subreaper), which kills it."""
    source = """
        import os, subprocess, sys, time
        escaped = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(600)"])
        time.sleep(0.3)  # time to leave
        print(escaped.pid, os.getsid(escaped.pid) != os.getsid(0), flush=True)
    """
    outcome = run(sandbox, tmp_path, source)

    assert outcome.result.ok, outcome.result.reason()
    pid, escaped = outcome.lines[0].split()
    assert escaped == "True"
    assert _gone(int(pid))
    assert_runs_a_good_script(sandbox, tmp_path)


CHAIN = 1500


def test_a_deep_chain_of_processes_a_script_leaves_is_killed_whole(sandbox: Sandbox, tmp_path: Path) -> None:
    """Each link starts the next in the background and becomes a sleep: the zygote killed them a generation at a
    time, one look at the process table each, which outlasted the worker's patience; the worker then killed the
    zygote and most of the chain lived on, past every limit of the run."""
    (tmp_path / "chain.sh").write_text(
        'n=$1; if [ "$n" -gt 0 ]; then sh "$0" $((n-1)) & else echo done > chain.done; fi; exec sleep 987654\n'
    )
    source = f"""
        import os, subprocess, sys, time
        if os.fork() == 0:
            os.setsid()
            subprocess.Popen(["sh", {str(tmp_path / "chain.sh")!r}, "{CHAIN}"])
            os._exit(0)
        while not os.path.exists("chain.done"):  # in its workspace, where the chain runs
            time.sleep(0.1)
        print("chained", flush=True)
        time.sleep(600)
    """
    outcome = run(sandbox, tmp_path, source, limits=replace(LIMITS, timeout_s=20))

    # Stopped, the zygote has the worker's grace of some seconds to kill and reap what the run left.
    assert outcome.lines == ["chained"] and outcome.result.reason() == "timed out after 20 s (the org's limit)"
    assert eventually(lambda: _sleepers() == [], seconds=10), f"{len(_sleepers())} of the chain live on"
    assert_runs_a_good_script(sandbox, tmp_path)


def _sleepers() -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        with suppress(OSError):
            if entry.name.isdigit() and b"987654" in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def test_the_workspace_is_removed_however_the_run_ended(sandbox: Sandbox, tmp_path: Path) -> None:
    source = """
        import os
        os.makedirs("locked/inner")
        open("locked/inner/model.txt", "w").close()
        os.chmod("locked", 0)
        os.symlink("/", "root")
        raise SystemExit(3)
    """
    outcome = run(sandbox, tmp_path, source)

    assert outcome.result.reason().startswith("exited with 3")
    assert not outcome.workdir.exists()


# Folders nested 2,000 deep (past Python's recursion limit), named so that the path to the bottom outgrows PATH_MAX
# (4,096 bytes) twenty times over; made one at a time from inside the last, as a script can.
NESTS_DEEP = """
    import os
    for _ in range(2000):
        os.mkdir("d" * 51)
        os.chdir("d" * 51)
"""


def test_a_script_nesting_folders_past_path_max_ends_with_its_own_reason_and_its_workspace_removed(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    source = textwrap.dedent(NESTS_DEEP) + "open('rows.bin', 'wb').write(os.urandom(2**20))\n" + HOLD_ON
    source += "raise SystemExit(4)\n"

    outcome = run(sandbox, tmp_path, source, limits=replace(LIMITS, disk_mb=20))

    assert outcome.result.reason() == "exited with 4: (nothing on stderr)"
    assert not outcome.workdir.exists()


def test_a_script_filling_its_quota_at_the_bottom_of_a_deep_tree_is_stopped_and_its_workspace_removed(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    source = """
        for number in range(20):  # 40 MB: enough to be stopped, little enough to end if not
            with open(f"part-{number}.bin", "wb") as file:
                file.write(os.urandom(2 * 2**20))
    """
    source = textwrap.dedent(NESTS_DEEP) + textwrap.dedent(source) + HOLD_ON

    outcome = run(sandbox, tmp_path, source, limits=replace(LIMITS, max_file_mb=2, disk_mb=20))

    assert outcome.result.reason() == "filled its workspace past the disk quota (limit 20 MB)"
    assert not outcome.workdir.exists()
    assert_runs_a_good_script(sandbox, tmp_path)


def test_a_script_that_fills_its_workspace_is_stopped_soon_and_the_workspace_removed(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Each file under the file-size limit, in its private tmp and its folder: only the quota stops it."""
    source = """
        import os
        for number in range(200):  # 200 MB: enough to be stopped, little enough to end if not
            folder = "tmp" if number % 2 else "."
            with open(os.path.join(folder, f"part-{number}.bin"), "wb") as file:
                file.write(os.urandom(2**20))
    """
    started = time.monotonic()
    outcome = run(sandbox, tmp_path, source, limits=replace(LIMITS, max_file_mb=2, disk_mb=30))

    assert outcome.result.reason() == "filled its workspace past the disk quota (limit 30 MB)"
    assert outcome.result.signal == "SIGKILL"
    assert time.monotonic() - started < 10
    assert not outcome.workdir.exists()
    assert_runs_a_good_script(sandbox, tmp_path)


# Long enough for the quota to be measured many times while the script waits.
HOLD_ON = "\nimport time\ntime.sleep(1.5)\n"


def test_a_script_that_writes_below_its_quota_succeeds_beside_the_workers_own_files(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """The rows the worker put in the workspace before the script started are not the script's to answer for."""
    source = """
        import os
        for number in range(8):
            with open(f"tmp/part-{number}.bin", "wb") as file:
                file.write(os.urandom(2**20))
    """
    source = textwrap.dedent(source) + HOLD_ON
    with sandbox.workspace() as workdir:
        (workdir / "source.parquet").write_bytes(os.urandom(40 * 2**20))
        result = run_in(sandbox, tmp_path, workdir, source, limits=replace(LIMITS, disk_mb=16))

    assert result.ok, result.reason()


def test_a_link_to_a_big_file_outside_the_workspace_is_not_counted(sandbox: Sandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(os.urandom(40 * 2**20))
    source = f"""
        import os
        os.symlink({str(outside / "big.bin")!r}, "big.bin")
        os.symlink({str(outside)!r}, "tmp/outside")
    """
    source = textwrap.dedent(source) + HOLD_ON

    outcome = run(sandbox, tmp_path, source, limits=replace(LIMITS, disk_mb=16))

    assert outcome.result.ok, outcome.result.reason()


def test_a_file_of_several_names_is_counted_once(sandbox: Sandbox, tmp_path: Path) -> None:
    source = """
        import os
        with open("model.bin", "wb") as file:
            file.write(os.urandom(8 * 2**20))
        for name in ("a.bin", "b.bin", "tmp/c.bin"):
            os.link("model.bin", name)
    """
    source = textwrap.dedent(source) + HOLD_ON

    outcome = run(sandbox, tmp_path, source, limits=replace(LIMITS, disk_mb=16))

    assert outcome.result.ok, outcome.result.reason()


def test_a_folder_the_script_makes_unreadable_is_counted_all_the_same(sandbox: Sandbox, tmp_path: Path) -> None:
    source = """
        import os
        os.makedirs("hidden/deeper")
        for number in range(30):
            with open(f"hidden/deeper/part-{number}.bin", "wb") as file:
                file.write(os.urandom(2**20))
        os.chmod("hidden/deeper", 0)
        os.chmod("hidden", 0)
    """
    source = textwrap.dedent(source) + HOLD_ON

    outcome = run(sandbox, tmp_path, source, limits=replace(LIMITS, max_file_mb=2, disk_mb=20))

    assert outcome.result.reason() == "filled its workspace past the disk quota (limit 20 MB)"
    assert not outcome.workdir.exists()


def test_the_workspaces_a_killed_worker_left_are_swept_and_a_live_workers_kept(tmp_path: Path) -> None:
    """A worker killed mid-run cannot remove its run's workspace; a sweep does, leaving the others' runs alone."""
    root = tmp_path / "workspaces"
    with workspace_holder(root) as (killed, left), workspace_holder(root) as (_live, held):
        killed.kill()
        killed.wait()
        assert (left / "source.parquet").exists()

        swept = Sandbox(workspaces_root=root).sweep_workspaces()

        assert swept == [left] and not left.exists()
        assert (held / "source.parquet").exists()
    assert Sandbox(workspaces_root=root).sweep_workspaces() == []
    assert list(root.iterdir()) == []


def test_a_folder_of_workspaces_others_may_enter_is_refused(tmp_path: Path) -> None:
    """In a shared temporary folder another user could make it first, to read the rows runs put there."""
    root = tmp_path / "workspaces"
    root.mkdir()
    root.chmod(0o777)

    with pytest.raises(WorkspaceError, match="only this user can enter"), Sandbox(workspaces_root=root).workspace():
        pass


def test_start_launches_the_one_zygote_that_runs_the_scripts(tmp_path: Path) -> None:
    before = _zygotes_of_this_process()
    with Sandbox() as fresh:
        fresh.start()
        fresh.start()
        outcome = run(fresh, tmp_path, "import os\nprint(os.getppid())")
        # Read once a script has run: until the child has exec'd, its command line is still this process's.
        started = _zygotes_of_this_process() - before

    assert started == {int(outcome.lines[0])}


def test_a_killed_zygote_is_replaced(sandbox: Sandbox, tmp_path: Path) -> None:
    source = "import os\nprint(os.getppid())"
    first = int(run(sandbox, tmp_path, source).lines[0])
    os.kill(first, signal.SIGKILL)

    second = run(sandbox, tmp_path, source)

    assert second.result.ok
    assert int(second.lines[0]) != first


def test_a_script_that_kills_its_zygote_fails_and_the_next_run_works(tmp_path: Path) -> None:
    """Only an unconfined script can signal its zygote (a confined one is refused, above)."""
    source = """
        import os, signal, time
        print(os.getpid(), flush=True)
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(600)
    """
    with Sandbox(filesystem="host") as unconfined:
        outcome = run(unconfined, tmp_path, source)

        assert not outcome.result.ok
        assert outcome.result.reason().startswith("lost: the sandbox's zygote ended during the run")
        assert _gone(int(outcome.lines[0]))
        assert_runs_a_good_script(unconfined, tmp_path)


def test_limits_come_from_settings_and_take_an_orgs_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    # The module's sandbox fixture, still set up, put a value in the worker's environment that is no secret key.
    monkeypatch.delenv(SECRET)
    limits = Limits.from_settings(Settings(training_timeout_s=60, training_memory_mb=1024, training_disk_mb=2048))

    overridden = limits.with_overrides({"timeoutS": 30, "memoryMb": 512.0, "maxOpenFiles": 128, "diskMb": 64})

    assert (limits.timeout_s, limits.memory_mb, limits.disk_mb) == (60, 1024, 2048)
    assert (overridden.timeout_s, overridden.memory_mb, overridden.max_open_files) == (30, 512, 128)
    assert overridden.disk_mb == 64
    assert isinstance(overridden.memory_mb, int)
    assert overridden.cpu_s == limits.cpu_s


@pytest.mark.parametrize(
    "overrides", [{"timeout": 30}, {"memoryMb": 0}, {"cpuS": 1.5}, {"maxFileMb": True}, {"diskMb": -1}]
)
def test_a_bad_override_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        LIMITS.with_overrides(overrides)


def _zygotes_of_this_process() -> set[int]:
    zygotes = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(FileNotFoundError, ProcessLookupError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == os.getpid() and b"services.trainer.zygote" in (entry / "cmdline").read_bytes():
                zygotes.add(int(entry.name))
    return zygotes


def _gone(pid: int) -> bool:
    """Whether the process ends within a moment: SIGKILL takes effect when the process is next scheduled."""
    deadline = time.monotonic() + 2.0
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    # A killed process whose parent is gone shows as a zombie until init reaps it.
    return state != "Z"


def test_a_script_runs_under_the_largest_limits_an_org_may_set(sandbox: Sandbox, tmp_path: Path) -> None:
    limits = LIMITS.with_overrides(TrainingPolicyInput.model_validate(LIMIT_MAXIMA).limit_overrides())
    outcome = run(sandbox, tmp_path, 'print("trained")', limits=limits)
    assert outcome.result.ok, outcome.result.reason()


def test_a_limit_stored_over_its_maximum_is_held_at_it_and_the_script_runs(sandbox: Sandbox, tmp_path: Path) -> None:
    """Stored before the api refused such limits, memoryMb 10^24 failed every run of the org: setrlimit raised
    OverflowError. The stored config still reads, and the limit is held at its maximum."""
    stored = OrgConfig.model_validate({"training": {"memoryMb": 10**24, "cpuS": 10**24, "maxOpenFiles": 128}})
    overrides = stored.training.limit_overrides()
    assert overrides == {"memoryMb": LIMIT_MAXIMA["memoryMb"], "cpuS": LIMIT_MAXIMA["cpuS"], "maxOpenFiles": 128}
    outcome = run(sandbox, tmp_path, 'print("trained")', limits=LIMITS.with_overrides(overrides))
    assert outcome.result.ok, outcome.result.reason()
