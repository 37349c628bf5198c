"""Engines and sessions: one engine per process, one session per unit of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

SessionFactory = sessionmaker[Session]

# A database that accepts connections but never answers held a request (and its thread) until it gave up, and
# held every other request behind it waiting for the pool: these bound both waits, after which the services answer
# 503 with Retry-After and workers retry as for any database error.
CONNECT_TIMEOUT_S = 5
POOL_TIMEOUT_S = 5


def with_shipped_driver(url: str | URL) -> URL:
    """`postgresql://` names no driver, and SQLAlchemy 2.1 then picks psycopg 3, which Kiln does not ship: such a
    URL gets psycopg2, the driver Kiln does ship, wherever a user gives one."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg2") if parsed.drivername == "postgresql" else parsed


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine with the settings each backend needs to share one database between processes."""
    url = with_shipped_driver(url)
    if url.get_backend_name() == "sqlite":
        # The api, workers and predictor all open the same file: WAL lets readers run beside one writer,
        # and the busy timeout makes a second writer wait instead of failing.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    if "poolclass" not in kwargs:  # NullPool has no checkout to wait for, and refuses the argument
        kwargs.setdefault("pool_timeout", POOL_TIMEOUT_S)
    return create_engine(url, pool_pre_ping=True, connect_args=_connect_args(url), **kwargs)


def _connect_args(url: URL) -> dict[str, Any]:
    """libpq's connect_timeout, unless the URL sets its own (an org's store across a slow link may)."""
    if url.get_backend_name() != "postgresql" or "connect_timeout" in url.query:
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT_S}


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def driver_message(error: SQLAlchemyError) -> str:
    """What the database or its driver said, in one line: SQLAlchemy's own text adds the statement, its
    parameters (which may hold records) and a link."""
    said = error.orig if isinstance(error, DBAPIError) else error
    return " ".join(line.strip() for line in str(said).splitlines() if line.strip())


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: SessionFactory) -> Iterator[Session]:
    """Commit when the block succeeds, roll back when it raises, always close."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
