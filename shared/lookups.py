"""Fetching an org's own rows: a row of another org is as absent as a missing one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from shared.db.models import Dataset, ModelVersion, TrainingRun
from shared.db.row_locks import hold_sqlite_write_lock
from shared.errors import NotFound

Owned = TypeVar("Owned", Dataset, TrainingRun, ModelVersion)
Listed = TypeVar("Listed", TrainingRun, ModelVersion)

NOUNS = {Dataset: "dataset", TrainingRun: "training run", ModelVersion: "model version"}


def get_owned(
    session: Session, model: type[Owned], key: str, *, org_id: str, field: str | None = None, held: bool = False
) -> Owned:
    """`held`: kept as read until the commit, for a check the caller acts on. A change of the row (an erasure, say)
    committed before is what this reads, and one not yet made waits for this transaction: PostgreSQL's FOR SHARE,
    SQLite's database write lock (it ignores FOR SHARE)."""
    if held:
        hold_sqlite_write_lock(session, model.org_id)
    row = session.get(model, key, with_for_update={"read": True} if held else None, populate_existing=held)
    if row is None or row.org_id != org_id:
        raise NotFound(f"{NOUNS[model]} {key!r} not found", field=field)
    return row


def newest_first(
    session: Session, model: type[Listed], *, org_id: str, limit: int, before: str | None, status: str | None
) -> Sequence[Listed]:
    """One page of the org's rows, newest first, of `status` only when it is given. `before` is the key of the row
    the previous page ended with (404 naming `before` when the org has no such row). Rows created at the same moment
    are ordered by key, so paging back never skips nor repeats one."""
    key = model.__mapper__.primary_key[0]
    query = select(model).where(model.org_id == org_id)
    if status is not None:
        query = query.where(model.status == status)
    if before is not None:
        cursor = get_owned(session, model, before, org_id=org_id, field="before")
        query = query.where(tuple_(model.created_at, key) < tuple_(cursor.created_at, before))
    return session.scalars(query.order_by(model.created_at.desc(), key.desc()).limit(limit)).all()
