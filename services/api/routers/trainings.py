"""Training runs: submit a TrainingConfig, follow the run."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.api.deps import OrgTrainer, OrgViewer, ResourcesDep, SessionDep
from services.api.lookups import get_owned
from services.api.outbox_relay import commit_and_send
from services.api.schemas import RunAccepted, RunOut
from shared.db.models import Dataset, ModelVersion, TrainingRun
from shared.errors import InvalidInput
from shared.outbox import KIND_TRAIN_TASK, add_message
from shared.schemas import TrainingConfig

router = APIRouter(prefix="/v1/orgs/{org}/trainings", tags=["trainings"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=RunAccepted)
def submit_training(
    config: TrainingConfig, access: OrgTrainer, session: SessionDep, resources: ResourcesDep
) -> RunAccepted:
    dataset = _dataset_for(session, config, org_id=access.org_id)
    run = TrainingRun(
        id="run_" + secrets.token_hex(8),
        org_id=access.org_id,
        status="queued",
        config=config.to_wire(),
        dataset_id=dataset.id,
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


def _dataset_for(session: Session, config: TrainingConfig, *, org_id: str) -> Dataset:
    """The dataset the run will read, checked against the config so a bad run is refused before it is queued."""
    if config.dataset_id is None:
        raise InvalidInput("datasetId is required: upload a dataset first", field="datasetId")
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
        progress=run.progress,
        config=run.config,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )
