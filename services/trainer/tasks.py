"""Celery tasks: thin wrappers that take ids and call plain functions."""

from __future__ import annotations

from celery import Task
from celery.utils.time import get_exponential_backoff_interval

from services.trainer.celery_app import app
from services.trainer.context import worker_context
from services.trainer.erasure import erase_here_or_forward
from services.trainer.revalidate import revalidate
from services.trainer.training import run_training
from shared.db.session import DATABASE_TROUBLE, out_of_reach
from shared.errors import TransientError
from shared.queues import ERASE_TASK, TRAIN_TASK, VALIDATE_TASK

# Kiln's database out of reach before the run was claimed: the message comes back this long after, doubling up to
# DATABASE_RETRY_MAX_S, for as long as it is. Dropped, it would leave the run queued for good.
DATABASE_RETRY_S = 5
DATABASE_RETRY_MAX_S = 300


@app.task(name=TRAIN_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def train(self: Task, run_id: str, org_id: str | None = None) -> str:
    """`org_id` is only there for operators: Flower shows it beside each task. A message that comes back for a
    run claimed meanwhile (its attempt ended unrecorded, or another worker took it) does nothing."""
    try:
        return run_training(run_id, worker_context(), worker=self.request.hostname)
    except DATABASE_TROUBLE as error:
        if not out_of_reach(error):  # a statement the database cannot run fails alike on every try
            raise
        countdown = get_exponential_backoff_interval(
            DATABASE_RETRY_S, self.request.retries, DATABASE_RETRY_MAX_S, full_jitter=False
        )
        raise self.retry(exc=error, countdown=countdown) from error


@app.task(name=VALIDATE_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def validate(self: Task, org_id: str, version: str, actor: str | None = None) -> str:
    """`actor` is the key that asked, for the audit row (absent from a task an older api queued). A store out of
    reach is tried again as a run's attempt is: up to KILN_RUN_MAX_ATTEMPTS in all, the waits doubling from
    KILN_RUN_RETRY_BACKOFF_S."""
    context = worker_context()
    settings = context.settings
    last_try = self.request.retries + 1 >= settings.run_max_attempts
    try:
        return revalidate(org_id, version, context, actor=actor, last_try=last_try)
    except TransientError as error:
        if last_try:
            raise
        countdown = settings.run_retry_backoff_s * 2**self.request.retries
        raise self.retry(exc=error, countdown=countdown) from error


@app.task(name=ERASE_TASK)  # type: ignore[untyped-decorator]
def erase_premises(org_id: str, version: str, actor: str | None = None) -> int:
    """An erased version's files on the org's premises; returns how many were removed."""
    return erase_here_or_forward(org_id, version, worker_context(), actor=actor)
