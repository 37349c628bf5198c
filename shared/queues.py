"""Names and broker settings shared by whoever enqueues work (api, beat) and whoever does it (workers)."""

from __future__ import annotations

from typing import Any

TRAIN_TASK = "kiln.train"
ORG_QUEUE_PREFIX = "train."


def train_queue(org_id: str) -> str:
    return f"{ORG_QUEUE_PREFIX}{org_id}"


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
