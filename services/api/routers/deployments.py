"""Deploy, roll back, and read the current deployment."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy.orm import Session

from services.api import registry
from services.api.deps import OrgAdmin, OrgViewer, ResourcesDep, SessionDep
from services.api.outbox_relay import commit_and_send
from services.api.schemas import DeploymentOut, DeployRequest, RollbackRequest
from shared.db.models import CurrentDeployment

router = APIRouter(prefix="/v1/orgs/{org}", tags=["deployments"])


@router.post("/deployments", status_code=status.HTTP_201_CREATED, response_model=DeploymentOut)
def deploy(body: DeployRequest, access: OrgAdmin, session: SessionDep, resources: ResourcesDep) -> DeploymentOut:
    version = registry.deployable_version(session, org_id=access.org_id, version=body.version)
    current, message = registry.record_deployment(
        session, org_id=access.org_id, version=version.version, action="deploy", actor=access.principal.key_id
    )
    if message is not None:
        commit_and_send(session, resources, message)
    return _deployment_out(session, current)


@router.post("/rollback", response_model=DeploymentOut)
def rollback(body: RollbackRequest, access: OrgAdmin, session: SessionDep, resources: ResourcesDep) -> DeploymentOut:
    target = registry.rollback_target(session, org_id=access.org_id, requested=body.version)
    current, message = registry.record_deployment(
        session, org_id=access.org_id, version=target, action="rollback", actor=access.principal.key_id
    )
    if message is not None:
        commit_and_send(session, resources, message)
    return _deployment_out(session, current)


@router.get("/deployment", response_model=DeploymentOut)
def current_deployment(access: OrgViewer, session: SessionDep) -> DeploymentOut:
    return _deployment_out(session, registry.current_deployment(session, org_id=access.org_id))


def _deployment_out(session: Session, current: CurrentDeployment) -> DeploymentOut:
    earlier = registry.earlier_deployable(session, org_id=current.org_id, version=current.version)
    return DeploymentOut(
        version=current.version, deployed_at=current.deployed_at, rollback_available=earlier is not None
    )
