"""How a predictor process shares the room for waiting prediction records, and the rows of each batch, among orgs;
and what it tells the operator when it refuses an org room. Nothing here is written: the database is never reached."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from services.predictor import records
from services.predictor.records import PredictionRecorder
from shared.db.session import make_engine, make_session_factory

ANSWER = {"score": 0.9, "label": "failure", "riskLevel": "high"}


def recorder(max_waiting_rows: int) -> PredictionRecorder:
    return PredictionRecorder(make_session_factory(make_engine("sqlite://")), 60, max_waiting_rows)  # never started


def add(recorder: PredictionRecorder, org_id: str, rows: int) -> None:
    recorder.add(org_id=org_id, version="v1", answers=[ANSWER] * rows, latency_ms=1.0)


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    """What the recorder logs, each record once, whether Kiln's logging (which does not propagate) is set up or not."""
    kept = Kept()
    logger = logging.getLogger(records.__name__)
    logger.addHandler(kept)
    try:
        yield kept.records
    finally:
        logger.removeHandler(kept)


def drop_lines(logged: list[logging.LogRecord]) -> list[tuple[int, Any]]:
    return [(record.levelno, record.args) for record in logged if "dropped" in record.getMessage()]


def test_an_org_refused_room_is_logged_once_a_minute_with_all_it_lost_meanwhile(
    logged: list[logging.LogRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropped at the limit, records were counted but never logged: nothing said which org lost them."""
    full = recorder(max_waiting_rows=100)
    add(full, "alpha", 100)
    for _ in range(10):
        add(full, "alpha", 50)
    add(full, "beta", 60)  # over its share, half the limit with alpha waiting

    assert drop_lines(logged) == [(logging.WARNING, (50, "alpha", 100, 60)), (logging.WARNING, (60, "beta", 100, 60))]
    monkeypatch.setattr(records, "DROP_WARNING_INTERVAL_S", 0.0)  # the minute has passed
    add(full, "alpha", 50)
    assert drop_lines(logged)[2:] == [(logging.WARNING, (500, "alpha", 100, 0))]
    assert full.dropped == 610


def test_no_more_than_twice_the_limit_waits_whatever_order_the_orgs_come_in() -> None:
    """Each org admitted up to its share as it came, four orgs one after another would hold 2.08 times the limit,
    and more the more orgs came so."""
    full = recorder(max_waiting_rows=1200)
    for org_id, rows in (("alpha", 1200), ("beta", 600), ("gamma", 400), ("delta", 300)):
        add(full, org_id, rows)
    assert full.dropped == 300
    add(full, "delta", 200)
    assert full.dropped == 300


def test_a_batch_gives_light_orgs_all_they_wait_for_and_heavy_ones_the_rest_in_equal_parts() -> None:
    assert records.fair_shares({"alpha": 180_000, "beta": 20, "gamma": 3000}, 5000) == {
        "beta": 20,
        "alpha": 2490,
        "gamma": 2490,
    }
    assert records.fair_shares({"alpha": 10, "beta": 1}, 5000) == {"beta": 1, "alpha": 10}
    # More orgs waiting than a batch has rows: the first in turn get one each, the others come first next time.
    assert records.fair_shares({"alpha": 9, "beta": 1, "gamma": 1}, 2) == {"beta": 1, "alpha": 1}


def test_records_with_no_room_are_refused_before_a_request_makes_them_and_counted() -> None:
    """A V2 request makes its records for them alone: 1.39M rows over the limit took 370 MB, to be dropped."""
    full = recorder(max_waiting_rows=100)
    add(full, "alpha", 100)

    assert (full.takes("alpha", 50), full.takes("beta", 40), full.takes("beta", 60)) == (False, True, False)
    assert full.dropped == 110


def test_records_a_stopping_predictor_could_not_write_are_logged_and_counted_as_lost(
    logged: list[logging.LogRecord],
) -> None:
    """They went with the process, with no word and no count."""
    away = recorder(max_waiting_rows=100)  # its database has no predictions table: every write fails, and is kept
    away.flush_s = 0.01
    away.start()
    add(away, "alpha", 30)

    away.stop()

    assert away.dropped == 30
    assert [(r.levelno, r.getMessage()) for r in logged if r.getMessage().startswith("stopping")] == [
        (logging.ERROR, "stopping: 30 prediction records were not written and are lost (the database is away)")
    ]


class Hanging(PredictionRecorder):
    """A recorder whose database takes its writes, then fails them, after `hang_s`: as one that went away does."""

    hang_s = 1.0

    def _write(self, batch: list[records.Answered]) -> int:
        time.sleep(self.hang_s)
        raise OperationalError("INSERT", {}, Exception("the database is away"))


def test_records_in_a_write_still_hanging_when_the_predictor_stops_are_counted_as_lost(
    logged: list[logging.LogRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken out of the count as the write began, they were neither written nor said to be lost."""
    monkeypatch.setattr(records, "STOP_WAIT_S", 0.2)
    away = Hanging(make_session_factory(make_engine("sqlite://")), 0.01, 100)
    away.start()
    add(away, "alpha", 30)
    time.sleep(0.1)  # the write under way

    away.stop()

    assert away.dropped == 30
    assert [r.getMessage() for r in logged if r.getMessage().startswith("stopping")] == [
        "stopping: 30 prediction records were not written and are lost (the database is away)"
    ]
