"""Judging a version again as a worker does it: the task the api queued, with the arguments it sends."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select

from services.trainer.context import WorkerContext
from services.trainer.revalidate import revalidate
from shared.db.models import OutboxMessage
from shared.outbox import KIND_VALIDATE_TASK
from shared.queues import send_validate_task


class _Sent:
    def __init__(self) -> None:
        self.args: list[Any] = []

    def send_task(self, name: str, args: list[Any], queue: str) -> object:
        self.args = args
        return None


def queued_judgement(engine: Engine, org_id: str, version: str) -> list[Any]:
    """The arguments of the newest judgement of `version` queued over the api (`POST .../validate`), as the task
    gets them: the org, the version, and the key that asked."""
    with engine.connect() as connection:
        payloads = connection.scalars(
            select(OutboxMessage.payload).where(OutboxMessage.kind == KIND_VALIDATE_TASK).order_by(OutboxMessage.id)
        ).all()
    payload = [p for p in payloads if (p["org_id"], p["version"]) == (org_id, version)][-1]
    sent = _Sent()
    send_validate_task(sent, payload)
    return sent.args


def judge_queued(engine: Engine, worker: WorkerContext, org_id: str, version: str) -> str:
    """Run the newest judgement of `version` queued over the api (`POST .../validate`), as the task sent for it."""
    queued_org, queued_version, *actor = queued_judgement(engine, org_id, version)
    return revalidate(queued_org, queued_version, worker, *actor)
