"""An org's lock: what the api's deploys, erasures and sync-source changes and the trainer's run claims take, so
that each of them sees what the others did. Here in shared/ because both services take it, and must take it the
same way for the turns to hold."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.db.models import Organization


def lock_org(session: Session, org_id: str) -> None:
    """Serialise the org's deploys, erasures, run claims and sync-source changes until the commit.

    A no-op UPDATE of the org's row, not SELECT ... FOR UPDATE: SQLite ignores FOR UPDATE, and pysqlite sends BEGIN
    only before the first write, so a write is what takes SQLite's database write lock (and PostgreSQL's row lock)
    before anything after it is read, holding it until the commit. On PostgreSQL the UPDATE's row lock (FOR NO KEY
    UPDATE) conflicts with itself and with a run renewal's FOR SHARE, as FOR UPDATE would, but not with the key
    share that an insert naming the org (a run, an audit row) takes: submissions never wait for a claim.
    """
    session.execute(
        update(Organization)
        .where(Organization.id == org_id)
        .values(name=Organization.name)
        .execution_options(synchronize_session=False)
    )
