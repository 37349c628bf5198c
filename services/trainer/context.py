"""What a worker process holds open: settings, database, object store, the training sandbox and a Celery
producer, built once per process on first use.

Built lazily because Celery forks its pool after importing the app: connections made before the fork would be
shared by every child.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from services.trainer.sandbox import Sandbox
from shared.db.session import SessionFactory, make_central_engine, make_session_factory
from shared.outbox import KIND_TRAIN_TASK, Sender
from shared.queues import celery_config, send_train_task
from shared.settings import Settings, build_settings
from shared.storage import ObjectStore, open_object_store, premises_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    engine: Engine
    sessions: SessionFactory
    store: ObjectStore
    sandbox: Sandbox
    producer: Celery

    @classmethod
    def open(cls, settings: Settings) -> WorkerContext:
        engine = make_central_engine(settings, bound_answers=True)
        producer = Celery("kiln-trainer-producer")
        producer.conf.update(celery_config(settings.redis_url, longest_training_s=settings.training_timeout_s))
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            store=open_object_store(settings),
            sandbox=_swept(Sandbox(network=settings.training_network, filesystem=settings.training_filesystem)),
            producer=producer,
        )

    def close(self) -> None:
        self.sandbox.close()
        self.engine.dispose()

    def holdout_store(self, *, on_premises: bool) -> ObjectStore:
        """Where held-out rows are kept: a folder on this worker when the org's data stays on its premises (only
        the model and its metrics leave), else the central store beside the version. A version records which
        (ModelVersion.holdout_on_premises): its org may have changed its residency since."""
        return premises_store(self.settings) if on_premises else self.store

    def on_premises_of(self, org_id: str) -> bool:
        """Whether this worker was started for the org (KILN_WORKER_ORGS): only such a worker is on the premises
        of an org that keeps its data there, and holds its folder."""
        return org_id in self.settings.worker_org_ids

    def outbox_senders(self) -> dict[str, Sender]:
        def send(payload: dict[str, Any]) -> None:
            send_train_task(self.producer, payload)

        return {KIND_TRAIN_TASK: send}


def _swept(sandbox: Sandbox) -> Sandbox:
    """A worker killed mid-run left its run's workspace, with an org's rows in it: the next to start removes it."""
    for path in sandbox.sweep_workspaces():
        log.warning("removed %s, the workspace of a run whose worker ended before removing it", path)
    return sandbox


@cache
def worker_context() -> WorkerContext:
    return WorkerContext.open(build_settings())
