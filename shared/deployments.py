"""What an org serves, by the rule the api and every predictor share: its pointer's deployment or, while that one
is refused, its last good one (the newest before it that is not failed). An undeploy is never refused, so once the
pointer has passed one, nothing from before it ever serves again."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, ScalarSelect, func, select
from sqlalchemy.orm import Session, aliased

from shared.db.models import DEPLOYMENT_FAILED, CurrentDeployment, Deployment


def _may_serve(candidate: type[Deployment], org_id: Any, pointer: Any) -> tuple[ColumnElement[bool], ...]:
    """The rule: the org's deployments up to its pointer that were not refused; the newest of them serves."""
    return candidate.org_id == org_id, candidate.id <= pointer, candidate.status != DEPLOYMENT_FAILED


def serving_deployment_id() -> ScalarSelect[int]:
    """For each org's pointer (correlated to CurrentDeployment): the id of the deployment that serves it."""
    candidate = aliased(Deployment)
    return (
        select(func.max(candidate.id))
        .where(*_may_serve(candidate, CurrentDeployment.org_id, CurrentDeployment.deployment_id))
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
        select(Deployment).where(*_may_serve(Deployment, org_id, pointer)).order_by(Deployment.id.desc()).limit(1)
    )
