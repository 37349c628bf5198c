"""The sync beat: `celery -A services.sync.celery_app beat`. Each tick queues the sync jobs whose schedules are due,
and every KILN_SYNC_PURGE_INTERVAL_S sends a retention purge to each org with sources or prediction records.

Schedules fire as training ones do (shared/beat.py): each due time once across beats, a fire time missed by more
than shared.beat.GRACE (no sync beat was running) skipped and audited, not made up, and a schedule that cannot
fire recorded without holding up the others.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.beat import DatabaseBeat, fire_each_due
from shared.db.models import Organization, SyncSchedule, SyncSource
from shared.db.session import SessionFactory, session_scope
from shared.db.types import utcnow
from shared.outbox import KIND_SYNC_TASK, relay
from shared.queues import send_purge_task, send_sync_task
from shared.schemas import OrgConfig
from shared.sync_jobs import deletion_refusal, queue_sync_job

log = logging.getLogger(__name__)


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
    _job, message = queue_sync_job(session, source=source, actor="schedule", trigger="schedule")
    return message.id


def orgs_to_purge(sessions: SessionFactory) -> list[str]:
    """The orgs with records to keep within their retention period: synced ones, or prediction records."""
    with session_scope(sessions) as session:
        with_sources = set(
            session.scalars(select(SyncSource.org_id).where(SyncSource.deletion_requested_at.is_(None)).distinct())
        )
        recording = {
            org.id
            for org in session.scalars(select(Organization))
            if OrgConfig.model_validate(org.config).predictions.record
        }
    return sorted(with_sources | recording)


class SyncScheduler(DatabaseBeat):
    """A beat scheduler whose entries are the sources' schedules, in the database, and the retention purges."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.next_purge = time.monotonic()

    def fire_due(self) -> None:
        messages = fire_due_sync_schedules(self.sessions, now=utcnow())
        if messages:
            relay(self.sessions, {KIND_SYNC_TASK: lambda payload: send_sync_task(self.app, payload)}, ids=messages)
        if time.monotonic() >= self.next_purge:
            for org_id in orgs_to_purge(self.sessions):
                send_purge_task(self.app, org_id)
            self.next_purge = time.monotonic() + self.settings.sync_purge_interval_s
