"""Celery tasks: thin wrappers that take ids and call the plain training function."""

from __future__ import annotations

from services.trainer.celery_app import app
from services.trainer.context import worker_context
from services.trainer.training import run_training
from shared.queues import TRAIN_TASK


@app.task(name=TRAIN_TASK)  # type: ignore[untyped-decorator]
def train(run_id: str) -> str:
    return run_training(run_id, worker_context())
