"""Putting a training run in the queue: the row and its outbox message in one transaction. The api does it for
a POST, beat for a schedule; a worker for a retry, a run handed back or woken, or a message lost."""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.audit import record_change
from shared.db.models import OutboxMessage, TrainingRun
from shared.db.types import utcnow
from shared.outbox import KIND_TRAIN_TASK, add_message
from shared.schemas import TrainingConfig


def queue_run(
    session: Session,
    *,
    org_id: str,
    config: TrainingConfig,
    dataset_id: str | None,
    actor: str,
    trigger: str,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> tuple[TrainingRun, OutboxMessage]:
    run = TrainingRun(
        id="run_" + secrets.token_hex(8),
        org_id=org_id,
        status="queued",
        config=config.to_wire(),
        dataset_id=dataset_id,
        progress={"stage": "queued", "percent": 0},
        trigger=trigger,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(run)
    session.flush()
    record_change(
        session,
        org_id=org_id,
        actor=actor,
        action="training.submitted",
        target=run.id,
        detail={"trigger": trigger, "datasetId": dataset_id},
    )
    return run, message_for(session, run.id, org_id)


def message_for(session: Session, run_id: str, org_id: str, *, send_after: timedelta | None = None) -> OutboxMessage:
    """The run's message, sent by the outbox (after `send_after`), and the time it is queued, kept on the run."""
    queued_at = utcnow() + (send_after or timedelta())
    session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(message_queued_at=queued_at))
    payload = {"run_id": run_id, "org_id": org_id}
    return add_message(session, kind=KIND_TRAIN_TASK, payload=payload, send_after=send_after)
