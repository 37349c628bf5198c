"""An org's lock: what the api's deploys, erasures and sync-source changes and the trainer's run claims take, so
that each of them sees what the others did. Here in shared/ because both services take it, and must take it the
same way for the turns to hold."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.db.models import Organization
from shared.db.row_locks import lock_row


def lock_org(session: Session, org_id: str) -> None:
    """Serialise the org's deploys, erasures, run claims and sync-source changes until the commit.

    The org row's write lock (shared/db/row_locks.py). On PostgreSQL that lock (FOR NO KEY UPDATE) conflicts with
    itself and with a run renewal's FOR SHARE, as FOR UPDATE would, but not with the key share that an insert naming
    the org (a run, an audit row) takes: submissions never wait for a claim.
    """
    lock_row(session, Organization.id, org_id, unchanged=Organization.name)
