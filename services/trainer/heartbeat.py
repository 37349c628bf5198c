"""Keeping a run's lease while an attempt works, and noticing a cancel, or a lease lost, within a second."""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from services.trainer.runs import Attempt, LeaseLost, cancel_requested, renew_lease
from shared.db.session import SessionFactory

log = logging.getLogger(__name__)

CHECK_S = 0.5


class Heartbeat:
    """A thread that reads the attempt's cancel flag every CHECK_S seconds and renews its lease every third of
    the lease: a write only every few seconds, a cancel noticed within one check. A lease that ran out (the worker
    stalled past it, or could not reach the database for that long) or was taken over sets `lost`, and the attempt
    stops: its script is killed and it writes nothing more."""

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
        renewed = time.monotonic()
        while not self._done.wait(CHECK_S):
            try:
                if time.monotonic() - renewed >= self.lease_s / 3:
                    cancel = renew_lease(self.sessions, self.attempt, lease_s=self.lease_s)
                    renewed = time.monotonic()
                else:
                    cancel = cancel_requested(self.sessions, self.attempt)
                if cancel:
                    self.cancelled.set()
            except LeaseLost:
                self.lost.set()
                return
            except Exception:
                # The database may come back before the lease runs out; until then the attempt goes on. After it,
                # by this process's own clock (started once the last renewal had returned), another worker may
                # have taken the run over already.
                log.warning("run %s: lease renewal failed", self.attempt.run_id, exc_info=True)
                if time.monotonic() - renewed >= self.lease_s:
                    self.lost.set()
                    return
                time.sleep(CHECK_S)
