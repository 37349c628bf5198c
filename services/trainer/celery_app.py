"""The trainer's Celery app: `celery -A services.trainer.celery_app worker`. Configured lazily, at first use."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_revoked, worker_init, worker_process_init

from services.trainer.context import worker_context
from services.trainer.protection import refuse_inspection
from services.trainer.reaper import RunReaper, cancel_revoked
from services.trainer.sandbox import OPENMP_SPINCOUNT
from shared.org_queues import PremisesQueues, TrainQueues
from shared.queues import TRAIN_TASK, celery_config
from shared.settings import settings_for

# For the worker's own LightGBM work (parity), as for scripts (sandbox.py says why). libgomp reads it when LightGBM
# loads, which is after this module.
os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINCOUNT)

app = Celery("kiln-trainer", include=["services.trainer.tasks"])
app.steps["consumer"].add(TrainQueues)
app.steps["consumer"].add(PremisesQueues)
app.steps["consumer"].add(RunReaper)


@app.on_configure.connect  # type: ignore[untyped-decorator]
def _configure(sender: Celery, **_kwargs: Any) -> None:
    settings = settings_for(sender.main)
    sender.conf.update(celery_config(settings.redis_url, longest_training_s=settings.training_timeout_s))
    sender.conf.beat_scheduler = "services.trainer.beat:DatabaseScheduler"
    sender.conf.beat_max_loop_interval = settings.beat_tick_s


@worker_init.connect  # type: ignore[untyped-decorator]
def _protect_secrets(**_kwargs: Any) -> None:
    refuse_inspection()


@task_revoked.connect  # type: ignore[untyped-decorator]
def _cancel_revoked_run(sender: Any, request: Any, **_kwargs: Any) -> None:
    """An operator revoked a training in Flower: the run reads cancelled, however far it had gone."""
    # The sender is the task; the request is its execution context, which carries the arguments but not the name.
    if sender.name == TRAIN_TASK and request.args:
        cancel_revoked(str(request.args[0]))


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _start_sandbox(**_kwargs: Any) -> None:
    # The sandbox's zygote takes ~2 s to load the training stack: pay that when the worker starts, not in a run.
    worker_context().sandbox.start()
