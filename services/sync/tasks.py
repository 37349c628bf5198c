"""Celery tasks: thin wrappers that take ids and call plain functions."""

from __future__ import annotations

from celery import Task

from services.sync.celery_app import app
from services.sync.context import worker_context
from services.sync.jobs import MAX_ATTEMPTS, run_job
from services.sync.retention import purge_expired
from services.sync.rotation import rotate_org_key
from services.sync.source_deletion import delete_source
from shared.errors import TransientError
from shared.queues import SYNC_DELETE_SOURCE_TASK, SYNC_PURGE_TASK, SYNC_ROTATE_TASK, SYNC_TASK
from shared.source_lock import SourceBusy

RETRY_BACKOFF_S = 5
MAX_RETRIES = MAX_ATTEMPTS - 1
# A deletion asked for while the source's job runs looks again at most this long after the last look.
BUSY_RETRY_MAX_S = 60


@app.task(
    name=SYNC_TASK,
    bind=True,
    autoretry_for=(TransientError,),
    retry_backoff=RETRY_BACKOFF_S,
    max_retries=MAX_RETRIES,
)  # type: ignore[untyped-decorator]
def sync(self: Task, job_id: str, org_id: str | None = None) -> str:
    """`org_id` is only there for operators: Flower shows it beside each task.

    The job counts its attempts itself (a message delivered again after its worker died is one more), but a try
    cut off from the central store before it started counts no attempt: on Celery's last retry the job ends
    `failed` whatever its count, rather than read `retrying` with nothing left to retry it."""
    return run_job(worker_context(), job_id, last_try=self.request.retries >= self.max_retries)


@app.task(name=SYNC_PURGE_TASK)  # type: ignore[untyped-decorator]
def purge(org_id: str) -> int:
    return purge_expired(worker_context(), org_id)


@app.task(name=SYNC_ROTATE_TASK)  # type: ignore[untyped-decorator]
def rotate(org_id: str, actor: str) -> dict[str, object]:
    """Rotate the org's key (asked for over the api by `actor`); the new key and the drained ones are in the audit
    trail and at GET /v1/orgs/{org}/sync-keys."""
    return rotate_org_key(worker_context(), org_id, actor=actor)


@app.task(
    name=SYNC_DELETE_SOURCE_TASK,
    autoretry_for=(SourceBusy,),
    retry_backoff=RETRY_BACKOFF_S,
    retry_backoff_max=BUSY_RETRY_MAX_S,
    max_retries=None,
)  # type: ignore[untyped-decorator]
def delete_sync_source(source_id: str, org_id: str) -> dict[str, object]:
    """Delete a source asked for over the api, once its running job ends (tried again while it runs, at most
    BUSY_RETRY_MAX_S apart); what went is in the audit trail (`sync.source.deleted`)."""
    return delete_source(worker_context(), source_id, org_id=org_id)
