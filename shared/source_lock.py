"""A sync source's job lock: one job of a source at a time, across workers, and whatever must not run beside one
(its deletion, a retention purge, a change of its URL) waits for it or is refused. Here in shared/ because the api
takes it too, to change a source's URL between its jobs."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from shared.errors import Conflict


class SourceBusy(Conflict):
    """A job of the source holds its lock now."""


# Raises if the lock is no longer held; a holder calls it between steps that must not run beside another job.
ConfirmHeld = Callable[[], None]


@contextmanager
def one_job_per_source(central: Engine, source_id: str, *, wait: bool = True) -> Iterator[ConfirmHeld]:
    """Hold the source's job lock, released should the process die: an advisory lock on a PostgreSQL connection of
    its own, or, for the embedded default's SQLite file, a file lock beside it (the api and any sync worker of the
    embedded stack run on the machine that holds that file). Without `wait`, SourceBusy is raised at once if a job
    of the source holds it. Yields what confirms the lock is still held."""
    if central.dialect.name == "postgresql":
        with _advisory_lock(central, _lock_name(source_id), source_id, wait=wait) as confirm_held:
            yield confirm_held
    else:
        with _file_lock_beside(central.url.database, source_id, wait=wait):
            yield _held_while_open


@contextmanager
def refused_while_a_job_runs(session: Session, source_id: str) -> Iterator[None]:
    """Raise SourceBusy if a job of the source holds its lock, and keep one from starting until the session's
    commit, made inside this block. The lock is taken shared: requests holding it at once (each made its change
    under the org's lock) never refuse each other, a job's exclusive hold refuses them all. On PostgreSQL it is
    taken for the session's transaction, on its connection: a request that waited for a second pooled connection
    while holding its first (and the org's lock on it) could wait for good, with the pool's connections all held by
    requests queued behind that lock."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        with _file_lock_beside(connection.engine.url.database, source_id, wait=False, shared=True):
            yield
        return
    taken = connection.execute(
        text("SELECT pg_try_advisory_xact_lock_shared(hashtext(:k))"), {"k": _lock_name(source_id)}
    )
    if not taken.scalar():
        raise _busy(source_id)
    yield


def _lock_name(source_id: str) -> str:
    """An advisory lock's name; the session's (a job's) and the transaction's (an api request's) share one space."""
    return f"sync-source:{source_id}"


@contextmanager
def _file_lock_beside(database: str | None, source_id: str, *, wait: bool, shared: bool = False) -> Iterator[None]:
    """The source's file lock beside the embedded default's SQLite file; none for a database in memory, which no
    other process reaches."""
    if not database or database == ":memory:":
        yield
        return
    with _file_lock(Path(f"{database}.sync-{source_id}.lock"), source_id, wait=wait, shared=shared):
        yield


def _held_while_open() -> None:
    """A file lock (or none) cannot be lost while this process holds its file open."""


@contextmanager
def _advisory_lock(central: Engine, name: str, source_id: str, *, wait: bool) -> Iterator[ConfirmHeld]:
    with central.connect() as connection:
        function = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
        taken = connection.execute(text(f"SELECT {function}(hashtext(:k))"), {"k": name}).scalar() is not False
        connection.commit()
        if not taken:
            raise _busy(source_id)

        def confirm_held() -> None:
            """The lock lives as long as its connection: one that was closed (the server's idle_session_timeout, a
            proxy, an administrator) raises OperationalError here, and another job may hold the lock by now."""
            connection.execute(text("SELECT 1"))
            connection.commit()

        try:
            yield confirm_held
        finally:
            if not connection.invalidated:  # a connection found closed took the lock with it
                connection.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": name})
                connection.commit()


@contextmanager
def _file_lock(path: Path, source_id: str, *, wait: bool, shared: bool = False) -> Iterator[None]:
    """flock: held by this open file, so it also keeps out another thread of this process."""
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(source_id) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _busy(source_id: str) -> SourceBusy:
    return SourceBusy(
        f"a job of sync source {source_id} is running: try again once it has ended (GET its job), as a job reads "
        "the source's URL when it starts"
    )
