"""Organizations and their keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.api.deps import OrgAdmin, OrgOperator, OrgViewer, PlatformAdmin, ResourcesDep, SessionDep
from services.api.outbox_relay import commit_and_send
from services.api.registry import deploy_event
from services.api.schemas import KeyCreate, KeyCreated, KeyOut, OrgCreate, OrgOut, OrgUpdate
from shared.audit import record_change
from shared.db.models import ApiKey, CurrentDeployment, Organization
from shared.db.row_locks import lock_row
from shared.db.types import utcnow
from shared.errors import Conflict, NotFound
from shared.keys import PLATFORM_ADMIN, hash_key, new_key, new_key_id
from shared.org_lock import lock_org
from shared.outbox import KIND_ORGS_CHANGED, add_message
from shared.schemas import OrgConfigInput, printable

router = APIRouter(prefix="/v1/orgs", tags=["organizations"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=OrgOut)
def create_org(body: OrgCreate, admin: PlatformAdmin, session: SessionDep, resources: ResourcesDep) -> OrgOut:
    if session.get(Organization, body.id) is not None:
        raise Conflict(f"organization {body.id!r} already exists", field="id")
    org = Organization(id=body.id, name=body.name, config=body.config.model_dump(by_alias=True, exclude_none=True))
    try:
        session.add(org)
        session.flush()
        record_change(
            session,
            org_id=org.id,
            actor=admin.key_id,
            action="org.created",
            target=org.id,
            detail={"name": org.name, "config": org.config},
        )
        message = add_message(session, kind=KIND_ORGS_CHANGED, payload={"org_id": org.id})
        answer = _answer(org)
        commit_and_send(session, resources, message)
    except IntegrityError:
        raise Conflict(f"organization {body.id!r} already exists", field="id") from None
    return answer


@router.get("/{org}", response_model=OrgOut)
def get_org(access: OrgViewer, session: SessionDep) -> OrgOut:
    org = session.get_one(Organization, access.org_id)
    # A config stored before lone surrogates were refused (SQLite took them) is shown with their escapes, not as a
    # 500: a PATCH replacing the value mends it (what reads the config refuses it until then, as it refuses a NUL).
    return OrgOut(id=org.id, name=printable(org.name), config=printable(org.config), created_at=org.created_at)


@router.patch("/{org}", response_model=OrgOut)
def update_org(org: OrgOperator, body: OrgUpdate, session: SessionDep, resources: ResourcesDep) -> OrgOut:
    """Rename an org or change its config (residency, limits, gates, training script, records): operators only."""
    lock_org(session, org)  # two patches at once each merge into what the other committed: neither change is lost
    row = session.get_one(Organization, org, populate_existing=True)
    if body.name is not None:
        row.name = body.name
    if "config" in body.model_fields_set:
        row.config = _patched_config(row.config, body.config)
    record_change(
        session,
        org_id=org,
        actor=PLATFORM_ADMIN.key_id,
        action="org.updated",
        target=org,
        detail=body.model_dump(by_alias=True, exclude_unset=True),
    )
    # Residency decides which workers consume the org's queue: they look again now.
    messages = [add_message(session, kind=KIND_ORGS_CHANGED, payload={"org_id": org})]
    if (current := session.get(CurrentDeployment, org)) is not None:
        # Prediction records and risk bands are applied by the predictors: they re-read them now, not at the next
        # reconcile, so the next request follows the new config.
        messages.append(deploy_event(session, current))
    answer = _answer(row)
    commit_and_send(session, resources, *messages)
    return answer


@router.post("/{org}/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def create_key(body: KeyCreate, access: OrgAdmin, session: SessionDep) -> KeyCreated:
    key = new_key()
    row = ApiKey(id=new_key_id(), org_id=access.org_id, role=body.role, key_hash=hash_key(key))
    session.add(row)
    session.flush()
    record_change(
        session,
        org_id=access.org_id,
        actor=access.principal.key_id,
        action="key.created",
        target=row.id,
        detail={"role": row.role},
    )
    return KeyCreated(key_id=row.id, role=row.role, key=key, created_at=row.created_at)


@router.get("/{org}/keys", response_model=list[KeyOut])
def list_keys(access: OrgAdmin, session: SessionDep) -> list[KeyOut]:
    """The org's keys, newest first, revoked ones included: ids, roles and dates, never a key or its digest."""
    query = select(ApiKey).where(ApiKey.org_id == access.org_id).order_by(ApiKey.created_at.desc(), ApiKey.id)
    return [
        KeyOut(key_id=row.id, role=row.role, created_at=row.created_at, revoked_at=row.revoked_at)
        for row in session.scalars(query)
    ]


@router.delete("/{org}/keys/{api_key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_key(api_key_id: str, access: OrgAdmin, session: SessionDep) -> Response:
    """Refuse the key from now on (the api at once; a predictor once its lookup expires,
    KILN_PREDICTOR_KEY_CACHE_S). Revoking a revoked key changes nothing."""
    # Revocations of the key take turns: two at once each read it unrevoked, and both were audited.
    lock_row(session, ApiKey.id, api_key_id, unchanged=ApiKey.role)
    row = session.get(ApiKey, api_key_id, populate_existing=True)
    if row is None or row.org_id != access.org_id:
        raise NotFound(f"key {api_key_id!r} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record_change(
            session,
            org_id=access.org_id,
            actor=access.principal.key_id,
            action="key.revoked",
            target=row.id,
            detail={"role": row.role},
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _answer(row: Organization) -> OrgOut:
    """The answer to a create or update, serialised once before the commit: these handlers commit themselves (the
    outbox message goes after it), so an org FastAPI then failed to answer was stored all the same, as a 500."""
    answer = OrgOut.model_validate(row, from_attributes=True)
    answer.model_dump_json()
    return answer


def _patched_config(current: dict[str, Any], patch: dict[str, Any] | None) -> dict[str, Any]:
    """The stored config with the patch merged in, checked as a whole; `"config": null` puts every default back."""
    merged = {} if patch is None else merge_patch(current, patch)
    try:
        config = OrgConfigInput.model_validate(merged)
    except ValidationError as error:
        raise RequestValidationError([_as_patched(problem, patch) for problem in error.errors()]) from None
    return config.model_dump(by_alias=True, exclude_none=True)


def _as_patched(problem: Any, patch: dict[str, Any] | None) -> Any:
    """A problem of the merged config, placed in the body; one with a value the patch did not send is the stored
    one (set before a bound it now breaks existed, by an older Kiln): the message says how to put it right."""
    located = {**problem, "loc": ("body", "config", *problem["loc"])}
    if _sends(patch, problem["loc"]):
        return located
    return {**located, "msg": f"{problem['msg']} (the stored value: send one within bounds, or null for the default)"}


def _sends(patch: Any, loc: tuple[Any, ...]) -> bool:
    """Whether the patch sent the value at `loc`: what is below a value it sent that is no object (a list, whose
    items pydantic locates by index) is its own too."""
    for name in loc:
        if not isinstance(patch, dict):
            return patch is not None
        if name not in patch:
            return False
        patch = patch[name]
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: an object merges member by member, a null member is removed, any other value replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = merge_patch(merged.get(name), value)
    return merged
