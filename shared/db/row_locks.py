"""Taking one row's write lock before anything is read, the same way on PostgreSQL and SQLite."""

from __future__ import annotations

from typing import Any

from sqlalchemy import false, update
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


def hold_sqlite_write_lock(session: Session, column: InstrumentedAttribute[Any]) -> None:
    """On SQLite, take the database's write lock now, held until the commit, by a write to `column`'s table that
    changes nothing (as lock_row does); elsewhere nothing. For a reader that marks the rows it reads, which SQLite
    would otherwise let a second reader read alike: it ignores FOR UPDATE and SKIP LOCKED."""
    if session.connection().dialect.name == "sqlite":
        session.execute(update(column.class_).where(false()).values({column.key: column}))
