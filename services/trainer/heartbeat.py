"""Keeping a run's lease while an attempt works, and noticing a cancel, or a lease lost, within a second."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from types import TracebackType

from services.trainer.runs import Attempt, LeaseLost, cancel_requested, renew_lease
from shared.db.session import SessionFactory

log = logging.getLogger(__name__)

CHECK_S = 0.5


class Heartbeat:
    """A thread that reads the attempt's cancel flag every CHECK_S seconds and renews its lease every third of
    the lease: a write only every few seconds, a cancel noticed within one check. A lease that ran out (the worker
    stalled past it, or could not reach the database for that long) or was taken over sets `lost`, and the attempt
    stops: its script is killed and it writes nothing more.

    The lease is judged by this process's clock while each look waits for the database: a look the database does not
    answer holds the heartbeat only until the lease has passed since the last renewal was sent (the database set the
    lease from no earlier a moment), not for the whole KILN_DATABASE_TIMEOUT_S."""

    def __init__(self, sessions: SessionFactory, attempt: Attempt, *, lease_s: float) -> None:
        self.sessions = sessions
        self.attempt = attempt
        self.lease_s = lease_s
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{attempt.run_id}", daemon=True)
        # Each look runs on this thread, so that the heartbeat can give up on one the database does not answer.
        self._looks = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"heartbeat-look-{attempt.run_id}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._done.set()
        self._thread.join()
        # A look given up on ends within the database's own bound; nothing waits for it.
        self._looks.shutdown(wait=False, cancel_futures=True)

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def _beat(self) -> None:
        renewed = time.monotonic()
        failures = 0  # since the lease was last renewed: the traceback once, then a line each
        while not self._done.wait(CHECK_S):
            sent = time.monotonic()
            renewing = sent - renewed >= self.lease_s / 3
            try:
                cancel = self._look(renewing, deadline=renewed + self.lease_s)
            except LeaseLost:
                self.lost.set()
                return
            except Exception as error:
                # The database may come back before the lease runs out; until then the attempt goes on.
                failures += 1
                log.warning(
                    "run %s: lease renewal failed (%d since it was last renewed): %s",
                    self.attempt.run_id,
                    failures,
                    type(error).__name__,
                    exc_info=failures == 1,
                )
                if time.monotonic() - renewed >= self.lease_s:
                    self.lost.set()
                    return
                time.sleep(CHECK_S)
                continue
            if cancel is None:
                # Past the lease by this process's clock, another worker may have taken the run over already.
                log.warning("run %s: no answer from the database before the lease ran out", self.attempt.run_id)
                self.lost.set()
                return
            if renewing:
                renewed, failures = sent, 0
            if cancel:
                self.cancelled.set()

    def _look(self, renewing: bool, *, deadline: float) -> bool | None:
        """Renew the lease or read the cancel flag; whether a cancel was asked for, or None when the database had
        not answered by `deadline`. Raises what the look raised."""
        if renewing:
            look = self._looks.submit(renew_lease, self.sessions, self.attempt, lease_s=self.lease_s)
        else:
            look = self._looks.submit(cancel_requested, self.sessions, self.attempt)
        answered, _ = wait([look], timeout=max(0.0, deadline - time.monotonic()))
        return look.result() if answered else None
