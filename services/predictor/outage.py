"""What the predictor's requests know of the central database being out of reach, so that they do not each wait on
it: a wait that failed once tells every request after it to answer without the database, until it answers again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy.exc import OperationalError, TimeoutError

from shared.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0


class DatabaseOutage:
    """Once a request's wait on the database fails, requests that start after it go without the database until it
    answers again. Meanwhile a thread of the outage's own asks it (`probe`, whose wait is as bounded as a request's)
    every `probe_every_s`, so that no caller pays for finding it still out of reach; its first answer ends the
    outage.

    The probe's answer is not the requests' own: a database can answer it and still fail their statements (a locked
    table, a query past its bound). So an outage lasts at least `probe_every_s`, twice the last one's least when it
    began within `longest_s` of that one's end, up to `longest_s`: such a database costs a wave of stalled requests
    once per `longest_s`, not once a second.

    A request that goes without gets DatabaseUnavailable (503), unless it has an answer from memory to give instead."""

    def __init__(self, probe: Callable[[], object], *, longest_s: float, probe_every_s: float = PROBE_EVERY_S) -> None:
        self.probe_every_s = probe_every_s
        self.longest_s = max(longest_s, probe_every_s)
        self._probe = probe
        self._lock = threading.Lock()
        self._out = False
        self._ended = 0  # outages ended so far
        self._ended_at = -float("inf")
        self._least_s = probe_every_s
        self._closed = threading.Event()

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """Around one request's use of the database: DatabaseUnavailable at once while the database is out of reach."""
        if self._out:
            raise DatabaseUnavailable()
        ended_before = self._ended
        try:
            yield
        except (OperationalError, TimeoutError):
            self._begin(ended_before)
            raise

    def close(self) -> None:
        """Stop probing: the process is ending."""
        self._closed.set()

    def _begin(self, ended_before: int) -> None:
        with self._lock:
            # A request that started before the last outage ended met that outage, which an answer since has closed.
            if self._out or ended_before != self._ended or self._closed.is_set():
                return
            now = time.monotonic()
            again = now - self._ended_at < self.longest_s
            self._least_s = min(2 * self._least_s, self.longest_s) if again else self.probe_every_s
            prober = threading.Thread(
                target=self._probe_until_answered, args=(self._least_s,), name="database-probe", daemon=True
            )
            try:
                prober.start()
            except RuntimeError:
                log.exception("no thread to probe the database with: requests go on trying it themselves")
                return
            self._out = True
        log.warning("the database is out of reach: requests go without it for at least %.0f s", self._least_s)

    def _probe_until_answered(self, least_s: float) -> None:
        wait_s = least_s
        while not self._closed.wait(wait_s):
            wait_s = self.probe_every_s
            try:
                self._probe()
            except Exception as error:  # whatever it was, the database did not answer: the probing goes on
                log.debug("the database is still out of reach: %s: %s", type(error).__name__, error)
                continue
            with self._lock:
                self._out = False
                self._ended += 1
                self._ended_at = time.monotonic()
            log.warning("the database answers again: the outage is over")
            return
