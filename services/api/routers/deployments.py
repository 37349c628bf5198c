"""Deploy, roll back, undeploy, and read the current deployment."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.api import registry
from services.api.deps import OrgAdmin, OrgViewer, ResourcesDep, SessionDep
from services.api.outbox_relay import commit_and_send
from services.api.resources import Resources
from services.api.schemas import MAX_ROW_ID, DeploymentOut, DeploymentRecord, DeployRequest, RollbackRequest
from shared.audit import record_change
from shared.db.models import CurrentDeployment, Deployment, ModelVersion, OutboxMessage
from shared.deployments import serving_as_of

router = APIRouter(prefix="/v1/orgs/{org}", tags=["deployments"])


@router.post("/deployments", status_code=status.HTTP_201_CREATED, response_model=DeploymentOut)
def deploy(body: DeployRequest, access: OrgAdmin, session: SessionDep, resources: ResourcesDep) -> DeploymentOut:
    version = registry.deployable_version(session, org_id=access.org_id, version=body.version)
    current, message = registry.record_deployment(
        session, org_id=access.org_id, version=version.version, action="deploy", actor=access.principal.key_id
    )
    if message is not None:  # the version already deployed: nothing changed, so nothing to audit
        record_change(
            session,
            org_id=access.org_id,
            actor=access.principal.key_id,
            action="model.deployed",
            target=version.version,
            detail=_from_to(session, current),
        )
    return _answer_and_commit(session, resources, current, message)


@router.post("/rollback", response_model=DeploymentOut)
def rollback(body: RollbackRequest, access: OrgAdmin, session: SessionDep, resources: ResourcesDep) -> DeploymentOut:
    target = registry.rollback_target(session, org_id=access.org_id, requested=body.version)
    current, message = registry.record_deployment(
        session, org_id=access.org_id, version=target, action="rollback", actor=access.principal.key_id
    )
    if message is not None:  # a concurrent request got there first: nothing changed, so nothing to audit
        record_change(
            session,
            org_id=access.org_id,
            actor=access.principal.key_id,
            action="model.rolled_back",
            target=target,
            detail=_from_to(session, current),
        )
    return _answer_and_commit(session, resources, current, message)


@router.delete("/deployment", status_code=status.HTTP_204_NO_CONTENT)
def undeploy(access: OrgAdmin, session: SessionDep, resources: ResourcesDep) -> Response:
    """Stop serving the org at once: every predictor drops its model (on the event, or at its next reconcile) and
    answers 404 until a version is deployed or rolled back to. Undeploying when nothing serves changes nothing."""
    undeployed = registry.record_undeployment(session, org_id=access.org_id, actor=access.principal.key_id)
    if undeployed is not None:  # when nothing served, nothing changed, so nothing to audit
        version, message = undeployed
        record_change(
            session,
            org_id=access.org_id,
            actor=access.principal.key_id,
            action="model.undeployed",
            target=version,
            detail={"from": version, "to": None},
        )
        commit_and_send(session, resources, message)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/deployment", response_model=DeploymentOut)
def current_deployment(access: OrgViewer, session: SessionDep) -> DeploymentOut:
    return _deployment_out(session, registry.current_deployment(session, org_id=access.org_id))


@router.get("/deployments", response_model=list[DeploymentRecord])
def deployment_history(
    access: OrgViewer,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ROW_ID, description="only deployments older than this id, to page back")
    ] = None,
) -> list[DeploymentRecord]:
    """Every deploy, rollback and undeploy, newest first: who, when, from which version to which (none for an
    undeploy), and how it went; paged back by deploymentId, as the audit trail and prediction records are."""
    query = select(Deployment).where(Deployment.org_id == access.org_id)
    if before is not None:
        query = query.where(Deployment.id < before)
    rows = session.scalars(query.order_by(Deployment.id.desc()).limit(limit))
    return [
        DeploymentRecord(
            deployment_id=row.id,
            action=row.action,
            version=row.version,
            previous_version=row.previous_version,
            actor=row.actor,
            status=row.status,
            error=row.error,
            created_at=row.created_at,
        )
        for row in rows
    ]


def _answer_and_commit(
    session: Session, resources: Resources, current: CurrentDeployment, message: OutboxMessage | None
) -> DeploymentOut:
    """The deployment as this request left it, read while the org's lock still holds: read after the commit, its
    servingVersion and rollbackAvailable could already be another deploy's, beside this one's version and status."""
    answer = _deployment_out(session, current)
    if message is not None:  # nothing changed otherwise: the session's own commit ends the request
        commit_and_send(session, resources, message)
    return answer


def _deployment_out(session: Session, current: CurrentDeployment) -> DeploymentOut:
    history = session.get_one(Deployment, current.deployment_id)
    # Judging a version again never undeploys it (that is the admin's call), so the view carries the verdict.
    version = session.get(ModelVersion, current.version) if current.version is not None else None
    return DeploymentOut(
        version=current.version,
        deployed_at=current.deployed_at,
        rollback_available=registry.rollback_default(session, current) is not None,
        deployment_id=history.id,
        status=history.status,
        error=history.error,
        version_status=version.status if version is not None else None,
        failed_gates=registry.failed_gates(version) if version is not None else [],
        serving_version=serving.version if (serving := serving_as_of(session, current.org_id, history.id)) else None,
    )


def _from_to(session: Session, current: CurrentDeployment) -> dict[str, str | None]:
    """The audit detail of a deploy or rollback: the version deployed before it (null for the org's first), and now."""
    history = session.get_one(Deployment, current.deployment_id)
    return {"from": history.previous_version, "to": history.version}
