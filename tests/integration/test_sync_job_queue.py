"""A source has at most one job waiting to start: a job syncs all there is when it starts, so a request for another
while one waits (a client retrying, a schedule firing while the sync workers are down, a resync, a review choice)
answers the waiting one, and queues no message."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from services.sync.beat import fire_due_sync_schedules
from services.sync.context import SyncContext
from services.sync.jobs import run_job
from services.sync.pair import Tally
from shared.db.models import SyncSchedule, SyncSource
from shared.db.session import session_scope
from shared.db.types import utcnow
from shared.sync_jobs import REQUEUE_AFTER, queue_sync_job
from tests.integration.sync_support import Sync, open_sync


def queued(sync: Sync) -> list[tuple[Any, ...]]:
    """The source's queued jobs, and the outbox messages queued to run each."""
    return sync.central(
        "SELECT j.id, (SELECT count(*) FROM outbox o WHERE o.payload ->> 'job_id' = j.id) FROM sync_jobs j "
        "WHERE j.source_id = :s AND j.status = 'queued'",
        {"s": sync.source_id},
    )


def audited(sync: Sync, action: str) -> list[tuple[Any, ...]]:
    return sync.central(
        "SELECT actor, target, detail ->> 'trigger' FROM audit_log WHERE org_id = :o AND action = :a ORDER BY id",
        {"o": sync.org.org_id, "a": action},
    )


def test_a_post_while_the_sources_job_is_queued_answers_that_job_and_queues_no_message(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)

    first, again = sync.submit(), sync.submit()

    assert again == first
    assert queued(sync) == [(first, 1)]
    assert [job["jobId"] for job in sync_api.get(f"/v1/orgs/{org_id}/sync-jobs", headers=sync.org.viewer).json()] == [
        first
    ]
    assert [(target, trigger) for _, target, trigger in audited(sync, "sync.job.coalesced")] == [(first, "api")]
    assert run_job(sync_context, first) == "succeeded"
    assert sync.job(first)["pushed"] == 2


def test_a_post_once_the_job_started_queues_a_new_one(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    first = sync.submit()
    asked_while_running: list[tuple[str, str]] = []

    def post_after_the_first_batch(_tally: Tally) -> None:
        if not asked_while_running:
            asked_while_running.append((sync.job(first)["status"], sync.submit()))

    assert run_job(sync_context, first, after_batch=post_after_the_first_batch) == "succeeded"
    [(status, second)] = asked_while_running

    assert (status, second != first) == ("running", True)
    assert queued(sync) == [(second, 1)]
    assert sync.submit() == second  # and it is the one waiting now


def test_posts_at_once_queue_one_job_and_one_message(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    start = threading.Barrier(6)

    def submit_at_once(_attempt: int) -> str:
        start.wait()
        return sync.submit()

    with ThreadPoolExecutor(6) as pool:
        answers = set(pool.map(submit_at_once, range(6)))

    assert len(answers) == 1
    assert queued(sync) == [(answers.pop(), 1)]


def test_a_schedule_firing_while_the_sources_job_is_queued_queues_none(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The sync workers down, a schedule every minute: the source still has one job to run when they are back."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    url = f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}/schedule"
    assert sync_api.put(url, json={"pattern": "* * * * *"}, headers=sync.org.admin).status_code == 200
    waiting = sync.submit()

    sent = []
    for _fire in range(3):
        with session_scope(sync_context.sessions) as session:
            session.execute(
                update(SyncSchedule)
                .where(SyncSchedule.source_id == sync.source_id)
                .values(next_fire_at=utcnow() - timedelta(seconds=5))
            )
        sent.append(fire_due_sync_schedules(sync_context.sessions, now=utcnow()))

    assert sent == [[], [], []]
    assert queued(sync) == [(waiting, 1)]
    assert audited(sync, "sync.job.coalesced") == [("schedule", waiting, "schedule")] * 3


def test_a_resync_asked_while_a_job_is_queued_is_applied_by_that_job(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The request is recorded on the source (a SyncResync row per table), which the job reads as it reaches each
    table, after it started: the job waiting does what a job of its own would."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    waiting = sync.submit()

    resync = sync_api.post(f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}/resync", headers=sync.org.admin)

    assert (resync.status_code, resync.json()["jobId"]) == (202, waiting)
    assert queued(sync) == [(waiting, 1)]
    assert run_job(sync_context, waiting) == "succeeded"
    assert audited(sync, "sync.resync.applied") == [("sync", f"{sync.source_id}/readings", None)]


def test_a_job_starting_while_a_request_joins_it_waits_for_that_requests_commit(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """What the request writes with it (a resync asked, a conflict's choice) is then there when the job reads it; a
    request coming after the job started finds it running, and queues another."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    waiting = sync.submit()
    statuses: list[str] = []
    with session_scope(sync_context.sessions) as session:
        source = session.get_one(SyncSource, sync.source_id)
        joined, messages = queue_sync_job(session, source=source, actor="test", trigger="api")
        worker = threading.Thread(target=lambda: statuses.append(run_job(sync_context, waiting)))
        worker.start()
        time.sleep(2)
        still_waiting = (worker.is_alive(), sync.job(waiting)["status"])
    worker.join()

    assert (joined.id, messages) == (waiting, [])
    assert still_waiting == (True, "queued")
    assert statuses == ["succeeded"]


def test_a_request_joining_a_job_queued_past_the_visibility_timeout_queues_its_message_again_and_it_runs_once(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Its message perhaps gone (Redis restarted empty), the job joined by every later request would never run: one
    waiting that long has its message queued again, and is never cancelled for waiting (its first message may only
    be behind a long backlog). The second copy finds it finished and runs nothing."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    waiting = sync.submit()
    sync.central(
        "UPDATE sync_jobs SET created_at = :at WHERE id = :j",
        {"at": utcnow() - REQUEUE_AFTER - timedelta(minutes=1), "j": waiting},
    )

    again, soon_after = sync.submit(), sync.submit()

    assert again == soon_after == waiting
    assert queued(sync) == [(waiting, 2)]  # its first message and one more, not one per request
    assert [target for _, target, _ in audited(sync, "sync.job.requeued")] == [waiting]
    assert [target for _, target, _ in audited(sync, "sync.job.coalesced")] == [waiting]
    assert (run_job(sync_context, waiting), run_job(sync_context, waiting)) == ("succeeded", "succeeded")
    assert (sync.job(waiting)["attempts"], sync.job(waiting)["pushed"]) == (1, 2)
