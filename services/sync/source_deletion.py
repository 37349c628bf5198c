"""Deleting a sync source (DELETE /v1/orgs/{org}/sync-sources/{id}, which marks it and queues this on `sync.<org>`).

Everything Kiln holds centrally for the source goes, in one transaction, once its running job (if any) has ended:
its central copies (`sync_<sourceId>_<table>`, their triggers and indexes with them; the capture functions are
shared by every central copy and stay), their rows in the central change log, its watermarks, store marks, resyncs,
conflicts, field-merge and append-only bases and schedule; its jobs not finished end `refused`, saying why. So the
same tables may be registered again, under a new source, with a new policy or new sensitive columns.

What stays: the audit trail (append-only: its `sync.delete` rows keep the records deleted then, as they were
stored), the jobs' history, and the source's row as a tombstone (password removed) that the api answers 404 for.
The local store is the org's own and is not touched: its triggers and change log stay, and a source registered
again on it has its first job make the triggers anew for its own key and log the records once more
(services/sync/jobs.py, open_pair), so that all of them go up again.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import MetaData, Table, delete, func, select, table
from sqlalchemy.orm import Session

from services.sync.context import SyncContext
from services.sync.envelope import one_key_change_at_a_time
from services.sync.watermarks import DOWN
from shared.audit import record_change
from shared.db.models import (
    SyncBase,
    SyncChange,
    SyncConflict,
    SyncJob,
    SyncResync,
    SyncSchedule,
    SyncSource,
    SyncStoreMark,
    SyncWatermark,
)
from shared.db.session import session_scope
from shared.db.types import utcnow
from shared.source_lock import one_job_per_source
from shared.sync_jobs import FINISHED, REFUSED, source_tables
from shared.sync_tables import SyncTable, central_table_name

log = logging.getLogger(__name__)

# The records kept for a source in Kiln's shared tables, by the name the audit row gives their count.
_KEPT_FOR_SOURCE: dict[str, Any] = {
    "watermarks": SyncWatermark,
    "storeMarks": SyncStoreMark,
    "resyncs": SyncResync,
    "conflicts": SyncConflict,
    "bases": SyncBase,
    "schedules": SyncSchedule,
}


def delete_source(context: SyncContext, source_id: str, *, org_id: str) -> dict[str, Any]:
    """Delete the source if its deletion was asked for; returns what the audit row says was removed. A message
    delivered twice finds the source deleted already and does nothing. SourceBusy while a job of the source runs."""
    with session_scope(context.sessions) as session:
        source = session.get(SyncSource, source_id)
        if source is None or source.org_id != org_id:
            log.warning("sync source %s of org %s: no such source to delete", source_id, org_id)
            return {"status": "missing"}
        if source.deleted_at is not None:
            return {"status": "deleted already"}
        if source.deletion_requested_at is None:
            log.warning("sync source %s: its deletion was not asked for; left as it is", source_id)
            return {"status": "not asked for"}
    # The source's job, if one runs, ends first: it would otherwise write to the tables dropped under it. Waiting
    # for it here would hold one of the sync workers every org shares for as long as the job runs: SourceBusy
    # instead, and the task tries again later (services/sync/tasks.py).
    with one_job_per_source(context.engine, source_id, wait=False):
        return _delete_between_jobs(context, source_id)


def _delete_between_jobs(context: SyncContext, source_id: str) -> dict[str, Any]:
    with session_scope(context.sessions) as session:
        # A key rotation reads the org's central copies: it runs before this or after, never between.
        source = session.get_one(SyncSource, source_id)
        one_key_change_at_a_time(session, source.org_id)
        session.refresh(source, with_for_update=True)  # a second deletion of it waits, then finds it deleted
        if source.deleted_at is not None:
            return {"status": "deleted already"}
        specs = source_tables(source)
        refused = _refuse_unfinished_jobs(session, source)
        tables = [_table_removed(session, source.id, spec) for spec in specs]
        removed = {
            name: _delete_rows(session, model, model.source_id == source.id) for name, model in _KEPT_FOR_SOURCE.items()
        }
        for entry in tables:
            _drop_table(session, entry["centralTable"])
        source.deleted_at, source.password_encrypted = utcnow(), None
        summary = {"tables": tables, "removed": removed, "jobsRefused": refused}
        record_change(
            session,
            org_id=source.org_id,
            actor=source.deletion_requested_by or "sync",
            action="sync.source.deleted",
            target=source.id,
            detail=summary,
        )
    log.info("sync source %s deleted: %s", source_id, summary)
    return summary


def _refuse_unfinished_jobs(session: Session, source: SyncSource) -> list[str]:
    """Jobs queued (or retrying, or left `running` by a worker that died) end refused: their message, should it come,
    finds them finished. Each is audited as every job's end is."""
    reason = f"sync source {source.id} was deleted: the job was not run"
    jobs = session.scalars(
        select(SyncJob).where(SyncJob.source_id == source.id, SyncJob.status.not_in(FINISHED)).order_by(SyncJob.id)
    ).all()
    for job in jobs:
        job.status, job.finished_at = REFUSED, utcnow()
        job.errors = [*job.errors, {"at": utcnow().isoformat(), "error": reason}]
        detail = {"status": REFUSED, "pushed": job.pushed, "pulled": job.pulled, "conflicts": job.conflicts}
        record_change(
            session,
            org_id=job.org_id,
            actor="sync",
            action=f"sync.job.{REFUSED}",
            target=job.id,
            detail={**detail, "error": reason},
        )
    return [job.id for job in jobs]


def _table_removed(session: Session, source_id: str, spec: SyncTable) -> dict[str, Any]:
    """What goes of one table: its central copy's records, its central change log rows, and how many central
    changes had not come down to the local store yet (lost with the copy: say so)."""
    name = central_table_name(source_id, spec.name)
    connection = session.connection()
    exists = connection.dialect.has_table(connection, name)
    records = _count(session, name) if exists else 0
    unpulled = 0
    if spec.sends_down:
        pulled_to = session.scalar(
            select(SyncWatermark.seq).where(
                SyncWatermark.source_id == source_id,
                SyncWatermark.table_name == spec.name,
                SyncWatermark.direction == DOWN,
            )
        )
        unpulled = int(
            session.scalar(select(func.count()).where(SyncChange.tbl == name, SyncChange.seq > (pulled_to or 0))) or 0
        )
    logged = _delete_rows(session, SyncChange, SyncChange.tbl == name)
    return {
        "table": spec.name,
        "centralTable": name,
        "records": records,
        "changeLogRows": logged,
        "unpulledChanges": unpulled,
    }


def _count(session: Session, name: str) -> int:
    return int(session.execute(select(func.count()).select_from(table(name))).scalar_one())


def _drop_table(session: Session, name: str) -> None:
    """The central copy, with its triggers, key and indexes; in the deletion's transaction (DDL is transactional
    on PostgreSQL, and SQLite's transaction is open by now: the deletion has written)."""
    Table(name, MetaData()).drop(session.connection(), checkfirst=True)


def _delete_rows(session: Session, model: Any, where: Any) -> int:
    result = session.execute(delete(model).where(where).execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]
