"""A resync (POST /v1/orgs/{org}/sync-sources/{id}/resync): a table whose local store was restored from a backup or
replaced is brought back together with its central copy by the source's next job, keeping the edits made since
(README, "Restoring a store").

Which of the store's records and log rows came from the backup, and which were made since, cannot be told one by one,
so the resync starts each direction from what can be told:

- Up: the table's last acknowledged push came from the lost store, before the restore. Local log rows written before
  it (by the store's clock: that moment on the central clock plus the store's measured offset) were the backup's,
  and went up with the lost store, or are older than the watermark anyway; those written after it are the store's
  own edits since the restore. The watermark moves back to the last row before them, never past where it was.
- Down: central changes come down again from where the store says it had taken them (from the start if it keeps no
  mark). For a table that also sends up, that is not enough: what came up from the lost store is in no central log.
  So every central record is logged to come down once more, and every local record the central store no longer has
  (deleted there, or by the lost store) to be deleted locally, unless it was edited since the restore.

A record edited locally since the restore goes up before the pull reaches it, as pulls always let a local edit (the
transfer's _before_local_edits). Logged to come down, it meets a central version the restored store may never have
seen, so it goes through the table's policy as a conflict, which keeps the version that loses.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, Text, cast, delete, func, insert, literal, select
from sqlalchemy.orm import Session

from services.sync.changes import LOCAL_LOG, ORIGIN_MERGE, log_merges, pending
from services.sync.hlc import wall_clock_ms
from services.sync.pair import TablePair
from services.sync.store_marks import LOG, taken_position
from services.sync.stores import READ_CHUNK, key_text
from services.sync.watermarks import DOWN, UP, set_watermark, watermark
from shared.audit import record_change
from shared.db.models import SyncChange, SyncResync, SyncWatermark
from shared.db.types import utcnow


def resync_asked(central: Engine, source_id: str, table: str) -> bool:
    with Session(central) as session:
        return session.get(SyncResync, (source_id, table)) is not None


def resync_if_asked(pair: TablePair) -> bool:
    """Bring the table back together with its store, in one central transaction, if a resync was asked for it;
    False if none was."""
    with Session(pair.central) as session, session.begin():
        asked = session.get(SyncResync, (pair.source_id, pair.spec.name))
        if asked is None:
            return False
        with pair.local.connect() as local:
            up = _restart_up(session, local, pair) if pair.spec.sends_up else None
            down = _restart_down(session, local, pair, edited_after=up or 0) if pair.spec.sends_down else None
        drop_request(session, asked)
        record_change(
            session,
            org_id=pair.org_id,
            actor="sync",
            action="sync.resync.applied",
            target=f"{pair.source_id}/{pair.spec.name}",
            detail={"requestedBy": asked.requested_by, "upFrom": up, "downFrom": down},
        )
    return True


def drop_request(session: Session, asked: SyncResync) -> None:
    """Delete the request applied, unless it was renewed meanwhile (the api does not wait for this transaction):
    the store may have been restored again since it was read, and the renewed request is for the next job."""
    session.execute(
        delete(SyncResync).where(
            SyncResync.source_id == asked.source_id,
            SyncResync.table_name == asked.table_name,
            SyncResync.requested_at == asked.requested_at,
        )
    )


def _restart_up(session: Session, local: Connection, pair: TablePair) -> int:
    """Move the up watermark back to the last local log row written before the table's last acknowledged push."""
    up = session.get(SyncWatermark, (pair.source_id, pair.spec.name, UP))
    if up is None or up.seq == 0:
        return 0
    acknowledged_ms = int(up.updated_at.timestamp() * 1000) + pair.offset_ms
    first_after = (
        select(func.min(LOG.c.seq)).where(LOG.c.tbl == pair.spec.name, LOG.c.at_ms > acknowledged_ms).scalar_subquery()
    )
    row = local.execute(
        select(LOG.c.seq, LOG.c.pk, LOG.c.at_ms)
        .where(LOG.c.tbl == pair.spec.name, LOG.c.seq <= up.seq, LOG.c.seq < func.coalesce(first_after, up.seq + 1))
        .order_by(LOG.c.seq.desc())
        .limit(1)
    ).first()
    up.seq = int(row.seq) if row is not None else 0
    up.logged_key, up.logged_at_ms = (row.pk, row.at_ms) if row is not None else (None, None)
    up.updated_at = utcnow()
    return up.seq


def _restart_down(session: Session, local: Connection, pair: TablePair, *, edited_after: int) -> int:
    """Central changes come down again from where the store had taken them; for a table that also sends up, every
    record of either side is logged to come down (or be deleted locally) once more."""
    seq = min(taken_position(local, pair) or 0, watermark(session, pair, DOWN))
    set_watermark(session, pair, DOWN, seq)
    if pair.spec.sends_up:
        _log_central_records(session, pair)
        _log_records_gone_centrally(session, local, pair, edited_after=edited_after)
    return seq


def _log_central_records(session: Session, pair: TablePair) -> None:
    """Every central record, logged to come down: what the lost store sent up is in no central log."""
    central = pair.central_table
    logged = select(
        literal(pair.central_name),
        cast(central.c[pair.key], Text),
        literal(ORIGIN_MERGE),
        literal(wall_clock_ms(), BigInteger),
    )
    session.execute(insert(SyncChange).from_select(["tbl", "pk", "origin", "at_ms"], logged))


def _log_records_gone_centrally(session: Session, local: Connection, pair: TablePair, *, edited_after: int) -> None:
    """Local records the central store no longer has, and not edited since the restore, were deleted there or by
    the lost store: each is logged, to be deleted locally. The local keys are read a chunk at a time, in order."""
    local_key, central_key = pair.local_table.c[pair.key], pair.central_table.c[pair.key]
    last: Any = None
    while True:
        query = select(local_key).order_by(local_key).limit(READ_CHUNK)
        values = local.execute(query if last is None else query.where(local_key > last)).scalars().all()
        if not values:
            return
        last = values[-1]
        kept = {key_text(value) for value in session.scalars(select(central_key).where(central_key.in_(values)))}
        gone = {key_text(value) for value in values} - kept
        edited = pending(local, LOCAL_LOG, table=pair.spec.name, keys=gone, after=edited_after)
        log_merges(
            session.connection(),
            table=pair.central_name,
            merges=dict.fromkeys(gone - edited.keys()),
            at_ms=wall_clock_ms(),
        )
