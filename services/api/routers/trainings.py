"""Training runs: submit a TrainingConfig, follow the run."""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Header, Query, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.api.deps import OrgTrainer, OrgViewer, ResourcesDep, SessionDep
from services.api.outbox_relay import commit_and_send
from services.api.ratelimit import take_submission
from services.api.schemas import MAX_ROW_ID, RunAccepted, RunLogOut, RunOut
from shared.audit import record_change
from shared.cancellation import request_cancel
from shared.db.models import ModelVersion, Organization, RunLog, TrainingRun
from shared.errors import Conflict
from shared.lookups import get_owned, newest_first
from shared.schemas import OrgConfig, TrainingConfigInput
from shared.submissions import queue_run
from shared.training_checks import check_source

router = APIRouter(prefix="/v1/orgs/{org}/trainings", tags=["trainings"])

RunStatus = Literal["queued", "running", "succeeded", "rejected", "failed", "cancelled"]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=RunAccepted)
def submit_training(
    config: TrainingConfigInput,
    access: OrgTrainer,
    session: SessionDep,
    resources: ResourcesDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)] = None,
) -> RunAccepted:
    """Queue a run. With an Idempotency-Key, the same key and body return the same run; another body is a 409."""
    body_hash = hashlib.sha256(orjson.dumps(config.to_wire(), option=orjson.OPT_SORT_KEYS)).hexdigest()
    if idempotency_key is not None and (earlier := _by_key(session, access.org_id, idempotency_key, body_hash)):
        return RunAccepted(run_id=earlier.id, status=earlier.status)
    org_config = OrgConfig.model_validate(session.get_one(Organization, access.org_id).config)
    dataset_id = check_source(session, config, org_id=access.org_id)
    try:
        # The insert meets a twin request's committed key here (PostgreSQL waits for it to commit): only a
        # submission that is not a duplicate takes one of the org's submissions for the minute.
        run, message = queue_run(
            session,
            org_id=access.org_id,
            config=config,
            dataset_id=dataset_id,
            actor=access.principal.key_id,
            trigger="api",
            idempotency_key=idempotency_key,
            request_hash=body_hash,
        )
        take_submission(resources.redis, access.org_id, org_config.submissions_per_minute)
        commit_and_send(session, resources, message)
    except IntegrityError:  # the same key, submitted at the same moment by another request
        session.rollback()
        if idempotency_key is None or not (earlier := _by_key(session, access.org_id, idempotency_key, body_hash)):
            raise
        return RunAccepted(run_id=earlier.id, status=earlier.status)
    return RunAccepted(run_id=run.id, status=run.status)


def _by_key(session: Session, org_id: str, key: str, body_hash: str) -> TrainingRun | None:
    earlier = session.scalar(
        select(TrainingRun).where(TrainingRun.org_id == org_id, TrainingRun.idempotency_key == key)
    )
    if earlier is not None and earlier.request_hash != body_hash:
        raise Conflict(f"Idempotency-Key {key!r} was used for another request body", field="Idempotency-Key")
    return earlier


@router.get("", response_model=list[RunOut])
def list_trainings(
    access: OrgViewer,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        str | None, Query(min_length=1, max_length=40, description="only runs submitted before this run, to page back")
    ] = None,
    state: Annotated[RunStatus | None, Query(alias="status")] = None,
) -> list[RunOut]:
    """The org's runs, newest first."""
    runs = newest_first(session, TrainingRun, org_id=access.org_id, limit=limit, before=before, status=state)
    versions = {
        v.version: v
        for v in session.scalars(
            select(ModelVersion).where(ModelVersion.version.in_([r.version for r in runs if r.version]))
        )
    }
    return [_run_out(run, versions.get(run.version or "")) for run in runs]


@router.get("/{run_id}", response_model=RunOut)
def get_training(run_id: str, access: OrgViewer, session: SessionDep) -> RunOut:
    run = get_owned(session, TrainingRun, run_id, org_id=access.org_id)
    version = session.get(ModelVersion, run.version) if run.version else None
    return _run_out(run, version)


@router.post("/{run_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=RunOut)
def cancel_training(run_id: str, access: OrgTrainer, session: SessionDep) -> RunOut:
    """A queued run is cancelled at once and never starts; a running one is stopped by its worker within seconds."""
    run = get_owned(session, TrainingRun, run_id, org_id=access.org_id)
    if request_cancel(session, run_id) is None:
        raise Conflict(f"run {run_id} is already {run.status}", field="runId")
    record_change(
        session, org_id=access.org_id, actor=access.principal.key_id, action="training.cancelled", target=run_id
    )
    session.commit()
    session.refresh(run)
    return _run_out(run, None)


@router.get("/{run_id}/logs", response_model=list[RunLogOut])
def training_logs(
    run_id: str,
    access: OrgViewer,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_ROW_ID, description="only lines after this id, to page on or follow the run")
    ] = None,
) -> list[RunLog]:
    """The run's log, oldest line first. A run's log is bounded (its script's progress is logged a few times a
    second, 200 times at most, per attempt), so the default page holds a whole log."""
    get_owned(session, TrainingRun, run_id, org_id=access.org_id)
    query = select(RunLog).where(RunLog.run_id == run_id)
    if after is not None:
        query = query.where(RunLog.id > after)
    return list(session.scalars(query.order_by(RunLog.id).limit(limit)))


def _run_out(run: TrainingRun, version: ModelVersion | None) -> RunOut:
    return RunOut(
        run_id=run.id,
        status=run.status,
        version=run.version,
        metrics=version.metrics if version is not None else None,
        error=run.error,
        attempts=run.attempts,
        cancel_requested=run.cancel_requested,
        waiting_for_slot=run.waiting_for_slot,
        trigger=run.trigger,
        worker=run.worker,
        progress=run.progress,
        config=run.config,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )
