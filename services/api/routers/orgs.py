"""Organizations and their keys."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy.exc import IntegrityError

from services.api.deps import OrgAdmin, OrgOperator, OrgViewer, PlatformAdmin, ResourcesDep, SessionDep
from services.api.outbox_relay import commit_and_send
from services.api.schemas import KeyCreate, KeyCreated, OrgCreate, OrgOut, OrgUpdate
from shared.db.models import ApiKey, Organization
from shared.errors import Conflict
from shared.keys import hash_key, new_key, new_key_id
from shared.outbox import KIND_ORG_CREATED, add_message

router = APIRouter(prefix="/v1/orgs", tags=["organizations"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=OrgOut)
def create_org(body: OrgCreate, _admin: PlatformAdmin, session: SessionDep, resources: ResourcesDep) -> Organization:
    if session.get(Organization, body.id) is not None:
        raise Conflict(f"organization {body.id!r} already exists", field="id")
    org = Organization(id=body.id, name=body.name, config=body.config.model_dump(by_alias=True, exclude_none=True))
    try:
        session.add(org)
        message = add_message(session, kind=KIND_ORG_CREATED, payload={"org_id": org.id})
        commit_and_send(session, resources, message)
    except IntegrityError:
        raise Conflict(f"organization {body.id!r} already exists", field="id") from None
    return org


@router.get("/{org}", response_model=OrgOut)
def get_org(access: OrgViewer, session: SessionDep) -> Organization:
    return session.get_one(Organization, access.org_id)


@router.patch("/{org}", response_model=OrgOut)
def update_org(org: OrgOperator, body: OrgUpdate, session: SessionDep) -> Organization:
    """Rename an org or replace its config (gates, training script and limits): operators only."""
    row = session.get_one(Organization, org)
    if body.name is not None:
        row.name = body.name
    if body.config is not None:
        row.config = body.config.model_dump(by_alias=True, exclude_none=True)
    session.flush()
    return row


@router.post("/{org}/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create_key(body: KeyCreate, access: OrgAdmin, session: SessionDep) -> KeyCreated:
    key = new_key()
    row = ApiKey(id=new_key_id(), org_id=access.org_id, role=body.role, key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return KeyCreated(key_id=row.id, role=row.role, key=key, created_at=row.created_at)
