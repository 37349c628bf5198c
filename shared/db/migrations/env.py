"""Alembic environment: the URL comes from the caller (shared.db.migrate), never from a file.

Each run is one transaction, on SQLite too: a migration that fails half-way leaves the database as it was, rather
than with part of its tables made and alembic_version not saying so (which made every later run fail).
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, Engine, event

from shared.db.models import Base
from shared.db.session import make_engine


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # Alembic takes SQLite's DDL as not transactional, and commits after each migration: not with the hooks
        # below, which make it so.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("shared.db.migrate sets sqlalchemy.url before running migrations")
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        make_ddl_transactional(engine)
    with engine.connect() as connection:
        run_with(connection)
    engine.dispose()


def make_ddl_transactional(engine: Engine) -> None:
    """SQLAlchemy's recipe for pysqlite (its docs: "Serializable isolation / Savepoints / Transactional DDL"):
    the driver begins a transaction only before INSERT, UPDATE or DELETE, so CREATE and ALTER run outside any and
    stay applied when a later statement fails. Here the driver begins none, and each transaction is begun with an
    explicit BEGIN, which DDL runs inside as well."""

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")


run_online()
