"""What the predictor's requests know of the central database being out of reach, so that they do not each wait on
it: a wait that failed once tells every request after it, for a while, to answer without the database."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import OperationalError, TimeoutError

from shared.errors import DatabaseUnavailable


class DatabaseOutage:
    """Once a request's wait on the database fails, no request waits on it for the next `period_s`; then one
    request tries it again while the others still go without. The first answer ends the outage.

    A request that goes without gets DatabaseUnavailable (503), unless it has an answer from memory to give instead."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._lock = threading.Lock()
        self._out_until: float | None = None
        self._trying = False

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """Around one request's use of the database: DatabaseUnavailable at once while the outage says not to try it."""
        trying_again = self._claim()
        try:
            yield
        except (OperationalError, TimeoutError):
            self._begin()
            raise
        else:
            self._end()
        finally:
            if trying_again:
                with self._lock:
                    self._trying = False

    def _claim(self) -> bool:
        """Whether this request is the one trying the database again; DatabaseUnavailable if it may not try it."""
        with self._lock:
            if self._out_until is None:
                return False
            if self._trying or time.monotonic() < self._out_until:
                raise DatabaseUnavailable()
            self._trying = True
            return True

    def _begin(self) -> None:
        with self._lock:
            self._out_until = time.monotonic() + self.period_s

    def _end(self) -> None:
        with self._lock:
            self._out_until = None
