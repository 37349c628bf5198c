"""What the api holds open for its lifetime: database, Redis, the Celery producer and the object store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine

from shared.crypto import SecretBox
from shared.db.session import SessionFactory, make_central_engine, make_session_factory
from shared.events import DeployEvent, publish_deploy_event
from shared.outbox import (
    KIND_DELETE_SOURCE_TASK,
    KIND_DEPLOY_EVENT,
    KIND_ERASE_TASK,
    KIND_ORGS_CHANGED,
    KIND_ROTATE_TASK,
    KIND_SYNC_TASK,
    KIND_TRAIN_TASK,
    KIND_VALIDATE_TASK,
    Sender,
)
from shared.queues import (
    SYNC_QUEUES_COMMAND,
    celery_config,
    send_delete_source_task,
    send_erase_task,
    send_rotate_task,
    send_sync_task,
    send_train_task,
    send_validate_task,
)
from shared.settings import Settings
from shared.storage import ObjectStore, open_object_store


@dataclass
class Resources:
    settings: Settings
    engine: Engine
    sessions: SessionFactory
    redis: redis.Redis
    celery: Celery
    store: ObjectStore
    secrets: SecretBox

    @classmethod
    def open(cls, settings: Settings) -> Resources:
        engine = make_central_engine(settings, bound_answers=True)
        celery = Celery("kiln-api")
        celery.conf.update(celery_config(settings.redis_url, longest_training_s=settings.training_timeout_s))
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            redis=redis.Redis.from_url(settings.redis_url),
            celery=celery,
            store=open_object_store(settings),
            secrets=SecretBox.from_settings(settings),
        )

    def close(self) -> None:
        self.redis.close()
        self.engine.dispose()

    def outbox_senders(self) -> dict[str, Sender]:
        return {
            KIND_DEPLOY_EVENT: self._send_deploy_event,
            KIND_TRAIN_TASK: self._send_train_task,
            KIND_ORGS_CHANGED: self._send_orgs_changed,
            KIND_VALIDATE_TASK: self._send_validate_task,
            KIND_ERASE_TASK: self._send_erase_task,
            KIND_SYNC_TASK: self._send_sync_task,
            KIND_ROTATE_TASK: self._send_rotate_task,
            KIND_DELETE_SOURCE_TASK: self._send_delete_source_task,
        }

    def _send_deploy_event(self, payload: dict[str, Any]) -> None:
        event = DeployEvent(
            org_id=payload["org_id"], version=payload["version"], deployment_id=payload["deployment_id"]
        )
        publish_deploy_event(self.redis, self.settings.deploy_channel, event)

    def _send_train_task(self, payload: dict[str, Any]) -> None:
        send_train_task(self.celery, payload)

    def _send_sync_task(self, payload: dict[str, Any]) -> None:
        send_sync_task(self.celery, payload)

    def _send_rotate_task(self, payload: dict[str, Any]) -> None:
        send_rotate_task(self.celery, payload)

    def _send_delete_source_task(self, payload: dict[str, Any]) -> None:
        send_delete_source_task(self.celery, payload)

    def _send_validate_task(self, payload: dict[str, Any]) -> None:
        send_validate_task(self.celery, payload)

    def _send_erase_task(self, payload: dict[str, Any]) -> None:
        send_erase_task(self.celery, payload)

    def _send_orgs_changed(self, _payload: dict[str, Any]) -> None:
        # Running workers look at the orgs now (a new queue, a residency change); any that miss this broadcast
        # find the change on their own sweep.
        self.celery.control.broadcast(SYNC_QUEUES_COMMAND, reply=False)
