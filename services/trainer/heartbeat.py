"""Keeping a run's lease while an attempt works, and noticing a cancel within a second."""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from services.trainer.runs import Attempt, LeaseLost, renew_lease
from shared.db.session import SessionFactory

log = logging.getLogger(__name__)

CHECK_S = 0.5


class Heartbeat:
    """A thread that renews the attempt's lease (and reads its cancel flag) every CHECK_S seconds."""

    def __init__(self, sessions: SessionFactory, attempt: Attempt, *, lease_s: float) -> None:
        self.sessions = sessions
        self.attempt = attempt
        self.lease_s = lease_s
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{attempt.run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._done.set()
        self._thread.join()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def _beat(self) -> None:
        while not self._done.wait(CHECK_S):
            try:
                if renew_lease(self.sessions, self.attempt, lease_s=self.lease_s):
                    self.cancelled.set()
            except LeaseLost:
                self.lost.set()
                return
            except Exception:
                # The database may come back before the lease runs out; until then the attempt goes on.
                log.warning("run %s: lease renewal failed", self.attempt.run_id, exc_info=True)
                time.sleep(CHECK_S)
