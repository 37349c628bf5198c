"""Names and broker settings shared by whoever enqueues work (api, beat) and whoever does it (workers)."""

from __future__ import annotations

from typing import Any, Protocol

TRAIN_TASK = "kiln.train"
VALIDATE_TASK = "kiln.validate"
ORG_QUEUE_PREFIX = "train."


def train_queue(org_id: str) -> str:
    return f"{ORG_QUEUE_PREFIX}{org_id}"


class TaskSender(Protocol):
    def send_task(self, name: str, args: list[Any], queue: str, countdown: float | None = None) -> object: ...


def send_train_task(sender: TaskSender, payload: dict[str, Any]) -> None:
    """The message behind an outbox row of kind train_task: run `run_id` on its org's queue, maybe later."""
    sender.send_task(
        TRAIN_TASK, args=[payload["run_id"]], queue=train_queue(payload["org_id"]), countdown=payload.get("countdown")
    )


def send_validate_task(sender: TaskSender, payload: dict[str, Any]) -> None:
    """Judge a stored version again, on its org's queue (where the org's workers, and its data, are)."""
    sender.send_task(VALIDATE_TASK, args=[payload["org_id"], payload["version"]], queue=train_queue(payload["org_id"]))


def celery_config(broker_url: str) -> dict[str, Any]:
    """Celery settings every Kiln Celery app shares, so producers and consumers agree on the broker."""
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": "kiln.default",
        # A message is acknowledged only when its task returns, and a worker takes one message at a time, so
        # a worker that dies mid-training hands its run back instead of losing it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "result_backend": None,
    }
