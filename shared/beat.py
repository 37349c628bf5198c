"""The base of Kiln's Celery beat schedulers: nothing static, every tick reads the database and fires what is due.

Subclasses say what firing means (services/trainer/beat.py: trainings; services/sync/beat.py: sync jobs and
retention purges); `fire_each_due` fires their schedules the same way:

- each due schedule in a transaction of its own, its fire time taken with a conditional update, so two beats
  running at once never fire the same moment twice;
- of the fire times passed since the schedule's stored one (more than one when no beat was running), the latest is
  fired if missed by no more than GRACE; the others, and that one when older, are skipped, not made up, and audited
  in one row (`<kind>.missed`);
- a schedule that cannot fire (a stored config or pattern that no longer validates) is logged and audited
  (`<kind>.failed`) and moved on to its next fire time, or disabled when its pattern gives none: it never holds
  up the other orgs' schedules.

A tick the database fails is logged and tried again at the next one; beat itself never stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from celery.beat import Scheduler
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.audit import record_change
from shared.db.models import Schedule, SyncSchedule
from shared.db.session import (
    DATABASE_TROUBLE,
    SessionFactory,
    make_central_engine,
    make_session_factory,
    session_scope,
)
from shared.schedules import ScheduleError, fires_between, next_fire_times
from shared.settings import Settings, build_settings

log = logging.getLogger(__name__)

GRACE = timedelta(minutes=10)
MAX_REASON = 1000
SHOWN_FIRES = 5  # the fire times a schedule's view lists

Row = TypeVar("Row", Schedule, SyncSchedule)


def fires_to_come(schedule: Schedule | SyncSchedule, now: datetime, count: int = 1) -> list[datetime]:
    """The schedule's next `count` fire times as of `now`: after it, and after its last fire. An api clock a few
    seconds behind beat's would otherwise store again the fire beat has just done, and it would fire twice."""
    start = now if schedule.last_fired_at is None else max(now, schedule.last_fired_at)
    return next_fire_times(schedule.pattern, schedule.timezone, after=start, count=count)


def reschedule(schedule: Schedule | SyncSchedule, *, pattern: str, timezone: str, enabled: bool, now: datetime) -> None:
    """Set the schedule's pattern, timezone and `enabled` at `now`, and its next fire time. A fire due and not yet
    fired is kept when the new pattern and timezone fire at it too: a PUT landing a second after the due moment,
    before beat's tick, would otherwise move the schedule on to its next fire, and this one would never happen.
    Beat then fires it with the new settings."""
    pending = _pending_fire(schedule, now)
    schedule.pattern, schedule.timezone, schedule.enabled = pattern, timezone, enabled
    if not enabled:
        schedule.next_fire_at = None
    elif pending is not None and _fires_at(pattern, timezone, pending):
        schedule.next_fire_at = pending
    else:
        schedule.next_fire_at = fires_to_come(schedule, now)[0]


def _pending_fire(schedule: Schedule | SyncSchedule, now: datetime) -> datetime | None:
    """The stored fire time beat has yet to fire at `now`: due, not missed (within GRACE), and after the last fire."""
    due_at = schedule.next_fire_at
    if not schedule.enabled or due_at is None or due_at > now or not within_grace(due_at, now):
        return None
    return due_at if schedule.last_fired_at is None or due_at > schedule.last_fired_at else None


def _fires_at(pattern: str, timezone: str, instant: datetime) -> bool:
    return next_fire_times(pattern, timezone, after=instant - timedelta(microseconds=1))[0] == instant


def within_grace(due_at: datetime, now: datetime) -> bool:
    """Whether a fire due at `due_at` is still to be fired at `now`; one older was missed (no beat was running)."""
    return now - due_at <= GRACE


def fire_each_due(
    sessions: SessionFactory,
    model: type[Row],
    *,
    now: datetime,
    kind: str,
    queue: Callable[[Session, Row], int | None],
    detail: Callable[[Row], dict[str, Any]] = lambda _row: {},
) -> list[int]:
    """Fire every schedule in `model`'s table due at `now`: `queue` queues a fire's work and returns its outbox
    message's id (None when the fire has nothing to queue). Returns the ids to send. `kind` names the audit rows;
    `detail` adds to them."""
    key = model.__mapper__.primary_key[0]
    with sessions() as session:
        due = session.scalars(select(key).where(model.enabled.is_(True), model.next_fire_at <= now)).all()
    messages = []
    for schedule_key in due:
        try:
            with session_scope(sessions) as session:
                message = _fire(session, model, schedule_key, now=now, kind=kind, queue=queue, detail=detail)
        except DATABASE_TROUBLE:  # the database, not the schedule, at fault: it stays due for the next tick
            log.warning("%s %s: the database failed; the next tick tries again", kind, schedule_key, exc_info=True)
            break
        except Exception as error:
            log.warning("%s %s could not fire", kind, schedule_key, exc_info=True)
            with session_scope(sessions) as session:
                _failed(session, model, schedule_key, now=now, kind=kind, detail=detail, error=error)
            continue
        if message is not None:
            messages.append(message)
    return messages


def _due(session: Session, model: type[Row], schedule_key: str, now: datetime) -> Row | None:
    """The schedule, locked, if still due: None once another beat took it (or it was changed meanwhile)."""
    key = model.__mapper__.primary_key[0]
    return session.scalar(
        select(model)
        .where(key == schedule_key, model.enabled.is_(True), model.next_fire_at <= now)
        .with_for_update(skip_locked=True)
    )


def _move_on(session: Session, model: type[Row], schedule_key: str, due_at: datetime, **values: Any) -> bool:
    """Take the fire due at `due_at`: only one beat's update finds it still due then."""
    key = model.__mapper__.primary_key[0]
    taken = session.execute(update(model).where(key == schedule_key, model.next_fire_at == due_at).values(**values))
    return bool(taken.rowcount == 1)  # type: ignore[attr-defined]


def _fire(
    session: Session,
    model: type[Row],
    schedule_key: str,
    *,
    now: datetime,
    kind: str,
    queue: Callable[[Session, Row], int | None],
    detail: Callable[[Row], dict[str, Any]],
) -> int | None:
    schedule = _due(session, model, schedule_key, now)
    due = None if schedule is None else due_fires(schedule, now)
    if schedule is None or due is None:
        return None
    following = next_fire_times(schedule.pattern, schedule.timezone, after=now)[0]
    if not _move_on(session, model, schedule_key, due.first, next_fire_at=following, last_fired_at=due.latest):
        return None  # another beat fired it
    if due.missed is not None:
        _audit_missed(
            session,
            org_id=schedule.org_id,
            skipped=due.missed,
            fired_at=due.fire_at,
            action=f"{kind}.missed",
            detail=detail(schedule),
        )
    if due.fire_at is None:
        return None
    message = queue(session, schedule)
    if message is not None:
        log.info("%s %s: fired the time due at %s", kind, schedule_key, due.fire_at)
    return message


@dataclass(frozen=True)
class Missed:
    """Fire times skipped, oldest first: how many, the first and the last; the times between follow from the
    pattern."""

    count: int
    first: datetime
    last: datetime


@dataclass(frozen=True)
class Due:
    """What a beat's tick does with a due schedule: of its fire times from the stored one (`first`) to the latest
    passed (`latest`), it fires `fire_at`, the latest, unless missed by more than GRACE (None), and skips `missed`
    (None when it skips none)."""

    first: datetime
    latest: datetime
    fire_at: datetime | None
    missed: Missed | None


def due_fires(schedule: Schedule | SyncSchedule, now: datetime) -> Due | None:
    """What a tick at `now` does with the schedule, None when nothing is due: beat's and the schedule's view's
    answer, so a schedule read while beat is down shows the fire beat makes when it is back. Of the fire times
    passed since the stored one (more than one when no beat ran at the time of the others) only the last is fired,
    if still within GRACE: the work it queues does what the earlier ones would have (a training on the data there
    is now, a sync of all there is to sync). Counted, not listed: a beat back after a month would otherwise walk
    each of a `* * * * *` schedule's 43,000 fires."""
    first = schedule.next_fire_at
    if not schedule.enabled or first is None or first > now:
        return None
    later = fires_between(schedule.pattern, schedule.timezone, after=first, until=now)
    count, ends = 1 + later.count, (first, *later.last)[-2:]
    if not within_grace(ends[-1], now):
        return Due(first, ends[-1], None, Missed(count, first, ends[-1]))
    missed = Missed(count - 1, first, ends[0]) if count > 1 else None
    return Due(first, ends[-1], ends[-1], missed)


@dataclass(frozen=True)
class Outlook:
    """A schedule as its view shows it (the training and the sync schedules' GET, and their PUT's answer): what a
    beat's tick does with it now, from due_fires, and the fires after. `next_fire_times` is headed by `due_fire_at`,
    a passed fire not yet fired that the tick fires (None when none); `missed_fires` counts those it skips."""

    next_fire_times: list[datetime]
    due_fire_at: datetime | None
    missed_fires: int


def outlook(schedule: Schedule | SyncSchedule, now: datetime, count: int = SHOWN_FIRES) -> Outlook:
    """The schedule's view at `now`, `count` fire times in all: none for a disabled schedule, nor for one stored
    before a rule its pattern breaks (its beat disables it at its next fire, recording why), which can still be read
    and set again."""
    if not schedule.enabled:
        return Outlook([], None, 0)
    try:
        due = due_fires(schedule, now)
        overdue = [due.fire_at] if due is not None and due.fire_at is not None else []
        fires = overdue + fires_to_come(schedule, now, count - len(overdue))
    except ScheduleError:
        return Outlook([], None, 0)
    if due is None:
        return Outlook(fires, None, 0)
    return Outlook(fires, due.fire_at, due.missed.count if due.missed is not None else 0)


def _failed(
    session: Session,
    model: type[Row],
    schedule_key: str,
    *,
    now: datetime,
    kind: str,
    detail: Callable[[Row], dict[str, Any]],
    error: Exception,
) -> None:
    """Record why the schedule could not fire, and move it on to its next fire time: it fails alone, once per fire
    time. A pattern that gives no next fire time disables the schedule until it is set again."""
    schedule = _due(session, model, schedule_key, now)
    if schedule is None or schedule.next_fire_at is None:
        return
    due_at = schedule.next_fire_at
    try:
        following: datetime | None = next_fire_times(schedule.pattern, schedule.timezone, after=now)[0]
    except Exception:
        following = None
    values: dict[str, Any] = {"next_fire_at": following} if following else {"next_fire_at": None, "enabled": False}
    if not _move_on(session, model, schedule_key, due_at, **values):
        return
    record_change(
        session,
        org_id=schedule.org_id,
        actor="schedule",
        action=f"{kind}.failed",
        target=due_at.isoformat(),
        detail={
            **detail(schedule),
            "error": f"{type(error).__name__}: {error}"[:MAX_REASON],
            "nextFireAt": following.isoformat() if following else None,
            "enabled": following is not None,
        },
    )


def _audit_missed(
    session: Session,
    *,
    org_id: str,
    skipped: Missed,
    fired_at: datetime | None,
    action: str,
    detail: dict[str, Any],
) -> None:
    """Log and audit, as `action`, the fire times `skipped` by a beat that fired `fired_at`, the last one due, or
    nothing when that too was missed by more than GRACE. A fire missed while no beat ran is not made up (a beat
    back after a day does not start a day's work at once), and one superseded by a later due fire is that fire. One
    row for them all, with their count and the first and last: a day without a beat would otherwise write 96 rows
    for a `*/15` schedule, and the times between follow from the pattern."""
    log.warning(
        "org %s: skipped %d fire(s) due from %s to %s (%s)", org_id, skipped.count, skipped.first, skipped.last, action
    )
    record_change(
        session,
        org_id=org_id,
        actor="schedule",
        action=action,
        target=skipped.first.isoformat(),
        detail={
            **detail,
            "missed": skipped.count,
            "firstMissedAt": skipped.first.isoformat(),
            "lastMissedAt": skipped.last.isoformat(),
            "firedAt": fired_at.isoformat() if fired_at else None,
        },
    )


class DatabaseBeat(Scheduler):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.settings: Settings = build_settings()
        self.engine = make_central_engine(self.settings, bound_answers=True)
        self.sessions = make_session_factory(self.engine)
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        """Nothing static: every tick reads the database."""

    def tick(self, *_args: Any, **_kwargs: Any) -> float:
        """Fire what is due; a failure is logged, and the next tick tries again."""
        try:
            self.fire_due()
        except Exception:
            log.warning("%s: nothing fired this tick; trying again", type(self).__name__, exc_info=True)
        return self.settings.beat_tick_s

    def fire_due(self) -> None:
        """Fire what is due now; each beat says what that means."""
        raise NotImplementedError

    def close(self) -> None:
        super().close()
        self.engine.dispose()
