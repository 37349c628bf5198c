"""`kiln up` / `kiln down` as a user runs them: every process answers, and afterwards none is left running."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.local import ai4i
from deploy.local.processes import group_alive, pid_alive, start_time
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
# Unset, so the launcher runs its embedded defaults: private Redis, SQLite and a local object folder.
REAL_SERVER_VARIABLES = ("KILN_REDIS_URL", "KILN_DATABASE_URL", "KILN_OBJECT_STORE", "KILN_ADMIN_TOKEN")
ANY_FREE_PORTS = ("--api-port", "0", "--predictor-port", "0", "--flower-port", "0")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "kiln"


@pytest.fixture
def kiln_env(data_dir: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in REAL_SERVER_VARIABLES}
    return {**env, "KILN_DATA_DIR": str(data_dir)}


def kiln(env: dict[str, str], *args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "deploy.local.cli", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=240, check=False)


def test_up_starts_every_process_and_down_stops_them_all(kiln_env: dict[str, str], data_dir: Path) -> None:
    up = kiln(kiln_env, "up", *ANY_FREE_PORTS)
    try:
        assert up.returncode == 0, up.stderr
        stack = json.loads((data_dir / "stack.json").read_text())
        check_stack_file(stack, data_dir)
        check_services_answer(stack)
        again = kiln(kiln_env, "up", *ANY_FREE_PORTS)
        assert again.returncode == 0, again.stderr
        assert f"already up (api {stack['api']})" in again.stdout
    finally:
        down = kiln(kiln_env, "down")
    assert down.returncode == 0, down.stderr
    assert not (data_dir / "stack.json").exists()
    assert [name for name, pid in stack["pids"].items() if group_alive(pid)] == []


def test_a_stack_with_a_dead_process_is_reported_degraded_and_up_says_how_to_restart_it(
    kiln_env: dict[str, str], data_dir: Path
) -> None:
    up = kiln(kiln_env, "up", *ANY_FREE_PORTS)
    try:
        assert up.returncode == 0, up.stderr
        stack = json.loads((data_dir / "stack.json").read_text())
        os.kill(stack["pids"]["api"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(stack["pids"]["api"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        status = kiln(kiln_env, "status")
        again = kiln(kiln_env, "up", *ANY_FREE_PORTS)
    finally:
        down = kiln(kiln_env, "down")

    degraded = (
        f"the stack is degraded: api not running (logs in {data_dir / 'logs'}); `kiln down`, then `kiln up`, "
        "restarts it"
    )
    assert status.returncode == 1
    assert f"api        pid {stack['pids']['api']:<8} NOT RUNNING" in status.stdout
    assert status.stderr == f"kiln status: {degraded}\n"
    assert (again.returncode, again.stdout, again.stderr) == (1, "", f"kiln up: {degraded}\n")
    assert down.returncode == 0, down.stderr
    assert [name for name, pid in stack["pids"].items() if group_alive(pid)] == []


def test_a_run_queued_when_the_stack_goes_down_is_trained_once_it_is_up_again(
    kiln_env: dict[str, str], data_dir: Path, tmp_path: Path
) -> None:
    """Its message waits in Redis while no trainer runs; `kiln down` stops Redis too, and `kiln up` starts it again
    holding the message."""
    csv = tmp_path / "ai4i.csv"
    ai4i.write_csv(ai4i.generate(50_000, seed=1), csv)
    up = kiln(kiln_env, "up", *ANY_FREE_PORTS)
    try:
        assert up.returncode == 0, up.stderr
        stack = json.loads((data_dir / "stack.json").read_text())
        os.killpg(stack["pids"]["trainer"], signal.SIGKILL)
        api = httpx.Client(base_url=stack["api"], headers={"Authorization": f"Bearer {stack['adminToken']}"})
        run_id = submit_training(api, csv)
        assert api.get(f"/v1/orgs/acme/trainings/{run_id}").json()["status"] == "queued"
        api.close()
        down = kiln(kiln_env, "down")
        assert down.returncode == 0, down.stderr

        again = kiln(kiln_env, "up", *ANY_FREE_PORTS)
        assert again.returncode == 0, again.stderr
        stack = json.loads((data_dir / "stack.json").read_text())
        api = httpx.Client(base_url=stack["api"], headers={"Authorization": f"Bearer {stack['adminToken']}"})
        run = eventually(lambda: finished(api, run_id), seconds=120)
        api.close()
    finally:
        down = kiln(kiln_env, "down")

    assert down.returncode == 0, down.stderr
    assert run is not None, "the run is still queued"
    assert (run["status"], run["attempts"]) == ("succeeded", 1), run


def submit_training(api: httpx.Client, csv: Path) -> str:
    assert api.post("/v1/orgs", json={"id": "acme", "name": "Acme"}).status_code == 201
    with csv.open("rb") as handle:
        uploaded = api.post("/v1/orgs/acme/datasets", files={"file": ("ai4i.csv", handle)}, timeout=30)
    assert uploaded.status_code == 201, uploaded.text
    config = {
        "datasetId": uploaded.json()["datasetId"],
        "targetColumn": ai4i.TARGET,
        "featureColumns": list(ai4i.FEATURES),
    }
    submitted = api.post("/v1/orgs/acme/trainings", json=config)
    assert submitted.status_code == 202, submitted.text
    return str(submitted.json()["runId"])


def finished(api: httpx.Client, run_id: str) -> dict[str, Any] | None:
    run: dict[str, Any] = api.get(f"/v1/orgs/acme/trainings/{run_id}").json()
    return run if run["status"] not in ("queued", "running") else None


def test_relative_paths_name_the_operators_folder_in_every_process_of_the_stack(
    kiln_env: dict[str, str], tmp_path: Path
) -> None:
    """The stack's processes run in the repository: a relative path handed down as it was named a folder there."""
    here = tmp_path / "operator"
    here.mkdir()
    relative = {"KILN_DATA_DIR": "kiln", "KILN_LOCAL_STORES_DIR": "stores", "KILN_OBJECT_STORE": "file://objects"}
    env = {**kiln_env, **relative}

    up = kiln(env, "up", *ANY_FREE_PORTS, cwd=here)
    try:
        assert up.returncode == 0, up.stderr
        api = json.loads((here / "kiln" / "stack.json").read_text())["pids"]["api"]
        seen = environment_of(api)
    finally:
        down = kiln(env, "down", cwd=here)

    assert down.returncode == 0, down.stderr
    assert {name: seen[name] for name in relative} == {
        "KILN_DATA_DIR": str(here / "kiln"),
        "KILN_LOCAL_STORES_DIR": str(here / "stores"),
        "KILN_OBJECT_STORE": f"file://{here / 'objects'}",
    }
    assert (here / "objects").is_dir()  # made by the api as it opened its object store


def environment_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def test_up_with_a_redis_out_of_reach_says_so_in_one_line_and_leaves_nothing_running(
    kiln_env: dict[str, str], data_dir: Path
) -> None:
    up = kiln({**kiln_env, "KILN_REDIS_URL": "redis://127.0.0.1:1/0"}, "up", *ANY_FREE_PORTS, "--timeout", "60")

    assert up.returncode == 1
    assert up.stderr.splitlines() == [
        "kiln up: Redis (KILN_REDIS_URL) cannot be reached: Error 111 connecting to 127.0.0.1:1. Connection refused."
    ]
    assert not (data_dir / "stack.json").exists() and not (data_dir / "stack.pid").exists()
    assert processes_started_with(data_dir) == []


def processes_started_with(data_dir: Path) -> list[int]:
    """The running processes whose environment names `data_dir`: every one the stack starts inherits it."""
    named = f"KILN_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and named in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def test_down_with_nothing_running_says_so(kiln_env: dict[str, str]) -> None:
    down = kiln(kiln_env, "down")
    assert down.returncode == 0, down.stderr
    assert "nothing was running" in down.stdout


@pytest.fixture
def stray(data_dir: Path) -> Iterator[int]:
    """A process an unfinished `kiln up` left running, in the pid file as the launcher records one."""
    data_dir.mkdir(parents=True)
    process = subprocess.Popen(["sleep", "120"], start_new_session=True)
    (data_dir / "stack.pid").write_text(f"trainer {process.pid} {start_time(process.pid)}\n")
    yield process.pid
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_pid_file_line_cut_short_is_passed_over_and_down_still_stops_the_rest(
    kiln_env: dict[str, str], data_dir: Path, stray: int
) -> None:
    with (data_dir / "stack.pid").open("a") as pid_file:
        pid_file.write("api 12")  # the launcher stopped mid-write: the pid may be cut short too

    status = kiln(kiln_env, "status")
    down = kiln(kiln_env, "down")

    assert status.returncode == 1
    assert status.stderr.strip() == (
        f"kiln status: processes [{stray}] of an unfinished `kiln up` are still running "
        f"(see {data_dir / 'stack.pid'}): run `kiln down` first"
    )
    assert (down.returncode, down.stdout.strip()) == (0, "stopped trainer"), down.stderr
    assert not group_alive(stray) and not (data_dir / "stack.pid").exists()


# A process only SIGKILL stops, and that takes a moment to go once killed, as a worker holding a model does: the
# kernel first frees the memory it holds.
SLOW_TO_DIE = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); held = b'x' * 300_000_000; "
    "print('ready', flush=True); time.sleep(120)"
)


@pytest.fixture
def slow_to_die(data_dir: Path) -> Iterator[int]:
    """Such a process, in the pid file as the launcher records one."""
    data_dir.mkdir(parents=True)
    command = [sys.executable, "-c", SLOW_TO_DIE]
    with subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        (data_dir / "stack.pid").write_text(f"trainer {process.pid} {start_time(process.pid)}\n")
        yield process.pid
        process.kill()


def test_down_with_no_grace_kills_at_once_and_still_waits_for_the_killed_to_go(
    kiln_env: dict[str, str], data_dir: Path, slow_to_die: int
) -> None:
    down = kiln(kiln_env, "down", "--grace", "0")

    assert (down.returncode, down.stdout.strip()) == (0, "stopped trainer"), down.stderr
    assert not group_alive(slow_to_die) and not (data_dir / "stack.pid").exists()


def test_a_stack_file_missing_fields_is_named_in_one_line_and_down_still_stops_the_stack(
    kiln_env: dict[str, str], data_dir: Path, stray: int
) -> None:
    (data_dir / "stack.json").write_text(json.dumps({"api": "http://127.0.0.1:8000", "pids": {"trainer": stray}}))

    status = kiln(kiln_env, "status")
    down = kiln(kiln_env, "down")

    assert status.returncode == 1
    assert status.stderr.splitlines() == [
        f"kiln status: {data_dir / 'stack.json'} is unreadable (predictor: Field required; flower: Field required; "
        "flowerUser: Field required; flowerPassword: Field required; adminToken: Field required; redis: Field "
        "required; logs: Field required): run `kiln down` first"
    ]
    assert (down.returncode, down.stdout.strip()) == (0, "stopped trainer"), down.stderr
    assert not group_alive(stray)


def test_a_stack_file_without_its_pid_file_stops_no_process_group_it_names(
    kiln_env: dict[str, str], data_dir: Path
) -> None:
    """A stack.json left or copied without its pid file: its pids carry no start time, and may be reused."""
    data_dir.mkdir(parents=True)
    someone_elses = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        (data_dir / "stack.json").write_text(json.dumps({"pids": {"api": someone_elses.pid}}))

        down = kiln(kiln_env, "down")

        assert down.returncode == 0, down.stderr
        assert "nothing was running" in down.stdout
        assert someone_elses.poll() is None
    finally:
        someone_elses.kill()
        someone_elses.wait()


def check_stack_file(stack: dict[str, Any], data_dir: Path) -> None:
    for name in ("api", "predictor", "flower", "redis"):
        assert stack[name].startswith(("http://127.0.0.1:", "redis://")), stack[name]
    assert stack["adminToken"] == (data_dir / "admin_token").read_text().strip()
    assert set(stack["pids"]) == {"redis", "api", "trainer", "predictor", "beat", "sync", "sync-beat", "flower"}
    # It holds the admin token and the Flower password: nobody else may read it.
    assert stat.S_IMODE((data_dir / "stack.json").stat().st_mode) == 0o600
    # The embedded database holds every org's records; its folder holds the secrets and the objects.
    assert stat.S_IMODE((data_dir / "kiln.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def check_services_answer(stack: dict[str, Any]) -> None:
    ready = httpx.get(stack["api"] + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert httpx.get(stack["predictor"] + "/v2/health/live", timeout=10).status_code == 200
    auth = (stack["flowerUser"], stack["flowerPassword"])
    assert httpx.get(stack["flower"] + "/", auth=auth, timeout=10).status_code == 200
    assert httpx.get(stack["flower"] + "/", timeout=10).status_code == 401
