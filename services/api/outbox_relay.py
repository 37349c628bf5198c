"""Sending what the api wrote to the outbox: at once after each commit, and by a background sweep for leftovers."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy.orm import Session

from services.api.resources import Resources
from shared.db.models import OutboxMessage
from shared.outbox import relay

log = logging.getLogger(__name__)


def commit_and_send(session: Session, resources: Resources, *messages: OutboxMessage) -> None:
    """Commit the request's work, then send its outbox messages; a failed send is left for the sweep."""
    session.commit()
    try:
        relay(resources.sessions, resources.outbox_senders(), ids=[message.id for message in messages])
    except Exception:
        log.warning("outbox send after commit failed; the sweep will retry", exc_info=True)


async def sweep_until(stop: asyncio.Event, resources: Resources) -> None:
    """Send messages a crashed request or a broker outage left behind, until `stop` is set.

    Stopping waits for a pass in progress, so resources are never closed under a send.
    """
    interval = resources.settings.outbox_interval_s
    while True:
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        except TimeoutError:
            pass
        try:
            await asyncio.to_thread(
                relay, resources.sessions, resources.outbox_senders(), min_age=timedelta(seconds=2 * interval)
            )
        except Exception:
            log.warning("outbox sweep failed; retrying in %.1f s", interval, exc_info=True)
