"""Training runs: submit a TrainingConfig, follow the run."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, status
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.api.deps import OrgTrainer, OrgViewer, ResourcesDep, SessionDep
from services.api.lookups import get_owned
from services.api.outbox_relay import commit_and_send
from services.api.schemas import RunAccepted, RunLogOut, RunOut
from shared.db.models import Dataset, DataSource, ModelVersion, RunLog, TrainingRun
from shared.db.types import utcnow
from shared.errors import Conflict, InvalidInput
from shared.outbox import KIND_TRAIN_TASK, add_message
from shared.schemas import TrainingConfig

router = APIRouter(prefix="/v1/orgs/{org}/trainings", tags=["trainings"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=RunAccepted)
def submit_training(
    config: TrainingConfig, access: OrgTrainer, session: SessionDep, resources: ResourcesDep
) -> RunAccepted:
    dataset_id = _check_source(session, config, org_id=access.org_id)
    run = TrainingRun(
        id="run_" + secrets.token_hex(8),
        org_id=access.org_id,
        status="queued",
        config=config.to_wire(),
        dataset_id=dataset_id,
        progress={"stage": "queued", "percent": 0},
    )
    session.add(run)
    message = add_message(session, kind=KIND_TRAIN_TASK, payload={"run_id": run.id, "org_id": access.org_id})
    commit_and_send(session, resources, message)
    return RunAccepted(run_id=run.id, status=run.status)


@router.get("", response_model=list[RunOut])
def list_trainings(access: OrgViewer, session: SessionDep) -> list[RunOut]:
    runs = session.scalars(
        select(TrainingRun).where(TrainingRun.org_id == access.org_id).order_by(TrainingRun.created_at.desc())
    ).all()
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
    for status_now, changes in (
        (
            "queued",
            {
                "status": "cancelled",
                "finished_at": utcnow(),
                "progress": {"stage": "cancelled", "percent": 100},
                "error": "cancelled before it started",
            },
        ),
        ("running", {}),
    ):
        updated = session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.status == status_now)
            .values(cancel_requested=True, **changes)
        )
        if updated.rowcount == 1:  # type: ignore[attr-defined]
            session.commit()
            session.refresh(run)
            return _run_out(run, None)
    session.refresh(run)
    raise Conflict(f"run {run_id} is already {run.status}", field="runId")


@router.get("/{run_id}/logs", response_model=list[RunLogOut])
def training_logs(run_id: str, access: OrgViewer, session: SessionDep) -> list[RunLog]:
    get_owned(session, TrainingRun, run_id, org_id=access.org_id)
    return list(session.scalars(select(RunLog).where(RunLog.run_id == run_id).order_by(RunLog.id)))


def _check_source(session: Session, config: TrainingConfig, *, org_id: str) -> str | None:
    """The dataset the run reads (None: the org's datasource), checked so a bad run is refused before queueing."""
    if config.dataset_id is not None:
        return _dataset_for(session, config, org_id=org_id).id
    datasource = session.get(DataSource, org_id)
    if datasource is None:
        raise InvalidInput("datasetId is required: upload a dataset or configure the datasource", field="datasetId")
    if config.data_range is not None and datasource.timestamp_column is None:
        raise InvalidInput("dataRange needs the datasource's timestampColumn, and none is set", field="dataRange")
    return None


def _dataset_for(session: Session, config: TrainingConfig, *, org_id: str) -> Dataset:
    assert config.dataset_id is not None
    dataset = get_owned(session, Dataset, config.dataset_id, org_id=org_id, field="datasetId")
    columns = {column["name"]: column for column in dataset.columns}
    if config.target_column not in columns:
        raise InvalidInput(
            f"targetColumn {config.target_column!r} is not a column of dataset {dataset.id}", field="targetColumn"
        )
    missing = [name for name in config.feature_columns if name not in columns]
    if missing:
        raise InvalidInput(f"featureColumns not in dataset {dataset.id}: {', '.join(missing)}", field="featureColumns")
    non_numeric = [
        f"{name} ({columns[name]['type']})" for name in config.feature_columns if not columns[name]["numeric"]
    ]
    if non_numeric:
        raise InvalidInput(f"featureColumns hold non-numeric values: {', '.join(non_numeric)}", field="featureColumns")
    if config.data_range is not None and dataset.timestamp_column is None:
        raise InvalidInput(
            f"dataRange needs a timestamp column, and dataset {dataset.id} was uploaded without timestampColumn",
            field="dataRange",
        )
    return dataset


def _run_out(run: TrainingRun, version: ModelVersion | None) -> RunOut:
    return RunOut(
        run_id=run.id,
        status=run.status,
        version=run.version,
        metrics=version.metrics if version is not None else None,
        error=run.error,
        attempts=run.attempts,
        cancel_requested=run.cancel_requested,
        progress=run.progress,
        config=run.config,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )
