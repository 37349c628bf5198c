"""Listening to the deploy channel the way a predictor does, for tests that check what was published."""

from __future__ import annotations

import time
from typing import Any

import redis

from shared.events import DeployEvent


class ChannelListener:
    def __init__(self, redis_url: str, channel: str) -> None:
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub: Any = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(channel)
        self._pubsub.get_message(timeout=1)  # the subscribe confirmation

    def next_event(self, seconds: float) -> DeployEvent | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=0.1)
            if message is not None:
                return DeployEvent.decode(message["data"])
        return None

    def next_event_of(self, org_id: str, seconds: float) -> DeployEvent | None:
        """The next event about `org_id`, passing over other orgs': the tests share one database, and an api's
        outbox sweep sends whatever any of them left pending into the channel of the test that runs it."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            event = self.next_event(seconds=left)
            if event is not None and event.org_id == org_id:
                return event
        return None

    def close(self) -> None:
        self._pubsub.close()
        self._client.close()
