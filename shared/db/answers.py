"""A bound on each wait for a PostgreSQL server's answer, for the engines whose statements are all short.

libpq waits for an answer in poll(), without end. Keepalives and tcp_user_timeout (shared/db/session.py) end that wait
once the peer stops acknowledging packets (its host gone, a partition), but not when its machine still acknowledges
them while postgres never answers: the server stopped or stuck, or a proxy between them that stopped forwarding. The
server's own statement_timeout cannot help a server that does not run. Here a watchdog shuts the connection's socket
down once a wait passes its bound: libpq reads end-of-file, psycopg2 marks the connection closed (SQLAlchemy then
throws it away as a disconnect), and the caller gets NoAnswer, an OperationalError naming the bound.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg2
import psycopg2.extensions

# How often the watchdog looks for a wait past its deadline, and how long it stays up with nothing to watch.
TICK_S = 0.2
IDLE_S = 5.0


class NoAnswer(psycopg2.OperationalError):  # type: ignore[misc]  # psycopg2 ships no type hints
    """The server did not answer within the bound; the connection is closed."""


@dataclass(eq=False)  # each wait is itself, however alike two are
class _Wait:
    fd: int
    socket_id: int
    deadline: float
    cut: bool = False


class Watchdog:
    """Cuts off a connection whose wait for its server's answer passed `bound_s`. One per engine; its thread runs
    only while waits are armed (and IDLE_S after), so that none outlives its engine's use."""

    def __init__(self, bound_s: float) -> None:
        self.bound_s = bound_s
        self._lock = threading.Lock()
        self._waits: set[_Wait] = set()
        self._thread: threading.Thread | None = None

    @contextmanager
    def bounded(self, fd: int) -> Iterator[None]:
        """The block's wait on the connection whose socket is `fd`, cut off past the bound."""
        wait = self._arm(fd)
        try:
            yield
        except psycopg2.OperationalError as error:
            self._disarm(wait)  # first: the watchdog sets `cut` under the lock
            if wait.cut:
                raise NoAnswer(f"the database did not answer within {self.bound_s:g} s") from error
            raise
        finally:
            self._disarm(wait)

    def _arm(self, fd: int) -> _Wait:
        wait = _Wait(fd, os.fstat(fd).st_ino, time.monotonic() + self.bound_s)
        with self._lock:
            self._waits.add(wait)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="database-watchdog", daemon=True)
                self._thread.start()
        return wait

    def _disarm(self, wait: _Wait) -> None:
        with self._lock:
            self._waits.discard(wait)

    def _watch(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(TICK_S)
            with self._lock:  # held while cutting: a disarmed wait's socket, maybe closed since, is never touched
                now = time.monotonic()
                for wait in self._waits:
                    if not wait.cut and wait.deadline <= now:
                        wait.cut = True
                        _shut_down(wait)
                if self._waits:
                    idle_since = now
                elif now - idle_since >= IDLE_S:
                    self._thread = None
                    return


def _shut_down(wait: _Wait) -> None:
    """Shut the wait's socket down for reading and writing: every blocked read on it returns end-of-file. Left alone
    when libpq closed it meanwhile (an error of its own) and its number now names another file."""
    with suppress(OSError):
        if os.fstat(wait.fd).st_ino != wait.socket_id:
            return
        with socket.socket(fileno=os.dup(wait.fd)) as duplicate:  # closing the duplicate leaves libpq's socket open
            duplicate.shutdown(socket.SHUT_RDWR)


class _BoundedConnection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection whose every wait on the server is bounded: statements (through its cursors, which
    fetch their whole result as they execute: no bounded engine asks for server-side cursors), commits and
    rollbacks. Connecting is bounded by libpq's connect_timeout."""

    def __init__(self, dsn: str, async_: int = 0, *, watchdog: Watchdog) -> None:
        super().__init__(dsn, async_)
        self.watchdog = watchdog
        self.cursor_factory = _BoundedCursor

    def bounded(self) -> AbstractContextManager[None]:
        return self.watchdog.bounded(self.fileno())

    def commit(self) -> None:
        with self.bounded():
            super().commit()

    def rollback(self) -> None:
        with self.bounded():
            super().rollback()


class _BoundedCursor(psycopg2.extensions.cursor):  # type: ignore[misc]
    def execute(self, query: Any, vars: Any = None) -> None:  # psycopg2 names them so, and callers may too
        with self.connection.bounded():
            super().execute(query, vars)

    def executemany(self, query: Any, vars_list: Any) -> None:
        with self.connection.bounded():
            super().executemany(query, vars_list)


def bounded_connections(bound_s: float) -> Callable[..., Any]:
    """A psycopg2 `connection_factory` whose connections wait at most `bound_s` for each answer."""
    return partial(_BoundedConnection, watchdog=Watchdog(bound_s))
