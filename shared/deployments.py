"""What an org serves, by the rule the api and every predictor share: its pointer's deployment or, while that one
is refused, its last good one (the newest before it that is not failed). An undeploy is never refused, so once the
pointer has passed one, nothing from before it ever serves again."""

from __future__ import annotations

from sqlalchemy import ScalarSelect, func, select
from sqlalchemy.orm import Session, aliased

from shared.db.models import DEPLOYMENT_FAILED, CurrentDeployment, Deployment


def serving_deployment_id() -> ScalarSelect[int]:
    """For each org's pointer (correlated to CurrentDeployment): the id of the deployment that serves it."""
    candidate = aliased(Deployment)
    return (
        select(func.max(candidate.id))
        .where(
            candidate.org_id == CurrentDeployment.org_id,
            candidate.id <= CurrentDeployment.deployment_id,
            candidate.status != DEPLOYMENT_FAILED,
        )
        .correlate(CurrentDeployment)
        .scalar_subquery()
    )


def serving_deployment(session: Session, org_id: str) -> Deployment | None:
    """The org's deployment that serves; an undeploy's row (no version) when it was undeployed since, and None when
    it never deployed or every deployment it made was refused."""
    return session.scalar(
        select(Deployment)
        .select_from(CurrentDeployment)
        .join(Deployment, Deployment.id == serving_deployment_id())
        .where(CurrentDeployment.org_id == org_id)
    )


def serving_as_of(session: Session, org_id: str, pointer: int) -> Deployment | None:
    """What serves while the org's pointer is at deployment `pointer`, by the same rule: for a view that read the
    pointer already, and must not mix it with one a deploy or undeploy committed since."""
    return session.scalar(
        select(Deployment)
        .where(Deployment.org_id == org_id, Deployment.id <= pointer, Deployment.status != DEPLOYMENT_FAILED)
        .order_by(Deployment.id.desc())
        .limit(1)
    )
