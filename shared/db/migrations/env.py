"""Alembic environment: the URL comes from the caller (shared.db.migrate), never from a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from shared.db.models import Base
from shared.db.session import make_engine


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("shared.db.migrate sets sqlalchemy.url before running migrations")
    engine = make_engine(url)
    with engine.connect() as connection:
        run_with(connection)
    engine.dispose()


run_online()
