"""Engines and sessions: one engine per process, one session per unit of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from shared.db.answers import bounded_connections

if TYPE_CHECKING:  # settings import this module's default
    from shared.settings import Settings

SessionFactory = sessionmaker[Session]

# A database that accepts connections but never answers held a request (and its thread) until it gave up, and
# held every other request behind it waiting for the pool: these bound both waits, after which the services answer
# 503 with Retry-After and workers retry as for any database error.
CONNECT_TIMEOUT_S = 5
POOL_TIMEOUT_S = 5
# How long a connection waits on a server that stops answering (KILN_DATABASE_TIMEOUT_S), for callers without
# settings (migrations).
DATABASE_TIMEOUT_S = 15.0
# With bounded answers, the server cancels a statement at the bound (statement_timeout) and the client gives up on
# the connection this much later: a server that runs answers with the cancel first, and the connection stays usable.
ANSWER_GRACE_S = 2.0
# The database, not the work, at fault: it did not answer, dropped the connection, or had none free. Trying again once
# it is back may work; any other error would be the same on every try.
DATABASE_TROUBLE = (OperationalError, InterfaceError, PoolTimeout)


def with_shipped_driver(url: str | URL) -> URL:
    """`postgresql://` names no driver, and SQLAlchemy 2.1 then picks psycopg 3, which Kiln does not ship: such a
    URL gets psycopg2, the driver Kiln does ship, wherever a user gives one."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg2") if parsed.drivername == "postgresql" else parsed


class Answers(Enum):
    """How long a PostgreSQL connection waits for its server's answer, beyond the dead-peer bounds all have."""

    # Until the peer stops acknowledging: Kiln's own database for workers whose statements may rightly run long
    # (sync batches, key rotations, migrations).
    UNBOUNDED = "unbounded"
    # For statements all short (the api, the predictor, the trainer, a training run's extraction): the server
    # cancels a statement at the bound, and the client gives up on a server that does not answer at all
    # ANSWER_GRACE_S later.
    BOUNDED = "bounded"
    # For an org's sync store, whose statements may rightly run long: no statement is cancelled, and a wait past the
    # bound is cut only once the server does not answer a new connection either (shared/db/answers.py).
    WHILE_SERVER_ANSWERS = "while server answers"


def make_engine(
    url: str | URL, *, timeout_s: float = DATABASE_TIMEOUT_S, answers: Answers = Answers.UNBOUNDED, **kwargs: Any
) -> Engine:
    """An engine with the settings each backend needs to share one database between processes.

    On PostgreSQL, a connection whose peer stops acknowledging packets ends within about `timeout_s`, and each wait
    for an answer is bounded as `answers` says."""
    url = with_shipped_driver(url)
    # A failed statement's error would quote its parameters, an org's records among them, into logs and job errors.
    kwargs.setdefault("hide_parameters", True)
    if url.get_backend_name() == "sqlite":
        # The api, workers and predictor all open the same file: WAL lets readers run beside one writer,
        # and the busy timeout makes a second writer wait instead of failing.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    if "poolclass" not in kwargs:  # NullPool has no checkout to wait for, and refuses the argument
        kwargs.setdefault("pool_timeout", POOL_TIMEOUT_S)
    connect_args = libpq_bounds(url, timeout_s)
    if answers is Answers.BOUNDED:
        connect_args |= _answer_bounds(url, timeout_s)
    elif answers is Answers.WHILE_SERVER_ANSWERS:
        connect_args["connection_factory"] = bounded_connections(timeout_s, spare_live_servers=True)
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def make_org_engine(url: URL, *, timeout_s: float) -> Engine:
    """An org's database (a training source, a store checked before a backup or restore), opened for a few short
    statements, one connection at a time. A SQLite file as it is: make_engine's settings would change its journal
    mode, a backup's snapshot among them. A PostgreSQL server with every wait on it bounded by `timeout_s`
    (Answers.BOUNDED): one that stops answering fails the work instead of holding its worker for ever."""
    if url.get_backend_name() == "sqlite":
        return create_engine(url, poolclass=NullPool, hide_parameters=True)
    return make_engine(url, timeout_s=timeout_s, answers=Answers.BOUNDED, poolclass=NullPool)


def make_central_engine(settings: Settings, *, bound_answers: bool, **kwargs: Any) -> Engine:
    """Kiln's own database, with the waits on it bounded by KILN_DATABASE_TIMEOUT_S (see make_engine)."""
    answers = Answers.BOUNDED if bound_answers else Answers.UNBOUNDED
    return make_engine(settings.resolved_database_url, timeout_s=settings.database_timeout_s, answers=answers, **kwargs)


def libpq_bounds(url: URL, timeout_s: float) -> dict[str, Any]:
    """libpq's bounds, each unless the URL sets its own (an org's store across a slow link may). connect_timeout
    bounds connecting. A peer that stops acknowledging (its host gone, a partition) ends the connection within about
    `timeout_s`: keepalives probe an idle one (idle + count * interval), and tcp_user_timeout (libpq >= 12) ends one
    whose sent data stays unacknowledged, mid-query too. Neither notices a server whose machine still acknowledges
    but never answers: shared/db/answers.py."""
    probe_s = max(1, round(timeout_s / 3))
    bounds = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": probe_s,
        "keepalives_interval": probe_s,
        "keepalives_count": 2,
        "tcp_user_timeout": round(timeout_s * 1000),
    }
    return {name: value for name, value in bounds.items() if name not in url.query}


def _answer_bounds(url: URL, timeout_s: float) -> dict[str, Any]:
    """The server's statement_timeout at `timeout_s` (added to the URL's own server options), and connections whose
    every wait for an answer the client cuts off ANSWER_GRACE_S later."""
    statement_timeout = f"-c statement_timeout={round(timeout_s * 1000)}"
    own = url.query.get("options")
    return {
        "options": f"{own} {statement_timeout}" if isinstance(own, str) else statement_timeout,
        "connection_factory": bounded_connections(timeout_s + ANSWER_GRACE_S),
    }


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def out_of_reach(error: BaseException) -> bool:
    """Whether a database error is worth another try: the database out of reach, busy, or with no connection free.
    SQLite reports a statement it cannot run (SQLITE_ERROR: a syntax error, a missing table or column) as an
    OperationalError too, and Python's sqlite3 text that is not UTF-8; those fail the same way on every try."""
    if not isinstance(error, DATABASE_TROUBLE):
        return False
    said = error.orig if isinstance(error, DBAPIError) else None
    return getattr(said, "sqlite_errorname", None) != "SQLITE_ERROR" and not undecodable(error)


def undecodable(error: SQLAlchemyError) -> bool:
    """Python's sqlite3 reading text that is not UTF-8, which SQLite holds as it was given: the same on every try."""
    return isinstance(error, DBAPIError) and str(error.orig).startswith("Could not decode to UTF-8")


def driver_message(error: SQLAlchemyError) -> str:
    """What the database or its driver said, in one line: SQLAlchemy's own text adds the statement, its
    parameters (which may hold records) and a link."""
    said = error.orig if isinstance(error, DBAPIError) else error
    return " ".join(line.strip() for line in str(said).splitlines() if line.strip())


def check_answers(engine: Engine) -> None:
    """Return when the database answers a statement; raise the driver's error, within the engine's bounds, if not."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


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
