"""Retention: synced records whose last change is older than the org's retention period are purged, on both sides,
and so are the org's prediction records (scores and risk levels of its patients' or machines' rows) older than it.

A record's last change is the newest of its central stamp, its local edits not yet pushed, and, while it is held
for review, the versions its conflict holds: one edited locally since its last sync, or whose edit went up into
its conflict alone, is judged by that edit, so a fresh edit is never purged. The purge of a
source holds its job lock, so no job moves a record between the two looks; the local store's writers are shut
out while its side is judged and deleted, and the central delete checks each stamp again, so a central edit made
meanwhile stays (and goes down). One audit row per purge (per table), naming how many records went and the cutoff.
The local copy goes first: if the central store is unreachable then, the next purge finds the same records again.
Prediction records go in batches, each with its audit row in its own transaction, so none goes unaudited.
Each table, and the prediction records, is purged on its own: one that fails (its local store out of reach, its
file moved) is logged and audited as `sync.purge.failed`, where the org's operators look, and the rest still goes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import ColumnElement, Connection, Table, select
from sqlalchemy.orm import Session

from services.sync.changes import CENTRAL_LOG, LOCAL_LOG, begin_applying, end_applying, pending, shut_out_writers
from services.sync.conflicts import locked_held_conflicts
from services.sync.context import SyncContext
from services.sync.hlc import Stamp
from services.sync.jobs import failure_reason, traceback_of
from services.sync.store_marks import check_same_store
from services.sync.stores import STAMP, delete, key_text, key_value, open_local, reflect
from services.sync.watermarks import UP
from shared.audit import record_change
from shared.db.models import Organization, Prediction, SyncBase, SyncSource, SyncWatermark
from shared.db.session import session_scope
from shared.db.types import utcnow
from shared.schemas import OrgConfig
from shared.source_lock import one_job_per_source
from shared.sync_jobs import CONFLICT_RESOLVED, source_tables
from shared.sync_tables import SyncTable, central_table_name

PREDICTIONS_PER_BATCH = 10_000
# A conflict whose record was purged while it waited for review, or for its choice to be written.
PURGED = "purged"

log = logging.getLogger(__name__)


def purge_expired(context: SyncContext, org_id: str, *, now: datetime | None = None) -> int:
    """Purge every source of the org, and its prediction records; returns how many records went."""
    with session_scope(context.sessions) as session:
        config = OrgConfig.model_validate(session.get_one(Organization, org_id).config)
        # A source being deleted loses its central copies whole: nothing to purge one by one.
        sources = session.scalars(
            select(SyncSource).where(SyncSource.org_id == org_id, SyncSource.deletion_requested_at.is_(None))
        ).all()
        session.expunge_all()
    days = config.retention_days
    cutoff = (now or utcnow()) - timedelta(days=days)
    purges = [
        (f"{source.id}/{spec.name}", partial(_purge_table, context, source, spec, cutoff, days))
        for source in sources
        for spec in source_tables(source)
    ]
    purges.append(("predictions", partial(_purge_predictions, context, org_id, cutoff, days)))
    return sum(_on_its_own(context, org_id, target, purge, cutoff, days) for target, purge in purges)


def _on_its_own(
    context: SyncContext, org_id: str, target: str, purge: Callable[[], int], cutoff: datetime, days: int
) -> int:
    """Run one purge. Should it fail, it is logged and audited, and the next one runs all the same: a store out of
    reach must not keep the org's other records past their time. (The central store out of reach fails the
    audit too, and so the whole purge, which the next one does again.)"""
    try:
        return purge()
    except Exception as error:
        reason = failure_reason(error)
        log.error("retention purge of %s (org %s) failed: %s\n%s", target, org_id, reason, traceback_of(error))
        with session_scope(context.sessions) as session:
            record_change(
                session,
                org_id=org_id,
                actor="retention",
                action="sync.purge.failed",
                target=target,
                detail={"error": reason, "cutoff": cutoff.isoformat(), "retentionDays": days},
            )
        return 0


def _purge_predictions(context: SyncContext, org_id: str, cutoff: datetime, days: int) -> int:
    removed = 0
    while True:
        with session_scope(context.sessions) as session:
            expired = session.scalars(
                select(Prediction.id)
                .where(Prediction.org_id == org_id, Prediction.at < cutoff)
                .order_by(Prediction.id)
                .limit(PREDICTIONS_PER_BATCH)
            ).all()
            if not expired:
                return removed
            session.query(Prediction).filter(Prediction.id.in_(expired)).delete(synchronize_session=False)
            record_change(
                session,
                org_id=org_id,
                actor="retention",
                action="predictions.purge",
                target="predictions",
                detail={"records": len(expired), "cutoff": cutoff.isoformat(), "retentionDays": days},
            )
        removed += len(expired)


def _purge_table(context: SyncContext, source: SyncSource, spec: SyncTable, cutoff: datetime, days: int) -> int:
    with one_job_per_source(context.engine, source.id):
        source = _as_it_is_now(context, source.id)
        if source.deletion_requested_at is not None:
            return 0  # its deletion was asked since the purge listed it: its central copies go whole
        return _purge_table_between_jobs(context, source, spec, cutoff, days)


def _as_it_is_now(context: SyncContext, source_id: str) -> SyncSource:
    """The source read under its job lock: its URL may have been changed (PATCH) since the purge listed it."""
    with session_scope(context.sessions) as session:
        source = session.get_one(SyncSource, source_id)
        session.expunge(source)
        return source


def _purge_table_between_jobs(
    context: SyncContext, source: SyncSource, spec: SyncTable, cutoff: datetime, days: int
) -> int:
    """The purge of one table, while no job of its source runs."""
    name = central_table_name(source.id, spec.name)
    with context.engine.connect() as connection:
        if not connection.dialect.has_table(connection, name):
            return 0
        central = reflect(connection, name)
        rows = connection.execute(select(central.c[spec.primary_key]).where(_expired(central, cutoff)))
        keys = [key_text(value) for (value,) in rows]
        up_watermark = _up_watermark(connection, source.id, spec.name)
    keys = _unless_held_with_an_edit_since(context, source.id, spec.name, keys, cutoff)
    if not keys:
        return 0
    keys = _purge_local(context, source, spec, keys, after=up_watermark, cutoff=cutoff)
    with session_scope(context.sessions) as session:
        connection = session.connection()
        begin_applying(connection, CENTRAL_LOG)
        removed = _delete_expired(connection, central, spec.primary_key, keys, cutoff)
        _forget_bases(session, source.id, spec.name, removed)
        _settle_conflicts(session, source, spec.name, removed)
        end_applying(connection, CENTRAL_LOG)
        record_change(
            session,
            org_id=source.org_id,
            actor="retention",
            action="sync.purge",
            target=f"{source.id}/{spec.name}",
            detail={"records": len(removed), "cutoff": cutoff.isoformat(), "retentionDays": days},
        )
    return len(removed)


def _unless_held_with_an_edit_since(
    context: SyncContext, source_id: str, table: str, keys: list[str], cutoff: datetime
) -> list[str]:
    """The keys but those of records held for review with a version stamped since the cutoff. An edit of a held
    record joins its conflict alone: the push moves past a local one, and the central record keeps its stamp, so
    judged by that stamp the record would go with an edit made today."""
    since = Stamp(_ms(cutoff), 0, "").encode()
    recent: set[str] = set()
    with session_scope(context.sessions) as session:
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            for conflict in locked_held_conflicts(session, source_id=source_id, table=table, keys=chunk):
                stamps = (conflict.local_version.get(STAMP), conflict.central_version.get(STAMP))
                if any(stamp is not None and stamp >= since for stamp in stamps):
                    recent.add(conflict.record_key)
    return [key for key in keys if key not in recent]


def _expired(central: Table, cutoff: datetime) -> ColumnElement[bool]:
    # Stamps are fixed-width text, so "older than the cutoff" is a text comparison on the stamp column.
    return central.c[STAMP] < Stamp(_ms(cutoff), 0, "").encode()


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _up_watermark(connection: Connection, source_id: str, table: str) -> int:
    """Where the last push stopped in the local change log: local edits after it have not reached the central store."""
    seq = connection.execute(
        select(SyncWatermark.seq).where(
            SyncWatermark.source_id == source_id, SyncWatermark.table_name == table, SyncWatermark.direction == UP
        )
    ).scalar()
    return seq or 0


def _purge_local(
    context: SyncContext, source: SyncSource, spec: SyncTable, keys: list[str], *, after: int, cutoff: datetime
) -> list[str]:
    """Delete locally the records expired centrally and not edited locally since; returns the keys deleted."""
    local = open_local(source.url, context.source_password(source), context.store_rules(source.org_id))
    try:
        check_same_store(context.engine, local, source)  # never delete from a database a changed URL named by mistake
        with local.begin() as connection:
            shut_out_writers(connection, LOCAL_LOG)  # no local edit lands between the look and the delete
            edited = pending(connection, LOCAL_LOG, table=spec.name, keys=keys, after=after)
            expired = [key for key in keys if key not in edited or edited[key].at_ms < _ms(cutoff)]
            begin_applying(connection, LOCAL_LOG)
            delete(connection, reflect(connection, spec.name), spec.primary_key, expired)
            end_applying(connection, LOCAL_LOG)
        return expired
    finally:
        local.dispose()


def _delete_expired(
    connection: Connection, central: Table, column: str, keys: list[str], cutoff: datetime
) -> list[str]:
    """Delete the central records among `keys` still expired, and return their keys: one edited since the purge
    looked stays, its base and conflict with it, and the change log sends it down to the local store, which has
    just deleted its copy."""
    values = [key_value(central, key, column) for key in keys]
    removed: list[str] = []
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        deleted = central.delete().where(central.c[column].in_(chunk), _expired(central, cutoff))
        removed += [key_text(value) for value in connection.execute(deleted.returning(central.c[column])).scalars()]
    return removed


def _forget_bases(session: Session, source_id: str, table: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 500):
        session.query(SyncBase).filter(
            SyncBase.source_id == source_id,
            SyncBase.table_name == table,
            SyncBase.record_key.in_(keys[start : start + 500]),
        ).delete(synchronize_session=False)


def _settle_conflicts(session: Session, source: SyncSource, table: str, keys: list[str]) -> None:
    """The purged records' conflicts still open or chosen are settled as purged, each audited: a choice written
    later would bring its record back centrally alone (keeping `local` sends nothing down), past its retention.
    Read under their rows' locks, which a choice takes too: one made meanwhile is settled all the same."""
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        for conflict in locked_held_conflicts(session, source_id=source.id, table=table, keys=chunk):
            conflict.status, conflict.outcome, conflict.kept = CONFLICT_RESOLVED, PURGED, None
            conflict.resolved_at, conflict.resolved_by = utcnow(), "retention"
            record_change(
                session,
                org_id=source.org_id,
                actor="retention",
                action="sync.conflict.purged",
                target=f"{table}/{conflict.record_key}",
                detail={"conflictId": conflict.id},
            )
