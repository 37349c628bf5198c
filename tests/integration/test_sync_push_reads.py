"""What a push reads of the local store, the change log and the records it names, read as one so that each record
goes up stamped from the change that left it as it is; and local writes made after that read, which go up next,
through the table's policy. On a SQLite and on a PostgreSQL local store."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Table, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import services.sync.transfer as transfer
from services.sync.context import SyncContext
from services.sync.pair import TablePair, hold_residency
from services.sync.stores import refuse_unnamed_keys
from tests.integration.postgres_sync_support import READINGS as PG_READINGS
from tests.integration.postgres_sync_support import TWO_READINGS as PG_TWO_READINGS
from tests.integration.postgres_sync_support import open_postgres_sync
from tests.integration.sync_support import Sync, choose, open_sync
from tests.support.polling import wait_until
from tests.support.servers import fresh_postgres_database

# The tests' batch size is 500: the first batch of a push after `edit_then_insert_499` ends just before the record's
# second edit.
NEW_RECORDS = ", ".join(f"({n}, 'pump-{n}', {n}.0, 'patient {n}')" for n in range(3, 502))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, store: str
) -> Iterator[Callable[[str], Sync]]:
    """An org syncing `readings` (records 1 and 2) of a local store of the kind `store` names, under a policy."""
    if store == "sqlite":
        yield lambda policy: open_sync(sync_api, sync_context, org_id, tmp_path, policy)
        return
    with fresh_postgres_database() as url:
        yield lambda policy: open_postgres_sync(
            sync_api, sync_context, org_id, url, policy, PG_READINGS, PG_TWO_READINGS
        )


def edit_then_insert_499(sync: Sync, edit: str) -> None:
    """Edit record 1 locally, then insert 499 records: the first push batch takes the edit and fills up."""
    sync.local(f"UPDATE readings SET {edit} WHERE id = 1")
    sync.local(f"INSERT INTO readings (id, device, value, patient) VALUES {NEW_RECORDS}")
    time.sleep(0.05)


def edit_centrally_between_two_local_edits_a_batch_apart(
    sync: Sync, first: str, central: str, second: str
) -> list[dict[str, Any]]:
    """Record 1 edited locally (`first`), then centrally, then locally again (`second`: the columns to set, or a
    DELETE statement) past the end of the first push batch; synced until both sides agree. Returns the two jobs."""
    sync.run()
    edit_then_insert_499(sync, first)
    sync.central(f"UPDATE {sync.central_table} SET {central} WHERE id = 1")
    time.sleep(0.05)
    sync.local(second if second.startswith("DELETE") else f"UPDATE readings SET {second} WHERE id = 1")
    return [sync.run(), sync.run()]


def record_1(sync: Sync) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    return (
        sync.local("SELECT device, value FROM readings WHERE id = 1"),
        sync.central(f"SELECT device, value FROM {sync.central_table} WHERE id = 1"),
    )


def the_other_records(sync: Sync) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every record but 1, (id, device, value), on each side."""
    return (
        sync.local("SELECT id, device, value FROM readings WHERE id <> 1 ORDER BY id"),
        sync.central(f"SELECT id, device, value FROM {sync.central_table} WHERE id <> 1 ORDER BY id"),
    )


# Records 2 to 501 as `edit_then_insert_499` leaves them: neither policy has any reason to touch them.
OTHER_RECORDS = [(2, "pump-2", 2.0)] + [(n, f"pump-{n}", float(n)) for n in range(3, 502)]


def audited_conflicts(sync: Sync) -> list[tuple[str, str]]:
    """The `sync.conflict` audit rows, as (target, outcome)."""
    entries = sync.api.get(f"/v1/orgs/{sync.org.org_id}/audit", headers=sync.org.admin).json()
    return [(e["target"], e["detail"]["outcome"]) for e in entries if e["action"] == "sync.conflict"]


def outcomes(sync: Sync) -> list[tuple[str, Any, Any]]:
    """Each conflict of record 1, the newest first, as (outcome, the local value, the central value); a deletion's
    value is None."""
    return [
        (c["outcome"], c["localVersion"].get("value"), c["centralVersion"].get("value"))
        for c in sync.conflicts()
        if c["recordKey"] == "1"
    ]


def test_field_merge_keeps_a_local_field_edit_made_after_a_central_one_and_past_the_end_of_a_push_batch(
    open_store: Callable[[str], Sync],
) -> None:
    """The first batch read record 1 holding its second edit (value 10.0) and stamped it from its first: the central
    value, edited in between, won the field, and the base saved made the local value look unchanged after."""
    sync = open_store("field-merge")

    edit_centrally_between_two_local_edits_a_batch_apart(sync, "device = 'pump-L'", "value = 99.0", "value = 10.0")

    assert record_1(sync) == ([("pump-L", 10.0)], [("pump-L", 10.0)])
    assert outcomes(sync) == [("merged", 10.0, 99.0)]


def test_last_writer_wins_records_no_conflict_lost_by_a_local_edit_past_the_end_of_a_push_batch_that_won(
    open_store: Callable[[str], Sync],
) -> None:
    """The first batch sent the second edit (20.0) stamped from the first: it lost to the central edit made in
    between, a conflict saying 20.0 lost though both sides end with it."""
    sync = open_store("last-writer-wins")

    edit_centrally_between_two_local_edits_a_batch_apart(sync, "value = 10.0", "value = 99.0", "value = 20.0")

    assert record_1(sync) == ([("pump-1", 20.0)], [("pump-1", 20.0)])
    assert outcomes(sync) == [("local-won", 20.0, 99.0)]


@pytest.mark.parametrize("keep", ["local", "central"])
@pytest.mark.parametrize(
    ("second", "latest"),
    [("value = 20.0", 20.0), ("DELETE FROM readings WHERE id = 1", None)],
    ids=["update", "deletion"],
)
def test_manual_holds_one_conflict_with_a_local_change_made_past_the_end_of_a_push_batch_until_a_choice_settles_it(
    open_store: Callable[[str], Sync], second: str, latest: float | None, keep: str
) -> None:
    """Record 1 edited locally (10.0), centrally (99.0), then changed locally again past the end of the first push
    batch (20.0, or deleted): one conflict waits for review holding the local store's latest version against the
    central one, neither side moving and no record lost, until the reviewer's choice is written to both sides.
    (Had the first batch sent the record, the conflict held there would have taken in the later change as it joined:
    what the user sees is the same, so it is the append-only test below that pins the record being left out.)"""
    sync = open_store("manual")

    jobs = edit_centrally_between_two_local_edits_a_batch_apart(sync, "value = 10.0", "value = 99.0", second)

    [held] = sync.conflicts("open")
    assert (held["recordKey"], held["outcome"]) == ("1", "held")
    assert outcomes(sync) == [("held", latest, 99.0)]
    assert [job["conflicts"] for job in jobs] == [1, 0]
    local_latest = [] if latest is None else [("pump-1", latest)]
    assert record_1(sync) == (local_latest, [("pump-1", 99.0)])
    assert the_other_records(sync) == (OTHER_RECORDS, OTHER_RECORDS)

    choose(sync, held["conflictId"], keep)
    sync.run()
    sync.run()

    kept = local_latest if keep == "local" else [("pump-1", 99.0)]
    assert record_1(sync) == (kept, kept)
    assert the_other_records(sync) == (OTHER_RECORDS, OTHER_RECORDS)
    assert outcomes(sync) == [(f"kept-{keep}", latest, 99.0)]  # the version not kept stays in the conflict
    assert sync.conflicts("open") == []
    assert audited_conflicts(sync) == [("readings/1", "held")]


@pytest.mark.parametrize(
    ("second", "outcome", "refused"),
    [("value = 20.0", "update-refused", 20.0), ("DELETE FROM readings WHERE id = 1", "delete-refused", None)],
    ids=["update", "deletion"],
)
def test_append_only_refuses_local_changes_around_a_central_edit_and_past_the_end_of_a_push_batch_in_one_conflict(
    open_store: Callable[[str], Sync], second: str, outcome: str, refused: float | None
) -> None:
    """Record 1 updated locally (10.0), centrally (99.0), then changed locally again past the end of the first push
    batch: refused once, with the local store's latest change and the central edit kept in the conflict and
    audited, and the first version back on both sides. (Sent by the first batch, stamped from the first edit, the
    record was refused there and then again in the next batch, against the first version the first had restored.)"""
    sync = open_store("append-only")

    jobs = edit_centrally_between_two_local_edits_a_batch_apart(sync, "value = 10.0", "value = 99.0", second)

    assert record_1(sync) == ([("pump-1", 1.0)], [("pump-1", 1.0)])
    assert sync.local("SELECT patient FROM readings WHERE id = 1") == [("Ada Lovelace",)]
    assert the_other_records(sync) == (OTHER_RECORDS, OTHER_RECORDS)
    [conflict] = sync.conflicts()
    assert (conflict["recordKey"], conflict["status"], conflict["outcome"], conflict["kept"]["value"]) == (
        "1",
        "resolved",
        outcome,
        1.0,
    )
    assert outcomes(sync) == [(outcome, refused, 99.0)]
    assert [job["conflicts"] for job in jobs] == [1, 0]
    assert audited_conflicts(sync) == [("readings/1", outcome)]


def test_last_writer_wins_keeps_a_central_edit_made_after_a_local_deletion_past_the_end_of_a_push_batch(
    open_store: Callable[[str], Sync],
) -> None:
    """The first batch found record 1 deleted and stamped the deletion from the edit before it: it lost to the later
    central edit, the record was not put back (written locally since), and the next batch deleted it centrally."""
    sync = open_store("last-writer-wins")
    sync.run()
    edit_then_insert_499(sync, "value = 10.0")
    sync.local("DELETE FROM readings WHERE id = 1")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")

    sync.run()
    sync.run()

    assert record_1(sync) == ([("pump-1", 99.0)], [("pump-1", 99.0)])
    assert outcomes(sync) == [("central-won", None, 99.0)]


def write_without_waiting(sync: Sync, store: str, sql: str) -> str:
    """Run `sql` as the application would, except that it does not wait for a lock: "" once it ran, or why not."""
    if store == "sqlite":
        with sqlite3.connect(sync.local_path, timeout=0) as connection:
            try:
                connection.execute(sql)
            except sqlite3.OperationalError as error:
                return str(error)
        return ""
    engine = create_engine(sync.local_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text("SET LOCAL lock_timeout = '100ms'"))
            connection.execute(text(sql))
    except OperationalError as error:
        return str(error.orig)
    finally:
        engine.dispose()
    return ""


def test_an_application_write_waits_while_a_push_reads_the_local_store_so_no_record_is_sent_newer_than_its_stamp(
    open_store: Callable[[str], Sync], store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write landing between the push's read of the log and its read of the records would go up stamped from an
    earlier change; one that kept landing there would keep its record from going up at all, had such records
    been left for a later batch."""
    sync = open_store("last-writer-wins")
    sync.run()
    sync.local("UPDATE readings SET value = 10.0 WHERE id = 1")
    refused: list[str] = []

    def write_between_the_reads(connection: Connection, table: Table, column: str) -> None:
        if not refused:
            refused.append(write_without_waiting(sync, store, "UPDATE readings SET value = 20.0 WHERE id = 1"))
        refuse_unnamed_keys(connection, table, column)

    monkeypatch.setattr(transfer, "refuse_unnamed_keys", write_between_the_reads)
    sync.run()

    [reason] = refused
    assert "lock" in reason  # SQLite: "database is locked"; PostgreSQL: "canceling statement due to lock timeout"
    assert record_1(sync) == ([("pump-1", 10.0)], [("pump-1", 10.0)])


def waiting_for_the_log(sync: Sync) -> int:
    """How many connections to the local PostgreSQL database wait for an advisory lock: the change log's."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'advisory'"
    return int(sync.local(query)[0][0])


@pytest.mark.parametrize("store", ["postgresql"])
def test_an_application_write_of_a_record_a_push_is_reading_waits_for_the_read_and_lands(
    open_store: Callable[[str], Sync], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the write locks its record, then waits for the change log the push holds while it reads: had
    the push's read locked the record too, each would have waited for the other, and the server failed one."""
    sync = open_store("last-writer-wins")
    sync.run()
    sync.local("UPDATE readings SET value = 10.0 WHERE id = 1")
    failed: list[Exception] = []

    def application_write() -> None:
        try:
            sync.local("UPDATE readings SET value = 20.0 WHERE id = 1")
        except Exception as error:
            failed.append(error)

    application = threading.Thread(target=application_write)

    def written_while_the_log_is_held(connection: Connection, table: Table, column: str) -> None:
        if not application.is_alive() and application.ident is None:
            application.start()
            wait_until(lambda: waiting_for_the_log(sync) == 1 or not application.is_alive())
        refuse_unnamed_keys(connection, table, column)

    monkeypatch.setattr(transfer, "refuse_unnamed_keys", written_while_the_log_is_held)
    job = sync.run()
    application.join()
    sync.run()

    assert (job["status"], failed) == ("succeeded", [])
    assert record_1(sync) == ([("pump-1", 20.0)], [("pump-1", 20.0)])


def test_last_writer_wins_keeps_a_central_edit_made_after_a_local_reinsert_that_followed_a_deletion_the_push_read(
    open_store: Callable[[str], Sync], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The push read record 1 deleted; the application inserted it again, then the central store edited it. The
    deletion lost, the insert kept the record from being restored, and the next push copied that older insert over
    the central edit, with no conflict."""
    sync = open_store("last-writer-wins")
    sync.run()
    sync.local("DELETE FROM readings WHERE id = 1")
    time.sleep(0.05)
    written: list[bool] = []

    def inserted_again_then_edited_centrally(session: Session, pair: TablePair) -> None:
        if not written:
            written.append(True)
            sync.local("INSERT INTO readings VALUES (1, 'pump-R', 5.0, 'Grace Hopper')")
            time.sleep(0.05)
            sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")
        hold_residency(session, pair)

    monkeypatch.setattr(transfer, "hold_residency", inserted_again_then_edited_centrally)
    sync.run()
    sync.run()

    assert record_1(sync) == ([("pump-1", 99.0)], [("pump-1", 99.0)])
    assert outcomes(sync) == [("central-won", 5.0, 99.0), ("central-won", None, 99.0)]  # the newest first
