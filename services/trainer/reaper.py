"""A consumer step that hands back runs whose worker died (their lease ran out, so another worker takes them, or
they fail once out of attempts), wakes runs waiting for a slot that is free, queues again the message of a run
queued so long that the broker may have lost it, sends the messages of retries whose backoff is over, and removes
the files of candidates no attempt will register (services/trainer/candidates.py). Every worker runs it;
conditional updates and row locks let only one win a run or a folder."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import bootsteps
from sqlalchemy.pool import NullPool

from services.trainer.candidates import CandidateStores, remove_abandoned
from services.trainer.runs import reap_expired, requeue_lost, wake_all_waiting
from shared.audit import record_change
from shared.cancellation import request_cancel
from shared.db.models import TrainingRun
from shared.db.session import make_central_engine, make_session_factory, session_scope
from shared.outbox import KIND_TRAIN_TASK, relay
from shared.queues import broker_transport_options, send_train_task
from shared.settings import build_settings

log = logging.getLogger(__name__)

SWEEP_SECONDS = 5.0


class RunReaper(bootsteps.StartStopStep):  # type: ignore[misc]
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None

    def start(self, consumer: Any) -> None:
        settings = build_settings()
        # Its own engine, in the worker's main process: the pool's children never inherit its connections.
        self.engine = make_central_engine(settings, bound_answers=True, poolclass=NullPool)
        self.sessions = make_session_factory(self.engine)
        self.settings = settings
        self.max_attempts = settings.run_max_attempts
        # What the broker takes for a lost fetch: a run still queued this long after its message may have lost it.
        self.requeue_after = timedelta(
            seconds=broker_transport_options(settings.training_timeout_s)["visibility_timeout"]
        )
        self.stores: CandidateStores | None = None
        self.timer_ref = consumer.timer.call_repeatedly(SWEEP_SECONDS, self.sweep, (consumer,), priority=10)

    def stop(self, consumer: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.engine.dispose()

    def sweep(self, consumer: Any) -> None:
        try:
            handed_back = reap_expired(
                self.sessions, max_attempts=self.max_attempts, retry_backoff_s=self.settings.run_retry_backoff_s
            )
            if handed_back:
                log.warning("handing back %d run(s) whose worker was lost", len(handed_back))
            woken = wake_all_waiting(self.sessions)
            requeued = requeue_lost(self.sessions, after=self.requeue_after)
            if requeued:
                log.warning(
                    "queued the messages of %d run(s) again: queued that long, they may have lost them", len(requeued)
                )
            senders = {KIND_TRAIN_TASK: lambda payload: send_train_task(consumer.app, payload)}
            if handed_back or woken or requeued:
                relay(self.sessions, senders, ids=[*handed_back, *woken, *requeued])
            # Retries whose backoff is over, and messages a process that died after its commit never sent.
            relay(self.sessions, senders, min_age=timedelta(seconds=2 * SWEEP_SECONDS))
            for prefix in remove_abandoned(self.sessions, self._candidate_stores()):
                log.warning("removed %s, the candidate of an attempt that registered no version", prefix)
        except Exception:
            log.warning("run reaper pass failed; trying again in %.0f s", SWEEP_SECONDS, exc_info=True)

    def _candidate_stores(self) -> CandidateStores:
        # Opened by a pass, not at start (opening an S3 store asks it for its bucket): a store down as the worker
        # starts must not keep it from handing runs back.
        if self.stores is None:
            self.stores = CandidateStores.open(self.settings)
        return self.stores


REVOKED = "revoked by an operator in Flower"


def cancel_revoked(run_id: str) -> None:
    """Cancel the run of a revoked task: at once if queued; a running one is stopped by its own worker's heartbeat
    (or, if a terminate killed that worker, ends cancelled when the reaper finds its lease gone). Audited as a cancel
    over the api is, by `flower`: Flower's basic auth names no key."""
    settings = build_settings()
    engine = make_central_engine(settings, bound_answers=True, poolclass=NullPool)
    try:
        with session_scope(make_session_factory(engine)) as session:
            run = session.get(TrainingRun, run_id)
            asked_before = run is None or run.cancel_requested  # over the api, or by an earlier revoke: audited then
            if request_cancel(session, run_id) is not None and not asked_before:
                assert run is not None
                record_change(
                    session,
                    org_id=run.org_id,
                    actor="flower",
                    action="training.cancelled",
                    target=run_id,
                    detail={"reason": REVOKED},
                )
    finally:
        engine.dispose()
