"""The prediction records an org keeps (config.predictions.record), newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from services.api.deps import OrgViewer, SessionDep
from services.api.schemas import MAX_ROW_ID, PredictionRecord
from shared.db.models import Prediction

router = APIRouter(prefix="/v1/orgs/{org}/predictions", tags=["predictions"])


@router.get("", response_model=list[PredictionRecord])
def list_predictions(
    access: OrgViewer,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ROW_ID, description="only records older than this id, to page back")
    ] = None,
) -> list[PredictionRecord]:
    query = select(Prediction).where(Prediction.org_id == access.org_id)
    if before is not None:
        query = query.where(Prediction.id < before)
    rows = session.scalars(query.order_by(Prediction.id.desc()).limit(limit))
    return [
        PredictionRecord(
            id=row.id,
            version=row.version,
            score=row.score,
            label=row.label,
            risk_level=row.risk_level,
            latency_ms=row.latency_ms,
            at=row.at,
        )
        for row in rows
    ]
