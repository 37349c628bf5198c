"""The trainer's Celery app: `celery -A services.trainer.celery_app worker`. Configured lazily, at first use."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init

from services.trainer.context import worker_context
from services.trainer.org_queues import OrgQueues
from services.trainer.protection import refuse_inspection
from services.trainer.reaper import RunReaper
from shared.queues import celery_config
from shared.settings import build_settings

# LightGBM's OpenMP threads spin while they wait by default; beside any other busy process that made fits 20-60x
# slower on a 2-core machine. libgomp reads this when LightGBM loads, which is after this module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = Celery("kiln-trainer", include=["services.trainer.tasks"])
app.steps["consumer"].add(OrgQueues)
app.steps["consumer"].add(RunReaper)


@app.on_configure.connect  # type: ignore[untyped-decorator]
def _configure(sender: Celery, **_kwargs: Any) -> None:
    sender.conf.update(celery_config(build_settings().redis_url))


@worker_init.connect  # type: ignore[untyped-decorator]
def _protect_secrets(**_kwargs: Any) -> None:
    refuse_inspection()


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _start_sandbox(**_kwargs: Any) -> None:
    # The sandbox's zygote takes ~2 s to load the training stack: pay that when the worker starts, not in a run.
    worker_context().sandbox.start()
