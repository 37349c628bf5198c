"""Many organizations on one pool of real worker processes (PostgreSQL, Redis, S3): limits that hold across
workers even when one is killed, fairness between orgs, one execution per run, data that stays on its premises,
schedules fired by two beats at once, and Flower showing and revoking a run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, update

import services.trainer.scripts
from deploy.local import ai4i, stack
from deploy.local.launch import worker_ready
from deploy.local.processes import spawn, stop_groups
from shared.db.models import Organization, Schedule
from shared.db.session import make_session_factory, session_scope
from shared.db.types import utcnow
from shared.settings import Settings
from shared.storage import open_object_store
from tests.conftest import ADMIN_TOKEN, SECRET_KEY
from tests.e2e.conftest import ANY_FREE_PORTS, REPO_ROOT, kiln
from tests.support.servers import S3Server, fresh_postgres_database, redis_for_tests

pytestmark = pytest.mark.e2e

LEASE_S = 3.0
BUILT_IN = Path(services.trainer.scripts.__file__).parent / "train_lightgbm.py"
TERMINAL = {"succeeded", "rejected", "failed", "cancelled"}


def sleeper(seconds: float) -> str:
    """A training script that takes `seconds` longer than the built-in one, then is the built-in one."""
    return f"import runpy, time\ntime.sleep({seconds})\nrunpy.run_path({str(BUILT_IN)!r}, run_name='__main__')\n"


# The script's parent is the zygote, whose parent is the worker's pool process: this kills the worker.
KILLER = "import os, signal\nworker = int(open(f'/proc/{os.getppid()}/stat').read().rsplit(')', 1)[1].split()[1])\n"
KILLER += "os.kill(worker, signal.SIGKILL)\n"

SCRIPTS = {"sleeps_1.py": sleeper(1), "sleeps_60.py": sleeper(60), "kills_worker.py": KILLER}


@pytest.fixture(scope="module")
def cluster_settings(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    folder = tmp_path_factory.mktemp("tenancy")
    scripts = folder / "scripts"
    scripts.mkdir()
    for name, body in SCRIPTS.items():
        (scripts / name).write_text(body)
    with fresh_postgres_database() as database_url:
        yield Settings(
            data_dir=folder / "kiln",
            database_url=database_url,
            redis_url=redis_for_tests(),
            object_store="s3://kiln-tenancy",
            s3_endpoint=s3_server.endpoint,
            s3_access_key=s3_server.access_key,
            s3_secret_key=SecretStr(s3_server.secret_key),
            admin_token=SecretStr(ADMIN_TOKEN),
            secret_key=SecretStr(SECRET_KEY),
            run_lease_s=LEASE_S,
            beat_tick_s=0.5,
            training_scripts_dir=scripts,
            # kills_worker.py stands for a worker lost mid-run; a script confined to its files may not signal it.
            training_filesystem="host",
            flower_password=SecretStr("flower-test-password"),
        )


@pytest.fixture(scope="module")
def cluster(cluster_settings: Settings) -> Iterator[stack.Stack]:
    """`kiln up` (api, worker trainer1, beat, predictor, Flower) shared by this module's tests."""
    env = {**os.environ, **cluster_settings.as_env()}
    up = kiln(env, "up", *ANY_FREE_PORTS)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield stack.Stack.model_validate(json.loads((cluster_settings.data_dir / "stack.json").read_text()))
    finally:
        kiln(env, "down")


class Processes:
    """Extra workers and beats a test starts; all stopped at its end."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.env = {**os.environ, **settings.as_env()}
        self.settings = settings
        self.folder = folder
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def worker(self, name: str, *, orgs: str | None = None) -> str:
        node = f"{name}@{os.uname().nodename}"
        env = {**self.env, **({"KILN_WORKER_ORGS": orgs} if orgs else {})}
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "services.trainer.celery_app",
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            "1",
            "--hostname",
            f"{name}@%h",
        ]
        process = spawn(command, env=env, cwd=REPO_ROOT, log_path=self.folder / f"{name}.log")
        self.started[node] = process
        wait(worker_ready(self.settings.redis_url, node, process.pid), seconds=60)
        return node

    def beat(self, name: str) -> None:
        command = [sys.executable, "-m", "celery", "-A", "services.trainer.celery_app", "beat", "--loglevel", "INFO"]
        self.started[name] = spawn(command, env=self.env, cwd=REPO_ROOT, log_path=self.folder / f"{name}.log")

    def kill(self, node: str) -> None:
        process = self.started.pop(node)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        stop_groups([process.pid for process in self.started.values()], grace_s=5)
        for process in self.started.values():
            process.wait()


@pytest.fixture
def processes(cluster_settings: Settings, tmp_path: Path) -> Iterator[Processes]:
    started = Processes(cluster_settings, tmp_path)
    yield started
    started.stop()


def wait(condition: Callable[[], Any], *, seconds: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(every)
    pytest.fail(f"not within {seconds} s: {condition}")


def admin_key(cluster: stack.Stack, org_id: str, *, config: dict[str, Any] | None = None) -> str:
    """An admin key of the org, which is created first when `config` is given."""
    admin = {"Authorization": f"Bearer {cluster.admin_token}"}
    with httpx.Client(base_url=cluster.api, headers=admin, timeout=30) as client:
        if config is not None:
            client.post("/v1/orgs", json={"id": org_id, "name": org_id, "config": config}).raise_for_status()
        return str(client.post(f"/v1/orgs/{org_id}/keys", json={"role": "admin"}).json()["key"])


class Org:
    def __init__(self, cluster: stack.Stack, org_id: str, key: str) -> None:
        self.id = org_id
        self.api = httpx.Client(base_url=cluster.api, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def upload(self, rows: int) -> str:
        table = ai4i.generate(rows, seed=7)
        sink = Path(f"/tmp/kiln-tenancy-{self.id}.csv")
        ai4i.write_csv(table, sink)
        with sink.open("rb") as handle:
            response = self.api.post(f"/v1/orgs/{self.id}/datasets", files={"file": ("d.csv", handle)})
        sink.unlink()
        response.raise_for_status()
        return str(response.json()["datasetId"])

    def submit(self, dataset_id: str | None, trees: int = 10) -> str:
        body = {
            "datasetId": dataset_id,
            "targetColumn": ai4i.TARGET,
            "featureColumns": list(ai4i.FEATURES),
            "hyperparameters": {"numIterations": trees},
        }
        response = self.api.post(f"/v1/orgs/{self.id}/trainings", json=body)
        response.raise_for_status()
        return str(response.json()["runId"])

    def run(self, run_id: str) -> dict[str, Any]:
        return dict(self.api.get(f"/v1/orgs/{self.id}/trainings/{run_id}").json())

    def runs(self) -> list[dict[str, Any]]:
        return list(self.api.get(f"/v1/orgs/{self.id}/trainings").json())

    def all_ended(self) -> bool:
        return all(run["status"] in TERMINAL for run in self.runs())


@pytest.fixture
def new_org(cluster: stack.Stack, org_id: str) -> Iterator[Callable[..., Org]]:
    made: list[Org] = []

    def make(suffix: str, **config: Any) -> Org:
        name = f"{org_id}-{suffix}"
        org = Org(cluster, name, admin_key(cluster, name, config=config))
        made.append(org)
        return org

    yield make
    for org in made:
        org.api.close()


def test_a_limit_holds_across_workers_and_a_killed_workers_run_finishes_once_elsewhere(
    cluster: stack.Stack, processes: Processes, new_org: Callable[..., Org], cluster_settings: Settings
) -> None:
    second = processes.worker("second")
    org = new_org(
        "plant",
        maxConcurrentTrainings=1,
        training={"scriptPath": str(cluster_settings.training_scripts_dir / "sleeps_1.py")},
    )
    dataset = org.upload(3_000)
    run_ids = [org.submit(dataset) for _ in range(5)]
    samples: list[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            samples.append(org.api.get(f"/v1/orgs/{org.id}/queue").json()["running"])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    victim = wait(
        lambda: next((r for r in org.runs() if r["status"] == "running" and r["worker"] == second), None), seconds=60
    )
    processes.kill(second)
    wait(org.all_ended, seconds=120, every=0.5)
    stop_sampling.set()
    sampler.join()
    finished = {run_id: org.run(run_id) for run_id in run_ids}
    assert max(samples) == 1, "the org ran more than its one slot at once"
    assert {run["status"] for run in finished.values()} <= {"succeeded", "rejected"}
    assert finished[victim["runId"]]["attempts"] == 2
    versions = org.api.get(f"/v1/orgs/{org.id}/models").json()
    assert sorted(v["runId"] for v in versions) == sorted(run_ids), "one version per run, whatever was killed"


def test_a_second_org_is_served_ahead_of_the_first_orgs_backlog(
    cluster: stack.Stack, processes: Processes, new_org: Callable[..., Org], cluster_settings: Settings
) -> None:
    processes.worker("second")
    script = {"scriptPath": str(cluster_settings.training_scripts_dir / "sleeps_1.py")}
    busy = new_org("busy", maxConcurrentTrainings=2, training=script)
    other = new_org("other", training=script)
    busy_dataset, other_dataset = busy.upload(2_000), other.upload(2_000)
    backlog = [busy.submit(busy_dataset) for _ in range(30)]
    wait(lambda: sum(run["status"] == "running" for run in busy.runs()) == 2, seconds=60)
    late = other.submit(other_dataset)
    submitted_at = datetime.fromisoformat(other.run(late)["createdAt"])
    started = wait(lambda: other.run(late)["startedAt"], seconds=60)
    overtaken = [
        run
        for run in busy.runs()
        if run["startedAt"]
        and submitted_at < datetime.fromisoformat(run["startedAt"]) < datetime.fromisoformat(started)
    ]
    assert overtaken == [], "the first org's backlog went ahead of the second org's run"
    for run_id in backlog:
        busy.api.post(f"/v1/orgs/{busy.id}/trainings/{run_id}/cancel")
    wait(busy.all_ended, seconds=60, every=0.5)


def test_a_run_that_kills_its_worker_every_time_fails_after_the_attempt_limit(
    cluster: stack.Stack, new_org: Callable[..., Org], cluster_settings: Settings
) -> None:
    org = new_org("crasher", training={"scriptPath": str(cluster_settings.training_scripts_dir / "kills_worker.py")})
    run_id = org.submit(org.upload(1_000))
    run = wait(lambda: (r := org.run(run_id))["status"] in TERMINAL and r, seconds=90, every=0.5)
    assert run["status"] == "failed" and run["attempts"] == 3
    assert "gave up after 3 attempts" in run["error"]


def write_historian(path: Path) -> None:
    table = ai4i.generate(3_000, seed=9)
    with sqlite3.connect(path) as connection:
        names = ", ".join(f'"{name}" REAL' for name in ai4i.FEATURES)
        connection.execute(f'CREATE TABLE readings ({names}, "{ai4i.TARGET}" INTEGER)')
        columns = [*ai4i.FEATURES, ai4i.TARGET]
        rows = zip(*(table.column(name).to_pylist() for name in columns), strict=True)
        placeholders = ", ".join("?" * len(columns))
        connection.executemany(f"INSERT INTO readings VALUES ({placeholders})", rows)


def test_a_worker_that_missed_the_new_org_broadcast_consumes_its_queue_after_a_sweep(
    cluster: stack.Stack, cluster_settings: Settings, org_id: str
) -> None:
    """An org written straight to the database, so no broadcast told the running worker: its own sweep (every
    5 s) finds the org's queue, and a run submitted there finishes."""
    quiet = f"{org_id}-quiet"
    engine = create_engine(cluster_settings.database_url)
    with make_session_factory(engine)() as session, session.begin():
        session.add(Organization(id=quiet, name=quiet, config={}))
    engine.dispose()
    org = Org(cluster, quiet, admin_key(cluster, quiet))

    with org.api:
        run_id = org.submit(org.upload(2000))
        run = wait(lambda: (r := org.run(run_id))["status"] in TERMINAL and r, seconds=60, every=0.5)

    assert run["status"] in {"succeeded", "rejected"}  # trained and judged: which, 2000 rows and 10 trees decide
    assert run["worker"] == f"{stack.TRAINER_NAME}@{os.uname().nodename}"


def test_a_hospitals_data_stays_on_its_own_worker(
    cluster: stack.Stack,
    processes: Processes,
    new_org: Callable[..., Org],
    cluster_settings: Settings,
) -> None:
    hospital = new_org("hospital", dataResidency="local")
    local = processes.worker("on-premises", orgs=hospital.id)
    historian = cluster_settings.resolved_local_stores_dir / hospital.id / "ehr.db"
    historian.parent.mkdir(parents=True)
    write_historian(historian)
    hospital.api.put(
        f"/v1/orgs/{hospital.id}/datasource", json={"url": f"sqlite:///{historian}", "table": "readings"}
    ).raise_for_status()
    run_id = hospital.submit(None)
    run = wait(lambda: (r := hospital.run(run_id))["status"] in TERMINAL and r, seconds=90, every=0.5)
    assert run["worker"] == local and run["version"]
    stored = open_object_store(cluster_settings).list(f"orgs/{hospital.id}/")
    assert any(key.endswith("/model.onnx") for key in stored)
    assert not any(key.endswith("holdout.parquet") or "/datasets/" in key for key in stored)


def test_two_beats_fire_a_due_schedule_once_without_a_restart(
    cluster: stack.Stack, processes: Processes, new_org: Callable[..., Org], cluster_settings: Settings
) -> None:
    processes.beat("second-beat")
    org = new_org("weekly")
    dataset = org.upload(1_000)
    body = {
        "pattern": "0 2 * * 0",
        "timezone": "America/New_York",
        "enabled": True,
        "trainingConfig": {"datasetId": dataset, "targetColumn": ai4i.TARGET, "featureColumns": list(ai4i.FEATURES)},
    }
    org.api.put(f"/v1/orgs/{org.id}/schedule", json=body).raise_for_status()
    engine = create_engine(cluster_settings.database_url)
    with session_scope(make_session_factory(engine)) as session:
        session.execute(
            update(Schedule).where(Schedule.org_id == org.id).values(next_fire_at=utcnow() - timedelta(seconds=1))
        )
    engine.dispose()
    wait(lambda: [r for r in org.runs() if r["trigger"] == "schedule"], seconds=15)
    time.sleep(3)
    assert len([r for r in org.runs() if r["trigger"] == "schedule"]) == 1
    upcoming = org.api.get(f"/v1/orgs/{org.id}/schedule").json()["nextFireTimes"][0]
    assert datetime.fromisoformat(upcoming) > datetime.now(UTC)


def test_flower_shows_a_run_with_its_org_and_revoking_it_cancels_the_run(
    cluster: stack.Stack, new_org: Callable[..., Org], cluster_settings: Settings
) -> None:
    org = new_org("revoked", training={"scriptPath": str(cluster_settings.training_scripts_dir / "sleeps_60.py")})
    run_id = org.submit(org.upload(1_000))
    wait(lambda: org.run(run_id)["status"] == "running", seconds=60)
    auth = (cluster.flower_user, cluster.flower_password)
    with httpx.Client(base_url=cluster.flower, auth=auth, timeout=10) as flower:
        assert flower.get("/api/tasks").status_code == 200
        assert httpx.get(cluster.flower + "/api/tasks", timeout=10).status_code == 401
        task_id, task = wait(
            lambda: next(
                ((tid, t) for tid, t in flower.get("/api/tasks").json().items() if run_id in str(t.get("args"))), None
            ),
            seconds=30,
        )
        assert org.id in str(task["args"]) and task["name"] == "kiln.train"
        flower.post(f"/api/task/revoke/{task_id}", params={"terminate": "true"}).raise_for_status()
    run = wait(lambda: (r := org.run(run_id))["status"] in TERMINAL and r, seconds=30, every=0.5)
    assert run["status"] == "cancelled"
