"""The predictor's knowledge of a database outage: which requests may wait on the database, and when."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.exc import OperationalError

from services.predictor.outage import DatabaseOutage
from shared.errors import Unavailable

PERIOD_S = 1.0  # far longer than the few statements between a failure and the next check


def fail_on_database(outage: DatabaseOutage) -> None:
    with pytest.raises(OperationalError), outage.attempt():
        raise OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))


def test_a_database_that_answers_lets_every_request_try_it_and_other_errors_start_no_outage() -> None:
    outage = DatabaseOutage(PERIOD_S)
    with pytest.raises(ValueError, match="not the database's"), outage.attempt():
        raise ValueError("not the database's")
    with outage.attempt(), outage.attempt():  # two at once, as requests of one process are
        pass


def test_after_a_failed_wait_no_request_tries_the_database_for_the_period() -> None:
    outage = DatabaseOutage(PERIOD_S)
    fail_on_database(outage)
    with pytest.raises(Unavailable, match="the database is unavailable") as refused, outage.attempt():
        pass
    assert refused.value.headers == {"Retry-After": "1"}


def test_after_the_period_one_request_tries_again_while_the_others_still_go_without() -> None:
    outage = DatabaseOutage(PERIOD_S)
    fail_on_database(outage)
    time.sleep(PERIOD_S)
    with outage.attempt(), pytest.raises(Unavailable), outage.attempt():
        pass
    with outage.attempt(), outage.attempt():  # it answered: the outage is over
        pass


def test_a_failed_try_again_starts_another_period() -> None:
    outage = DatabaseOutage(PERIOD_S)
    fail_on_database(outage)
    time.sleep(PERIOD_S)
    fail_on_database(outage)
    with pytest.raises(Unavailable), outage.attempt():
        pass
    time.sleep(PERIOD_S)
    with outage.attempt():
        pass
