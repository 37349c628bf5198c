"""An org's recurring training: a cron pattern in its timezone, fired by Celery beat from the database."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from services.api.deps import OrgAdmin, OrgViewer, SessionDep
from services.api.schemas import ScheduleIn, ScheduleOut
from shared.audit import record_change
from shared.beat import outlook, reschedule
from shared.db.models import Organization, Schedule
from shared.db.types import utcnow
from shared.errors import NotFound
from shared.org_lock import lock_org
from shared.schedules import DST_POLICY, check_schedule
from shared.training_checks import check_source

router = APIRouter(prefix="/v1/orgs/{org}/schedule", tags=["schedule"])


@router.put("", response_model=ScheduleOut)
def put_schedule(body: ScheduleIn, access: OrgAdmin, session: SessionDep) -> ScheduleOut:
    """Set the schedule; beat picks the change up at its next tick, without a restart."""
    check_schedule(body.pattern, body.timezone)
    lock_org(session, access.org_id)  # the first two at once: the second finds the row the first made, and sets it
    # Under the org's lock, as a dataset's erasure checks for a schedule under it: one of the two is refused.
    check_source(session, body.training_config, org_id=access.org_id, within="trainingConfig.")
    # Locked, so a beat firing it now either fires first (and its last fire is seen here) or after the change.
    row = session.get(Schedule, access.org_id, with_for_update=True) or _recreated(session, access.org_id)
    reschedule(row, pattern=body.pattern, timezone=body.timezone, enabled=body.enabled, now=utcnow())
    row.training_config = body.training_config.to_wire()
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    record_change(
        session,
        org_id=access.org_id,
        actor=access.principal.key_id,
        action="schedule.set",
        target=body.pattern,
        # What it trains, as stored: the audit trail says who pointed the schedule at another config.
        detail={
            "pattern": body.pattern,
            "timezone": body.timezone,
            "enabled": body.enabled,
            "trainingConfig": row.training_config,
        },
    )
    return _schedule_out(row)


@router.get("", response_model=ScheduleOut)
def get_schedule(access: OrgViewer, session: SessionDep) -> ScheduleOut:
    return _schedule_out(_existing(session, access.org_id))


@router.delete("", status_code=status.HTTP_204_NO_CONTENT)
def delete_schedule(access: OrgAdmin, session: SessionDep) -> Response:
    # Deletions take turns with each other and with a PUT: two at once each found the row, and both were audited.
    lock_org(session, access.org_id)
    # Locked, as a PUT locks it: a beat firing it now commits first, and its fire is the last one kept.
    row = _existing(session, access.org_id, locked=True)
    session.get_one(Organization, access.org_id).schedule_last_fired_at = row.last_fired_at
    session.delete(row)
    record_change(
        session, org_id=access.org_id, actor=access.principal.key_id, action="schedule.deleted", target=row.pattern
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _recreated(session: SessionDep, org_id: str) -> Schedule:
    """A new schedule, remembering the last fire of one deleted before: it next fires after that, as one set again
    without being deleted does (shared.beat.fires_to_come)."""
    # As it is now, under the org's lock: a copy the session still held from the request's authentication would
    # predate a DELETE that committed since.
    last_fired_at = session.get_one(Organization, org_id, populate_existing=True).schedule_last_fired_at
    return Schedule(org_id=org_id, last_fired_at=last_fired_at)


def _existing(session: SessionDep, org_id: str, *, locked: bool = False) -> Schedule:
    # As it is now, should the org's lock be held.
    row = session.get(Schedule, org_id, populate_existing=True, with_for_update=locked or None)
    if row is None:
        raise NotFound(f"organization {org_id!r} has no schedule")
    return row


def _schedule_out(row: Schedule) -> ScheduleOut:
    shown = outlook(row, utcnow())
    return ScheduleOut(
        pattern=row.pattern,
        timezone=row.timezone,
        enabled=row.enabled,
        training_config=row.training_config,
        next_fire_times=shown.next_fire_times,
        due_fire_at=shown.due_fire_at,
        missed_fires=shown.missed_fires,
        last_fired_at=row.last_fired_at,
        dst_policy=DST_POLICY,
    )
