"""Following each org's deployment in a thread of its own, one follow at a time per org, so that an org whose model
read hangs holds up nothing but its own follows."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from services.predictor.models import LoadedModel
from shared.errors import KilnError, TransientError

log = logging.getLogger(__name__)

Follow = Callable[[], LoadedModel | None]


class OrgFollows:
    """Runs each org's follows (load and swap, or undeploy) one after another, in a thread started for the org that
    ends once the org has none queued. Requests, deploy events and reconciles at most wait on a follow's Future, so a
    store read that never ends costs one thread, and only its org waits.

    `follow_now(org_id)` is the follow read at the time it runs: what a follow queued behind another runs."""

    def __init__(self, follow_now: Callable[[str], LoadedModel | None]) -> None:
        self._follow_now = follow_now
        self._lock = threading.Lock()
        self._running: dict[str, Future[LoadedModel | None]] = {}
        self._queued: dict[str, Future[LoadedModel | None]] = {}

    def after_now(self, org_id: str, job: Follow | None = None) -> Future[LoadedModel | None]:
        """A follow of the org that reads the deployments table after this call: `job` (what the caller has just
        read), or else a fresh read, started at once when the org has no follow running; else one fresh read queued
        behind the running one, shared by every caller until it starts."""
        with self._lock:
            if org_id in self._running:
                if org_id not in self._queued:
                    self._queued[org_id] = Future()
                return self._queued[org_id]
            result: Future[LoadedModel | None] = Future()
            self._running[org_id] = result
            self._start(org_id, job or (lambda: self._follow_now(org_id)), result)
            return result

    def under_way_or_new(self, org_id: str, job: Follow) -> Future[LoadedModel | None]:
        """The org's follow under way, whatever it read, or else `job` started: what a request waits on, since any
        deployment the org loads answers it."""
        with self._lock:
            running = self._running.get(org_id)
        return running if running is not None else self.after_now(org_id, job)

    def _start(self, org_id: str, job: Follow, result: Future[LoadedModel | None]) -> None:
        thread = threading.Thread(target=self._run, args=(org_id, job, result), name=f"follow-{org_id}", daemon=True)
        try:
            thread.start()
        except RuntimeError as error:  # no thread to be had: this follow fails, the org's next one may start
            del self._running[org_id]
            result.set_exception(TransientError(f"the model of {org_id!r} cannot be loaded for now: {error}"))

    def _run(self, org_id: str, job: Follow, result: Future[LoadedModel | None]) -> None:
        while True:
            _settle(org_id, job, result)
            with self._lock:
                queued = self._queued.pop(org_id, None)
                if queued is None:
                    del self._running[org_id]
                    return
                self._running[org_id] = queued
            job, result = (lambda: self._follow_now(org_id)), queued


def _settle(org_id: str, job: Follow, result: Future[LoadedModel | None]) -> None:
    try:
        model = job()
    except KilnError as error:  # said where it was raised; a request waiting on it answers with it
        result.set_exception(error)
    except Exception as error:
        log.warning("org %s: could not follow its deployment; the next event or reconcile will", org_id, exc_info=True)
        result.set_exception(error)
    else:
        result.set_result(model)
