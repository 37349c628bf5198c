"""Cancelling a run, asked over the API or by an operator revoking its task in Flower."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.db.models import TrainingRun
from shared.db.types import utcnow


def request_cancel(session: Session, run_id: str) -> str | None:
    """A queued run is cancelled at once and will never start; a running one is flagged, and its worker stops it
    within a second. Returns the run's status after the request, or None when it had already ended."""
    cancelled_now = {
        "status": "cancelled",
        "finished_at": utcnow(),
        "progress": {"stage": "cancelled", "percent": 100},
        "error": "cancelled before it started",
    }
    for status, changes in (("queued", cancelled_now), ("running", {})):
        updated = session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.status == status)
            .values(cancel_requested=True, **changes)
        )
        if updated.rowcount == 1:  # type: ignore[attr-defined]
            return "cancelled" if status == "queued" else "running"
    return None
