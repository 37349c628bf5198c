"""The transactional outbox: messages are rows written with the state they announce, then relayed.

A crash between the commit and the send leaves the row pending, and the next relay pass sends it. Consumers
must therefore tolerate a repeat: deploy subscribers re-read the database, and a training run is claimed once.

A message whose send fails waits before it is tried again (1 s, doubling up to a minute), its reason kept in
`last_error`, and the pass stops there: the broker may be down. A pass sends the messages that failed fewest times
first, oldest first among equals, so messages that can never be sent (payloads a newer or older Kiln wrote), however
many, hold back no other: each failure sends one further back. They stay pending, in `kiln_outbox_failing`, until
an operator looks. No consumer relies on the order: two relays running at once send in any order already.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from shared.db.models import OutboxMessage
from shared.db.row_locks import hold_sqlite_write_lock
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

FIRST_BACKOFF = timedelta(seconds=1)
LONGEST_BACKOFF = timedelta(minutes=1)


def add_message(
    session: Session, *, kind: str, payload: dict[str, Any], send_after: timedelta | None = None
) -> OutboxMessage:
    """With `send_after`, the message waits here that long, and a sweep sends it once due: a delay left to the broker
    (Celery's countdown) is held unacknowledged by the one worker that received it, behind its own task, or until
    the broker's visibility timeout if that worker dies."""
    message = OutboxMessage(kind=kind, payload=payload)
    if send_after is not None:
        message.next_send_at = utcnow() + send_after
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
    """Send pending messages (all, or the given ids), those that failed fewest times first, oldest first among
    equals; return how many were sent. `min_age` spares the messages a request or a worker is about to send itself,
    not those waiting for their time (delayed, or backing off after a failed send), whose time is their own.

    Rows are locked with SKIP LOCKED where the database has it, so two relays never send the same row at once.
    A failing send stops the pass and waits its backoff; what was sent before it stays marked.
    """
    sent = 0
    now = utcnow()
    with session_scope(factory) as session:
        # So that on SQLite a second relay waits for this one's marks instead of sending the same rows again.
        hold_sqlite_write_lock(session, OutboxMessage.kind)
        query = (
            select(OutboxMessage)
            .where(
                OutboxMessage.published_at.is_(None),
                or_(
                    OutboxMessage.next_send_at <= now,
                    and_(OutboxMessage.next_send_at.is_(None), OutboxMessage.created_at <= now - min_age),
                ),
                OutboxMessage.kind.in_(list(senders)),
            )
            .order_by(OutboxMessage.failed_sends, OutboxMessage.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if ids is not None:
            query = query.where(OutboxMessage.id.in_(list(ids)))
        for message in session.scalars(query):
            try:
                senders[message.kind](message.payload)
            except Exception as error:
                _back_off(message, error)
                break
            message.published_at = utcnow()
            sent += 1
    return sent


def _back_off(message: OutboxMessage, error: Exception) -> None:
    message.failed_sends += 1
    wait = min(FIRST_BACKOFF * 2 ** min(message.failed_sends - 1, 16), LONGEST_BACKOFF)  # 2**16 s: past the longest
    message.next_send_at = utcnow() + wait
    message.last_error = f"{type(error).__name__}: {error}"[:1000]
    log.warning(
        "outbox message %s (%s) not sent, failure %d; trying again in %.0f s",
        message.id,
        message.kind,
        message.failed_sends,
        wait.total_seconds(),
        exc_info=True,
    )
