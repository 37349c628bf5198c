"""A TCP forwarder between a service and a real server that can be frozen: it stops forwarding, in both directions,
while every socket stays open. The client's kernel still has its packets acknowledged (by the forwarder's), so to the
client it is a server that takes everything and never answers: a stopped postgres, or one behind a stuck link. A trap
freezes each connection at one step of its conversation instead: where its client first sends given bytes."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

from sqlalchemy.engine import make_url

POLL_S = 0.1
T = TypeVar("T")


class FreezableLink:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_S)
        self._flowing = threading.Event()
        self._flowing.set()
        self._closing = threading.Event()
        self._trap: bytes | None = None
        self._sockets: list[socket.socket] = []
        self._pumps: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="link-accept", daemon=True)
        self._acceptor.start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def trap(self, marker: bytes) -> None:
        """From now on, each connection whose client sends `marker` (in one message) freezes there for good, the
        message unsent; the others flow."""
        self._trap = marker

    def close(self) -> None:
        """Closing every socket also ends a client's wait on the link, however it was left."""
        self._closing.set()
        self._flowing.set()  # wakes the pumps, which then see the link closing
        self._acceptor.join(timeout=5)
        for pump in self._pumps:
            pump.join(timeout=5)
        for sock in [self._listener, *self._sockets]:
            sock.close()

    def outcome_within(self, seconds: float, call: Callable[[], T]) -> T | Exception:
        """What `call` returns or raises, run in a thread of its own. Past `seconds` the link is closed, which ends
        any wait on it, and the test fails: a wait without end fails the test instead of hanging it."""
        outcome: list[T | Exception] = []

        def run() -> None:
            try:
                outcome.append(call())
            except Exception as error:
                outcome.append(error)

        thread = threading.Thread(target=run, name="call-on-link", daemon=True)
        thread.start()
        thread.join(seconds)
        if not outcome:
            self.close()
            raise AssertionError(f"still waiting after {seconds} s")
        return outcome[0]

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            trapped = threading.Event()
            for source, sink in ((client, server), (server, client)):
                pump = threading.Thread(
                    target=self._pump, args=(source, sink, trapped, source is client), name="link-pump", daemon=True
                )
                self._pumps.append(pump)
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, trapped: threading.Event, from_client: bool) -> None:
        """Forward what `source` sends while the link flows; frozen or trapped, read nothing more, and leave it in
        the kernel."""
        with suppress(OSError):
            while not self._closing.is_set():
                self._flowing.wait()
                if trapped.is_set():
                    self._closing.wait(POLL_S)
                    continue
                readable, _, _ = select.select([source], [], [], POLL_S)
                if not readable or not self._flowing.is_set():
                    continue
                data = source.recv(65536)
                if not data:
                    break
                if from_client and self._trap is not None and self._trap in data:
                    trapped.set()
                    continue
                sink.sendall(data)
        for end in (source, sink):  # one side hung up: so does the other, and its pump ends
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


@contextmanager
def freezable_link_to(database_url: str) -> Iterator[tuple[FreezableLink, str]]:
    """A freezable link to the PostgreSQL server of `database_url`, and the same URL through it."""
    url = make_url(database_url)
    link = FreezableLink((url.host or "127.0.0.1", url.port or 5432))
    try:
        yield link, url.set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)
    finally:
        link.close()
