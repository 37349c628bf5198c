"""Prediction records for the orgs that keep them, written in batches by a thread of their own: a request only
appends one item to a queue, whatever its number of rows."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert

from shared.db.models import Prediction
from shared.db.session import SessionFactory, session_scope
from shared.db.types import utcnow

log = logging.getLogger(__name__)

BATCH_ROWS = 5_000
# Beyond this many requests waiting (the database is down or slow), new records are dropped and counted rather
# than letting memory grow without end.
MAX_WAITING = 50_000


@dataclass(frozen=True)
class Answered:
    org_id: str
    version: str
    answers: list[dict[str, Any]]
    latency_ms: float
    at: datetime

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "org_id": self.org_id,
                "version": self.version,
                "score": answer["score"],
                "label": str(answer["label"]),
                "risk_level": answer["riskLevel"],
                "latency_ms": self.latency_ms,
                "at": self.at,
            }
            for answer in self.answers
        ]


class PredictionRecorder(threading.Thread):
    def __init__(self, sessions: SessionFactory, flush_s: float) -> None:
        super().__init__(name="prediction-records", daemon=True)
        self.sessions = sessions
        self.flush_s = flush_s
        self.dropped = 0
        self._queue: queue.SimpleQueue[Answered] = queue.SimpleQueue()
        self._stopping = threading.Event()

    def add(self, *, org_id: str, version: str, answers: list[dict[str, Any]], latency_ms: float) -> None:
        if self._queue.qsize() >= MAX_WAITING:
            self.dropped += len(answers)
            return
        self._queue.put(Answered(org_id, version, answers, latency_ms, utcnow()))

    def run(self) -> None:
        while not self._stopping.wait(self.flush_s):
            self.flush()
        self.flush()

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)

    def flush(self) -> int:
        """Write what is waiting, in batches; the requests of a failed batch are kept for the next pass."""
        written = 0
        while batch := self._take():
            try:
                with session_scope(self.sessions) as session:
                    session.execute(insert(Prediction), [row for answered in batch for row in answered.rows()])
            except Exception:
                log.warning("could not write prediction records; retrying later", exc_info=True)
                for answered in batch:
                    self._queue.put(answered)
                break
            written += sum(len(answered.answers) for answered in batch)
        return written

    def _take(self) -> list[Answered]:
        batch: list[Answered] = []
        rows = 0
        while rows < BATCH_ROWS:
            try:
                answered = self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(answered)
            rows += len(answered.answers)
        return batch
