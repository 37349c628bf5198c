"""A PostgreSQL database as the local store: records both ways with the central PostgreSQL, and conflicts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from services.sync import deletions, jobs
from services.sync.context import SyncContext
from services.sync.envelope import load_keyring
from services.sync.jobs import run_job
from shared.db.session import session_scope
from tests.integration.conftest import create_org_with_keys
from tests.integration.postgres_sync_support import READINGS, TWO_READINGS, open_postgres_sync
from tests.integration.sync_support import (
    LOCAL_ONLY,
    Sync,
    a_job_cut_off_before_its_pull_is_acknowledged,
    central_copies,
    error_of,
    register,
    run_sql,
)
from tests.support.polling import start_until_it_waits_for_a_lock
from tests.support.servers import fresh_postgres_database


@pytest.fixture
def local_url() -> Iterator[str]:
    """The local store: a second, fresh PostgreSQL database beside the central one."""
    with fresh_postgres_database() as url:
        yield url


NOTES: dict[str, Any] = {"name": "notes", "primaryKey": "id", "sensitiveColumns": []}


def test_records_go_both_ways_between_a_postgresql_local_store_and_the_central_one(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", READINGS, TWO_READINGS)

    first = sync.run()
    sync.local("INSERT INTO readings VALUES (3, 'pump-3', 3.0, 'Grace Hopper')")
    sync.central(f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 2")
    second = sync.run()
    third = sync.run()

    assert [(job["status"], job["pushed"], job["pulled"]) for job in (first, second, third)] == [
        ("succeeded", 2, 0),
        ("succeeded", 1, 1),
        ("succeeded", 0, 0),
    ]
    assert sync.local("SELECT id, device, value, patient FROM readings ORDER BY id") == [
        (1, "pump-1", 1.0, "Ada Lovelace"),
        (2, "pump-2", 20.0, "Alan Turing"),
        (3, "pump-3", 3.0, "Grace Hopper"),
    ]
    # The local log holds the application's writes only: the record pulled down is not sent back up.
    assert sync.local("SELECT pk FROM _kiln_changes ORDER BY seq") == [("1",), ("2",), ("3",)]
    central = sync.central(f"SELECT id, value, patient, _kiln_version FROM {sync.central_table} ORDER BY id")
    assert [(row[0], row[1], row[3]) for row in central] == [(1, 1.0, 1), (2, 20.0, 2), (3, 3.0, 1)]
    assert not any("Hopper" in row[2] or "Turing" in row[2] for row in central)


def test_last_writer_wins_between_a_postgresql_local_store_and_the_central_one(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", READINGS, TWO_READINGS)
    sync.run()
    sync.local("UPDATE readings SET value = 10.0 WHERE id = 1")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")
    sync.central(f"UPDATE {sync.central_table} SET value = 77.0 WHERE id = 2")
    time.sleep(0.05)
    sync.local("UPDATE readings SET value = 22.0 WHERE id = 2")

    job = sync.run()
    sync.run()

    assert job["conflicts"] == 2
    assert sync.local("SELECT id, value FROM readings ORDER BY id") == [(1, 99.0), (2, 22.0)]
    assert sync.central(f"SELECT id, value FROM {sync.central_table} ORDER BY id") == [(1, 99.0), (2, 22.0)]
    outcomes = {
        c["recordKey"]: (c["outcome"], c["localVersion"]["value"], c["centralVersion"]["value"])
        for c in sync.conflicts()
    }
    assert outcomes == {"1": ("central-won", 10.0, 99.0), "2": ("local-won", 22.0, 77.0)}


# A table with a time and a decimal, and one reading in it.
TIMED_READING = (
    "CREATE TABLE readings (id text PRIMARY KEY, taken timestamptz, dose numeric(6, 2), note text, patient text)",
    "INSERT INTO readings VALUES ('r-1', '2026-01-02T03:04:05Z', 1.50, 'first', 'Ada Lovelace')",
)


def test_field_merge_compares_timestamp_and_numeric_fields_with_their_base(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    sync = open_postgres_sync(
        sync_api,
        sync_context,
        org_id,
        local_url,
        "field-merge",
        *TIMED_READING,
    )
    sync.run()
    sync.local("UPDATE readings SET note = 'checked' WHERE id = 'r-1'")
    sync.central(f"UPDATE {sync.central_table} SET dose = 2.25 WHERE id = 'r-1'")

    sync.run()
    sync.run()

    [(taken, dose, note)] = sync.local("SELECT taken, dose, note FROM readings")
    assert (taken.isoformat(), dose, note) == ("2026-01-02T03:04:05+00:00", Decimal("2.25"), "checked")
    assert sync.central(f"SELECT dose, note FROM {sync.central_table}") == [(Decimal("2.25"), "checked")]
    [conflict] = sync.conflicts()
    assert (conflict["outcome"], datetime.fromisoformat(conflict["localVersion"]["taken"]).year) == ("merged", 2026)


@pytest.fixture
def tokyo_local_url(local_url: str) -> str:
    """The local store, on a server that reads times in Tokyo's zone (the central one reads them at UTC)."""
    run_sql(local_url, f"ALTER DATABASE \"{make_url(local_url).database}\" SET timezone TO 'Asia/Tokyo'")
    return local_url


def a_field_merged_reading(sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str) -> Sync:
    """A reading synced both ways, its base saved from the central record that came down."""
    sync = open_postgres_sync(
        sync_api,
        sync_context,
        org_id,
        local_url,
        "field-merge",
        *TIMED_READING,
    )
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET note = 'central' WHERE id = 'r-1'")
    assert sync.run()["pulled"] == 1
    return sync


def edit_both_sides_and_sync(sync: Sync) -> None:
    """The central side changes the time, the local one the dose, later."""
    sync.central(f"UPDATE {sync.central_table} SET taken = '2030-05-05T05:05:05Z' WHERE id = 'r-1'")
    sync.local("UPDATE readings SET dose = 9.99 WHERE id = 'r-1'")
    sync.run()
    sync.run()


def test_field_merge_keeps_a_central_time_edit_when_the_local_server_reads_times_in_another_zone(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tokyo_local_url: str
) -> None:
    """The local time, unchanged, reads 12:04:05+09:00 where its base says 03:04:05+00:00: the same instant."""
    sync = a_field_merged_reading(sync_api, sync_context, org_id, tokyo_local_url)

    edit_both_sides_and_sync(sync)

    expected = [(datetime.fromisoformat("2030-05-05T05:05:05+00:00"), Decimal("9.99"), "central")]
    assert sync.local("SELECT taken, dose, note FROM readings") == expected
    assert sync.central(f"SELECT taken, dose, note FROM {sync.central_table}") == expected
    [conflict] = sync.conflicts()
    assert conflict["outcome"] == "merged", conflict


def test_field_merge_compares_a_base_kept_with_another_zones_offset_as_the_instant_it_names(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tokyo_local_url: str
) -> None:
    """Bases saved before times were kept at UTC have them at the offset of the server that read them."""
    sync = a_field_merged_reading(sync_api, sync_context, org_id, tokyo_local_url)
    sync.central(
        "UPDATE sync_bases SET row = jsonb_set(row, '{taken}', '\"2026-01-02T12:04:05+09:00\"') WHERE source_id = :s",
        {"s": sync.source_id},
    )

    edit_both_sides_and_sync(sync)

    expected = [(datetime.fromisoformat("2030-05-05T05:05:05+00:00"), Decimal("9.99"), "central")]
    assert sync.local("SELECT taken, dose, note FROM readings") == expected
    assert sync.central(f"SELECT taken, dose, note FROM {sync.central_table}") == expected


@pytest.mark.parametrize("policy", ["last-writer-wins", "field-merge"])
def test_uuid_and_interval_fields_pass_through_deletions_conflicts_and_bases(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str, policy: str
) -> None:
    """Kept as JSON (a deletion's audit row, a conflict, a field-merge base), a UUID or a timedelta had no JSON form:
    the job failed, and every job after it, for good."""
    sync = open_postgres_sync(
        sync_api,
        sync_context,
        org_id,
        local_url,
        policy,
        "CREATE TABLE notes (id integer PRIMARY KEY, ref uuid, span interval, body text)",
        "INSERT INTO notes VALUES (1, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1 hour', 'x'), "
        "(2, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', '1 day 2 hours 0.000005 seconds', 'y')",
        **NOTES,
    )
    assert sync.run()["status"] == "succeeded"
    sync.local("DELETE FROM notes WHERE id = 1")
    sync.local("UPDATE notes SET body = 'local' WHERE id = 2")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET span = interval '3 hours' WHERE id = 2")

    jobs = [sync.run(), sync.run()]

    assert [(job["status"], error_of(job)) for job in jobs] == [("succeeded", ""), ("succeeded", "")]
    # Last writer wins: the later central edit, whole; field-merge: each side's change.
    expected_body = "local" if policy == "field-merge" else "y"
    [(span,)] = sync.central("SELECT interval '3 hours'")
    ref = UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12")
    assert sync.local("SELECT id, ref, span, body FROM notes") == [(2, ref, span, expected_body)]
    assert sync.central(f"SELECT id, ref, span, body FROM {sync.central_table}") == [(2, ref, span, expected_body)]
    [conflict] = sync.conflicts()
    assert conflict["localVersion"]["ref"] == str(ref)
    assert conflict["localVersion"]["span"] == "P1DT7200.000005S"
    assert conflict["centralVersion"]["span"] == "P0DT10800.000000S"


def test_a_central_deletion_cut_off_before_its_audit_is_audited_with_its_uuid_and_interval_fields_as_they_were(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    local_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pull's note of the deleted record keeps each value's type until the retry audits it: an interval had no
    form there, and every pull of the table failed from then on."""
    sync = open_postgres_sync(
        sync_api,
        sync_context,
        org_id,
        local_url,
        "last-writer-wins",
        "CREATE TABLE notes (id integer PRIMARY KEY, ref uuid, span interval, body text)",
        "INSERT INTO notes VALUES (1, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1 hour', 'x'), "
        "(2, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', '1 day 2 hours 0.000005 seconds', 'y')",
        **{**NOTES, "sensitiveColumns": ["span"]},
    )
    assert sync.run()["status"] == "succeeded"
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")
    job_id = a_job_cut_off_before_its_pull_is_acknowledged(sync, monkeypatch)

    assert run_job(sync_context, job_id) == "succeeded"

    assert sync.local("SELECT id FROM notes") == [(1,)]
    [(detail,)] = sync.central(
        "SELECT detail FROM audit_log WHERE org_id = :o AND action = 'sync.delete'", {"o": sync.org.org_id}
    )
    with session_scope(sync_context.sessions) as session:
        keyring = load_keyring(session, sync_context.secrets, org_id)
    deleted = detail["deleted"]
    assert (deleted["ref"], deleted["body"]) == ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12", "y")
    assert keyring.open(deleted["span"], column="notes.span") == timedelta(days=1, hours=2, microseconds=5)


@pytest.mark.parametrize("policy", ["last-writer-wins", "field-merge"])
def test_arrays_of_numbers_and_intervals_sync_through_bases_conflicts_and_deletions_sealed_or_not(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str, policy: str
) -> None:
    """A numeric[] or interval[] field had no JSON form in a base, a conflict, an audit row or a deletion's note:
    the table's jobs failed for good; sealed, its items came back as text the column refused."""
    sync = open_postgres_sync(
        sync_api,
        sync_context,
        org_id,
        local_url,
        policy,
        "CREATE TABLE notes (id integer PRIMARY KEY, amounts numeric[], spans interval[], body text)",
        "INSERT INTO notes VALUES (1, '{1.5,2.25}', '{{1 hour},{2 days}}', 'x'), (2, '{3.5}', '{2 hours}', 'y')",
        **{**NOTES, "sensitiveColumns": ["amounts"]},
    )
    assert sync.run()["status"] == "succeeded"
    sync.local("UPDATE notes SET body = 'local' WHERE id = 1")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET spans = '{{{{3 hours}},{{1 day}}}}' WHERE id = 1")
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")

    jobs = [sync.run(), sync.run()]

    assert [(job["status"], error_of(job)) for job in jobs] == [("succeeded", ""), ("succeeded", "")]
    body = "local" if policy == "field-merge" else "x"
    spans = [[timedelta(hours=3)], [timedelta(days=1)]]
    assert sync.local("SELECT id, amounts, spans, body FROM notes") == [
        (1, [Decimal("1.5"), Decimal("2.25")], spans, body)
    ]
    [(deleted,)] = sync.central(
        "SELECT detail -> 'deleted' FROM audit_log WHERE org_id = :o AND action = 'sync.delete'", {"o": sync.org.org_id}
    )
    assert deleted["spans"] == ["P0DT7200.000000S"]


def test_field_merge_keeps_a_local_change_to_a_sensitive_timestamp_beside_a_later_central_one(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    """The base holds the sealed timestamp; opened, it is compared in the same form as both sides' values."""
    run_sql(local_url, "CREATE TABLE readings (id text PRIMARY KEY, taken timestamptz, note text, patient text)")
    run_sql(local_url, "INSERT INTO readings VALUES ('r-1', '2026-01-02T03:04:05Z', 'first', 'Ada Lovelace')")
    org = create_org_with_keys(sync_api, org_id)
    source_id = register(sync_api, org, local_url, "field-merge", sensitiveColumns=["taken", "patient"])
    sync = Sync(sync_api, sync_context, org, local_url, source_id, sync_context.settings.resolved_database_url)
    sync.run()
    sync.local("UPDATE readings SET taken = '2026-03-04T05:06:07Z' WHERE id = 'r-1'")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET note = 'checked' WHERE id = 'r-1'")  # the later edit

    sync.run()
    sync.run()

    [(taken, note)] = sync.local("SELECT taken, note FROM readings")
    assert (taken.isoformat(), note) == ("2026-03-04T05:06:07+00:00", "checked")
    [conflict] = sync.conflicts()
    assert conflict["outcome"] == "merged"
    assert (
        "overlappingFields"
        not in sync.central(
            "SELECT detail FROM audit_log WHERE action = 'sync.conflict' AND org_id = :o", {"o": org_id}
        )[0][0]
    )


def test_sensitive_numeric_timestamp_date_and_bytea_columns_come_back_as_they_were_sealed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    run_sql(
        local_url,
        "CREATE TABLE labs (id integer PRIMARY KEY, dose numeric(6, 2), taken timestamptz, born date, scan bytea, "
        "ward text)",
    )
    run_sql(local_url, "INSERT INTO labs VALUES (1, 12.50, '2026-01-02T03:04:05Z', '1815-12-10', '\\x00ff', 'A')")
    org = create_org_with_keys(sync_api, org_id)
    sensitive = ["dose", "taken", "born", "scan"]
    source_id = register(sync_api, org, local_url, "last-writer-wins", name="labs", sensitiveColumns=sensitive)
    sync = Sync(sync_api, sync_context, org, local_url, source_id, sync_context.settings.resolved_database_url)
    before = sync.local("SELECT * FROM labs")

    pushed = sync.run()
    central_table = f"sync_{source_id}_labs"
    sync.central(f"UPDATE {central_table} SET ward = 'B' WHERE id = 1")
    pulled = sync.run()

    assert (pushed["status"], pushed["pushed"], pulled["status"], pulled["pulled"]) == ("succeeded", 1, "succeeded", 1)
    [(_, dose, taken, born, scan, ward)] = sync.local("SELECT * FROM labs")
    assert (dose, taken, born, bytes(scan), ward) == (*before[0][1:4], bytes(before[0][4]), "B")
    assert (type(dose), type(taken), type(born)) == (Decimal, datetime, date)
    [sealed] = sync.central(f"SELECT dose, taken, born, scan FROM {central_table}")
    assert not any(plain in value for value in sealed for plain in ("12.5", "2026", "1815"))


def test_sensitive_nan_and_infinities_come_back_as_they_were_sealed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    sync = open_postgres_sync(
        sync_api,
        sync_context,
        org_id,
        local_url,
        "last-writer-wins",
        "CREATE TABLE readings (id integer PRIMARY KEY, device text, value double precision, patient float8)",
        "INSERT INTO readings VALUES (1, 'a', 1, 'NaN'), (2, 'b', 2, 'Infinity'), (3, 'c', 3, '-Infinity')",
    )
    assert sync.run()["status"] == "succeeded"
    sync.central(f"UPDATE {sync.central_table} SET device = device || '!'")  # all three come down again

    job = sync.run()

    assert (job["status"], job["pulled"]) == ("succeeded", 3)
    assert sync.local("SELECT id, device, patient::text FROM readings ORDER BY id") == [
        (1, "a!", "NaN"),
        (2, "b!", "Infinity"),
        (3, "c!", "-Infinity"),
    ]


def test_a_postgresql_local_table_and_key_named_by_reserved_words_sync_both_ways(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    run_sql(local_url, 'CREATE TABLE "user" ("order" integer PRIMARY KEY, "my col" text)')
    run_sql(local_url, """INSERT INTO "user" VALUES (1, 'a')""")
    sync = open_postgres_sync(
        sync_api,
        sync_context,
        org_id,
        local_url,
        "last-writer-wins",
        name="user",
        primaryKey="order",
        sensitiveColumns=[],
    )
    assert sync.run()["status"] == "succeeded"
    sync.local("""INSERT INTO "user" VALUES (2, 'b')""")
    sync.run()
    sync.central(f"""UPDATE {sync.central_table} SET "my col" = 'central' WHERE "order" = 1""")

    job = sync.run()

    assert (job["status"], job["pulled"]) == ("succeeded", 1)
    assert sync.local('SELECT * FROM "user" ORDER BY 1') == [(1, "central"), (2, "b")]
    assert sync.central(f'SELECT "order", "my col" FROM {sync.central_table} ORDER BY 1') == [(1, "central"), (2, "b")]


@pytest.mark.parametrize("policy", ["last-writer-wins", "field-merge", "manual"])
def test_text_keys_of_any_length_sync_and_the_applications_own_writes_still_land(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str, policy: str
) -> None:
    key = "device/" + "x" * 300
    run_sql(local_url, "CREATE TABLE notes (id text PRIMARY KEY, body text)")
    run_sql(local_url, "INSERT INTO notes VALUES (:k, 'first')", {"k": key})
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, policy, **NOTES)
    assert sync.run()["status"] == "succeeded"

    sync.local("UPDATE notes SET body = 'local' WHERE id = :k", {"k": key})  # the local application's write
    sync.central(f"UPDATE {sync.central_table} SET body = 'central' WHERE id = :k", {"k": key})  # the central one's
    job = sync.run()
    if policy == "manual":
        [held] = sync.conflicts("open")
        assert held["recordKey"] == key
        decided = sync_api.post(
            f"/v1/orgs/{org_id}/conflicts/{held['conflictId']}", json={"keep": "central"}, headers=sync.org.admin
        )
        assert decided.status_code == 200, decided.text
        job = sync.run()

    assert job["status"] == "succeeded", job
    assert sync.local("SELECT id, body FROM notes") == sync.central(f"SELECT id, body FROM {sync.central_table}")


@pytest.mark.parametrize(
    ("declared", "keys", "shown"),
    [
        ("timestamptz", "('2024-01-01 00:00:00+00'), ('2024-01-02 10:00:00.5+00')", "TIMESTAMP WITH TIME ZONE"),
        ("numeric", "(0.0000001), (1.50)", "NUMERIC"),
        ("double precision", "(0.30000000000000004), (1e15)", "DOUBLE PRECISION"),
        ("char(5)", "('ab'), ('abcde')", "CHAR(5)"),
    ],
    ids=["timestamptz", "numeric", "float8", "char"],
)
def test_a_postgresql_table_keyed_by_a_type_the_change_log_cannot_name_exactly_fails_its_job_and_installs_nothing(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str, declared: str, keys: str, shown: str
) -> None:
    """The trigger logs key::text ('2024-01-01 00:00:00+00', '1e-07', 'ab' for char(5)'s 'ab   ') where the service
    names a record by Python's str(): those records were taken for deleted on both sides and never synced, while
    the job succeeded."""
    run_sql(local_url, f"CREATE TABLE notes (id {declared} PRIMARY KEY, body text)")
    run_sql(local_url, f"INSERT INTO notes (id) VALUES {keys}")
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", **NOTES)

    job = sync.run()

    assert (job["status"], job["pushed"], error_of(job)) == (
        "failed",
        0,
        f"table 'notes': its primary key 'id' is {shown}, a type whose values the sync service cannot name exactly "
        "(two records could be taken for one, or a record for none); a synced table's key is an integer or text "
        "column (or a uuid, between PostgreSQL stores)",
    )
    assert sync.local("SELECT tgname FROM pg_trigger WHERE tgrelid = 'notes'::regclass") == []
    assert sync.central("SELECT to_regclass(:t) IS NULL", {"t": sync.central_table}) == [(True,)]


def test_uuid_keys_sync_both_ways_between_postgresql_stores(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    first, second = UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), UUID("b1eebc99-9c0b-4ef8-bb6d-6bb9bd380a12")
    run_sql(local_url, "CREATE TABLE notes (id uuid PRIMARY KEY, body text)")
    # Spelled otherwise, as PostgreSQL takes a uuid: its text in the change log is its one canonical form.
    spelled = {"a": str(first).upper(), "b": "{" + str(second) + "}"}
    run_sql(local_url, "INSERT INTO notes VALUES (CAST(:a AS uuid), 'a'), (CAST(:b AS uuid), 'b')", spelled)
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", **NOTES)
    pushed = sync.run()
    sync.central(f"UPDATE {sync.central_table} SET body = 'central' WHERE id = :k", {"k": second})
    sync.local("UPDATE notes SET body = 'local' WHERE id = :k", {"k": first})

    both = sync.run()

    assert (pushed["status"], pushed["pushed"], both["status"], both["pushed"], both["pulled"]) == (
        "succeeded",
        2,
        "succeeded",
        1,
        1,
    )
    records = [(first, "local"), (second, "central")]
    assert sync.local("SELECT id, body FROM notes ORDER BY id") == records
    assert sync.central(f"SELECT id, body FROM {sync.central_table} ORDER BY id") == records


def test_a_change_log_an_earlier_version_made_takes_keys_of_any_length(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    run_sql(
        local_url,
        "CREATE TABLE _kiln_changes (seq BIGSERIAL PRIMARY KEY, tbl VARCHAR(64) NOT NULL, pk VARCHAR(200) NOT NULL,"
        " origin VARCHAR(8) NOT NULL, at_ms BIGINT NOT NULL)",
    )
    run_sql(local_url, "CREATE TABLE notes (id text PRIMARY KEY, body text)")
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", **NOTES)
    assert sync.run()["status"] == "succeeded"

    sync.local("INSERT INTO notes VALUES (:k, 'long')", {"k": "k" * 500})  # refused by the old log's trigger

    assert sync.run()["pushed"] == 1


def test_a_central_edit_a_postgresql_local_store_refuses_is_kept_in_a_conflict_and_the_rest_goes_down(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    run_sql(local_url, "CREATE TABLE notes (id integer PRIMARY KEY, body text NOT NULL)")
    run_sql(local_url, "INSERT INTO notes VALUES (1, 'a'), (2, 'b')")
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", **NOTES)
    assert sync.run()["status"] == "succeeded"
    sync.central(f"UPDATE {sync.central_table} SET body = NULL WHERE id = 1")
    sync.central(f"UPDATE {sync.central_table} SET body = 'central' WHERE id = 2")

    job = sync.run()

    assert (job["status"], job["pulled"], job["conflicts"]) == ("succeeded", 1, 1), job
    assert sync.local("SELECT id, body FROM notes ORDER BY id") == [(1, "a"), (2, "central")]
    assert sync.central(f"SELECT id, body FROM {sync.central_table} ORDER BY id") == [(1, "a"), (2, "central")]


def test_a_down_only_table_holds_a_refused_central_edit_with_postgresqls_reason_and_no_local_values(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    """The reason is PostgreSQL's message without its DETAIL line, which quotes the row refused."""
    run_sql(local_url, "CREATE TABLE notes (id integer PRIMARY KEY, body text, n integer CHECK (n < 10))")
    run_sql(local_url, f"INSERT INTO notes VALUES (1, '{LOCAL_ONLY}', 5)")
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", **NOTES, direction="down")
    assert sync.run()["status"] == "succeeded"
    sync.central(f"INSERT INTO {sync.central_table} (id, body, n) VALUES (1, 'central', 99)")

    job = sync.run()

    assert (job["status"], job["pulled"], job["conflicts"]) == ("succeeded", 0, 1), job
    assert sync.central(f"SELECT id, body, n FROM {sync.central_table}") == [(1, "central", 99)]
    assert sync.local("SELECT id, body, n FROM notes") == [(1, LOCAL_ONLY, 5)]
    [held] = sync.conflicts("open")
    assert held["localVersion"] == {
        "_kiln_withheld": True,
        "_kiln_refusal": 'new row for relation "notes" violates check constraint "notes_n_check"',
    }
    assert LOCAL_ONLY not in central_copies(sync)


def test_a_central_edit_a_postgresql_local_store_refuses_is_logged_without_the_row_its_detail_quotes(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL's DETAIL line quotes the row it refused, its sensitive values opened: the log keeps the rest."""
    checked = READINGS.replace("double precision", "double precision CHECK (value < 50)")
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", checked, TWO_READINGS)
    assert sync.run()["status"] == "succeeded"
    sync.central(f"UPDATE {sync.central_table} SET value = 99 WHERE id = 1")

    with caplog.at_level(logging.WARNING):
        job = sync.run()

    assert (job["status"], job["conflicts"]) == ("succeeded", 1), job
    [logged] = [record.getMessage() for record in caplog.records if "refuses the central" in record.getMessage()]
    assert logged.endswith('violates check constraint "readings_value_check"'), logged
    assert "Ada Lovelace" not in logged


def test_a_job_a_postgresql_local_store_fails_logs_its_traceback_without_the_row_its_detail_quotes(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", READINGS, TWO_READINGS)
    assert sync.run()["status"] == "succeeded"
    run_sql(
        local_url,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'readings are kept as read' USING DETAIL = 'patient ' || OLD.patient; END $$",
    )
    run_sql(local_url, "CREATE TRIGGER refuse BEFORE UPDATE ON readings FOR EACH ROW EXECUTE FUNCTION refuse()")
    sync.central(f"UPDATE {sync.central_table} SET value = 9 WHERE id = 1")

    with caplog.at_level(logging.ERROR):
        job = sync.run()

    assert (job["status"], error_of(job)) == ("failed", "table 'readings': RaiseException: readings are kept as read")
    assert "Traceback" in caplog.text and "RaiseException: readings are kept as read" in caplog.text
    assert "Ada Lovelace" not in caplog.text, caplog.text


def test_enum_and_domain_columns_sync_as_text_and_their_base_type_and_no_type_is_made_centrally(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    """An enum's central copy as a named type would be one type in Kiln's schema for every org: another org's enum
    of the same name would clash with it, and it would outlive the source."""
    run_sql(local_url, "CREATE TYPE mood AS ENUM ('ok', 'bad')")
    run_sql(local_url, "CREATE DOMAIN celsius AS numeric(5, 2)")
    run_sql(local_url, "CREATE TABLE notes (id integer PRIMARY KEY, mood mood, temperature celsius)")
    run_sql(local_url, "INSERT INTO notes VALUES (1, 'ok', 36.60)")
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", **NOTES)

    first = sync.run()
    sync.central(f"UPDATE {sync.central_table} SET mood = 'bad', temperature = 39.20 WHERE id = 1")
    second = sync.run()

    assert [(job["status"], job["pushed"], job["pulled"]) for job in (first, second)] == [
        ("succeeded", 1, 0),
        ("succeeded", 0, 1),
    ]
    assert sync.local("SELECT mood::text, temperature FROM notes") == [("bad", Decimal("39.20"))]
    types = sync.central(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = :t AND column_name IN "
        "('mood', 'temperature') ORDER BY column_name",
        {"t": sync.central_table},
    )
    assert types == [("mood", "text"), ("temperature", "numeric")]
    assert sync.central("SELECT count(*) FROM pg_type WHERE typname = 'mood'") == [(0,)]


def test_a_column_of_a_type_the_central_copy_has_none_for_fails_the_job_naming_it(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    run_sql(local_url, "CREATE TABLE notes (id integer PRIMARY KEY, address inet)")
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", **NOTES)

    job = sync.run()

    assert (job["status"], error_of(job)) == (
        "failed",
        "table 'notes' column 'address' is of type inet, which the central copy has no type for; store it as text "
        "or another standard SQL type",
    )
    assert sync.central("SELECT to_regclass(:t) IS NULL", {"t": sync.central_table}) == [(True,)]


@pytest.mark.parametrize(
    ("create", "refusal"),
    [
        (
            "CREATE TABLE notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text)",
            "table 'notes' column 'id' is GENERATED ALWAYS AS IDENTITY: the store numbers it and refuses any value "
            "written to it, so central records could not be written down; declare it GENERATED BY DEFAULT AS "
            'IDENTITY, or sync the table up only (direction "up")',
        ),
        (
            "CREATE TABLE notes (id integer PRIMARY KEY, price numeric, qty integer, "
            "total numeric GENERATED ALWAYS AS (price * qty) STORED)",
            "table 'notes' column 'total' is a generated column: the store computes its values and refuses any "
            "written to it, so central records could not be written down; make it a plain column, or sync the "
            'table up only (direction "up")',
        ),
    ],
    ids=["identity-key", "generated-column"],
)
def test_a_table_syncing_down_with_a_column_its_store_fills_in_fails_the_job_naming_it_and_installs_nothing(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str, create: str, refusal: str
) -> None:
    """Such a table went up, then every job failed on the first central edit to come down."""
    run_sql(local_url, create)
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", **NOTES)

    job = sync.run()

    assert (job["status"], error_of(job)) == ("failed", refusal)
    assert sync.central("SELECT to_regclass(:t) IS NULL", {"t": sync.central_table}) == [(True,)]
    assert sync.local("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'notes'::regclass") == [(0,)]


def test_a_table_syncing_up_only_with_a_generated_column_sends_its_values_up(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    run_sql(
        local_url,
        "CREATE TABLE notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, price numeric, qty integer, "
        "total numeric GENERATED ALWAYS AS (price * qty) STORED)",
    )
    run_sql(local_url, "INSERT INTO notes (price, qty) VALUES (2.5, 4)")
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", **NOTES, direction="up")

    job = sync.run()

    assert (job["status"], job["pushed"]) == ("succeeded", 1), job
    assert sync.central(f"SELECT id, total FROM {sync.central_table}") == [(1, Decimal("10.0"))]


def test_two_first_jobs_making_kilns_tables_in_one_store_at_once_both_go_on(
    local_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sources on one store, their first jobs (or their first since an upgrade added a table) at once: the
    second looked for a table the first had made but not committed, made it again, and failed for good."""
    made, go_on = threading.Event(), threading.Event()
    create_deletion_notes = deletions.create_deletion_notes
    failures: list[BaseException] = []

    def first_holds_its_tables(connection: Connection) -> None:
        create_deletion_notes(connection)
        if threading.current_thread().name == "first":
            made.set()
            go_on.wait(10)

    def make_tables() -> None:
        engine = create_engine(local_url, poolclass=NullPool)
        try:
            with engine.begin() as connection:
                jobs.make_kiln_tables(connection)
        except BaseException as error:
            failures.append(error)
        finally:
            engine.dispose()

    monkeypatch.setattr(jobs, "create_deletion_notes", first_holds_its_tables)
    first, second = (threading.Thread(target=make_tables, name=name) for name in ("first", "second"))
    first.start()
    assert made.wait(10)
    start_until_it_waits_for_a_lock(second, local_url)
    go_on.set()
    first.join(10)
    second.join(10)

    assert failures == []
    assert run_sql(local_url, "SELECT count(*) FROM _kiln_deleted") == [(0,)]


def wards_and_patients(
    api: TestClient, context: SyncContext, org_id: str, local_url: str, order: list[str], direction: str = "both"
) -> Sync:
    """Two tables of a PostgreSQL store, a patient's ward_id a foreign key to wards, registered in `order`."""
    run_sql(local_url, "CREATE TABLE wards (id integer PRIMARY KEY, name text)")
    run_sql(local_url, "CREATE TABLE patients (id integer PRIMARY KEY, ward_id integer REFERENCES wards, name text)")
    run_sql(local_url, "INSERT INTO wards VALUES (1, 'A')")
    run_sql(local_url, "INSERT INTO patients VALUES (1, 1, 'Ada')")
    org = create_org_with_keys(api, org_id)
    tables = [
        {"name": name, "primaryKey": "id", "policy": "last-writer-wins", "direction": direction} for name in order
    ]
    created = api.post(f"/v1/orgs/{org_id}/sync-sources", json={"url": local_url, "tables": tables}, headers=org.admin)
    assert created.status_code == 201, created.text
    source_id = created.json()["sourceId"]
    return Sync(api, context, org, local_url, source_id, context.settings.resolved_database_url, "patients")


def test_a_central_record_and_one_pointing_at_it_come_down_whichever_table_was_registered_first(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    """Tables synced in the order registered: the patient came down before its ward, was refused by the foreign key,
    and left the central store as `insert-refused`."""
    sync = wards_and_patients(sync_api, sync_context, org_id, local_url, ["patients", "wards"])
    assert sync.run()["status"] == "succeeded"
    sync.central(f"INSERT INTO sync_{sync.source_id}_wards (id, name) VALUES (2, 'B')")
    sync.central(f"INSERT INTO sync_{sync.source_id}_patients (id, ward_id, name) VALUES (2, 2, 'Alan')")

    job = sync.run()

    assert (job["status"], job["pulled"], job["conflicts"]) == ("succeeded", 2, 0)
    assert sync.local("SELECT id, ward_id, name FROM patients ORDER BY id") == [(1, 1, "Ada"), (2, 2, "Alan")]
    assert sync.central(f"SELECT id FROM {sync.central_table} ORDER BY id") == [(1,), (2,)]
    assert sync.conflicts() == []


@pytest.mark.parametrize("order", [["wards", "patients"], ["patients", "wards"]])
@pytest.mark.parametrize("direction", ["both", "down"])
def test_a_central_record_and_one_pointing_at_it_deleted_together_both_go_whichever_table_was_registered_first(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str, order: list[str], direction: str
) -> None:
    """The ward's deletion, pulled first, was refused by the patient still pointing at it: the job failed on that
    batch, every time. It is now put off until the patients' table has synced, and then goes."""
    sync = wards_and_patients(sync_api, sync_context, org_id, local_url, order, direction)
    assert sync.run()["status"] == "succeeded"
    if direction == "down":  # a down table's central copy holds only what was made centrally
        sync.central(f"INSERT INTO sync_{sync.source_id}_wards (id, name) VALUES (2, 'B')")
        sync.central(f"INSERT INTO {sync.central_table} (id, ward_id, name) VALUES (2, 2, 'Alan')")
        assert sync.run()["status"] == "succeeded"
    ward = 1 if direction == "both" else 2
    sync.central(f"DELETE FROM {sync.central_table} WHERE ward_id = {ward}")
    sync.central(f"DELETE FROM sync_{sync.source_id}_wards WHERE id = {ward}")

    job = sync.run()

    assert (job["status"], job["conflicts"]) == ("succeeded", 0), error_of(job)
    assert sync.local(f"SELECT count(*) FROM patients WHERE ward_id = {ward}") == [(0,)]
    assert sync.local(f"SELECT count(*) FROM wards WHERE id = {ward}") == [(0,)]
    assert sync.conflicts() == []


def test_a_central_deletion_the_local_foreign_keys_still_refuse_puts_the_record_back_centrally_and_the_job_goes_on(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    """A ward deleted centrally while a patient points at it, centrally and locally: the job failed on that batch,
    every time."""
    sync = wards_and_patients(sync_api, sync_context, org_id, local_url, ["wards", "patients"])
    assert sync.run()["status"] == "succeeded"
    sync.central(f"DELETE FROM sync_{sync.source_id}_wards WHERE id = 1")

    first, second = sync.run(), sync.run()

    assert [(job["status"], job["conflicts"]) for job in (first, second)] == [("succeeded", 1), ("succeeded", 0)]
    assert sync.local("SELECT id, ward_id FROM patients") == [(1, 1)]
    assert sync.central(f"SELECT id, name FROM sync_{sync.source_id}_wards") == [(1, "A")]
    assert [(c["table"], c["recordKey"], c["outcome"]) for c in sync.conflicts()] == [("wards", "1", "delete-refused")]
