"""A table's acknowledged positions in each store's change log, and the job's counters, both moved in the
transaction of the batch they acknowledge, so a replayed batch is neither lost nor counted twice."""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.orm import Session

from services.sync.changes import Change
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


def set_watermark(session: Session, pair: TablePair, direction: str, seq: int, *, logged: Change | None = None) -> None:
    """`logged`, for `up`: the local log row at `seq`, kept beside it so that a job knows a store restored from a
    backup, whose log lacks that row (services/sync/store_marks.py)."""
    values: dict[str, Any] = {"seq": seq, "updated_at": utcnow()}
    if logged is not None:
        values.update(logged_key=logged.key, logged_at_ms=logged.at_ms)
    moved = session.execute(
        update(SyncWatermark)
        .where(
            SyncWatermark.source_id == pair.source_id,
            SyncWatermark.table_name == pair.spec.name,
            SyncWatermark.direction == direction,
        )
        .values(values)
    )
    if moved.rowcount == 0:  # type: ignore[attr-defined]
        session.add(SyncWatermark(source_id=pair.source_id, table_name=pair.spec.name, direction=direction, **values))


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


def start_up_after(connection: Connection, source_id: str, table: str, logged: Change) -> None:
    """A source's first `up` position for a table, after the local log row `logged`, kept with it as every `up`
    watermark is; a position the source has already is left as it is."""
    this = (
        SyncWatermark.source_id == source_id,
        SyncWatermark.table_name == table,
        SyncWatermark.direction == UP,
    )
    if connection.execute(select(SyncWatermark.seq).where(*this)).first() is not None:
        return
    connection.execute(
        insert(SyncWatermark).values(
            source_id=source_id,
            table_name=table,
            direction=UP,
            seq=logged.seq,
            updated_at=utcnow(),
            logged_key=logged.key,
            logged_at_ms=logged.at_ms,
        )
    )
