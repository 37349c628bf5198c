"""The sync beat: `celery -A services.sync.celery_app beat`. Each tick queues the sync jobs whose schedules are due
and, again, the jobs whose worker died and the source deletions whose message was lost; every
KILN_SYNC_PURGE_INTERVAL_S it sends a retention purge to each org with sources or prediction records.

Schedules fire as training ones do (shared/beat.py): each due time once across beats, a fire time missed by more
than shared.beat.GRACE (no sync beat was running) skipped and audited, not made up, and a schedule that cannot
fire recorded without holding up the others.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, exists, select
from sqlalchemy.orm import Session

from services.sync.jobs import requeue_if_orphaned
from shared.audit import record_change
from shared.beat import DatabaseBeat, fire_each_due
from shared.db.models import Organization, Prediction, SyncJob, SyncSchedule, SyncSource
from shared.db.session import SessionFactory, session_scope
from shared.db.types import utcnow
from shared.outbox import KIND_DELETE_SOURCE_TASK, KIND_SYNC_TASK, relay
from shared.queues import (
    TaskSender,
    send_delete_source_task,
    send_purge_task,
    send_sync_task,
)
from shared.sync_jobs import REQUEUE_AFTER, RUNNING, deletion_refusal, queue_source_deletion, queue_sync_job

log = logging.getLogger(__name__)


def send_due(app: TaskSender, central: Engine, sessions: SessionFactory, *, now: datetime) -> int:
    """Queue the jobs of the sync schedules due at `now` and, again, the jobs whose worker died and the deletions
    presumed lost; send their messages (a send that fails is left in the outbox, for the api's sweep). Returns how
    many were sent."""
    messages = [
        *fire_due_sync_schedules(sessions, now=now),
        *requeue_orphaned_jobs(central, sessions),
        *resend_lost_deletions(sessions, now=now),
    ]
    if not messages:
        return 0
    senders = {
        KIND_SYNC_TASK: lambda payload: send_sync_task(app, payload),
        KIND_DELETE_SOURCE_TASK: lambda payload: send_delete_source_task(app, payload),
    }
    return relay(sessions, senders, ids=messages)


def fire_due_sync_schedules(sessions: SessionFactory, *, now: datetime) -> list[int]:
    """Queue a job for every sync schedule due at `now`; returns the outbox message ids to send."""
    return fire_each_due(
        sessions,
        SyncSchedule,
        now=now,
        kind="sync.schedule",
        queue=_queue_job,
        detail=lambda schedule: {"sourceId": schedule.source_id},
    )


def _queue_job(session: Session, schedule: SyncSchedule) -> int | None:
    source = session.get_one(SyncSource, schedule.source_id)
    if deletion_refusal(source) is not None:
        return None  # its deletion removes the schedule; until then it fires nothing
    _job, messages = queue_sync_job(session, source=source, actor="schedule", trigger="schedule")
    return messages[0].id if messages else None  # none when a job of the source waits already


def requeue_orphaned_jobs(central: Engine, sessions: SessionFactory) -> list[int]:
    """Queue again, through the outbox, each job left `running` by a worker killed whole (services/sync/jobs.py,
    requeue_if_orphaned); returns the outbox message ids to send."""
    with session_scope(sessions) as session:  # by ix_sync_jobs_running: few rows, however many jobs ended
        running = session.execute(select(SyncJob.id, SyncJob.source_id).where(SyncJob.status == RUNNING)).all()
    requeued = (requeue_if_orphaned(central, sessions, job_id, source_id) for job_id, source_id in running)
    return [message for message in requeued if message is not None]


def resend_lost_deletions(sessions: SessionFactory, *, now: datetime) -> list[int]:
    """Queue again, through the outbox, each deletion still pending REQUEUE_AFTER after it was last queued; returns
    the outbox message ids to send. Its message waits fetched for the source's running job to end, and the broker
    hands it out again only after its visibility timeout: pending past that, it is presumed lost, as a waiting job's
    message is (sooner, a copy could hold a second sync worker waiting on the same running job for nothing). A
    deletion being done holds its source's row and is skipped, as is one another beat is queueing; a copy that comes
    after the deletion was done finds it done and does nothing."""
    with session_scope(sessions) as session:
        lost = session.scalars(
            select(SyncSource)
            .where(SyncSource.deleted_at.is_(None), SyncSource.deletion_queued_at <= now - REQUEUE_AFTER)
            .order_by(SyncSource.deletion_queued_at)
            .with_for_update(skip_locked=True)
        ).all()
        return [_queue_deletion_again(session, source, now=now) for source in lost]


def _queue_deletion_again(session: Session, source: SyncSource, *, now: datetime) -> int:
    queued_at = source.deletion_queued_at
    log.warning("sync source %s: its deletion, queued at %s, is not done; queueing it again", source.id, queued_at)
    record_change(
        session,
        org_id=source.org_id,
        actor="sync",
        action="sync.source.deletion.requeued",
        target=source.id,
        detail={"queuedAt": queued_at.isoformat() if queued_at else None},
    )
    return queue_source_deletion(session, source=source, at=now).id


def orgs_to_purge(sessions: SessionFactory) -> list[str]:
    """The orgs with records to keep within their retention period: synced ones, or prediction records. Those
    holding prediction records, not those recording now: records kept before recording was turned off age too."""
    holding_predictions = exists().where(Prediction.org_id == Organization.id)  # by ix_predictions_org_id_id
    with session_scope(sessions) as session:
        with_sources = set(
            session.scalars(select(SyncSource.org_id).where(SyncSource.deletion_requested_at.is_(None)).distinct())
        )
        with_predictions = set(session.scalars(select(Organization.id).where(holding_predictions)))
    return sorted(with_sources | with_predictions)


class SyncScheduler(DatabaseBeat):
    """A beat scheduler whose entries are the sources' schedules, in the database, and the retention purges."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.next_purge = time.monotonic()

    def fire_due(self) -> None:
        send_due(self.app, self.engine, self.sessions, now=utcnow())
        if time.monotonic() >= self.next_purge:
            for org_id in orgs_to_purge(self.sessions):
                send_purge_task(self.app, org_id)
            self.next_purge = time.monotonic() + self.settings.sync_purge_interval_s
