"""Queueing a sync job or a source's deletion, the same way from the api and from the sync beat: the row and its
outbox message together."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.audit import record_change
from shared.db.models import OutboxMessage, SyncJob, SyncSource
from shared.db.types import utcnow
from shared.outbox import KIND_DELETE_SOURCE_TASK, KIND_SYNC_TASK, add_message
from shared.queues import broker_transport_options
from shared.schemas import OrgConfig
from shared.sync_tables import SyncTable

QUEUED, RUNNING, RETRYING, SUCCEEDED, FAILED, REFUSED, CANCELLED = (
    "queued",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "refused",
    "cancelled",  # its task revoked by an operator in Flower (services/sync/revocation.py)
)
FINISHED = (SUCCEEDED, FAILED, REFUSED, CANCELLED)
# A conflict: held for review, a version chosen there (the next job writes it), or settled.
CONFLICT_OPEN, CONFLICT_CHOSEN, CONFLICT_RESOLVED = "open", "chosen", "resolved"
# A conflict's local version when its table syncs down only: the local record never reaches the central store, so the
# conflict holds this marker in its place, with the local store's reason for refusing the central version.
WITHHELD, REFUSAL = "_kiln_withheld", "_kiln_refusal"

# A sync job holds its message (acks_late) while it runs; an hour is far beyond any batch loop seen here.
LONGEST_JOB_S = 3600.0
# A job's message waits in the org's sync queue; fetched, a worker holds it unacknowledged while the job runs
# (LONGEST_JOB_S at most), and the broker hands it out again only after its visibility timeout. A job still queued
# that long after its message was queued may have lost it (Redis restarted empty, the queue purged), and would be
# joined by every later request and never run: a request joining it then queues its message again. A copy that
# comes once the job has started or ended finds it so and does nothing; the job is never cancelled for waiting,
# since a message only kept waiting behind a long backlog is not lost.
REQUEUE_AFTER = timedelta(seconds=broker_transport_options(LONGEST_JOB_S)["visibility_timeout"])


def residency_refusal(org_config: OrgConfig, source: SyncSource) -> str | None:
    """Why an org's job may not run, or None: an org keeping its data on its premises never sends records up."""
    if org_config.data_residency != "local":
        return None
    upward = [table.name for table in source_tables(source) if table.sends_up]
    if not upward:
        return None
    return (
        f"organization {source.org_id!r} keeps its data on its premises (dataResidency 'local'): records never "
        f"leave the local store, so tables {', '.join(upward)} cannot sync up (direction 'down' is allowed)"
    )


def deletion_refusal(source: SyncSource) -> str | None:
    """Why nothing new may start for a source, or None: its deletion was asked for (DELETE
    /v1/orgs/{org}/sync-sources/{id}), or done. Jobs, resyncs and schedule changes are refused with this reason."""
    if source.deleted_at is not None:
        return f"sync source {source.id} was deleted at {source.deleted_at.isoformat()}"
    if source.deletion_requested_at is None:
        return None
    return (
        f"sync source {source.id} is being deleted (asked at {source.deletion_requested_at.isoformat()}): it takes no "
        "new job, resync, URL or schedule change, and a sync worker removes its central copies and records; register "
        "its tables again once GET on the source answers 404"
    )


def source_tables(source: SyncSource) -> list[SyncTable]:
    return [SyncTable.model_validate(table) for table in source.tables]


def queue_sync_job(
    session: Session, *, source: SyncSource, actor: str, trigger: str
) -> tuple[SyncJob, list[OutboxMessage]]:
    """The source's job waiting to start, or a new one queued; with the outbox messages to send (none for a job
    already waiting, whose message is on its way).

    A job syncs all there is when it starts, so one waiting does what another would: a retried POST, or a schedule
    firing while the sync workers are down, piles up no jobs with nothing left to do. A resync and a review choice
    join it too: each is recorded before the commit (a SyncResync row, a conflict `chosen`) and read by the job as
    it reaches each table, after it started. Once a job runs, a new one is queued, for what changed since it looked.
    A job waiting past REQUEUE_AFTER has its message queued again.
    """
    while True:
        waiting = _hold_waiting_job(session, source.id)
        if waiting is not None:
            return waiting, _join(session, waiting, actor=actor, trigger=trigger)
        job = _queue_unless_one_waits(session, source, trigger)
        if job is not None:
            _audit(session, job, actor=actor, action="sync.job.queued", trigger=trigger)
            return job, [message_for(session, job)]
        # Another request queued one between the two statements: it is the one waiting, unless it started already.


def _join(session: Session, job: SyncJob, *, actor: str, trigger: str) -> list[OutboxMessage]:
    """What a request joining the waiting `job` sends: nothing, or, once its message may be lost, that again."""
    now = utcnow()
    if (job.requeued_at or job.created_at) > now - REQUEUE_AFTER:
        _audit(session, job, actor=actor, action="sync.job.coalesced", trigger=trigger)
        return []
    job.requeued_at = now
    _audit(session, job, actor=actor, action="sync.job.requeued", trigger=trigger)
    return [message_for(session, job)]


def message_for(session: Session, job: SyncJob) -> OutboxMessage:
    """The job's task message, added to the outbox (flushed: its id is known), sent once the session commits."""
    return add_message(session, kind=KIND_SYNC_TASK, payload={"job_id": job.id, "org_id": job.org_id})


def _hold_waiting_job(session: Session, source_id: str) -> SyncJob | None:
    """The source's queued job, its row write-locked until the commit. A worker starting it (services/sync/jobs.py,
    _start) locks that row too, so it waits for this commit (on SQLite, for the database's write lock this takes):
    what the request wrote with it is there when the job reads it. A job started first is no longer `queued` when
    this statement gets the row."""
    held = session.scalar(
        update(SyncJob)
        .where(SyncJob.source_id == source_id, SyncJob.status == QUEUED)
        .values(status=SyncJob.status)
        .returning(SyncJob.id)
        .execution_options(synchronize_session=False)
    )
    return None if held is None else session.get_one(SyncJob, held, populate_existing=True)


def _queue_unless_one_waits(session: Session, source: SyncSource, trigger: str) -> SyncJob | None:
    """A new queued job, or None if one of the source is queued already: the index uq_sync_jobs_one_queued_per_source
    refuses a second (one another request inserted and has not committed is waited for)."""
    insert = sqlite.insert if session.connection().dialect.name == "sqlite" else postgresql.insert
    job_id = "sj" + secrets.token_hex(8)
    values = {"id": job_id, "org_id": source.org_id, "source_id": source.id, "status": QUEUED, "trigger": trigger}
    statement = insert(SyncJob).values(values)
    inserted = session.execute(
        statement.on_conflict_do_nothing(index_elements=["source_id"], index_where=SyncJob.status == QUEUED)
    )
    return session.get_one(SyncJob, job_id) if inserted.rowcount == 1 else None  # type: ignore[attr-defined]


def _audit(session: Session, job: SyncJob, *, actor: str, action: str, trigger: str) -> None:
    detail = {"sourceId": job.source_id, "trigger": trigger}
    record_change(session, org_id=job.org_id, actor=actor, action=action, target=job.id, detail=detail)


def queue_source_deletion(session: Session, *, source: SyncSource, at: datetime) -> OutboxMessage:
    """Queue the source's deletion task (services/sync/source_deletion.py), noting when: the sync beat queues it
    again when the source is still there long after, its message presumed lost."""
    source.deletion_queued_at = at
    return add_message(session, kind=KIND_DELETE_SOURCE_TASK, payload={"source_id": source.id, "org_id": source.org_id})
