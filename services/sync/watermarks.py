"""A table's acknowledged positions in each store's change log, and the job's counters, both moved in the
transaction of the batch they acknowledge, so a replayed batch is neither lost nor counted twice."""

from __future__ import annotations

from typing import Final

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.sync.pair import TablePair
from shared.db.models import SyncJob, SyncWatermark
from shared.db.types import utcnow

UP: Final = "up"
DOWN: Final = "down"


def watermark(session: Session, pair: TablePair, direction: str) -> int:
    return watermarks(session, pair).get(direction, 0)


def watermarks(session: Session, pair: TablePair) -> dict[str, int]:
    """Both directions' acknowledged positions, in one plain query: an ORM load per batch cost more than it."""
    rows = session.execute(
        select(SyncWatermark.direction, SyncWatermark.seq).where(
            SyncWatermark.source_id == pair.source_id, SyncWatermark.table_name == pair.spec.name
        )
    )
    return {direction: seq for direction, seq in rows}


def set_watermark(session: Session, pair: TablePair, direction: str, seq: int) -> None:
    moved = session.execute(
        update(SyncWatermark)
        .where(
            SyncWatermark.source_id == pair.source_id,
            SyncWatermark.table_name == pair.spec.name,
            SyncWatermark.direction == direction,
        )
        .values(seq=seq, updated_at=utcnow())
    )
    if moved.rowcount == 0:  # type: ignore[attr-defined]
        session.add(
            SyncWatermark(
                source_id=pair.source_id, table_name=pair.spec.name, direction=direction, seq=seq, updated_at=utcnow()
            )
        )


def count_moves(session: Session, pair: TablePair, *, pushed: int = 0, pulled: int = 0, conflicts: int = 0) -> None:
    """The job's counters move in the batch's own transaction, so a replayed batch is never counted twice."""
    pair.tally.pushed += pushed
    pair.tally.pulled += pulled
    pair.tally.conflicts += conflicts
    if pair.job_id is not None:
        session.execute(
            update(SyncJob)
            .where(SyncJob.id == pair.job_id)
            .values(
                pushed=SyncJob.pushed + pushed, pulled=SyncJob.pulled + pulled, conflicts=SyncJob.conflicts + conflicts
            )
        )
