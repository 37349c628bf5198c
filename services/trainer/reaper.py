"""A consumer step that hands back runs whose worker died: their lease ran out, so another worker takes them
(or they fail once out of attempts). Every worker runs it; the conditional update lets only one win a run."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from sqlalchemy.pool import NullPool

from services.trainer.runs import reap_expired
from shared.db.session import make_engine, make_session_factory
from shared.outbox import KIND_TRAIN_TASK, relay
from shared.queues import send_train_task
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
        self.engine = make_engine(settings.resolved_database_url, poolclass=NullPool)
        self.sessions = make_session_factory(self.engine)
        self.max_attempts = settings.run_max_attempts
        self.timer_ref = consumer.timer.call_repeatedly(SWEEP_SECONDS, self.sweep, (consumer,), priority=10)

    def stop(self, consumer: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.engine.dispose()

    def sweep(self, consumer: Any) -> None:
        try:
            message_ids = reap_expired(self.sessions, max_attempts=self.max_attempts)
            if message_ids:
                log.warning("handing back %d run(s) whose worker was lost", len(message_ids))
                relay(
                    self.sessions,
                    {KIND_TRAIN_TASK: lambda payload: send_train_task(consumer.app, payload)},
                    ids=message_ids,
                )
        except Exception:
            log.warning("run reaper pass failed; trying again in %.0f s", SWEEP_SECONDS, exc_info=True)
