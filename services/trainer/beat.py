"""Celery beat, reading the orgs' schedules from the database: `celery -A services.trainer.celery_app beat`.

Each tick fires the schedules that are due, as shared/beat.py says: each due time once across beats, a change made
over the API seen at the next tick without a restart, a fire time missed by more than shared.beat.GRACE (no beat
was running) skipped, not made up, and a schedule that cannot fire recorded without holding up the others.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from shared.beat import DatabaseBeat, fire_each_due
from shared.db.models import Schedule
from shared.db.session import SessionFactory
from shared.db.types import utcnow
from shared.outbox import KIND_TRAIN_TASK, relay
from shared.queues import send_train_task
from shared.schemas import TrainingConfig
from shared.submissions import queue_run
from shared.training_checks import check_source


def fire_due_schedules(sessions: SessionFactory, *, now: datetime) -> list[int]:
    """Queue a run for every schedule due at `now`; returns the outbox message ids to send."""
    return fire_each_due(sessions, Schedule, now=now, kind="schedule", queue=_queue_run)


def _queue_run(session: Session, schedule: Schedule) -> int:
    """A run of the stored config, checked as a POST is against what the org has now (a dataset erased since, a
    datasource changed since): one a POST would refuse fails the fire, recorded, instead of failing at its start."""
    config = TrainingConfig.model_validate(schedule.training_config)
    dataset_id = check_source(session, config, org_id=schedule.org_id)
    _run, message = queue_run(
        session,
        org_id=schedule.org_id,
        config=config,
        dataset_id=dataset_id,
        actor="schedule",
        trigger="schedule",
    )
    return message.id


class DatabaseScheduler(DatabaseBeat):
    """A beat scheduler whose only entries are the orgs' schedules, in the database."""

    def fire_due(self) -> None:
        messages = fire_due_schedules(self.sessions, now=utcnow())
        if messages:
            relay(self.sessions, {KIND_TRAIN_TASK: lambda payload: send_train_task(self.app, payload)}, ids=messages)
