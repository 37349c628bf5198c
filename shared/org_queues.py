"""A consumer step that keeps a worker consuming exactly the per-org queues (`train.<org>`, `sync.<org>`,
`premises.<org>`) it is for.

A worker started with KILN_WORKER_ORGS takes only those orgs (how a hospital trains on its own machine); any other
worker takes every org that keeps no data on its premises (config dataResidency "central"). A premises queue is
taken by the first kind only, whatever the org's residency: what waits there needs the org's own machine. The api
broadcasts `kiln_sync_queues` when orgs change; this sweep, every few seconds, catches a worker that was down or
missed it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.worker.control import control_command
from sqlalchemy import Engine, select
from sqlalchemy.pool import NullPool

from shared.db.models import Organization
from shared.db.session import make_central_engine
from shared.queues import ORG_QUEUE_PREFIX, PREMISES_QUEUE_PREFIX, SYNC_QUEUE_PREFIX, SYNC_QUEUES_COMMAND
from shared.schemas import OrgConfig
from shared.settings import build_settings

log = logging.getLogger(__name__)

SWEEP_SECONDS = 5.0


class OrgQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    """Subclasses name their queues' prefix (the queue of an org is the prefix then the org's id)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    prefix: str = ""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None
        self.engine: Engine | None = None
        self.only_orgs: frozenset[str] = frozenset()

    def start(self, consumer: Any) -> None:
        settings = build_settings()
        self.only_orgs = settings.worker_org_ids
        # Its own engine, in the worker's main process: the pool's children never inherit its connections.
        self.engine = make_central_engine(settings, bound_answers=True, poolclass=NullPool)
        self.sweep(consumer)
        self.timer_ref = consumer.timer.call_repeatedly(SWEEP_SECONDS, self.sweep, (consumer,), priority=10)

    def stop(self, consumer: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
        if self.engine is not None:
            self.engine.dispose()

    def sweep(self, consumer: Any) -> None:
        try:
            wanted = {self.prefix + org_id for org_id in self.org_ids()}
        except Exception:
            log.warning("cannot list organizations; keeping the current queues", exc_info=True)
            return
        consuming = {queue.name for queue in consumer.task_consumer.queues if queue.name.startswith(self.prefix)}
        for queue in sorted(wanted - consuming):
            log.info("consuming %s", queue)
            consumer.add_task_queue(queue)
        for queue in sorted(consuming - wanted):
            log.info("no longer consuming %s", queue)
            consumer.cancel_task_queue(queue)

    def org_ids(self) -> list[str]:
        """The orgs this worker is for."""
        assert self.engine is not None
        with self.engine.connect() as connection:
            orgs = connection.execute(select(Organization.id, Organization.config)).all()
        if self.only_orgs:
            return [org_id for org_id, _config in orgs if org_id in self.only_orgs]
        return [org_id for org_id, config in orgs if OrgConfig.model_validate(config).data_residency == "central"]


class TrainQueues(OrgQueues):
    prefix = ORG_QUEUE_PREFIX


class SyncQueues(OrgQueues):
    prefix = SYNC_QUEUE_PREFIX


class PremisesQueues(OrgQueues):
    """The queues of the orgs this worker was started for (KILN_WORKER_ORGS), and none on any other worker: an org
    that moved its data to the central store still has rows on its premises until its own worker removes them."""

    prefix = PREMISES_QUEUE_PREFIX

    def org_ids(self) -> list[str]:
        return super().org_ids() if self.only_orgs else []


@control_command(name=SYNC_QUEUES_COMMAND)  # type: ignore[untyped-decorator]
def sync_queues(state: Any) -> dict[str, str]:
    """The api's broadcast when orgs change: sweep now instead of at the next tick."""
    for step in state.consumer.steps:
        if isinstance(step, OrgQueues):
            step.sweep(state.consumer)
    return {"ok": "queues synced"}
