"""A real sync worker process (`celery -A services.sync.celery_app worker`) on real Redis runs an HTTP-queued job;
the sync task run here, eagerly (its retries at once, not over half an hour), ends a job its retries cannot save."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from services.sync import tasks
from services.sync.context import SyncContext
from services.sync.jobs import cancel_job, run_job
from services.sync.pair import Tally
from services.sync.revocation import REVOKED
from shared.db.session import session_scope
from shared.db.types import utcnow
from shared.queues import sync_queue
from shared.settings import Settings
from shared.source_lock import one_job_per_source
from tests.integration.conftest import create_org_with_keys
from tests.integration.sync_support import (
    TWO_READINGS,
    Sync,
    allow_connections,
    beat_tick,
    error_of,
    make_local_store,
    many_readings,
    open_sync,
    register,
)
from tests.support.polling import eventually
from tests.support.workers import celery_worker


@pytest.fixture
def sync_worker(central_settings: Settings, tmp_path: Path) -> Iterator[None]:
    with celery_worker("services.sync.celery_app", central_settings, tmp_path / "worker.log"):
        yield


def finished(sync: Sync, job_id: str, worker_log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while sync.job(job_id)["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
    job = sync.job(job_id)
    assert job["status"] == "succeeded", worker_log.read_text()
    return job


def test_a_job_queued_over_http_is_run_by_a_sync_worker(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, sync_worker: None
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)

    job = finished(sync, sync.submit(), tmp_path / "worker.log")

    assert job["pushed"] == 2
    assert sync.central(f"SELECT id, device FROM {sync.central_table} ORDER BY id") == [(1, "pump-1"), (2, "pump-2")]


def test_a_key_rotation_asked_over_http_is_run_by_a_sync_worker_and_the_old_key_destroyed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, sync_worker: None
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    finished(sync, sync.submit(), tmp_path / "worker.log")
    keys = f"/v1/orgs/{org_id}/sync-keys"
    [old] = sync_api.get(keys, headers=sync.org.viewer).json()

    by_a_trainer = sync_api.post(f"{keys}/rotate", headers=sync.org.trainer)
    rotation = sync_api.post(f"{keys}/rotate", headers=sync.org.admin)

    def rotation_finished() -> bool:
        # The new key appears with the old one retired; the old one is drained only once its values are re-sealed.
        listed = sync_api.get(keys, headers=sync.org.viewer).json()
        return len(listed) == 2 and listed[1]["status"] != "retired"

    eventually(rotation_finished, seconds=60)
    new, drained = sync_api.get(keys, headers=sync.org.viewer).json()
    destroy_active = sync_api.delete(f"{keys}/{new['keyId']}", headers=sync.org.admin)
    destroy_drained = sync_api.delete(f"{keys}/{old['keyId']}", headers=sync.org.admin)
    destroy_again = sync_api.delete(f"{keys}/{old['keyId']}", headers=sync.org.admin)

    assert (old["status"], by_a_trainer.status_code, rotation.status_code) == ("active", 403, 202)
    assert rotation.json() == {"status": "queued", "queue": f"sync.{org_id}"}
    assert (new["status"], drained["keyId"], drained["status"]) == ("active", old["keyId"], "drained")
    assert (destroy_active.status_code, destroy_drained.status_code, destroy_again.status_code) == (409, 204, 404)
    assert "drained" in destroy_active.json()["error"]
    assert sync_api.get(keys, headers=sync.org.viewer).json()[1]["status"] == "destroyed"
    sealed = [row[0] for row in sync.central(f"SELECT patient FROM {sync.central_table}")]
    assert sealed and all(value.startswith(new["keyId"] + ":") for value in sealed)
    audited = sync.central(
        "SELECT action, actor FROM audit_log WHERE org_id = :o AND action LIKE 'sync.key.%' ORDER BY id", {"o": org_id}
    )
    assert [action for action, _ in audited] == ["sync.key.rotation.queued", "sync.key.rotated", "sync.key.destroyed"]
    [actor] = {actor for _, actor in audited}  # the admin key that asked, carried through to the worker's rotation
    assert actor not in ("sync", "cli")


def test_a_source_deletion_asked_over_http_is_done_by_a_sync_worker(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, sync_worker: None
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    finished(sync, sync.submit(), tmp_path / "worker.log")
    source = f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}"

    deletion = sync_api.delete(source, headers=sync.org.admin)
    deadline = time.monotonic() + 60
    while sync_api.get(source, headers=sync.org.viewer).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)

    assert (deletion.status_code, deletion.json()["queue"]) == (202, f"sync.{org_id}")
    assert sync_api.get(source, headers=sync.org.viewer).status_code == 404, (tmp_path / "worker.log").read_text()
    assert sync.central(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = :t", {"t": sync.central_table}
    ) == [(0,)]
    assert sync.audit_actions()[:2] == ["sync.source.deleted", "sync.source.deletion.requested"]  # newest first


def queued_task_id(central_settings: Settings, org_id: str, job_id: str) -> str | None:
    """The id of the task waiting in the org's sync queue for `job_id`: what an operator sees in Flower."""
    broker = redis.Redis.from_url(central_settings.redis_url)
    waiting = [json.loads(message)["headers"] for message in broker.lrange(f"sync.{org_id}", 0, -1)]
    return next((str(headers["id"]) for headers in waiting if job_id in str(headers.get("argsrepr"))), None)


def test_a_sync_job_revoked_in_flower_reads_cancelled_and_its_message_coming_again_runs_nothing(
    sync_api: TestClient,
    sync_context: SyncContext,
    central_settings: Settings,
    org_id: str,
    tmp_path: Path,
    sync_task_here: None,
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    # Another source of the org: the first source's job, queued still while it waits for the lock, would be the one
    # a second request of that source answers.
    make_local_store(tmp_path / org_id / "other.db", TWO_READINGS)
    other = replace(
        sync, source_id=register(sync_api, sync.org, f"sqlite:///{tmp_path / org_id / 'other.db'}", "manual")
    )
    log_path = tmp_path / "worker.log"
    source_lock = {"k": f"sync-source:{sync.source_id}"}
    holder = create_engine(central_settings.database_url, poolclass=NullPool)
    with celery_worker("services.sync.celery_app", central_settings, log_path, pool="prefork"):
        # The source's lock held, as a long job of the source would hold it: the worker's first job waits for it,
        # and the second job's message (the other source's) waits in the org's queue, where an operator revokes it
        # in Flower.
        with holder.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(hashtext(:k))"), source_lock)
            first = sync.submit()
            assert eventually(lambda: queued_task_id(central_settings, org_id, first) is None, seconds=30)
            second = other.submit()
            task_id = eventually(lambda: queued_task_id(central_settings, org_id, second), seconds=30)
            with Celery(broker=central_settings.redis_url) as flower:
                flower.control.revoke(task_id)  # what Flower's revoke sends
            assert eventually(lambda: "Tasks flagged as revoked" in log_path.read_text(), seconds=30)
            connection.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), source_lock)
        holder.dispose()
        eventually(lambda: sync.job(second)["status"] not in ("queued", "running"), seconds=60)
        job = sync.job(second)
    redelivered = tasks.sync.apply(args=[second, org_id])

    assert "Discarding revoked task" in log_path.read_text()
    assert (job["status"], job["attempts"], error_of(job)) == ("cancelled", 0, "revoked by an operator in Flower")
    assert job["finishedAt"] is not None
    assert sync.job(first)["status"] == "succeeded", log_path.read_text()
    assert (redelivered.result, sync.job(second)) == ("cancelled", job)
    actions = sync.central("SELECT action FROM audit_log WHERE target = :j ORDER BY id", {"j": second})
    assert [action for (action,) in actions] == ["sync.job.queued", "sync.job.cancelled"]


# A job's attempts: its first and the worker's retries.
MAX_ATTEMPTS = tasks.MAX_RETRIES + 1
# A plant's PostgreSQL that is down: nothing listens on port 1.
DOWN_STORE = "postgresql+psycopg2://plant@127.0.0.1:1/records"


@pytest.fixture
def unreachable_store(sync_api: TestClient, sync_context: SyncContext, org_id: str) -> Sync:
    org = create_org_with_keys(sync_api, org_id)
    body = {"url": DOWN_STORE, "tables": [{"name": "readings", "primaryKey": "id"}]}
    created = sync_api.post(f"/v1/orgs/{org_id}/sync-sources", json=body, headers=org.admin)
    assert created.status_code == 201, created.text
    return Sync(
        sync_api, sync_context, org, DOWN_STORE, created.json()["sourceId"], sync_context.settings.resolved_database_url
    )


@pytest.fixture
def sync_task_here(sync_context: SyncContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's task, run in this process on the test's central store."""
    monkeypatch.setattr(tasks, "worker_context", lambda: sync_context)


def test_a_job_whose_store_stays_unreachable_fails_once_its_retries_run_out(
    unreachable_store: Sync, sync_task_here: None
) -> None:
    sync = unreachable_store
    job_id = sync.submit()

    outcome = tasks.sync.apply(args=[job_id, sync.org.org_id])

    job = sync.job(job_id)
    assert (job["status"], job["attempts"], len(job["errors"])) == ("failed", MAX_ATTEMPTS, MAX_ATTEMPTS)
    assert (outcome.state, outcome.result) == ("SUCCESS", "failed")  # the worker retries it no more
    assert job["finishedAt"] is not None
    assert error_of(job).startswith("a store was unreachable: ") and "port 1 failed" in error_of(job)
    assert error_of(job).endswith(f"; gave up after {MAX_ATTEMPTS} attempts")
    assert all("retrying" in error["error"] for error in job["errors"][:-1])
    assert sync.audit_actions()[:2] == ["sync.job.failed", "sync.job.retrying"]  # newest first


def test_a_job_whose_worker_died_fails_when_its_redelivered_last_try_fails(
    unreachable_store: Sync, sync_task_here: None
) -> None:
    """A worker that dies mid-job leaves it `running`; its message comes again (acks_late) with the retry count
    Celery had given it: on the last one, the job's store still out of reach, the job ends `failed`."""
    sync = unreachable_store
    job_id = sync.submit()
    sync.central("UPDATE sync_jobs SET status = 'running', attempts = 3 WHERE id = :j", {"j": job_id})

    outcome = tasks.sync.apply(args=[job_id, sync.org.org_id], retries=tasks.MAX_RETRIES)

    job = sync.job(job_id)
    assert (job["status"], job["attempts"]) == ("failed", 4)
    assert (outcome.state, outcome.result) == ("SUCCESS", "failed")
    assert error_of(job).startswith("a store was unreachable: ")
    assert error_of(job).endswith("; gave up after 4 attempts")


@pytest.fixture
def plants_only_task_here(central_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker's task, run in this process, with KILN_STORE_NETWORKS set: a store's name is resolved first."""
    context = SyncContext.open(central_settings.model_copy(update={"store_networks": "10.20.0.0/16"}))
    monkeypatch.setattr(tasks, "worker_context", lambda: context)
    yield
    context.close()


def test_a_job_whose_stores_name_does_not_resolve_is_retried_as_a_store_out_of_reach(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, plants_only_task_here: None
) -> None:
    """A DNS outage is over once the resolver answers again: it must not fail the job on its first attempt."""
    org = create_org_with_keys(sync_api, org_id)
    unresolved = "postgresql+psycopg2://plant@records-db.invalid:5432/records"  # `.invalid` never resolves
    source_id = register(sync_api, org, unresolved, "last-writer-wins")
    sync = Sync(sync_api, sync_context, org, unresolved, source_id, sync_context.settings.resolved_database_url)
    job_id = sync.submit()

    outcome = tasks.sync.apply(args=[job_id, org_id])

    job = sync.job(job_id)
    assert (job["status"], job["attempts"], outcome.result) == ("failed", MAX_ATTEMPTS, "failed")
    assert all(error["error"].startswith("a store was unreachable, retrying: ") for error in job["errors"][:-1])
    assert error_of(job).startswith("a store was unreachable: the database server records-db.invalid does not ")


def test_a_job_whose_worker_died_in_its_last_attempt_fails_when_its_message_comes_again(
    unreachable_store: Sync, sync_task_here: None
) -> None:
    """Redelivered messages keep Celery's retry count: the job's own count of attempts is what ends a job whose
    worker keeps dying."""
    sync = unreachable_store
    job_id = sync.submit()
    sync.central(
        "UPDATE sync_jobs SET status = 'running', attempts = :n WHERE id = :j", {"j": job_id, "n": MAX_ATTEMPTS}
    )

    outcome = tasks.sync.apply(args=[job_id, sync.org.org_id], retries=2)

    job = sync.job(job_id)
    assert (job["status"], job["attempts"]) == ("failed", MAX_ATTEMPTS)
    assert (outcome.state, outcome.result) == ("SUCCESS", "failed")
    assert job["finishedAt"] is not None
    assert error_of(job) == (
        f"attempt {MAX_ATTEMPTS} never ended (its worker was lost, or the central store out of reach); "
        f"gave up after {MAX_ATTEMPTS} attempts"
    )


def test_a_job_whose_retry_the_central_store_cannot_record_is_left_to_the_sync_beat_and_not_retried_twice(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    tmp_path: Path,
    sync_task_here: None,
    monkeypatch: pytest.MonkeyPatch,
    producer: Celery,
    broker: redis.Redis,
) -> None:
    """Cut off from the central store mid-job, the worker could not record the job's retry; Celery's retry went
    out, and the sync beat, finding the job `running` with its lock free, queued it again too: it ran twice over."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(1200))
    job_id = sync.submit()
    broker.delete(sync_queue(org_id))  # the message the task below stands for
    database = make_url(sync.central_url).database

    def cut_after_a_batch(tally: Tally) -> None:
        if tally.pushed == 500:
            allow_connections(database, allowed=False)

    def run_cut_off(context: SyncContext, job: str, *, last_try: bool) -> str:
        return run_job(context, job, after_batch=cut_after_a_batch, last_try=last_try)

    monkeypatch.setattr(tasks, "run_job", run_cut_off)
    try:
        outcome = tasks.sync.apply(args=[job_id, org_id])
    finally:
        allow_connections(database, allowed=True)
    sent = beat_tick(producer, sync_context, now=utcnow())

    assert (outcome.state, outcome.result) == ("SUCCESS", "running")  # no retry of the task's own
    assert (sent, broker.llen(sync_queue(org_id))) == (1, 1)
    job = sync.job(job_id)
    assert (job["status"], job["attempts"], job["pushed"]) == ("retrying", 1, 500)
    assert error_of(job).startswith("attempt 1 never ended") and error_of(job).endswith("; queued again")


def test_a_running_job_revoked_without_terminate_stops_after_its_batch_and_stays_cancelled(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Revoked in Flower while it runs (the job cancelled, its worker left alone): it stops at the end of the batch
    under way, that batch and those before it kept, and its end does not write `succeeded` over the cancel."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(2000))
    job_id = sync.submit()

    def revoked_after_the_first_batch(_tally: Tally) -> None:
        with session_scope(sync_context.sessions) as session:
            cancel_job(session, job_id, REVOKED)

    status = run_job(sync_context, job_id, after_batch=revoked_after_the_first_batch)

    job = sync.job(job_id)
    assert (status, job["status"], job["pushed"], error_of(job)) == ("cancelled", "cancelled", 500, REVOKED)
    assert sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(500,)]


def left_running_by_a_dead_worker(sync: Sync, broker: redis.Redis, *, attempts: int) -> str:
    """A job as a worker killed whole leaves it: `running`, its source's lock gone with the worker's process, and its
    message held unacknowledged by the broker until its visibility timeout (70 minutes), out of the queue."""
    job_id = sync.submit()
    broker.delete(sync_queue(sync.org.org_id))
    sync.central("UPDATE sync_jobs SET status = 'running', attempts = :n WHERE id = :j", {"j": job_id, "n": attempts})
    return job_id


def test_a_job_whose_worker_was_killed_whole_is_queued_again_by_the_sync_beats_next_tick_and_finished(
    sync_api: TestClient,
    sync_context: SyncContext,
    central_settings: Settings,
    org_id: str,
    tmp_path: Path,
    producer: Celery,
    broker: redis.Redis,
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    job_id = left_running_by_a_dead_worker(sync, broker, attempts=1)
    worker_log = tmp_path / "worker.log"

    with celery_worker("services.sync.celery_app", central_settings, worker_log):
        sent = beat_tick(producer, sync_context, now=utcnow())
        job = finished(sync, job_id, worker_log)

    assert sent == 1
    assert (job["attempts"], job["pushed"]) == (2, 2)
    assert job["errors"][0]["error"] == (
        "attempt 1 never ended (its worker was lost, or the central store out of reach); queued again"
    )
    assert sync.audit_actions()[:2] == ["sync.job.succeeded", "sync.job.retrying"]  # newest first


def test_a_running_job_whose_worker_holds_its_sources_lock_is_left_alone(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    tmp_path: Path,
    producer: Celery,
    broker: redis.Redis,
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    job_id = left_running_by_a_dead_worker(sync, broker, attempts=1)

    with one_job_per_source(sync_context.engine, sync.source_id):  # as its live worker holds it
        sent = beat_tick(producer, sync_context, now=utcnow())

    assert (sent, broker.llen(sync_queue(org_id))) == (0, 0)
    assert (sync.job(job_id)["status"], sync.job(job_id)["errors"]) == ("running", [])


def test_a_job_left_running_in_its_last_attempt_is_failed_by_the_sync_beat_and_not_queued_again(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    tmp_path: Path,
    producer: Celery,
    broker: redis.Redis,
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    job_id = left_running_by_a_dead_worker(sync, broker, attempts=MAX_ATTEMPTS)

    sent = beat_tick(producer, sync_context, now=utcnow())

    job = sync.job(job_id)
    assert (sent, broker.llen(sync_queue(org_id))) == (0, 0)
    assert (job["status"], job["finishedAt"] is not None) == ("failed", True)
    assert error_of(job) == (
        f"attempt {MAX_ATTEMPTS} never ended (its worker was lost, or the central store out of reach); "
        f"gave up after {MAX_ATTEMPTS} attempts"
    )
