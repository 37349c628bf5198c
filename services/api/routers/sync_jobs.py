"""Sync jobs (queued on `sync.<org>`, run by the sync workers) and the conflicts they met, with the review queue
of those held for a person to decide."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.api.deps import OrgAdmin, OrgTrainer, OrgViewer, ResourcesDep, SessionDep
from services.api.outbox_relay import commit_and_send
from services.api.routers.sync_sources import active_source
from services.api.schemas import MAX_ROW_ID
from services.api.sync_schemas import ConflictOut, ConflictResolution, SyncJobIn, SyncJobOut
from shared.audit import record_change
from shared.db.models import SyncConflict, SyncJob
from shared.db.row_locks import lock_row
from shared.db.types import utcnow
from shared.errors import Conflict, NotFound
from shared.org_lock import org_config_held
from shared.sync_jobs import CONFLICT_CHOSEN, CONFLICT_OPEN, WITHHELD, queue_sync_job, residency_refusal

router = APIRouter(prefix="/v1/orgs/{org}", tags=["sync"])


@router.post("/sync-jobs", status_code=status.HTTP_202_ACCEPTED, response_model=SyncJobOut)
def submit_job(body: SyncJobIn, access: OrgTrainer, session: SessionDep, resources: ResourcesDep) -> SyncJobOut:
    # Held first: a switch to local residency or a source's deletion (both under lock_org) committing after these
    # checks would leave a job queued that the api should have refused.
    org_config = org_config_held(session, access.org_id)
    source = active_source(session, body.source_id, org_id=access.org_id, field="sourceId")
    refusal = residency_refusal(org_config, source)
    if refusal is not None:
        raise Conflict(refusal, field="sourceId")
    job, messages = queue_sync_job(session, source=source, actor=access.principal.key_id, trigger="api")
    commit_and_send(session, resources, *messages)
    return _job_out(job)


@router.get("/sync-jobs", response_model=list[SyncJobOut])
def list_jobs(access: OrgViewer, session: SessionDep) -> list[SyncJobOut]:
    rows = session.scalars(
        select(SyncJob).where(SyncJob.org_id == access.org_id).order_by(SyncJob.created_at.desc()).limit(200)
    )
    return [_job_out(row) for row in rows]


@router.get("/sync-jobs/{job_id}", response_model=SyncJobOut)
def get_job(job_id: str, access: OrgViewer, session: SessionDep) -> SyncJobOut:
    row = session.get(SyncJob, job_id)
    if row is None or row.org_id != access.org_id:
        raise NotFound(f"sync job {job_id!r} not found")
    return _job_out(row)


@router.get("/conflicts", response_model=list[ConflictOut])
def list_conflicts(
    access: OrgViewer,
    session: SessionDep,
    state: Annotated[Literal["open", "chosen", "resolved"] | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ROW_ID, description="only conflicts older than this id, to page back")
    ] = None,
) -> list[ConflictOut]:
    """Every conflict met, newest first, a page at a time; `?status=open` is the manual review queue."""
    query = select(SyncConflict).where(SyncConflict.org_id == access.org_id)
    if state is not None:
        query = query.where(SyncConflict.status == state)
    if before is not None:
        query = query.where(SyncConflict.id < before)
    return [_conflict_out(row) for row in session.scalars(query.order_by(SyncConflict.id.desc()).limit(limit))]


@router.post("/conflicts/{conflictId}", response_model=ConflictOut)
def resolve_conflict(
    conflict_id: Annotated[int, Path(alias="conflictId", ge=1, le=MAX_ROW_ID)],
    body: ConflictResolution,
    access: OrgAdmin,
    session: SessionDep,
    resources: ResourcesDep,
) -> ConflictOut:
    """Decide a held conflict. The choice is written to both sides by a sync job, queued here."""
    # Held first, as a job's submission holds it: a source's deletion (under lock_org) committing after the check of
    # the source would leave a choice recorded and a job queued for a source the api answered as deleted.
    org_config_held(session, access.org_id)
    row = _locked_conflict(session, conflict_id)
    if row is None or row.org_id != access.org_id:
        raise NotFound(f"conflict {conflict_id} not found")
    if row.status != CONFLICT_OPEN:
        raise Conflict(f"conflict {conflict_id} is {row.status}, not open", field="conflictId")
    source = active_source(session, row.source_id, org_id=access.org_id)
    if body.keep == "local" and row.local_version.get(WITHHELD):
        raise Conflict(
            f"conflict {conflict_id}: its local version was withheld (table {row.table_name!r} syncs down only, so its "
            "local records never reach the central store); keep central, after a central edit the local store takes",
            field="keep",
        )
    row.status, row.outcome = CONFLICT_CHOSEN, f"kept-{body.keep}"
    row.kept = dict(row.local_version if body.keep == "local" else row.central_version)
    row.resolved_by = access.principal.key_id
    row.resolved_at = utcnow()
    record_change(
        session,
        org_id=access.org_id,
        actor=access.principal.key_id,
        action="sync.conflict.resolved",
        target=f"{row.table_name}/{row.record_key}",
        detail={"conflictId": row.id, "keep": body.keep},
    )
    _job, messages = queue_sync_job(session, source=source, actor=access.principal.key_id, trigger="review")
    commit_and_send(session, resources, *messages)
    return _conflict_out(row)


def _locked_conflict(session: Session, conflict_id: int) -> SyncConflict | None:
    """The conflict, read holding its row's lock until the commit. A key rotation re-encrypts a batch of conflicts
    under the same lock (services/sync/reseal.py, Conflicts): the two take turns, so `kept` is copied from versions
    as the rotation left them, never from ones under a key it then drains, and the rotation never writes back a
    conflict as it was before the choice."""
    lock_row(session, SyncConflict.id, conflict_id, unchanged=SyncConflict.status)
    return session.get(SyncConflict, conflict_id, populate_existing=True)


def _job_out(row: SyncJob) -> SyncJobOut:
    return SyncJobOut(
        job_id=row.id,
        source_id=row.source_id,
        status=row.status,
        trigger=row.trigger,
        pushed=row.pushed,
        pulled=row.pulled,
        conflicts=row.conflicts,
        errors=row.errors,
        attempts=row.attempts,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _conflict_out(row: SyncConflict) -> ConflictOut:
    return ConflictOut(
        conflict_id=row.id,
        source_id=row.source_id,
        job_id=row.job_id,
        table=row.table_name,
        record_key=row.record_key,
        policy=row.policy,
        status=row.status,
        outcome=row.outcome,
        local_version=row.local_version,
        central_version=row.central_version,
        kept=row.kept,
        created_at=row.created_at,
        resolved_at=row.resolved_at,
        resolved_by=row.resolved_by,
    )
