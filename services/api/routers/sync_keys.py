"""An org's envelope keys for sensitive columns: their states, a rotation (queued on `sync.<org>`, run by a sync
worker: it re-encrypts every sealed value), and destroying a key a rotation drained. Key material never leaves."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from services.api.deps import OrgAdmin, OrgViewer, ResourcesDep, SessionDep
from services.api.outbox_relay import commit_and_send
from services.api.sync_schemas import RotationOut, SyncKeyOut
from shared.audit import record_change
from shared.outbox import KIND_ROTATE_TASK, add_message
from shared.queues import sync_queue
from shared.sync_keys import destroy_key, org_keys

router = APIRouter(prefix="/v1/orgs/{org}/sync-keys", tags=["sync"])


@router.get("", response_model=list[SyncKeyOut])
def list_keys(access: OrgViewer, session: SessionDep) -> list[SyncKeyOut]:
    """Newest first; an org has none until its first sync seals a value."""
    return [
        SyncKeyOut(
            key_id=row.id,
            status=row.status,
            created_at=row.created_at,
            retired_at=row.retired_at,
            destroyed_at=row.destroyed_at,
        )
        for row in org_keys(session, access.org_id)
    ]


@router.post("/rotate", status_code=status.HTTP_202_ACCEPTED, response_model=RotationOut)
def rotate(access: OrgAdmin, session: SessionDep, resources: ResourcesDep) -> RotationOut:
    """A new active key; every value sealed under the old ones is re-encrypted, then they read `drained`."""
    actor = access.principal.key_id
    record_change(session, org_id=access.org_id, actor=actor, action="sync.key.rotation.queued", target=access.org_id)
    message = add_message(session, kind=KIND_ROTATE_TASK, payload={"org_id": access.org_id, "actor": actor})
    commit_and_send(session, resources, message)
    return RotationOut(status="queued", queue=sync_queue(access.org_id))


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def destroy(key_id: str, access: OrgAdmin, session: SessionDep) -> Response:
    """Only a drained key: after this nothing can decrypt under it."""
    destroy_key(session, access.org_id, key_id, actor=access.principal.key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
