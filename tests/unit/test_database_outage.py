"""The predictor's knowledge of a database outage: which requests may wait on the database, and when it is over."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy.exc import OperationalError

from services.predictor.outage import DatabaseOutage
from shared.errors import Unavailable
from tests.support.polling import eventually

PROBE_EVERY_S = 0.05
WAIT_S = 10.0


class Database:
    """What the outage's probe asks: out of reach until `back` is set; it counts the probes."""

    def __init__(self) -> None:
        self.back = threading.Event()
        self.probes = 0

    def answer(self) -> None:
        self.probes += 1
        if not self.back.is_set():
            raise OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))


@pytest.fixture
def database() -> Database:
    return Database()


@pytest.fixture
def outage(database: Database) -> Iterator[DatabaseOutage]:
    outage = DatabaseOutage(database.answer, probe_every_s=PROBE_EVERY_S)
    yield outage
    outage.close()


def fail_on_database(outage: DatabaseOutage) -> None:
    with pytest.raises(OperationalError), outage.attempt():
        raise OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))


def tries_the_database(outage: DatabaseOutage) -> bool:
    try:
        with outage.attempt():
            return True
    except Unavailable:
        return False


def test_a_database_that_answers_lets_every_request_try_it_and_other_errors_start_no_outage(
    outage: DatabaseOutage, database: Database
) -> None:
    with pytest.raises(ValueError, match="not the database's"), outage.attempt():
        raise ValueError("not the database's")
    with outage.attempt(), outage.attempt():  # two at once, as requests of one process are
        pass
    time.sleep(5 * PROBE_EVERY_S)
    assert database.probes == 0


def test_after_a_failed_wait_no_request_tries_the_database_while_it_is_out_of_reach(
    outage: DatabaseOutage, database: Database
) -> None:
    fail_on_database(outage)
    with pytest.raises(Unavailable, match="the database is unavailable") as refused, outage.attempt():
        pass
    assert refused.value.headers == {"Retry-After": "1"}
    assert eventually(lambda: database.probes >= 5)  # asked in the background, by no request
    assert not tries_the_database(outage)


def test_the_first_answer_to_the_probe_ends_the_outage_and_the_probing(
    outage: DatabaseOutage, database: Database
) -> None:
    fail_on_database(outage)
    assert eventually(lambda: database.probes >= 2)

    database.back.set()

    assert eventually(lambda: tries_the_database(outage), seconds=20 * PROBE_EVERY_S)
    probes = database.probes
    time.sleep(5 * PROBE_EVERY_S)
    assert database.probes == probes


def test_a_failed_wait_after_an_outage_ended_starts_another(outage: DatabaseOutage, database: Database) -> None:
    database.back.set()
    fail_on_database(outage)
    assert eventually(lambda: tries_the_database(outage))
    database.back.clear()

    fail_on_database(outage)

    assert not tries_the_database(outage)
    probes = database.probes
    assert eventually(lambda: database.probes > probes)
    database.back.set()
    assert eventually(lambda: tries_the_database(outage))


def test_a_closed_outage_probes_no_more(outage: DatabaseOutage, database: Database) -> None:
    fail_on_database(outage)
    assert eventually(lambda: database.probes >= 1)

    outage.close()

    time.sleep(2 * PROBE_EVERY_S)
    probes = database.probes
    time.sleep(5 * PROBE_EVERY_S)
    assert database.probes == probes
