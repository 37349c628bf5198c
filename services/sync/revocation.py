"""Ending a sync job whose task an operator revoked in Flower (connected to Celery's task_revoked in
services/sync/celery_app.py). It runs in the worker's main process, which holds no engine of the jobs': it opens
one of its own for the update."""

from __future__ import annotations

import logging

from sqlalchemy.pool import NullPool

from services.sync.jobs import cancel_job
from shared.db.session import make_central_engine, make_session_factory, session_scope
from shared.settings import build_settings

log = logging.getLogger(__name__)

REVOKED = "revoked by an operator in Flower"


def cancel_revoked(job_id: str) -> None:
    """End the job of a revoked task `cancelled`, whether it was queued, retrying or running: its message was
    acknowledged, so nothing would ever end it otherwise. A running one was cut off by the terminate that revoked
    it, as a job whose worker dies is: its batch under way rolled back, its lock gone with its connection. A
    message of the job that comes again finds it finished and runs nothing."""
    engine = make_central_engine(build_settings(), bound_answers=True, poolclass=NullPool)
    try:
        with session_scope(make_session_factory(engine)) as session:
            if cancel_job(session, job_id, REVOKED):
                log.info("sync job %s cancelled: %s", job_id, REVOKED)
    finally:
        engine.dispose()
