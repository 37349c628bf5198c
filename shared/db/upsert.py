"""Inserting a row, or updating the one of its key, in one statement, the same way on PostgreSQL and SQLite."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session


def upsert(session: Session, model: type[DeclarativeBase], values: dict[str, Any], *, key: list[str]) -> None:
    """INSERT ... ON CONFLICT (key) DO UPDATE: unlike a read and then a write (session.merge), no row deleted by
    another transaction between the two leaves the write matching nothing."""
    insert = sqlite.insert if session.connection().dialect.name == "sqlite" else postgresql.insert
    statement = insert(model).values(values)
    updated = {name: statement.excluded[name] for name in values if name not in key}
    session.execute(statement.on_conflict_do_update(index_elements=key, set_=updated))
