"""The predictor's knowledge of a database outage: which requests may wait on the database, and when it is over."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.exc import OperationalError

from services.predictor.outage import DatabaseOutage
from shared.errors import Unavailable
from tests.support.polling import eventually

PROBE_EVERY_S = 0.05
LONGEST_S = 0.4


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
    outage = DatabaseOutage(database.answer, longest_s=LONGEST_S, probe_every_s=PROBE_EVERY_S)
    yield outage
    outage.close()


def fail_on_database(outage: DatabaseOutage) -> None:
    with pytest.raises(OperationalError), outage.attempt():
        raise OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))


def fail_on_database_after(outage: DatabaseOutage, meanwhile: Callable[[], None]) -> None:
    """A request that fails on the database once `meanwhile` has happened beside it."""
    with outage.attempt():
        meanwhile()
        raise OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))


def tries_the_database_and_fails(outage: DatabaseOutage) -> bool:
    try:
        fail_on_database(outage)
    except Unavailable:
        return False
    return True


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


def test_a_database_that_answers_the_probe_but_fails_requests_is_tried_by_them_ever_more_rarely(
    outage: DatabaseOutage, database: Database
) -> None:
    database.back.set()
    tried_at = []
    until = time.monotonic() + 5 * LONGEST_S
    while time.monotonic() < until:
        if tries_the_database_and_fails(outage):
            tried_at.append(time.monotonic())
        time.sleep(0.005)

    gaps = [later - earlier for earlier, later in itertools.pairwise(tried_at)]
    assert gaps[-1] >= LONGEST_S
    assert len(tried_at) <= 10  # a try per probe would be 40


def test_an_outage_long_after_the_last_one_lasts_the_least_again(database: Database) -> None:
    outage = DatabaseOutage(database.answer, longest_s=2.0, probe_every_s=PROBE_EVERY_S)
    database.back.set()
    try:
        for _ in range(5):  # each at least twice as long as the one before: 0.05 s, 0.1 s, ... 0.8 s
            fail_on_database(outage)
            assert eventually(lambda: tries_the_database(outage))
        time.sleep(2.0)

        fail_on_database(outage)
        failed_at = time.monotonic()

        assert eventually(lambda: tries_the_database(outage))
        assert time.monotonic() - failed_at < 1.0  # the next after those five would last at least 1.6 s
    finally:
        outage.close()


def test_a_request_that_started_before_an_outage_ended_and_fails_after_it_starts_no_other(
    outage: DatabaseOutage, database: Database
) -> None:
    database.back.set()

    def an_outage_begins_and_ends() -> None:
        fail_on_database(outage)
        assert eventually(lambda: tries_the_database(outage))

    with pytest.raises(OperationalError):
        fail_on_database_after(outage, an_outage_begins_and_ends)

    assert tries_the_database(outage)


def test_with_no_thread_to_probe_the_database_requests_go_on_trying_it(
    outage: DatabaseOutage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(_: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)

    fail_on_database(outage)

    assert tries_the_database(outage)
