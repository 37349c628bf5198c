"""Celery tasks: thin wrappers that take ids and call plain functions."""

from __future__ import annotations

from services.trainer.celery_app import app
from services.trainer.context import worker_context
from services.trainer.revalidate import revalidate
from services.trainer.training import run_training
from shared.queues import TRAIN_TASK, VALIDATE_TASK


@app.task(name=TRAIN_TASK)  # type: ignore[untyped-decorator]
def train(run_id: str) -> str:
    return run_training(run_id, worker_context())


@app.task(name=VALIDATE_TASK)  # type: ignore[untyped-decorator]
def validate(org_id: str, version: str) -> str:
    return revalidate(org_id, version, worker_context())
