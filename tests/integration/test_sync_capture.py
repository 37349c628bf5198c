"""The central store's capture triggers, on PostgreSQL and on SQLite: each edit by anyone but the sync service is
logged with the stamp it replaced, and versioned and stamped as it is made. And a local store's, made anew for
another key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, text

from services.sync.changes import (
    CENTRAL_LOG,
    LOCAL_LOG,
    begin_applying,
    create_log,
    end_applying,
    has_triggers,
    install_triggers,
)
from tests.support.servers import fresh_postgres_database

TABLE = "sync_src_readings"


@pytest.fixture(params=["postgresql", "sqlite"])
def central(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A central-like store: a synced table's central copy, its change log, the capture triggers."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'central.db'}")
        yield from _with_capture(engine)
        return
    with fresh_postgres_database() as url:
        yield from _with_capture(create_engine(url))


def _with_capture(engine: Engine) -> Iterator[Engine]:
    with engine.begin() as connection:
        connection.execute(
            text(
                f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, value FLOAT, "
                "_kiln_version BIGINT NOT NULL DEFAULT 0, _kiln_hlc VARCHAR(40))"
            )
        )
        create_log(connection, CENTRAL_LOG)
        install_triggers(connection, CENTRAL_LOG, table=TABLE, key="id", logged_as=TABLE)
        assert has_triggers(connection, CENTRAL_LOG, TABLE)
    yield engine
    engine.dispose()


def _run(connection: Connection, sql: str) -> list[tuple[Any, ...]]:
    result = connection.execute(text(sql))
    return [tuple(row) for row in result] if result.returns_rows else []


def test_an_edit_is_logged_with_the_stamp_it_replaced_and_versioned_and_stamped_as_it_is_made(
    central: Engine,
) -> None:
    with central.begin() as connection:
        _run(connection, f"INSERT INTO {TABLE} (id, value) VALUES (1, 1.0)")
    with central.begin() as connection:
        [(inserted_version, inserted_stamp)] = _run(connection, f"SELECT _kiln_version, _kiln_hlc FROM {TABLE}")
        _run(connection, f"UPDATE {TABLE} SET value = 2.0 WHERE id = 1")
    with central.begin() as connection:
        [(version, stamp)] = _run(connection, f"SELECT _kiln_version, _kiln_hlc FROM {TABLE}")
        logged = _run(connection, "SELECT pk, origin, replaced FROM sync_changes ORDER BY seq")

    assert (inserted_version, version) == (1, 2)
    assert inserted_stamp.endswith(".central") and stamp > inserted_stamp
    assert logged == [("1", "app", None), ("1", "app", inserted_stamp)]


def test_edits_within_one_clock_tick_order_by_their_counter(central: Engine) -> None:
    with central.begin() as connection:
        # A version the service wrote with a stamp far ahead of this clock: the next edits keep its time and count up.
        begin_applying(connection, CENTRAL_LOG)
        _run(connection, f"INSERT INTO {TABLE} VALUES (1, 1.0, 1, '999999999999999.00003.local')")
        end_applying(connection, CENTRAL_LOG)
    with central.begin() as connection:
        _run(connection, f"UPDATE {TABLE} SET value = 2.0")
        _run(connection, f"UPDATE {TABLE} SET value = 3.0")
        [(version, stamp)] = _run(connection, f"SELECT _kiln_version, _kiln_hlc FROM {TABLE}")

    assert (version, stamp) == (3, "999999999999999.00005.central")


def test_the_sync_services_own_writes_are_neither_logged_nor_restamped(central: Engine) -> None:
    with central.begin() as connection:
        begin_applying(connection, CENTRAL_LOG)
        _run(connection, f"INSERT INTO {TABLE} VALUES (1, 1.0, 7, '000000000000001.00000.local')")
        _run(connection, f"UPDATE {TABLE} SET value = 2.0")
        end_applying(connection, CENTRAL_LOG)
    with central.begin() as connection:
        assert _run(connection, f"SELECT _kiln_version, _kiln_hlc FROM {TABLE}") == [(7, "000000000000001.00000.local")]
        assert _run(connection, "SELECT count(*) FROM sync_changes") == [(0,)]


class _Failed(Exception):
    pass


def test_a_local_capture_made_anew_for_another_key_logs_by_it_and_is_one_change_with_its_transaction(
    central: Engine,
) -> None:
    """A table registered again by another key: its capture is made anew, and, rolled back, left as it was (SQLite
    runs DDL outside the transaction unless a write began one)."""
    with central.begin() as connection:
        _run(connection, "CREATE TABLE t (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE)")
        create_log(connection, LOCAL_LOG)
        install_triggers(connection, LOCAL_LOG, table="t", key="id", logged_as="t")
        _run(connection, "INSERT INTO t VALUES (1, 'a')")
    try:
        with central.begin() as connection:
            install_triggers(connection, LOCAL_LOG, table="t", key="code", logged_as="t")
            raise _Failed
    except _Failed:
        pass
    with central.begin() as connection:
        _run(connection, "INSERT INTO t VALUES (2, 'b')")
        install_triggers(connection, LOCAL_LOG, table="t", key="code", logged_as="t")
        assert has_triggers(connection, LOCAL_LOG, "t")
    with central.begin() as connection:
        _run(connection, "INSERT INTO t VALUES (3, 'c')")
        _run(connection, "UPDATE t SET id = 4 WHERE code = 'a'")
        _run(connection, "DELETE FROM t WHERE code = 'b'")
        logged = _run(connection, "SELECT pk FROM _kiln_changes ORDER BY seq")

    assert logged == [("1",), ("2",), ("c",), ("a",), ("b",)]
