"""Cancelling a run, asked over the API or by an operator revoking its task in Flower."""

from __future__ import annotations

from sqlalchemy import case, literal, select, update
from sqlalchemy.orm import Session

from shared.db.models import RunLog, TrainingRun
from shared.db.types import JsonType, UTCDateTime, utcnow

CANCELLED_QUEUED = "cancelled before it started"


def request_cancel(session: Session, run_id: str) -> str | None:
    """A queued run is cancelled at once and will never start; a running one is flagged, and its worker stops it
    within a second. Returns the run's status after the request, or None when it had already ended.

    One update decides between the two, on the row as it is when the update gets it: a run a sweep hands back to
    the queue at that very moment (running, then queued) is cancelled either way, never missed."""
    queued = TrainingRun.status == "queued"
    status = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status.in_(("queued", "running")))
        .values(
            cancel_requested=True,
            status=case((queued, "cancelled"), else_=TrainingRun.status),
            finished_at=case((queued, literal(utcnow(), UTCDateTime())), else_=TrainingRun.finished_at),
            error=case((queued, CANCELLED_QUEUED), else_=TrainingRun.error),
            progress=case(
                (queued, literal({"stage": "cancelled", "percent": 100}, JsonType)), else_=TrainingRun.progress
            ),
        )
        .returning(TrainingRun.status)
    ).scalar_one_or_none()
    if status == "cancelled":
        _log_queued_cancel(session, run_id)
    return status


def _log_queued_cancel(session: Session, run_id: str) -> None:
    """No worker ever writes the log of a run cancelled in the queue (a running one's worker logs its own stop), so
    the cancel writes its line: every run keeps a training log."""
    attempts = session.scalar(select(TrainingRun.attempts).where(TrainingRun.id == run_id)) or 0
    session.add(RunLog(run_id=run_id, attempt=attempts, level="info", stage="cancelled", message=CANCELLED_QUEUED))
