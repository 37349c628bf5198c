"""The api in-process (TestClient) over real PostgreSQL, Redis and S3."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2
import pyarrow as pa
import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, update

from deploy.local import ai4i
from services.api.app import create_app
from services.sync.context import SyncContext
from services.trainer import runs
from services.trainer.context import WorkerContext
from shared.db.migrate import upgrade
from shared.db.models import TrainingRun
from shared.db.session import SessionFactory, make_engine, session_scope
from shared.db.types import utcnow
from shared.queues import celery_config
from shared.settings import Settings
from shared.storage import ObjectStore, open_object_store
from shared.sync_jobs import LONGEST_JOB_S
from tests.conftest import ADMIN_TOKEN
from tests.support.servers import fresh_postgres_database

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# The api's database connections: SQLAlchemy's pool of 5 and its overflow of 10.
API_CONNECTIONS = 15


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """The tests' shared database, for seeding and inspecting it directly."""
    engine = create_engine(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return open_object_store(settings)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@dataclass(frozen=True)
class OrgKeys:
    org_id: str
    admin: dict[str, str]
    trainer: dict[str, str]
    viewer: dict[str, str]


def create_org_with_keys(api: TestClient, org_id: str) -> OrgKeys:
    response = api.post("/v1/orgs", json={"id": org_id, "name": f"Org {org_id}"}, headers=ADMIN)
    assert response.status_code == 201, response.text
    keys = {}
    for role in ("admin", "trainer", "viewer"):
        created = api.post(f"/v1/orgs/{org_id}/keys", json={"role": role}, headers=ADMIN)
        assert created.status_code == 201, created.text
        keys[role] = {"Authorization": f"Bearer {created.json()['key']}"}
    return OrgKeys(org_id=org_id, **keys)


@pytest.fixture
def org(api: TestClient, org_id: str) -> OrgKeys:
    return create_org_with_keys(api, org_id)


def upload(api: TestClient, org: OrgKeys, content: bytes, name: str = "data.csv", **form: str) -> httpx2.Response:
    return api.post(f"/v1/orgs/{org.org_id}/datasets", files={"file": (name, content)}, data=form, headers=org.trainer)


TRAINING_CSV = (
    b"timestamp,temperature,pressure,site,failed\n"
    b"2024-01-01T00:00:00Z,70.5,1.2,north,0\n"
    b"2024-01-02T00:00:00Z,71.0,1.3,south,1\n"
)


@pytest.fixture
def dataset_id(api: TestClient, org: OrgKeys) -> str:
    response = upload(api, org, TRAINING_CSV, timestampColumn="timestamp")
    assert response.status_code == 201
    return str(response.json()["datasetId"])


def config(dataset_id: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "datasetId": dataset_id,
        "targetColumn": "failed",
        "featureColumns": ["temperature", "pressure"],
        "validationSplit": 0.2,
        "hyperparameters": {"numLeaves": 31, "learningRate": 0.05, "numIterations": 100, "objective": "binary"},
    }
    body.update(changes)
    return body


def upload_table(
    api: TestClient, org: OrgKeys, table: pa.Table, tmp_path: Path, timestamp_column: str | None = "timestamp"
) -> str:
    path = tmp_path / "upload.csv"
    ai4i.write_csv(table, path)
    response = api.post(
        f"/v1/orgs/{org.org_id}/datasets",
        files={"file": ("upload.csv", path.read_bytes())},
        data={"timestampColumn": timestamp_column} if timestamp_column else {},
        headers=org.trainer,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["datasetId"])


def submit(api: TestClient, org: OrgKeys, dataset_id: str | None, **changes: Any) -> str:
    body = {
        "datasetId": dataset_id,
        "targetColumn": ai4i.TARGET,
        "featureColumns": list(ai4i.FEATURES),
        "validationSplit": 0.2,
        "hyperparameters": {"numLeaves": 31, "learningRate": 0.1, "numIterations": 100},
        **changes,
    }
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=body, headers=org.trainer)
    assert response.status_code == 202, response.text
    return str(response.json()["runId"])


@pytest.fixture
def worker(settings: Settings) -> Iterator[WorkerContext]:
    context = WorkerContext.open(settings)
    yield context
    context.close()


def run_of(api: TestClient, org: OrgKeys, run_id: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/orgs/{org.org_id}/trainings/{run_id}", headers=org.viewer).json())


def cancel_just_before(monkeypatch: pytest.MonkeyPatch, write: str, api: TestClient, org: OrgKeys) -> None:
    """Have a cancel accepted over the api at the last moment: just before the attempt's `runs.<write>`."""
    original = getattr(runs, write)

    def cancelled_first(sessions: SessionFactory, attempt: runs.Attempt, *args: Any, **kwargs: Any) -> Any:
        answer = api.post(f"/v1/orgs/{org.org_id}/trainings/{attempt.run_id}/cancel", headers=org.trainer)
        assert answer.status_code == 202 and answer.json()["cancelRequested"] is True, answer.text
        return original(sessions, attempt, *args, **kwargs)

    monkeypatch.setattr(runs, write, cancelled_first)


@contextmanager
def held_at_the_store(
    api: TestClient, monkeypatch: pytest.MonkeyPatch, method: str, send: Callable[[], httpx2.Response]
) -> Iterator[list[Future[httpx2.Response]]]:
    """`send` as many times at once as the api has database connections, each request held in the object store's
    `method` (as on a large file or a remote S3) until the block ends; their answers are the futures yielded."""
    served = api.app.state.resources.store  # type: ignore[attr-defined]
    call = getattr(served, method)
    arrived, go_on = threading.Semaphore(0), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        arrived.release()
        go_on.wait(timeout=60)
        return call(*args, **kwargs)

    monkeypatch.setattr(served, method, slow)
    with ThreadPoolExecutor(API_CONNECTIONS) as pool:
        answers = [pool.submit(send) for _ in range(API_CONNECTIONS)]
        try:
            for _ in answers:
                assert arrived.acquire(timeout=60), "a request never reached the object store"
            yield answers
        finally:
            go_on.set()


def stall_past_lease(sessions: SessionFactory, run_id: str) -> None:
    """What a worker stalled past its lease (SIGSTOP, swap, a paused VM) finds when it wakes: its lease ran out, and
    no sweep has handed the run back yet."""
    with session_scope(sessions) as session:
        session.execute(
            update(TrainingRun).where(TrainingRun.id == run_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def stall_just_before(monkeypatch: pytest.MonkeyPatch, write: str) -> None:
    """Have the attempt's lease run out at the last moment: just before its `runs.<write>`."""
    original = getattr(runs, write)

    def stalled_first(sessions: SessionFactory, attempt: runs.Attempt, *args: Any, **kwargs: Any) -> Any:
        stall_past_lease(sessions, attempt.run_id)
        return original(sessions, attempt, *args, **kwargs)

    monkeypatch.setattr(runs, write, stalled_first)


@pytest.fixture
def central_settings(settings: Settings) -> Iterator[Settings]:
    """The settings of the other tests, on a fresh central database of this test's own."""
    with fresh_postgres_database() as url:
        upgrade(url)
        yield settings.model_copy(update={"database_url": url, "sync_batch_size": 500})


@pytest.fixture
def sync_context(central_settings: Settings) -> Iterator[SyncContext]:
    context = SyncContext.open(central_settings)
    yield context
    context.close()


@pytest.fixture
def producer(central_settings: Settings) -> Iterator[Celery]:
    """What the sync beat sends its tasks with, on the tests' Redis."""
    app = Celery("kiln-test-sync-beat", set_as_current=False)
    app.conf.update(celery_config(central_settings.redis_url, longest_training_s=LONGEST_JOB_S))
    yield app
    app.close()


@pytest.fixture
def broker(central_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(central_settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def sync_api(central_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(central_settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The settings of `make up` (a SQLite file in the data folder), or of a deployment on PostgreSQL."""
    if request.param == "postgresql":
        return settings
    embedded = settings.model_copy(update={"database_url": ""})
    embedded.data_dir.mkdir(parents=True)
    upgrade(embedded.resolved_database_url)
    return embedded


@pytest.fixture
def backend_api(backend: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(backend), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def backend_engine(backend: Settings) -> Iterator[Engine]:
    engine = make_engine(backend.resolved_database_url)
    yield engine
    engine.dispose()
