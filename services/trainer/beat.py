"""Celery beat, reading the orgs' schedules from the database: `celery -A services.trainer.celery_app beat`.

Each tick fires the schedules that are due. A schedule's next fire time is taken with a conditional update, so
two beats running at once never fire the same moment twice, and a change made over the API is seen at the next
tick without a restart. A fire time missed by more than shared.beat.GRACE (no beat was running) is skipped, not
made up.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.beat import DatabaseBeat, missed
from shared.db.models import Schedule
from shared.db.session import SessionFactory, session_scope
from shared.db.types import utcnow
from shared.outbox import KIND_TRAIN_TASK, relay
from shared.queues import send_train_task
from shared.schedules import next_fire_times
from shared.schemas import TrainingConfig
from shared.submissions import queue_run

log = logging.getLogger(__name__)


def fire_due_schedules(sessions: SessionFactory, *, now: datetime) -> list[int]:
    """Queue a run for every schedule due at `now`; returns the outbox message ids to send."""
    messages = []
    with session_scope(sessions) as session:
        due = session.scalars(
            select(Schedule)
            .where(Schedule.enabled.is_(True), Schedule.next_fire_at <= now)
            .with_for_update(skip_locked=True)
        ).all()
        for schedule in due:
            message = _fire(session, schedule, now)
            if message is not None:
                messages.append(message)
    return messages


def _fire(session: Session, schedule: Schedule, now: datetime) -> int | None:
    due_at = schedule.next_fire_at
    assert due_at is not None
    following = next_fire_times(schedule.pattern, schedule.timezone, after=now)[0]
    taken = session.execute(
        update(Schedule)
        .where(Schedule.org_id == schedule.org_id, Schedule.next_fire_at == due_at)
        .values(next_fire_at=following, last_fired_at=due_at)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return None  # another beat fired it
    if missed(session, org_id=schedule.org_id, due_at=due_at, now=now, action="schedule.missed"):
        return None
    config = TrainingConfig.model_validate(schedule.training_config)
    _run, message = queue_run(
        session,
        org_id=schedule.org_id,
        config=config,
        dataset_id=config.dataset_id,
        actor="schedule",
        trigger="schedule",
    )
    log.info("org %s: queued the run due at %s", schedule.org_id, due_at)
    return message.id


class DatabaseScheduler(DatabaseBeat):
    """A beat scheduler whose only entries are the orgs' schedules, in the database."""

    def fire_due(self) -> None:
        messages = fire_due_schedules(self.sessions, now=utcnow())
        if messages:
            relay(self.sessions, {KIND_TRAIN_TASK: lambda payload: send_train_task(self.app, payload)}, ids=messages)
