"""An org's envelope keys as the api and the CLI see them: their states, and destroying a drained one. Making,
wrapping and rotating keys is the sync service's (services/sync/envelope.py, rotation.py)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.audit import record_change
from shared.db.models import SyncKey
from shared.db.row_locks import lock_row
from shared.db.types import utcnow
from shared.errors import Conflict, NotFound

# active: seals new values. retired: a rotation is re-encrypting what it sealed. drained: it seals nothing any
# more and may be destroyed. destroyed: its material is gone; nothing can decrypt under it again.
ACTIVE, RETIRED, DRAINED, DESTROYED = "active", "retired", "drained", "destroyed"


def org_keys(session: Session, org_id: str) -> Sequence[SyncKey]:
    """Every key the org has had, newest first."""
    return session.scalars(
        select(SyncKey).where(SyncKey.org_id == org_id).order_by(SyncKey.created_at.desc(), SyncKey.id)
    ).all()


def destroy_key(session: Session, org_id: str, key_id: str, *, actor: str) -> None:
    """Remove a drained key's material for good; any other state is refused (409), a destroyed key as not found."""
    # Destructions take turns, and with a rotation's (which locks the org's keys): two at once each read the key
    # drained, and both were audited.
    lock_row(session, SyncKey.id, key_id, unchanged=SyncKey.status)
    row = session.get(SyncKey, key_id, populate_existing=True)
    if row is None or row.org_id != org_id:
        raise NotFound(f"key {key_id!r} not found", field="keyId")
    if row.status == DESTROYED:  # still 404, as before: the key, as something to destroy, is gone
        raise NotFound(f"key {key_id!r} was destroyed already; nothing is left of it to destroy", field="keyId")
    if row.status != DRAINED:
        raise Conflict(
            f"key {key_id!r} is {row.status}: only a key drained by a rotation can be destroyed", field="keyId"
        )
    row.status, row.wrapped, row.destroyed_at = DESTROYED, None, utcnow()
    record_change(session, org_id=org_id, actor=actor, action="sync.key.destroyed", target=key_id)
