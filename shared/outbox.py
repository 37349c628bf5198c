"""The transactional outbox: messages are rows written with the state they announce, then relayed.

A crash between the commit and the send leaves the row pending, and the next relay pass sends it. Consumers
must therefore tolerate a repeat: deploy subscribers re-read the database, and a training run is claimed once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import OutboxMessage
from shared.db.session import SessionFactory, session_scope
from shared.db.types import utcnow

log = logging.getLogger(__name__)

KIND_DEPLOY_EVENT = "deploy_event"
KIND_TRAIN_TASK = "train_task"
KIND_ORGS_CHANGED = "orgs_changed"
KIND_VALIDATE_TASK = "validate_task"
KIND_ERASE_TASK = "erase_task"
KIND_SYNC_TASK = "sync_task"
KIND_ROTATE_TASK = "rotate_task"
KIND_DELETE_SOURCE_TASK = "delete_source_task"

Sender = Callable[[dict[str, Any]], None]


def add_message(session: Session, *, kind: str, payload: dict[str, Any]) -> OutboxMessage:
    message = OutboxMessage(kind=kind, payload=payload)
    session.add(message)
    session.flush()
    return message


def relay(
    factory: SessionFactory,
    senders: Mapping[str, Sender],
    *,
    ids: Iterable[int] | None = None,
    min_age: timedelta = timedelta(0),
    limit: int = 100,
) -> int:
    """Send pending messages (all, or the given ids) in order; return how many were sent.

    Rows are locked with SKIP LOCKED where the database has it, so two relays never send the same row at once.
    A failing send stops the pass; what was sent before it stays marked, the rest waits for the next pass.
    """
    sent = 0
    with session_scope(factory) as session:
        query = (
            select(OutboxMessage)
            .where(
                OutboxMessage.published_at.is_(None),
                OutboxMessage.created_at <= utcnow() - min_age,
                OutboxMessage.kind.in_(list(senders)),
            )
            .order_by(OutboxMessage.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if ids is not None:
            query = query.where(OutboxMessage.id.in_(list(ids)))
        for message in session.scalars(query):
            try:
                senders[message.kind](message.payload)
            except Exception:
                log.warning("outbox message %s (%s) not sent; will retry", message.id, message.kind, exc_info=True)
                break
            message.published_at = utcnow()
            sent += 1
    return sent
