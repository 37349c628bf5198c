"""Taking one row's write lock before anything is read, the same way on PostgreSQL and SQLite."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import InstrumentedAttribute, Session


def lock_row(
    session: Session, key: InstrumentedAttribute[Any], value: object, *, unchanged: InstrumentedAttribute[Any]
) -> None:
    """Hold the write lock of the row whose `key` is `value` until the commit (nothing when there is none).

    A no-op UPDATE (`unchanged` set to itself), not SELECT ... FOR UPDATE: SQLite ignores FOR UPDATE, and pysqlite
    sends BEGIN only before the first write, so a write is what takes SQLite's database write lock (and PostgreSQL's
    row lock, FOR NO KEY UPDATE) before anything after it is read. Read the row after it with populate_existing, so
    that a copy the session already held is not taken for what the lock now guards."""
    session.execute(
        update(key.class_)
        .where(key == value)
        .values({unchanged.key: unchanged})
        .execution_options(synchronize_session=False)
    )
