"""The outbox: a message committed with its state is sent even when the process died before sending it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from services.api.app import create_app
from shared.db.models import OutboxMessage
from shared.db.session import make_session_factory, session_scope
from shared.db.types import utcnow
from shared.events import DeployEvent
from shared.outbox import KIND_DEPLOY_EVENT, add_message, relay
from shared.settings import Settings
from tests.support.events import ChannelListener


def test_a_failed_send_leaves_the_message_pending_and_the_next_pass_sends_it(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        message_id = add_message(session, kind="test_kind", payload={"n": 1}).id
    sent: list[dict[str, Any]] = []

    def broken(_payload: dict[str, Any]) -> None:
        raise ConnectionError("broker down")

    assert relay(sessions, {"test_kind": broken}, ids=[message_id]) == 0
    assert relay(sessions, {"test_kind": sent.append}, ids=[message_id]) == 1
    assert sent == [{"n": 1}]
    assert relay(sessions, {"test_kind": sent.append}, ids=[message_id]) == 0
    with sessions() as session:
        assert session.get_one(OutboxMessage, message_id).published_at is not None
    engine.dispose()


def test_the_api_sweep_publishes_an_event_a_crashed_process_left_behind(settings: Settings, org_id: str) -> None:
    engine = create_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        message = add_message(
            session, kind=KIND_DEPLOY_EVENT, payload={"org_id": org_id, "version": "v-left", "deployment_id": 7}
        )
        message.created_at = utcnow() - timedelta(minutes=1)
    listener = ChannelListener(settings.redis_url, settings.deploy_channel)
    fast = settings.model_copy(update={"outbox_interval_s": 0.2})
    with TestClient(create_app(fast)):
        received = listener.next_event_of(org_id, seconds=10)
    # Leaving the block stops the api, which waits for the sweep that sent the event to mark it.
    assert received == DeployEvent(org_id=org_id, version="v-left", deployment_id=7)
    with sessions() as session:
        stored = session.scalar(select(OutboxMessage).where(OutboxMessage.id == message.id))
        assert stored is not None and stored.published_at is not None
    listener.close()
    engine.dispose()
