"""Prediction records for the orgs that keep them, written in batches by a thread of their own: a request only
appends to its org's queue, whatever its number of rows. Orgs share the queue's room and the thread's batches fairly,
so that one org's heavy traffic neither shuts out another's records nor holds them back behind its own."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, TimeoutError

from shared.db.models import Prediction
from shared.db.session import SessionFactory, session_scope
from shared.db.types import utcnow

log = logging.getLogger(__name__)

# Rows a transaction writes at most: one request of 180,000 rows written whole took ~30 s, and the one thread writing
# wrote nothing else meanwhile.
BATCH_ROWS = 5_000
# Beyond this many rows waiting (the database is down or slow, or one org sends more than it can take), an org gets
# no more room than its fair share: ~220 bytes a row (measured once by hand), so ~110 MB. Counted in rows, not
# requests: one request may carry 200,000 rows.
MAX_WAITING_ROWS = 500_000
# How long a stopping predictor waits for its last records to be written: within the 10 s that `kiln down` and
# docker-compose give a process before SIGKILL, so that what is lost is said before then.
STOP_WAIT_S = 8.0
# An org refused room is told at most this often: every refused request of a flood logged would flood the log.
DROP_WARNING_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Answered:
    """Rows `start` to `stop` of one request's answers: a large request is written in parts, each a view of the
    request's answers rather than a copy, since the request may still be on the event loop when it is split."""

    org_id: str
    version: str
    answers: list[dict[str, Any]]
    latency_ms: float
    at: datetime
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def split(self, rows: int) -> tuple[Answered, Answered]:
        """The first `rows` rows, and the rest."""
        return replace(self, stop=self.start + rows), replace(self, start=self.start + rows)

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
            for answer in self.answers[self.start : self.stop]
        ]


@dataclass
class OrgQueue:
    """One org's records waiting, oldest first."""

    parts: deque[Answered] = field(default_factory=deque)
    rows: int = 0

    def append(self, answered: Answered) -> None:
        self.parts.append(answered)
        self.rows += answered.size

    def put_back(self, parts: list[Answered]) -> None:
        """Parts taken earlier, ahead of all that came since: an org's records are written in the order answered."""
        self.parts.extendleft(reversed(parts))
        self.rows += sum(part.size for part in parts)

    def take(self, rows: int) -> list[Answered]:
        """The oldest `rows` rows (no more than are waiting), splitting a request where they end."""
        taken: list[Answered] = []
        self.rows -= rows
        while rows > 0:
            part = self.parts.popleft()
            if part.size > rows:
                part, rest = part.split(rows)
                self.parts.appendleft(rest)
            taken.append(part)
            rows -= part.size
        return taken


def fair_shares(waiting: dict[str, int], capacity: int) -> dict[str, int]:
    """`capacity` rows shared max-min fairly among the orgs with rows `waiting`, taken in their turn order: an org
    waiting for less than an equal share gets all it waits for, the others split what that leaves. Each org gets at
    least one row, so when more orgs than `capacity` wait, only the first `capacity` in turn get any."""
    orgs = sorted(list(waiting)[:capacity], key=waiting.__getitem__)
    shares: dict[str, int] = {}
    left = capacity
    for index, org in enumerate(orgs):
        shares[org] = min(waiting[org], left // (len(orgs) - index))
        left -= shares[org]
    return shares


class PredictionRecorder(threading.Thread):
    def __init__(self, sessions: SessionFactory, flush_s: float, max_waiting_rows: int = MAX_WAITING_ROWS) -> None:
        super().__init__(name="prediction-records", daemon=True)
        self.sessions = sessions
        self.flush_s = flush_s
        self.max_waiting_rows = max_waiting_rows
        self.dropped = 0
        # Requests add from their threads, this thread takes: the lock keeps the queues and every count below exact.
        self._lock = threading.Lock()
        self._queues: dict[str, OrgQueue] = {}  # the orgs with rows waiting, in their turn order
        self._waiting_rows = 0
        self._warned_at: dict[str, float] = {}
        self._unwarned_drops: dict[str, int] = {}
        self._stopping = threading.Event()

    def add(self, *, org_id: str, version: str, answers: list[dict[str, Any]], latency_ms: float) -> None:
        if not answers:
            return  # nothing to record; and an org waits in turn only with rows to write
        answered = Answered(org_id, version, answers, latency_ms, utcnow(), 0, len(answers))
        with self._lock:
            if self._has_room(org_id, answered.size):
                self._queues.setdefault(org_id, OrgQueue()).append(answered)
                self._waiting_rows += answered.size
                return
        self._drop(org_id, answered.size)

    def takes(self, org_id: str, rows: int) -> bool:
        """Whether `rows` records of the org would find room now; if not, they are dropped and counted here, and the
        request need not make them (a V2 request makes its records for them alone: 1.39M rows took 370 MB)."""
        with self._lock:
            if self._has_room(org_id, rows):
                return True
        self._drop(org_id, rows)
        return False

    def _drop(self, org_id: str, rows: int) -> None:
        with self._lock:
            self.dropped += rows
            warn_of = self._drops_to_warn_of(org_id, rows)
        if warn_of:
            log.warning(
                "dropped %d prediction records of org %s since the last such line for it: over %d rows wait to be "
                "written and the org has its share of them already (or twice as many wait); one such line per org "
                "every %.0f s at most",
                warn_of,
                org_id,
                self.max_waiting_rows,
                DROP_WARNING_INTERVAL_S,
            )

    def run(self) -> None:
        while not self._stopping.wait(self.flush_s):
            self.flush()
        self.flush()

    def stop(self) -> None:
        """Write what waits, for up to STOP_WAIT_S; what is not written by then (the database slow or away), the
        batch being written among it, is lost with the process, and said so."""
        self._stopping.set()
        self.join(timeout=STOP_WAIT_S)
        with self._lock:
            lost = self._waiting_rows
            self.dropped += lost
        if lost:
            log.error("stopping: %d prediction records were not written and are lost (the database is away)", lost)

    def flush(self) -> int:
        """Write what is waiting, in batches. The database out of reach: the batch is kept for the next pass. A batch
        the database refuses otherwise (a label longer than the column, say) is written part by part, and the parts
        it refuses are dropped and counted: kept, one of them would hold back every record after it."""
        written = 0
        while batch := self._take():
            try:
                written += self._write(batch)
                self._written(batch)
            except (OperationalError, InterfaceError, TimeoutError):
                log.warning("could not write prediction records; retrying later", exc_info=True)
                self._put_back(batch)
                break
            except DBAPIError:
                written += self._write_each(batch)
        return written

    def _has_room(self, org_id: str, rows: int) -> bool:
        """Under the limit, for anyone. Over it, only within the org's fair share: the limit split evenly among the
        orgs with rows waiting, itself counted, so that one org's volume never shuts out another; alone, an org's
        share is the whole limit. Never past twice the limit, which only orgs arriving one after another, each
        filling its share as it comes, could otherwise pass."""
        total = self._waiting_rows + rows
        if total <= self.max_waiting_rows:
            return True
        queue = self._queues.get(org_id)
        held = queue.rows if queue else 0
        orgs = len(self._queues) + (queue is None)
        return total <= 2 * self.max_waiting_rows and (held + rows) * orgs <= self.max_waiting_rows

    def _drops_to_warn_of(self, org_id: str, rows: int) -> int:
        """The org's rows dropped since its last warning, if another is due; else 0, and they wait for the next."""
        self._unwarned_drops[org_id] = self._unwarned_drops.get(org_id, 0) + rows
        now = time.monotonic()
        last = self._warned_at.get(org_id)
        if last is not None and now - last < DROP_WARNING_INTERVAL_S:
            return 0
        self._warned_at[org_id] = now
        return self._unwarned_drops.pop(org_id)

    def _write(self, batch: list[Answered]) -> int:
        with session_scope(self.sessions) as session:
            session.execute(insert(Prediction), [row for answered in batch for row in answered.rows()])
        return sum(answered.size for answered in batch)

    def _write_each(self, batch: list[Answered]) -> int:
        written = 0
        for index, answered in enumerate(batch):
            try:
                written += self._write([answered])
                self._written([answered])
            except (OperationalError, InterfaceError, TimeoutError):
                self._put_back(batch[index:])
                break
            except DBAPIError as error:
                self._written([answered])
                with self._lock:
                    self.dropped += answered.size
                log.error(
                    "dropped %d prediction records of org %s version %s that the database refused: %s",
                    answered.size,
                    answered.org_id,
                    answered.version,
                    error.orig,
                )
        return written

    def _take(self) -> list[Answered]:
        """Up to a batch of rows, shared fairly among the orgs waiting; each org served goes to the back of the turn,
        so that when more orgs wait than a batch has rows, the next batch begins with those left out."""
        with self._lock:
            waiting = {org_id: queue.rows for org_id, queue in self._queues.items()}
            batch: list[Answered] = []
            for org_id, rows in fair_shares(waiting, BATCH_ROWS).items():
                queue = self._queues.pop(org_id)
                batch += queue.take(rows)
                if queue.rows:
                    self._queues[org_id] = queue
        return batch

    def _written(self, parts: list[Answered]) -> None:
        """Rows taken are counted as waiting until they are written (or refused): while a write hangs on a database
        that is away, they are still in memory, and not yet written when the predictor stops."""
        with self._lock:
            self._waiting_rows -= sum(part.size for part in parts)

    def _put_back(self, batch: list[Answered]) -> None:
        """Records the database could not take now, queued again ahead of their orgs' later ones, whatever is
        waiting: they were counted in once, and are still counted."""
        parts: dict[str, list[Answered]] = {}
        for answered in batch:
            parts.setdefault(answered.org_id, []).append(answered)
        with self._lock:
            for org_id, taken in parts.items():
                self._queues.setdefault(org_id, OrgQueue()).put_back(taken)
