"""Cancelling a run, asked over the API or by an operator revoking its task in Flower."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.db.models import RunLog, TrainingRun
from shared.db.types import utcnow

CANCELLED_QUEUED = "cancelled before it started"


def request_cancel(session: Session, run_id: str) -> str | None:
    """A queued run is cancelled at once and will never start; a running one is flagged, and its worker stops it
    within a second. Returns the run's status after the request, or None when it had already ended."""
    cancelled_now = {
        "status": "cancelled",
        "finished_at": utcnow(),
        "progress": {"stage": "cancelled", "percent": 100},
        "error": CANCELLED_QUEUED,
    }
    for status, changes in (("queued", cancelled_now), ("running", {})):
        updated = session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.status == status)
            .values(cancel_requested=True, **changes)
        )
        if updated.rowcount == 1:  # type: ignore[attr-defined]
            if status == "queued":
                _log_queued_cancel(session, run_id)
                return "cancelled"
            return "running"
    return None


def _log_queued_cancel(session: Session, run_id: str) -> None:
    """No worker ever writes the log of a run cancelled in the queue (a running one's worker logs its own stop), so
    the cancel writes its line: every run keeps a training log."""
    attempts = session.scalar(select(TrainingRun.attempts).where(TrainingRun.id == run_id)) or 0
    session.add(RunLog(run_id=run_id, attempt=attempts, level="info", stage="cancelled", message=CANCELLED_QUEUED))
