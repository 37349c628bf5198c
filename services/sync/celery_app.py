"""The sync service's Celery app: `celery -A services.sync.celery_app worker` consumes the `sync.<org>` queues,
`... beat` fires sync schedules and retention purges. Configured lazily, at first use."""

from __future__ import annotations

import gc
from typing import Any

from celery import Celery
from celery.signals import task_revoked, worker_process_init

from services.sync.revocation import cancel_revoked
from shared.org_queues import SyncQueues
from shared.queues import SYNC_TASK, celery_config
from shared.settings import settings_for
from shared.sync_jobs import LONGEST_JOB_S

app = Celery("kiln-sync", include=["services.sync.tasks"])
app.steps["consumer"].add(SyncQueues)


@app.on_configure.connect  # type: ignore[untyped-decorator]
def _configure(sender: Celery, **_kwargs: Any) -> None:
    settings = settings_for(sender.main)
    sender.conf.update(celery_config(settings.redis_url, longest_training_s=LONGEST_JOB_S))
    sender.conf.beat_scheduler = "services.sync.beat:SyncScheduler"
    sender.conf.beat_max_loop_interval = settings.beat_tick_s


@task_revoked.connect  # type: ignore[untyped-decorator]
def _cancel_revoked_job(sender: Any, request: Any, **_kwargs: Any) -> None:
    """An operator revoked a sync job in Flower: the job reads cancelled, however far it had gone."""
    # The sender is the task; the request is its execution context, which carries the arguments but not the name.
    if sender.name == SYNC_TASK and request.args:
        cancel_revoked(str(request.args[0]))


@worker_process_init.connect  # type: ignore[untyped-decorator]
def freeze_startup_heap(**_kwargs: Any) -> None:
    """Leave what the worker imported out of the garbage collector's full passes. A pull makes enough garbage for
    one every ~30k records, and each walked the whole imported heap (~55 ms): a quarter of a pull's CPU less
    (bench/sync.py, which calls this as the worker does)."""
    gc.freeze()
