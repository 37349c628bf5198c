"""The outbox: a message committed with its state is sent even when the process died before sending it."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from services.api.app import create_app
from shared.db.migrate import upgrade
from shared.db.models import OutboxMessage
from shared.db.session import make_engine, make_session_factory, session_scope
from shared.db.types import utcnow
from shared.events import DeployEvent
from shared.outbox import FIRST_BACKOFF, KIND_DEPLOY_EVENT, add_message, relay
from shared.settings import Settings
from tests.support.events import ChannelListener


def test_a_failed_send_leaves_the_message_pending_and_a_pass_after_its_backoff_sends_it(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        message_id = add_message(session, kind="test_kind", payload={"n": 1}).id
    sent: list[dict[str, Any]] = []

    def broken(_payload: dict[str, Any]) -> None:
        raise ConnectionError("broker down")

    assert relay(sessions, {"test_kind": broken}, ids=[message_id]) == 0
    with sessions() as session:
        failed = session.get_one(OutboxMessage, message_id)
        assert (failed.published_at, failed.failed_sends, failed.last_error) == (
            None,
            1,
            "ConnectionError: broker down",
        )
    assert relay(sessions, {"test_kind": sent.append}, ids=[message_id]) == 0  # within its backoff
    time.sleep(FIRST_BACKOFF.total_seconds())
    assert relay(sessions, {"test_kind": sent.append}, ids=[message_id]) == 1
    assert sent == [{"n": 1}]
    assert relay(sessions, {"test_kind": sent.append}, ids=[message_id]) == 0
    with sessions() as session:
        assert session.get_one(OutboxMessage, message_id).published_at is not None
    engine.dispose()


def test_a_delayed_message_waits_for_its_time_and_then_any_sweep_sends_it(settings: Settings) -> None:
    """A sweep leaves alone the messages a request is about to send itself (younger than `min_age`), but not a
    delayed one whose time has come: nobody else will send it."""
    engine = create_engine(settings.database_url)
    sessions = make_session_factory(engine)
    delay = timedelta(seconds=1)
    with session_scope(sessions) as session:
        message_id = add_message(session, kind="test_kind", payload={"n": 1}, send_after=delay).id
    sent: list[dict[str, Any]] = []

    assert relay(sessions, {"test_kind": sent.append}, ids=[message_id]) == 0  # sent after its commit: not yet
    time.sleep(delay.total_seconds())
    assert relay(sessions, {"test_kind": sent.append}, min_age=timedelta(hours=1)) == 1

    assert sent == [{"n": 1}]
    engine.dispose()


def test_a_message_that_can_never_be_sent_holds_back_no_message_after_it(settings: Settings) -> None:
    """Once a payload no sender can take stopped every pass at itself, and nothing after it was ever sent."""
    engine = create_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        ids = [add_message(session, kind="test_kind", payload=payload).id for payload in ({}, {"n": 1}, {"n": 2})]
    sent: list[int] = []

    def send(payload: dict[str, Any]) -> None:
        sent.append(payload["n"])

    assert relay(sessions, {"test_kind": send}, ids=ids) == 0
    assert relay(sessions, {"test_kind": send}, ids=ids) == 2
    assert sent == [1, 2]
    with sessions() as session:
        poison = session.get_one(OutboxMessage, ids[0])
        assert (poison.published_at, poison.failed_sends, poison.last_error) == (None, 1, "KeyError: 'n'")
    engine.dispose()


def test_messages_that_failed_fewest_times_go_first_so_any_number_that_never_send_hold_back_none(
    settings: Settings,
) -> None:
    """Oldest first, a few dozen messages that could never be sent, each back from its backoff in turn, stopped
    every pass at one of them: a message whose first send had failed in a broker blip was never sent again."""
    engine = create_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        never = [add_message(session, kind="test_kind", payload={}) for _ in range(3)]
        for message in never:
            message.failed_sends = 7
        blip = add_message(session, kind="test_kind", payload={"n": 1})
        blip.failed_sends = 1
        fresh = add_message(session, kind="test_kind", payload={"n": 2})
        ids = [message.id for message in (*never, blip, fresh)]
    sent: list[int] = []

    def send(payload: dict[str, Any]) -> None:
        sent.append(payload["n"])

    assert relay(sessions, {"test_kind": send}, ids=ids) == 2
    assert sent == [2, 1]
    engine.dispose()


def test_two_relays_at_once_on_the_embedded_sqlite_database_send_a_message_once(tmp_path: Path) -> None:
    """SQLite ignores SKIP LOCKED: a sweep running while another relay sent a message sent it again, and a key
    rotation or a judgement ran twice."""
    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        message_id = add_message(session, kind="test_kind", payload={}).id
    senders: list[str] = []
    sending = threading.Event()

    def send_slowly(_payload: dict[str, Any]) -> None:
        senders.append("first")
        sending.set()
        time.sleep(0.5)  # a broker round trip, long enough for the second relay to start meanwhile

    first = threading.Thread(target=relay, args=(sessions, {"test_kind": send_slowly}), kwargs={"ids": [message_id]})
    first.start()
    assert sending.wait(10)
    assert relay(sessions, {"test_kind": lambda _payload: senders.append("second")}) == 0
    first.join(10)
    assert senders == ["first"]
    engine.dispose()


def test_each_failure_doubles_a_message_s_wait_up_to_a_minute(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        message_id = add_message(session, kind="test_kind", payload={}).id

    def broken(_payload: dict[str, Any]) -> None:
        raise ConnectionError("broker down")

    waits = []
    for _ in range(8):
        with session_scope(sessions) as session:
            session.get_one(OutboxMessage, message_id).next_send_at = None  # its wait is over
        before = utcnow()
        relay(sessions, {"test_kind": broken}, ids=[message_id])
        with sessions() as session:
            next_send_at = session.get_one(OutboxMessage, message_id).next_send_at
        assert next_send_at is not None
        waits.append(round((next_send_at - before).total_seconds()))
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
    with session_scope(sessions) as session:
        message = session.get_one(OutboxMessage, message_id)
        message.failed_sends, message.next_send_at = 100_000, None  # days of an outage
    relay(sessions, {"test_kind": broken}, ids=[message_id])
    with sessions() as session:
        assert session.get_one(OutboxMessage, message_id).failed_sends == 100_001
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
