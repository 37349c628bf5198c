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
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, TimeoutError

from shared.db.models import Prediction
from shared.db.session import SessionFactory, session_scope
from shared.db.types import utcnow

log = logging.getLogger(__name__)

BATCH_ROWS = 5_000
# Beyond this many rows waiting (the database is down or slow), new records are dropped and counted rather than
# letting memory grow without end: ~220 bytes a row (measured once by hand), so ~110 MB. Counted in rows, not
# requests: one request may carry 200,000 rows.
MAX_WAITING_ROWS = 500_000


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
    def __init__(self, sessions: SessionFactory, flush_s: float, max_waiting_rows: int = MAX_WAITING_ROWS) -> None:
        super().__init__(name="prediction-records", daemon=True)
        self.sessions = sessions
        self.flush_s = flush_s
        self.max_waiting_rows = max_waiting_rows
        self.dropped = 0
        self._queue: queue.SimpleQueue[Answered] = queue.SimpleQueue()
        self._waiting_rows = 0
        self._counting = threading.Lock()  # requests add from their threads, this thread takes
        self._stopping = threading.Event()

    def add(self, *, org_id: str, version: str, answers: list[dict[str, Any]], latency_ms: float) -> None:
        with self._counting:
            if self._waiting_rows + len(answers) > self.max_waiting_rows:
                self.dropped += len(answers)
                return
            self._waiting_rows += len(answers)
        self._queue.put(Answered(org_id, version, answers, latency_ms, utcnow()))

    def run(self) -> None:
        while not self._stopping.wait(self.flush_s):
            self.flush()
        self.flush()

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)

    def flush(self) -> int:
        """Write what is waiting, in batches. The database out of reach: the batch is kept for the next pass. A batch
        the database refuses otherwise (a label longer than the column, say) is written request by request, and the
        requests it refuses are dropped and counted: kept, one of them would hold back every record after it."""
        written = 0
        while batch := self._take():
            try:
                written += self._write(batch)
            except (OperationalError, InterfaceError, TimeoutError):
                log.warning("could not write prediction records; retrying later", exc_info=True)
                self._put_back(batch)
                break
            except DBAPIError:
                written += self._write_each(batch)
        return written

    def _write(self, batch: list[Answered]) -> int:
        with session_scope(self.sessions) as session:
            session.execute(insert(Prediction), [row for answered in batch for row in answered.rows()])
        return sum(len(answered.answers) for answered in batch)

    def _write_each(self, batch: list[Answered]) -> int:
        written = 0
        for index, answered in enumerate(batch):
            try:
                written += self._write([answered])
            except (OperationalError, InterfaceError, TimeoutError):
                self._put_back(batch[index:])
                break
            except DBAPIError as error:
                self.dropped += len(answered.answers)
                log.error(
                    "dropped %d prediction records of org %s version %s that the database refused: %s",
                    len(answered.answers),
                    answered.org_id,
                    answered.version,
                    error.orig,
                )
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
        with self._counting:
            self._waiting_rows -= rows
        return batch

    def _put_back(self, batch: list[Answered]) -> None:
        """Records the database could not take now, queued again whatever is waiting: they were counted in once."""
        with self._counting:
            self._waiting_rows += sum(len(answered.answers) for answered in batch)
        for answered in batch:
            self._queue.put(answered)
