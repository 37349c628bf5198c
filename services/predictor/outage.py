"""What the predictor's requests know of the central database being out of reach, so that they do not each wait on
it: a wait that failed once tells every request after it to answer without the database, until it answers again."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy.exc import OperationalError, TimeoutError

from shared.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0


class DatabaseOutage:
    """Once a request's wait on the database fails, no request waits on it until it answers again. Meanwhile a
    thread of the outage's own asks it (`probe`, whose wait is as bounded as a request's) every `probe_every_s`, so
    that no caller pays for finding it still out of reach, and the first answer ends the outage.

    A request that goes without gets DatabaseUnavailable (503), unless it has an answer from memory to give instead."""

    def __init__(self, probe: Callable[[], object], probe_every_s: float = PROBE_EVERY_S) -> None:
        self.probe_every_s = probe_every_s
        self._probe = probe
        self._lock = threading.Lock()
        self._out = False
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """Around one request's use of the database: DatabaseUnavailable at once while the database is out of reach."""
        if self._out:
            raise DatabaseUnavailable()
        try:
            yield
        except (OperationalError, TimeoutError):
            self._begin()
            raise

    def close(self) -> None:
        """Stop probing: the process is ending."""
        self._closed.set()

    def _begin(self) -> None:
        with self._lock:
            self._out = True
            if self._prober is None and not self._closed.is_set():
                log.warning("the database is out of reach: requests go without it until it answers again")
                self._prober = threading.Thread(target=self._probe_until_answered, name="database-probe", daemon=True)
                self._prober.start()

    def _probe_until_answered(self) -> None:
        while not self._closed.wait(self.probe_every_s):
            try:
                self._probe()
            except Exception as error:  # whatever it was, the database did not answer: the probing goes on
                log.debug("the database is still out of reach: %s: %s", type(error).__name__, error)
                continue
            log.warning("the database answers again: the outage is over")
            break
        with self._lock:
            self._out = False
            self._prober = None
