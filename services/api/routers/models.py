"""Model versions with their metrics and validation reports."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy import select

from services.api.deps import OrgTrainer, OrgViewer, ResourcesDep, SessionDep
from services.api.lookups import get_owned
from services.api.outbox_relay import commit_and_send
from services.api.schemas import ModelOut, ValidationAccepted
from shared.db.models import ModelVersion
from shared.outbox import KIND_VALIDATE_TASK, add_message

router = APIRouter(prefix="/v1/orgs/{org}/models", tags=["models"])


@router.get("", response_model=list[ModelOut])
def list_models(access: OrgViewer, session: SessionDep) -> list[ModelOut]:
    rows = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.org_id == access.org_id)
        .order_by(ModelVersion.created_at.desc(), ModelVersion.version.desc())
    )
    return [_model_out(row) for row in rows]


@router.get("/{version}", response_model=ModelOut)
def get_model(version: str, access: OrgViewer, session: SessionDep) -> ModelOut:
    return _model_out(get_owned(session, ModelVersion, version, org_id=access.org_id))


@router.post("/{version}/validate", status_code=status.HTTP_202_ACCEPTED, response_model=ValidationAccepted)
def validate_model(
    version: str, access: OrgTrainer, session: SessionDep, resources: ResourcesDep
) -> ValidationAccepted:
    """Run every gate again on the stored artifact, on the org's workers; the report replaces the version's."""
    row = get_owned(session, ModelVersion, version, org_id=access.org_id)
    message = add_message(session, kind=KIND_VALIDATE_TASK, payload={"org_id": access.org_id, "version": row.version})
    commit_and_send(session, resources, message)
    return ValidationAccepted(version=row.version, status="validating")


def _model_out(row: ModelVersion) -> ModelOut:
    return ModelOut(
        version=row.version,
        status=row.status,
        run_id=row.run_id,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        feature_columns=row.feature_columns,
        target_column=row.target_column,
        classes=row.classes,
        metrics=row.metrics,
        validation=row.validation,
        created_at=row.created_at,
        validated_at=row.validated_at,
    )
