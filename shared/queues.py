"""Names and broker settings shared by whoever enqueues work (api, beat) and whoever does it (workers)."""

from __future__ import annotations

from typing import Any, Protocol

TRAIN_TASK = "kiln.train"
VALIDATE_TASK = "kiln.validate"
ERASE_TASK = "kiln.erase_premises"
SYNC_TASK = "kiln.sync"
SYNC_PURGE_TASK = "kiln.sync.purge"
SYNC_ROTATE_TASK = "kiln.sync.rotate"
SYNC_DELETE_SOURCE_TASK = "kiln.sync.delete_source"
ORG_QUEUE_PREFIX = "train."
PREMISES_QUEUE_PREFIX = "premises."
SYNC_QUEUE_PREFIX = "sync."
# The broadcast that makes workers look at the orgs again; it names queues, not the sync service.
SYNC_QUEUES_COMMAND = "kiln_sync_queues"


def train_queue(org_id: str) -> str:
    return f"{ORG_QUEUE_PREFIX}{org_id}"


def sync_queue(org_id: str) -> str:
    return f"{SYNC_QUEUE_PREFIX}{org_id}"


def premises_queue(org_id: str) -> str:
    """Work only the org's own workers (KILN_WORKER_ORGS) may do, whatever its residency is today."""
    return f"{PREMISES_QUEUE_PREFIX}{org_id}"


class TaskSender(Protocol):
    def send_task(self, name: str, args: list[Any], queue: str) -> object: ...


def send_train_task(sender: TaskSender, payload: dict[str, Any]) -> None:
    """The message behind an outbox row of kind train_task: run `run_id` on its org's queue (a retry's row waits in
    the outbox for its backoff: shared/outbox.py says why)."""
    # The org rides along in the arguments so that operators see it beside each task in Flower.
    sender.send_task(TRAIN_TASK, args=[payload["run_id"], payload["org_id"]], queue=train_queue(payload["org_id"]))


def send_validate_task(sender: TaskSender, payload: dict[str, Any]) -> None:
    """Judge a stored version again where its held-out rows are: on the org's premises queue for a version whose
    run wrote them there (whatever the org's residency is now: a central worker would not find them), else on its
    org's queue."""
    # The key that asked rides along, for the audit row of the judgement.
    args = [payload["org_id"], payload["version"], payload.get("actor")]
    queue = premises_queue if payload.get("on_premises") else train_queue
    sender.send_task(VALIDATE_TASK, args=args, queue=queue(payload["org_id"]))


def send_erase_task(sender: TaskSender, payload: dict[str, Any]) -> None:
    """Remove an erased version's files from the org's premises folder, on the org's premises queue: only the
    org's own workers, on its premises, reach that folder. Not on `train.<org>`, which the central workers take
    once the org keeps its data centrally: one of them would find nothing in its own folder and say so."""
    args = [payload["org_id"], payload["version"], payload.get("actor")]
    sender.send_task(ERASE_TASK, args=args, queue=premises_queue(payload["org_id"]))


def send_sync_task(sender: TaskSender, payload: dict[str, Any]) -> None:
    """The message behind an outbox row of kind sync_task: run sync job `job_id` on its org's sync queue."""
    sender.send_task(SYNC_TASK, args=[payload["job_id"], payload["org_id"]], queue=sync_queue(payload["org_id"]))


def send_rotate_task(sender: TaskSender, payload: dict[str, Any]) -> None:
    """The message behind an outbox row of kind rotate_task: rotate the org's key, on its sync queue."""
    sender.send_task(SYNC_ROTATE_TASK, args=[payload["org_id"], payload["actor"]], queue=sync_queue(payload["org_id"]))


def send_delete_source_task(sender: TaskSender, payload: dict[str, Any]) -> None:
    """The message behind an outbox row of kind delete_source_task: delete a sync source, on its org's sync queue
    (a worker of the org's sync does it, between the source's jobs)."""
    sender.send_task(
        SYNC_DELETE_SOURCE_TASK, args=[payload["source_id"], payload["org_id"]], queue=sync_queue(payload["org_id"])
    )


def send_purge_task(sender: TaskSender, org_id: str) -> None:
    sender.send_task(SYNC_PURGE_TASK, args=[org_id], queue=sync_queue(org_id))


# How long a command to the broker may wait for its answer.
BROKER_SOCKET_TIMEOUT_S = 5.0


def celery_config(broker_url: str, *, longest_training_s: float) -> dict[str, Any]:
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
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "result_backend": None,
        "broker_transport_options": broker_transport_options(longest_training_s),
    }


def broker_transport_options(longest_training_s: float) -> dict[str, float | bool]:
    """Redis keeps a fetched message in its "unacked" set until the task returns; after visibility_timeout it
    gives the message to another worker. With acks_late, a training is unacked for as long as it runs, so the
    timeout outlasts the worker's wall-clock limit (plus queueing and judging), or a healthy run's message would be
    handed out again. An org allowed longer (its timeoutS, up to a week) still has it handed out once per timeout:
    a timeout that long would leave a message lost before its claim as long. Redelivery is never what saves a run
    whose worker died: the run's lease runs out within KILN_RUN_LEASE_S and a worker's reaper hands it back; a
    repeated message is a no-op, since a run is claimed once. The restore check runs every 10 s (the default, 60 s,
    let a 15 s timeout come back after 93 s here), so a message lost before its run was claimed returns soon after
    the timeout.
    """
    return {
        "visibility_timeout": longest_training_s + 600,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        # A Redis that takes connections and never answers (paused, overloaded, a half-open link) held each publish,
        # and so each submission and the database connection under it, for ever: 15 such requests took the api's
        # pool, and every org's requests answered 503. (Well above the worker's 1 s BRPOP, which it must outlast.)
        "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_S,
        "socket_keepalive": True,
    }
