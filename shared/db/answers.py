"""A bound on each wait for a PostgreSQL server's answer, for the engines whose statements are all short.

libpq waits for an answer in poll(), without end. Keepalives and tcp_user_timeout (shared/db/session.py) end that wait
once the peer stops acknowledging packets (its host gone, a partition), but not when its machine still acknowledges
them while postgres never answers: the server stopped or stuck, or a proxy between them that stopped forwarding. The
server's own statement_timeout cannot help a server that does not run. Here a watchdog shuts the connection's socket
down once a wait passes its bound: libpq reads end-of-file, psycopg2 marks the connection closed (SQLAlchemy then
throws it away as a disconnect), and the caller gets NoAnswer, an OperationalError naming the bound.

An org's sync store runs statements that may rightly outlast any bound (a table's first capture logs every record,
DDL waits for the org's own locks): its watchdog spares a wait past the bound while the server still answers a new
connection's first message, and cuts it once the server does not (stopped, stuck, or its link frozen).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg2
import psycopg2.extensions

# How often the watchdog looks for a wait past its deadline, and how long it stays up with nothing to watch.
TICK_S = 0.2
IDLE_S = 5.0
# How long a live server takes at most to answer a new connection's SSLRequest: its postmaster answers it at once, one
# byte, before any login or backend.
PROBE_S = 2.0
SSL_REQUEST = struct.pack("!II", 8, 80877103)


class NoAnswer(psycopg2.OperationalError):  # type: ignore[misc]  # psycopg2 ships no type hints
    """The server did not answer within the bound (`bound_s`); the connection is closed."""

    def __init__(self, bound_s: float) -> None:
        super().__init__(f"the database did not answer within {bound_s:g} s")
        self.bound_s = bound_s


@dataclass(eq=False)  # each wait is itself, however alike two are
class _Wait:
    fd: int
    socket_id: int
    deadline: float
    # The server's address, to probe it with a new connection; None when the watchdog spares no live server.
    peer: Any = None
    cut: bool = False


class Watchdog:
    """Cuts off a connection whose wait for its server's answer passed `bound_s`. One per engine; its thread runs
    only while waits are armed (and IDLE_S after), so that none outlives its engine's use. With
    `spare_live_servers`, a wait past the bound goes on for another bound while the server answers a new connection."""

    def __init__(self, bound_s: float, *, spare_live_servers: bool = False) -> None:
        self.bound_s = bound_s
        self.spare_live_servers = spare_live_servers
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
                raise NoAnswer(self.bound_s) from error
            raise
        finally:
            self._disarm(wait)

    def _arm(self, fd: int) -> _Wait:
        wait = _Wait(fd, os.fstat(fd).st_ino, time.monotonic() + self.bound_s)
        if self.spare_live_servers:
            wait.peer = _peer(fd)
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
            with self._lock:
                now = time.monotonic()
                due = [wait for wait in self._waits if not wait.cut and wait.deadline <= now]
            alive = [wait for wait in due if wait.peer is not None and _answers(wait.peer)]  # unlocked: a probe waits
            with self._lock:  # held while cutting: a disarmed wait's socket, maybe closed since, is never touched
                for wait in due:
                    if wait in alive:
                        wait.deadline = time.monotonic() + self.bound_s
                    elif wait in self._waits:
                        wait.cut = True
                        _shut_down(wait.fd, wait.socket_id)
                if self._waits:
                    idle_since = now
                elif now - idle_since >= IDLE_S:
                    self._thread = None
                    return


def _peer(fd: int) -> Any:
    """The address the connection whose socket is `fd` reaches (its server's, or a proxy's in front of it)."""
    with socket.socket(fileno=os.dup(fd)) as duplicate:
        return duplicate.getpeername()


def _answers(peer: Any) -> bool:
    """Whether a PostgreSQL server at `peer` answers a new connection's SSLRequest ('S' or 'N') within PROBE_S."""
    family = socket.AF_UNIX if isinstance(peer, str) else socket.AF_INET6 if len(peer) == 4 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(PROBE_S)
            probe.connect(peer)
            probe.sendall(SSL_REQUEST)
            return probe.recv(1) in (b"S", b"N")
    except OSError:
        return False


def cutter(fd: int) -> Callable[[], None]:
    """What cuts off, from any thread, the connection whose socket is `fd` now: every wait on it ends at once, and
    libpq reports the connection lost (an OperationalError)."""
    return partial(_shut_down, fd, os.fstat(fd).st_ino)


def _shut_down(fd: int, socket_id: int) -> None:
    """Shut the socket `fd` down for reading and writing: every blocked read on it returns end-of-file. Left alone
    when libpq closed it meanwhile (an error of its own) and its number now names another file."""
    with suppress(OSError):
        if os.fstat(fd).st_ino != socket_id:
            return
        with socket.socket(fileno=os.dup(fd)) as duplicate:  # closing the duplicate leaves libpq's socket open
            duplicate.shutdown(socket.SHUT_RDWR)


class _BoundedConnection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection whose every wait on the server is bounded: statements, a server-side cursor's fetches,
    commits and rollbacks. Connecting is bounded by libpq's connect_timeout."""

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

    def fetchone(self) -> Any:
        with self._fetching():
            return super().fetchone()

    def fetchmany(self, size: int | None = None) -> Any:
        with self._fetching():
            return super().fetchmany(size)

    def fetchall(self) -> Any:
        with self._fetching():
            return super().fetchall()

    def _fetching(self) -> AbstractContextManager[None]:
        """A server-side (named) cursor fetches each chunk from the server, a wait like a statement's; a client-side
        one holds its whole result already."""
        return self.connection.bounded() if self.name is not None else nullcontext()


def bounded_connections(bound_s: float, *, spare_live_servers: bool = False) -> Callable[..., Any]:
    """A psycopg2 `connection_factory` whose connections wait at most `bound_s` for each answer (see Watchdog)."""
    return partial(_BoundedConnection, watchdog=Watchdog(bound_s, spare_live_servers=spare_live_servers))
