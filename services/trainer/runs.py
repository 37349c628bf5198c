"""A training run's row: claimed once, progress while it works, and its end with or without a version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import update

from shared.db.models import Dataset, ModelVersion, Organization, TrainingRun
from shared.db.session import SessionFactory, session_scope
from shared.db.types import utcnow
from shared.schemas import OrgConfig, TrainingConfig


@dataclass(frozen=True)
class RunSpec:
    """Everything the pipeline needs about a claimed run, detached from the database."""

    run_id: str
    org_id: str
    config: TrainingConfig
    org_config: OrgConfig
    dataset_key: str
    timestamp_column: str | None


def claim_run(sessions: SessionFactory, run_id: str) -> RunSpec | None:
    """Move a queued run to running; None when it is not queued (a repeated message, or a cancelled run)."""
    with session_scope(sessions) as session:
        claimed = session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.status == "queued")
            .values(
                status="running",
                attempts=TrainingRun.attempts + 1,
                started_at=utcnow(),
                progress={"stage": "starting", "percent": 0},
            )
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        run = session.get_one(TrainingRun, run_id)
        org = session.get_one(Organization, run.org_id)
        dataset = session.get_one(Dataset, run.dataset_id)
        return RunSpec(
            run_id=run.id,
            org_id=run.org_id,
            config=TrainingConfig.model_validate(run.config),
            org_config=OrgConfig.model_validate(org.config),
            dataset_key=dataset.object_key,
            timestamp_column=dataset.timestamp_column,
        )


def set_progress(sessions: SessionFactory, run_id: str, stage: str, percent: int) -> None:
    with session_scope(sessions) as session:
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.status == "running")
            .values(progress={"stage": stage, "percent": percent})
        )


def fail_run(sessions: SessionFactory, run_id: str, reason: str) -> None:
    with session_scope(sessions) as session:
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.status == "running")
            .values(status="failed", error=reason, finished_at=utcnow(), progress={"stage": "failed", "percent": 100})
        )


@dataclass(frozen=True)
class TrainedVersion:
    version: str
    sha256: str
    size_bytes: int
    artifact_prefix: str
    feature_columns: list[str]
    target_column: str
    classes: list[Any]
    metrics: dict[str, Any]
    validation: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.validation["passed"])


def register_version(sessions: SessionFactory, spec: RunSpec, trained: TrainedVersion) -> str:
    """Record the version and end the run in one transaction: succeeded when every gate passed, else rejected."""
    status = "succeeded" if trained.passed else "rejected"
    error = None if trained.passed else "validation failed: " + ", ".join(trained.validation["failed"])
    with session_scope(sessions) as session:
        session.add(
            ModelVersion(
                version=trained.version,
                org_id=spec.org_id,
                run_id=spec.run_id,
                status="validated" if trained.passed else "rejected",
                sha256=trained.sha256,
                size_bytes=trained.size_bytes,
                artifact_prefix=trained.artifact_prefix,
                feature_columns=trained.feature_columns,
                target_column=trained.target_column,
                classes=trained.classes,
                metrics=trained.metrics,
                validation=trained.validation,
            )
        )
        session.flush()
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == spec.run_id)
            .values(
                status=status,
                version=trained.version,
                error=error,
                finished_at=utcnow(),
                progress={"stage": status, "percent": 100},
            )
        )
    return status
