"""Retention: synced records whose last change is older than the org's retention period are purged, on both sides,
and so are the org's prediction records (scores and risk levels of its patients' or machines' rows) older than it.

One audit row per purge (per table), naming how many records went and the cutoff. The local copy goes first: if
the central store is unreachable then, the next purge finds the same records again. Prediction records go in
batches, each with its audit row in its own transaction, so none goes unaudited.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.sync.changes import CENTRAL_LOG, LOCAL_LOG, begin_applying, end_applying
from services.sync.context import SyncContext
from services.sync.hlc import Stamp
from services.sync.stores import STAMP, delete, key_text, open_local, reflect
from shared.audit import record_change
from shared.db.models import Organization, Prediction, SyncBase, SyncSource
from shared.db.session import session_scope
from shared.db.types import utcnow
from shared.schemas import OrgConfig
from shared.sync_jobs import source_tables
from shared.sync_tables import SyncTable, central_table_name

PREDICTIONS_PER_BATCH = 10_000


def purge_expired(context: SyncContext, org_id: str, *, now: datetime | None = None) -> int:
    """Purge every source of the org, and its prediction records; returns how many records went."""
    with session_scope(context.sessions) as session:
        config = OrgConfig.model_validate(session.get_one(Organization, org_id).config)
        sources = session.scalars(select(SyncSource).where(SyncSource.org_id == org_id)).all()
        session.expunge_all()
    cutoff = (now or utcnow()) - timedelta(days=config.retention_days)
    synced = sum(
        _purge_table(context, source, spec, cutoff, config.retention_days)
        for source in sources
        for spec in source_tables(source)
    )
    return synced + _purge_predictions(context, org_id, cutoff, config.retention_days)


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
    name = central_table_name(source.id, spec.name)
    with context.engine.connect() as connection:
        if not connection.dialect.has_table(connection, name):
            return 0
        central = reflect(connection, name)
        # Stamps are fixed-width text, so "older than the cutoff" is a text comparison on the stamp column.
        oldest = Stamp(int(cutoff.timestamp() * 1000), 0, "").encode()
        rows = connection.execute(select(central.c[spec.primary_key]).where(central.c[STAMP] < oldest))
        keys = [key_text(value) for (value,) in rows]
    if not keys:
        return 0
    _purge_local(context, source, spec, keys)
    with session_scope(context.sessions) as session:
        connection = session.connection()
        begin_applying(connection, CENTRAL_LOG)
        removed = delete(connection, central, spec.primary_key, keys)
        _forget_bases(session, source.id, spec.name, keys)
        end_applying(connection, CENTRAL_LOG)
        record_change(
            session,
            org_id=source.org_id,
            actor="retention",
            action="sync.purge",
            target=f"{source.id}/{spec.name}",
            detail={"records": removed, "cutoff": cutoff.isoformat(), "retentionDays": days},
        )
    return removed


def _purge_local(context: SyncContext, source: SyncSource, spec: SyncTable, keys: list[str]) -> None:
    password = None
    if source.password_encrypted is not None:
        password = context.secrets.decrypt(source.password_encrypted, context=f"sync-source:{source.id}")
    local = open_local(source.url, password, context.store_rules(source.org_id))
    try:
        with local.begin() as connection:
            begin_applying(connection, LOCAL_LOG)
            delete(connection, reflect(connection, spec.name), spec.primary_key, keys)
            end_applying(connection, LOCAL_LOG)
    finally:
        local.dispose()


def _forget_bases(session: Session, source_id: str, table: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 500):
        session.query(SyncBase).filter(
            SyncBase.source_id == source_id,
            SyncBase.table_name == table,
            SyncBase.record_key.in_(keys[start : start + 500]),
        ).delete(synchronize_session=False)
