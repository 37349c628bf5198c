"""An org's lock: what the api's deploys, erasures and sync-source changes and the trainer's run claims take, so
that each of them sees what the others did. Here in shared/ because both services take it, and must take it the
same way for the turns to hold."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import Organization
from shared.db.row_locks import hold_sqlite_write_lock, lock_row
from shared.schemas import OrgConfig


def lock_org(session: Session, org_id: str) -> None:
    """Serialise the org's deploys, erasures, run claims and sync-source changes until the commit.

    The org row's write lock (shared/db/row_locks.py). On PostgreSQL that lock (FOR NO KEY UPDATE) conflicts with
    itself and with a run renewal's FOR SHARE, as FOR UPDATE would, but not with the key share that an insert naming
    the org (a run, an audit row) takes: submissions never wait for a claim.
    """
    lock_row(session, Organization.id, org_id, unchanged=Organization.name)


def org_config_held(session: Session, org_id: str) -> OrgConfig:
    """The org's config, kept as read until the commit: a change of it (update_org, under lock_org) waits for this
    transaction, and one committed before is what this reads. Take it first in the transaction, before other locks.

    On PostgreSQL the org row's FOR SHARE, which lock_org's FOR NO KEY UPDATE waits for but other readers do not; on
    SQLite the database's write lock, as lock_org takes it (SQLite ignores FOR SHARE)."""
    hold_sqlite_write_lock(session, Organization.name)
    config = session.scalars(
        select(Organization.config).where(Organization.id == org_id).with_for_update(read=True)
    ).one()
    return OrgConfig.model_validate(config)
