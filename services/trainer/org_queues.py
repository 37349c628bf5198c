"""A consumer step that keeps a worker consuming one `train.<org>` queue per organization.

New orgs are announced by a broadcast from the api; this sweep catches a worker that was down or missed it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from sqlalchemy import Engine, select
from sqlalchemy.pool import NullPool

from shared.db.models import Organization
from shared.db.session import make_engine
from shared.queues import train_queue
from shared.settings import build_settings

log = logging.getLogger(__name__)

SWEEP_SECONDS = 5.0


class OrgQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None
        self.engine: Engine | None = None

    def start(self, consumer: Any) -> None:
        # Its own engine, in the worker's main process: the pool's children never inherit its connections.
        self.engine = make_engine(build_settings().resolved_database_url, poolclass=NullPool)
        self.sweep(consumer)
        self.timer_ref = consumer.timer.call_repeatedly(SWEEP_SECONDS, self.sweep, (consumer,), priority=10)

    def stop(self, consumer: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
        if self.engine is not None:
            self.engine.dispose()

    def sweep(self, consumer: Any) -> None:
        try:
            wanted = {train_queue(org_id) for org_id in self.org_ids()}
        except Exception:
            log.warning("cannot list organizations; keeping the current queues", exc_info=True)
            return
        consuming = {queue.name for queue in consumer.task_consumer.queues}
        for queue in sorted(wanted - consuming):
            log.info("consuming %s", queue)
            consumer.add_task_queue(queue)

    def org_ids(self) -> list[str]:
        assert self.engine is not None
        with self.engine.connect() as connection:
            return list(connection.scalars(select(Organization.id)))
