"""Queueing a sync job or a source's deletion, the same way from the api and from the sync beat: the row and its
outbox message together."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy.orm import Session

from shared.audit import record_change
from shared.db.models import OutboxMessage, SyncJob, SyncSource
from shared.outbox import KIND_DELETE_SOURCE_TASK, KIND_SYNC_TASK, add_message
from shared.schemas import OrgConfig
from shared.sync_tables import SyncTable

QUEUED, RUNNING, RETRYING, SUCCEEDED, FAILED, REFUSED, CANCELLED = (
    "queued",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "refused",
    "cancelled",  # its task revoked by an operator in Flower (services/sync/revocation.py)
)
FINISHED = (SUCCEEDED, FAILED, REFUSED, CANCELLED)
# A conflict: held for review, a version chosen there (the next job writes it), or settled.
CONFLICT_OPEN, CONFLICT_CHOSEN, CONFLICT_RESOLVED = "open", "chosen", "resolved"
# A conflict's local version when its table syncs down only: the local record never reaches the central store, so the
# conflict holds this marker in its place, with the local store's reason for refusing the central version.
WITHHELD, REFUSAL = "_kiln_withheld", "_kiln_refusal"


def residency_refusal(org_config: OrgConfig, source: SyncSource) -> str | None:
    """Why an org's job may not run, or None: an org keeping its data on its premises never sends records up."""
    if org_config.data_residency != "local":
        return None
    upward = [table.name for table in source_tables(source) if table.sends_up]
    if not upward:
        return None
    return (
        f"organization {source.org_id!r} keeps its data on its premises (dataResidency 'local'): records never "
        f"leave the local store, so tables {', '.join(upward)} cannot sync up (direction 'down' is allowed)"
    )


def deletion_refusal(source: SyncSource) -> str | None:
    """Why nothing new may start for a source, or None: its deletion was asked for (DELETE
    /v1/orgs/{org}/sync-sources/{id}), or done. Jobs, resyncs and schedule changes are refused with this reason."""
    if source.deleted_at is not None:
        return f"sync source {source.id} was deleted at {source.deleted_at.isoformat()}"
    if source.deletion_requested_at is None:
        return None
    return (
        f"sync source {source.id} is being deleted (asked at {source.deletion_requested_at.isoformat()}): it takes no "
        "new job, resync, URL or schedule change, and a sync worker removes its central copies and records; register "
        "its tables again once GET on the source answers 404"
    )


def source_tables(source: SyncSource) -> list[SyncTable]:
    return [SyncTable.model_validate(table) for table in source.tables]


def queue_sync_job(session: Session, *, source: SyncSource, actor: str, trigger: str) -> tuple[SyncJob, OutboxMessage]:
    job = SyncJob(
        id="sj" + secrets.token_hex(8), org_id=source.org_id, source_id=source.id, status=QUEUED, trigger=trigger
    )
    session.add(job)
    session.flush()
    record_change(
        session,
        org_id=source.org_id,
        actor=actor,
        action="sync.job.queued",
        target=job.id,
        detail={"sourceId": source.id, "trigger": trigger},
    )
    message = add_message(session, kind=KIND_SYNC_TASK, payload={"job_id": job.id, "org_id": source.org_id})
    return job, message


def queue_source_deletion(session: Session, *, source: SyncSource, at: datetime) -> OutboxMessage:
    """Queue the source's deletion task (services/sync/source_deletion.py), noting when: the sync beat queues it
    again when the source is still there long after, its message presumed lost."""
    source.deletion_queued_at = at
    return add_message(session, kind=KIND_DELETE_SOURCE_TASK, payload={"source_id": source.id, "org_id": source.org_id})
