"""Fetching an org's own rows: a row of another org is as absent as a missing one."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.db.models import Dataset, ModelVersion, Organization, TrainingRun
from shared.errors import NotFound

Owned = TypeVar("Owned", Dataset, TrainingRun, ModelVersion)

NOUNS = {Dataset: "dataset", TrainingRun: "training run", ModelVersion: "model version"}


def get_owned(session: Session, model: type[Owned], key: str, *, org_id: str, field: str | None = None) -> Owned:
    row = session.get(model, key)
    if row is None or row.org_id != org_id:
        raise NotFound(f"{NOUNS[model]} {key!r} not found", field=field)
    return row


def lock_org(session: Session, org_id: str) -> None:
    """Serialise the org's deploys, erasures and run claims until the commit, so each sees what the others did.

    SELECT ... FOR UPDATE would do on PostgreSQL, but SQLite ignores it, and pysqlite sends BEGIN only before the
    first write: a write to the org row takes SQLite's database write lock (and PostgreSQL's row lock, which a
    worker's claim of a run takes too) before anything is read, and holds it until the commit.
    """
    session.execute(
        update(Organization)
        .where(Organization.id == org_id)
        .values(name=Organization.name)
        .execution_options(synchronize_session=False)
    )
