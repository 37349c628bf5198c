"""A table's acknowledged positions in each store's change log, and the job's counters, both moved in the
transaction of the batch they acknowledge, so a replayed batch is neither lost nor counted twice."""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.sync.changes import Change
from services.sync.pair import TablePair
from shared.db.models import SyncJob, SyncWatermark
from shared.db.types import utcnow
from shared.errors import TransientError

UP: Final = "up"
DOWN: Final = "down"

# The statements every batch runs, made once: made anew, each took more of the worker's time than running it (about
# 0.2 ms for a select and 0.4 ms for an update, against 0.07 ms prebuilt). Run on the session's connection, as plain
# SQL: the ORM's autoflush and in-session syncing have nothing to do for rows no session object holds pending.
_THIS_TABLE = (SyncWatermark.source_id == bindparam("source"), SyncWatermark.table_name == bindparam("table"))
_POSITIONS = select(SyncWatermark.direction, SyncWatermark.seq).where(*_THIS_TABLE)
_MOVE = (
    update(SyncWatermark)
    .where(*_THIS_TABLE, SyncWatermark.direction == bindparam("way"))
    .values(seq=bindparam("new_seq"), updated_at=bindparam("now"))
)
_MOVE_LOGGED = _MOVE.values(logged_key=bindparam("key"), logged_at_ms=bindparam("at_ms"))
_MOVE_ON = _MOVE.where(SyncWatermark.seq == bindparam("old_seq"))
_COUNT = (
    update(SyncJob)
    .where(SyncJob.id == bindparam("job"))
    .values(
        pushed=SyncJob.pushed + bindparam("more_pushed"),
        pulled=SyncJob.pulled + bindparam("more_pulled"),
        conflicts=SyncJob.conflicts + bindparam("more_conflicts"),
    )
)


def watermark(session: Session, pair: TablePair, direction: str) -> int:
    return watermarks(session, pair).get(direction, 0)


def watermarks(session: Session, pair: TablePair) -> dict[str, int]:
    """Both directions' acknowledged positions, in one plain query: an ORM load per batch cost more than it."""
    rows = session.connection().execute(_POSITIONS, {"source": pair.source_id, "table": pair.spec.name})
    return {direction: seq for direction, seq in rows}


def set_watermark(session: Session, pair: TablePair, direction: str, seq: int, *, logged: Change | None = None) -> None:
    """`logged`, for `up`: the local log row at `seq`, kept beside it so that a job knows a store restored from a
    backup, whose log lacks that row (services/sync/store_marks.py)."""
    values: dict[str, Any] = {"seq": seq, "updated_at": utcnow()}
    this = {"source": pair.source_id, "table": pair.spec.name, "way": direction}
    if logged is None:
        moved = session.connection().execute(_MOVE, {**this, "new_seq": seq, "now": values["updated_at"]})
    else:
        values.update(logged_key=logged.key, logged_at_ms=logged.at_ms)
        moved = session.connection().execute(
            _MOVE_LOGGED,
            {**this, "new_seq": seq, "now": values["updated_at"], "key": logged.key, "at_ms": logged.at_ms},
        )
    if moved.rowcount == 0:
        session.add(SyncWatermark(source_id=pair.source_id, table_name=pair.spec.name, direction=direction, **values))


class WatermarkMoved(TransientError):
    """Another batch of the table was acknowledged while this one ran (its job's lock lost, and a second job let
    in): this one is undone centrally and the job tries again, from where the other left off."""


def move_watermark_on(session: Session, pair: TablePair, direction: str, *, after: int, seq: int) -> None:
    """From `after`, where the batch started, to `seq`; WatermarkMoved if it is not at `after` any more. A pull
    commits locally first and is acknowledged after: two batches between those commits would both audit what the
    first one deleted and count what both moved."""
    this = {"source": pair.source_id, "table": pair.spec.name, "way": direction}
    moved = session.connection().execute(_MOVE_ON, {**this, "old_seq": after, "new_seq": seq, "now": utcnow()})
    if moved.rowcount == 1:
        return
    moved_meanwhile = WatermarkMoved(
        f"table {pair.spec.name!r}: its {direction} changes were acknowledged up to another position while this batch "
        f"ran from {after}; the batch is redone from there"
    )
    if after != 0 or direction in watermarks(session, pair):
        raise moved_meanwhile
    first = SyncWatermark(source_id=pair.source_id, table_name=pair.spec.name, direction=direction, seq=seq)
    try:
        with session.begin_nested():  # the table's first position: another batch may be inserting it too
            session.add(first)
    except IntegrityError:
        raise moved_meanwhile from None


def count_moves(session: Session, pair: TablePair, *, pushed: int = 0, pulled: int = 0, conflicts: int = 0) -> None:
    """The job's counters move in the batch's own transaction, so a replayed batch is never counted twice."""
    pair.tally.pushed += pushed
    pair.tally.pulled += pulled
    pair.tally.conflicts += conflicts
    if pair.job_id is not None:
        counts = {"more_pushed": pushed, "more_pulled": pulled, "more_conflicts": conflicts}
        session.connection().execute(_COUNT, {"job": pair.job_id, **counts})


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
