"""Deploy events from Redis pub/sub, and a periodic reconcile that heals whatever pub/sub lost."""

from __future__ import annotations

import logging
import threading
import time

import redis

from services.predictor.deployments import Synchronizer
from shared.events import DeployEvent

log = logging.getLogger(__name__)


class DeployListener(threading.Thread):
    """Follows deploy events and reconciles every `reconcile_s` seconds, and right after each (re)subscribe,
    since events sent while disconnected are gone for good."""

    def __init__(self, client: redis.Redis, channel: str, synchronizer: Synchronizer, reconcile_s: float) -> None:
        super().__init__(name="deploy-listener", daemon=True)
        self.client = client
        self.channel = channel
        self.synchronizer = synchronizer
        self.reconcile_s = reconcile_s
        self._stopping = threading.Event()
        self._reconciles = 0  # how many this thread has run
        self._failures = 0  # in a row, since events last came through

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        while not self._stopping.is_set():
            reconciles = self._reconciles
            try:
                self._follow()
            except Exception:
                # Not only a connection lost: any error (Redis refusing the SUBSCRIBE, say, an ACL without it) that
                # ended this thread would end the reconciles too, while the process stays ready. The traceback once,
                # then a line a second.
                self._failures += 1
                log.warning(
                    "deploy events unavailable (%d in a row); reconciling from the database meanwhile",
                    self._failures,
                    exc_info=self._failures == 1,
                )
                if self._reconciles == reconciles:  # not after _follow's own, which it got to before the error
                    self._reconcile()
                self._stopping.wait(1.0)

    def _follow(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self.channel)
            self._reconcile()
            next_reconcile = time.monotonic() + self.reconcile_s
            while not self._stopping.is_set():
                message = pubsub.get_message(timeout=0.5)
                self._failures = 0
                if message is not None and message["type"] == "message":
                    self._on_event(message["data"])
                if time.monotonic() >= next_reconcile:
                    self._reconcile()
                    next_reconcile = time.monotonic() + self.reconcile_s
        finally:
            pubsub.close()

    def _on_event(self, data: bytes) -> None:
        try:
            event = DeployEvent.decode(data)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed deploy event: %r", data[:200])
            return
        self.synchronizer.follow_event(event.org_id)

    def _reconcile(self) -> None:
        self._reconciles += 1
        try:
            self.synchronizer.sync_all()
        except Exception:
            log.warning("reconcile with the deployments table failed; retrying later", exc_info=True)
