"""How an org's work stands: queued, waiting for one of its slots, running, and the longest wait."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, select

from services.api.deps import OrgViewer, SessionDep
from services.api.schemas import QueueOut
from shared.db.models import Organization, TrainingRun
from shared.db.types import utcnow
from shared.schemas import OrgConfig

router = APIRouter(prefix="/v1/orgs/{org}/queue", tags=["queue"])


@router.get("", response_model=QueueOut)
def queue_state(access: OrgViewer, session: SessionDep) -> QueueOut:
    counts = dict(
        session.execute(
            select(TrainingRun.status, func.count())
            .where(TrainingRun.org_id == access.org_id, TrainingRun.status.in_(["queued", "running"]))
            .group_by(TrainingRun.status)
        ).all()
    )
    waiting = session.scalar(
        select(func.count()).where(
            TrainingRun.org_id == access.org_id, TrainingRun.status == "queued", TrainingRun.waiting_for_slot.is_(True)
        )
    )
    oldest = session.scalar(
        select(func.min(TrainingRun.created_at)).where(
            TrainingRun.org_id == access.org_id, TrainingRun.status == "queued"
        )
    )
    config = OrgConfig.model_validate(session.get_one(Organization, access.org_id).config)
    return QueueOut(
        queued=counts.get("queued", 0),
        waiting_for_slot=waiting or 0,
        running=counts.get("running", 0),
        max_concurrent_trainings=config.max_concurrent_trainings,
        oldest_queued_at=oldest,
        oldest_wait_s=(utcnow() - oldest).total_seconds() if oldest else None,
    )
