"""Celery beat, reading the orgs' schedules from the database: `celery -A services.trainer.celery_app beat`.

Each tick fires the schedules that are due, as shared/beat.py says: each due time once across beats, a change made
over the API seen at the next tick without a restart, a fire time missed by more than shared.beat.GRACE (no beat
was running) skipped, not made up, and a schedule that cannot fire recorded without holding up the others. A
fire while the run the schedule queued before has not started queues none (`schedule.skipped`, naming that run).
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.audit import record_change
from shared.beat import DatabaseBeat, fire_each_due
from shared.db.models import Schedule, TrainingRun
from shared.db.session import SessionFactory
from shared.db.types import utcnow
from shared.outbox import KIND_TRAIN_TASK, relay
from shared.queues import send_train_task
from shared.schemas import TrainingConfig
from shared.submissions import queue_run
from shared.training_checks import check_source

log = logging.getLogger(__name__)


def fire_due_schedules(sessions: SessionFactory, *, now: datetime) -> list[int]:
    """Queue a run for every schedule due at `now`; returns the outbox message ids to send."""
    return fire_each_due(sessions, Schedule, now=now, kind="schedule", queue=_queue_run)


def _queue_run(session: Session, schedule: Schedule) -> int | None:
    """A run of the stored config, checked as a POST is against what the org has now (a dataset erased since, a
    datasource changed since): one a POST would refuse fails the fire, recorded, instead of failing at its start.
    None when a run of the schedule waits already (queued, not started)."""
    waiting = _waiting_run(session, schedule.org_id)
    if waiting is not None:
        _skip(session, schedule, waiting)
        return None
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


def _waiting_run(session: Session, org_id: str) -> str | None:
    """The run the org's schedule queued that is still `queued`, if any. While the workers are down, or runs take
    longer than the schedule's period, each fire would queue one more behind it, all to train on the same data
    once a worker comes; so a fire queues none while one waits. Once it runs, the next fire queues one, for the data
    that came since."""
    return session.scalar(
        select(TrainingRun.id)
        .where(TrainingRun.org_id == org_id, TrainingRun.trigger == "schedule", TrainingRun.status == "queued")
        .order_by(TrainingRun.created_at)
        .limit(1)
    )


def _skip(session: Session, schedule: Schedule, run_id: str) -> None:
    log.info("org %s: the schedule's run %s has not started yet; this fire queues none", schedule.org_id, run_id)
    record_change(
        session,
        org_id=schedule.org_id,
        actor="schedule",
        action="schedule.skipped",
        target=run_id,
        detail={"trigger": "schedule"},
    )


class DatabaseScheduler(DatabaseBeat):
    """A beat scheduler whose only entries are the orgs' schedules, in the database."""

    def fire_due(self) -> None:
        messages = fire_due_schedules(self.sessions, now=utcnow())
        if messages:
            relay(self.sessions, {KIND_TRAIN_TASK: lambda payload: send_train_task(self.app, payload)}, ids=messages)
