"""Records between a SQLite local store and the central PostgreSQL: up, down, incrementally, encrypted, resumable."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import services.sync.transfer as transfer
from services.sync.context import SyncContext
from services.sync.jobs import run_job
from services.sync.pair import Tally
from services.trainer.extract import extract_database
from services.trainer.runs import DatabaseSource
from shared.db.session import session_scope
from shared.errors import InvalidInput, TransientError
from shared.store_access import StoreRules
from tests.integration.conftest import create_org_with_keys
from tests.integration.sync_support import (
    LOCAL_ONLY,
    ODDLY_NAMED_SYNCED,
    ODDLY_NAMED_TABLE,
    Sync,
    allow_connections,
    central_copies,
    error_of,
    make_local_store,
    many_readings,
    oddly_named,
    open_down_only_vitals,
    open_sync,
    open_table_sync,
    register,
    run_sql,
    run_turning_local_after_the_first_batch,
    run_twice_at_once,
)


def test_local_records_go_up_with_sensitive_columns_sealed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)

    job = sync.run()

    assert (job["status"], job["pushed"], job["pulled"], job["conflicts"]) == ("succeeded", 2, 0, 0)
    rows = sync.central(f"SELECT id, device, value, patient, _kiln_version FROM {sync.central_table} ORDER BY id")
    assert [(row[0], row[1], row[2], row[4]) for row in rows] == [(1, "pump-1", 1.0, 1), (2, "pump-2", 2.0, 1)]
    assert all(row[3].startswith("ek") and "Ada" not in row[3] and "Alan" not in row[3] for row in rows)
    dumped = sync.central(f"SELECT CAST(t AS text) FROM {sync.central_table} t")
    assert not any("Lovelace" in row[0] or "Turing" in row[0] for row in dumped)


def test_each_run_moves_only_what_changed_since_the_last(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()

    sync.local("INSERT INTO readings VALUES (3, 'pump-3', 3.0, 'Grace Hopper')")
    sync.central(f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 2")
    second = sync.run()
    third = sync.run()

    assert (second["pushed"], second["pulled"]) == (1, 1)
    assert (third["pushed"], third["pulled"]) == (0, 0)
    assert sync.local("SELECT id, device, value, patient FROM readings ORDER BY id") == [
        (1, "pump-1", 1.0, "Ada Lovelace"),
        (2, "pump-2", 20.0, "Alan Turing"),
        (3, "pump-3", 3.0, "Grace Hopper"),
    ]
    assert sync.central(f"SELECT _kiln_version FROM {sync.central_table} WHERE id = 2") == [(2,)]


def test_a_central_edit_is_versioned_and_stamped_as_it_is_made_and_the_pull_leaves_it_so(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    [(pushed_stamp,)] = sync.central(f"SELECT _kiln_hlc FROM {sync.central_table} WHERE id = 2")

    sync.central(f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 2")
    sync.central(f"UPDATE {sync.central_table} SET value = 30.0 WHERE id = 2")
    edited = sync.central(f"SELECT _kiln_version, _kiln_hlc, xmin::text FROM {sync.central_table} WHERE id = 2")
    logged = sync.central("SELECT replaced FROM sync_changes WHERE tbl = :t ORDER BY seq", {"t": sync.central_table})
    job = sync.run()

    [(version, stamp, _)] = edited
    assert version == 3 and stamp.endswith(".central") and stamp > pushed_stamp
    assert logged[0] == (pushed_stamp,) and logged[1][0] < stamp
    assert job["pulled"] == 1 and sync.local("SELECT value FROM readings WHERE id = 2") == [(30.0,)]
    # xmin unchanged: the pull did not write the central record.
    assert sync.central(f"SELECT _kiln_version, _kiln_hlc, xmin::text FROM {sync.central_table} WHERE id = 2") == edited


def test_central_edits_committed_out_of_order_all_go_down(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """An edit that logs first but commits last must still go down, after a pull that ran in between."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    central = create_engine(sync.central_url, poolclass=NullPool)
    slow = central.connect()
    slow_edit = slow.begin()
    slow.execute(text(f"UPDATE {sync.central_table} SET value = 10.0 WHERE id = 1"))
    quick = threading.Thread(target=sync.central, args=(f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 2",))
    quick.start()
    quick.join(timeout=1)  # without ordering, the second edit commits here, ahead of the first

    between = sync.run()
    slow_edit.commit()
    slow.close()
    quick.join()
    after = sync.run()
    central.dispose()

    assert between["pulled"] + after["pulled"] == 2
    assert sync.local("SELECT id, value FROM readings ORDER BY id") == [(1, 10.0), (2, 20.0)]


def test_a_local_edit_committed_while_a_pull_runs_is_not_overwritten(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """An application holding a local write while a pull starts: the pull waits for it, and its edit survives."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 2")
    application = sqlite3.connect(sync.local_path)
    application.execute("UPDATE readings SET value = 99.0 WHERE id = 2")  # holds the store's write lock
    pulling = threading.Thread(target=sync.run)
    pulling.start()
    pulling.join(timeout=0.5)

    application.commit()
    application.close()
    pulling.join()
    sync.run()

    assert sync.local("SELECT value FROM readings WHERE id = 2") == [(99.0,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 2") == [(99.0,)]


def test_a_job_cut_off_from_the_central_store_resumes_from_its_watermark(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(5000))
    job_id = sync.submit()
    database = make_url(sync.central_url).database

    def cut_after_two_batches(tally: Tally) -> None:
        if tally.pushed == 1000:
            allow_connections(database, allowed=False)

    # Its status could not be written while the central store was away: it reads as still running, for the sync
    # beat to queue again, and its task is not retried besides.
    assert run_job(sync_context, job_id, after_batch=cut_after_two_batches) == "running"
    allow_connections(database, allowed=True)
    assert sync.job(job_id)["status"] == "running"
    assert sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(1000,)]

    assert run_job(sync_context, job_id) == "succeeded"

    job = sync.job(job_id)
    assert (job["pushed"], job["attempts"]) == (5000, 2)
    assert sync.central(f"SELECT count(*), count(DISTINCT id), max(_kiln_version) FROM {sync.central_table}") == [
        (5000, 5000, 1)
    ]


def test_an_org_keeping_its_data_local_is_refused_with_the_reason(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    from tests.integration.conftest import ADMIN

    sync_api.patch(f"/v1/orgs/{org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN)

    response = sync_api.post(
        f"/v1/orgs/{org_id}/sync-jobs", json={"sourceId": sync.source_id}, headers=sync.org.trainer
    )

    assert response.status_code == 409
    assert "dataResidency 'local'" in response.json()["error"]
    assert response.json()["field"] == "sourceId"


def test_a_job_running_when_its_org_turns_local_stops_refused_having_sent_nothing_more_up(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The operator switches the org to dataResidency 'local' after the job's first batch: the rest stays local."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(2000))

    status, job = run_turning_local_after_the_first_batch(sync)

    assert (status, job["status"], job["pushed"]) == ("refused", "refused", 500)
    assert "dataResidency 'local'" in job["errors"][-1]["error"]
    assert sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(500,)]


def test_bad_sources_are_refused_naming_the_field(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    url = f"/v1/orgs/{org_id}/sync-sources"
    bad_policy = {"url": "sqlite:////tmp/x.db", "tables": [{"name": "t", "primaryKey": "id", "policy": "newest"}]}
    bad_name = {"url": "sqlite:////tmp/x.db", "tables": [{"name": "Drop Table", "primaryKey": "id"}]}
    bad_url = {"url": "mysql://h/db", "tables": [{"name": "t", "primaryKey": "id"}]}
    sealed_key = {
        "url": "sqlite:////tmp/x.db",
        "tables": [{"name": "t", "primaryKey": "id", "sensitiveColumns": ["id"]}],
    }
    bodies = (bad_policy, bad_name, bad_url, sealed_key)

    answers = [sync_api.post(url, json=body, headers=sync.org.admin) for body in bodies]

    assert [a.status_code for a in answers] == [422, 422, 422, 422]
    fields = ["tables.0.policy", "tables.0.name", "url", "tables.0.sensitiveColumns"]
    assert [a.json()["field"] for a in answers] == fields
    missing = sync_api.post(f"/v1/orgs/{org_id}/sync-jobs", json={"sourceId": "nope"}, headers=sync.org.trainer)
    assert (missing.status_code, missing.json()["field"]) == (404, "sourceId")


def test_source_password_is_stored_encrypted_and_never_shown(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    body = {
        "url": "postgresql+psycopg2://plant:s3cret-pw@10.0.0.5/records",
        "tables": [{"name": "visits", "primaryKey": "id"}],
    }

    created = sync_api.post(f"/v1/orgs/{org_id}/sync-sources", json=body, headers=sync.org.admin)

    assert created.status_code == 201
    assert "s3cret-pw" not in created.text and created.json()["hasPassword"] is True
    stored = sync.central(
        "SELECT url, password_encrypted FROM sync_sources WHERE id = :i", {"i": created.json()["sourceId"]}
    )
    assert "s3cret-pw" not in stored[0][0] and "s3cret-pw" not in stored[0][1]


def test_a_synced_central_table_can_be_the_orgs_training_datasource(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    body = {"url": sync.central_url, "table": sync.central_table}

    answer = sync_api.put(f"/v1/orgs/{org_id}/datasource", json=body, headers=sync.org.admin)
    rows = read_central_table(sync_context, org_id, sync.central_url, sync.central_table, tmp_path)

    assert answer.status_code == 200, answer.text
    assert rows == 2


def test_another_orgs_synced_table_and_kilns_own_tables_are_no_training_datasource(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    theirs = open_sync(sync_api, sync_context, org_id, tmp_path)
    theirs.run()
    intruder = create_org_with_keys(sync_api, "intruder-" + org_id).org_id

    for table in (theirs.central_table, "api_keys"):
        with pytest.raises(InvalidInput, match="Kiln's own") as refused:
            read_central_table(sync_context, intruder, theirs.central_url, table, tmp_path)
        assert refused.value.field == "datasource"


def read_central_table(context: SyncContext, org_id: str, url: str, table: str, tmp_path: Path) -> int:
    """What the org's training run reads from `table` of the central database, as its worker checks it."""
    with session_scope(context.sessions) as session:
        rules = StoreRules.for_training(session, context.settings, org_id)
    return extract_database(
        DatabaseSource(url=url, password_encrypted=None, table=table, timestamp_column=None, column_map={}),
        None,
        columns=["id"],
        start=None,
        end=None,
        target=tmp_path / "training.parquet",
        rules=rules,
    )


def test_a_job_run_twice_at_once_runs_once_and_moves_each_record_once(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Its message delivered twice, say: the second run waits for the first to end, then finds the job finished."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(2000))
    job_id = sync.submit()

    first_run, second_run, twin_waited = run_twice_at_once(sync_context, job_id)

    assert (first_run, second_run, twin_waited) == ("succeeded", ["succeeded"], [True])
    job = sync.job(job_id)
    assert (job["pushed"], job["attempts"]) == (2000, 1)
    assert sync.central(f"SELECT count(*), max(_kiln_version) FROM {sync.central_table}") == [(2000, 1)]


def test_a_job_whose_source_lock_is_lost_stops_after_the_batch_and_its_retry_ends_the_work(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The lock lives as long as its connection: closed under the job (the server's idle_session_timeout, a proxy,
    an administrator), another job may take the source. The job goes no further than the batch under way."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(1500))  # batches of 500
    database = make_url(sync.central_url).database
    admin = make_url(sync.central_url).set(database="postgres").render_as_string(hide_password=False)

    def close_the_locks_connection(tally: Tally) -> None:
        if tally.pushed == 500:
            run_sql(
                admin,
                "SELECT pg_terminate_backend(pid) FROM pg_locks JOIN pg_stat_activity USING (pid) "
                "WHERE locktype = 'advisory' AND datname = :database",
                {"database": database},
            )

    job_id = sync.submit()
    with pytest.raises(TransientError):
        run_job(sync_context, job_id, after_batch=close_the_locks_connection)
    stopped = sync.job(job_id)
    assert (stopped["status"], stopped["pushed"]) == ("retrying", 500)
    assert "a store was unreachable, retrying" in error_of(stopped)

    assert run_job(sync_context, job_id) == "succeeded"
    assert sync.job(job_id)["pushed"] == 1500
    assert sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(1500,)]


def test_a_sync_store_must_be_a_file_in_the_orgs_folder_and_never_kilns_database(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    org = create_org_with_keys(sync_api, org_id)
    make_local_store(tmp_path / "elsewhere.db", [(1, "pump-1", 1.0, "Ada Lovelace")])
    stores = {
        f"sqlite:///{tmp_path / 'elsewhere.db'}": f"is not in {tmp_path / org_id}/",
        f"sqlite:///{tmp_path / org_id / 'typo.db'}": "does not exist",
        sync_context.settings.resolved_database_url: "Kiln's own",
    }
    for url, reason in stores.items():
        source_id = register(sync_api, org, url, "last-writer-wins")
        job_id = sync_api.post(f"/v1/orgs/{org_id}/sync-jobs", json={"sourceId": source_id}, headers=org.admin).json()[
            "jobId"
        ]

        assert run_job(sync_context, job_id) == "failed"
        job = sync_api.get(f"/v1/orgs/{org_id}/sync-jobs/{job_id}", headers=org.admin).json()
        assert reason in job["errors"][-1]["error"], job
    assert not (tmp_path / org_id / "typo.db").exists()


def test_an_unexpected_error_fails_the_job_naming_the_table_and_logs_its_traceback(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    assert sync.run()["status"] == "succeeded"
    # A central application writes plain text where the sealed value goes: nothing can open it.
    sync.central(f"UPDATE {sync.central_table} SET patient = 'Grace Hopper' WHERE id = 1")

    first, again = sync.run(), sync.run()

    assert (first["status"], again["status"]) == ("failed", "failed")
    assert error_of(first).startswith("table 'readings': "), error_of(first)
    assert "readings.patient is not sealed" in error_of(first) and "Grace" not in error_of(first)
    assert first["finishedAt"] is not None
    assert sync.local("SELECT id, patient FROM readings ORDER BY id") == [(1, "Ada Lovelace"), (2, "Alan Turing")]
    assert any(
        "table 'readings'" in record.getMessage() and "Traceback" in record.getMessage() for record in caplog.records
    )


WIDE = (
    "CREATE TABLE t (id INTEGER PRIMARY KEY, at_ms INTEGER, big BIGINT, flag BOOLEAN, at DATETIME, "
    "amount NUMERIC(10,2), code VARCHAR(5), ratio REAL, doc JSON, note TEXT)"
)
WIDE_ROWS = [
    (1, 1714550400123, 2**63 - 1, 1, "2024-05-01T10:00:00+02:00", 12.345, "longer than five", 0.1, '{"a": 1}', "x"),
    (2, 2**31, -(2**63), 0, "2024-05-01T10:00:00Z", 7, "ab", -2.5, "[1, 2]", "y"),
]


def test_values_sqlite_holds_come_back_down_as_they_were(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_table_sync(sync_api, sync_context, org_id, tmp_path, WIDE)
    with sqlite3.connect(sync.local_path) as connection:
        connection.executemany(f"INSERT INTO t VALUES ({', '.join('?' * 10)})", WIDE_ROWS)
    assert sync.run()["status"] == "succeeded"
    sync.central(f"UPDATE {sync.central_table} SET note = note || '!'")  # both records come down again

    job = sync.run()

    assert (job["status"], job["pulled"]) == ("succeeded", 2), job
    expected = [(*row[:-1], row[-1] + "!") for row in WIDE_ROWS]
    assert sync.local("SELECT * FROM t ORDER BY id") == expected
    assert sync.local("SELECT typeof(amount) FROM t ORDER BY id") == [("real",), ("integer",)]
    central = sync.central(f"SELECT at_ms, big, amount, code FROM {sync.central_table} ORDER BY id")
    assert central == [(1714550400123, 2**63 - 1, Decimal("12.345"), "longer than five"), (2**31, -(2**63), 7, "ab")]


def test_numbers_beyond_64_bits_in_a_numeric_column_come_back_down_as_the_reals_sqlite_held(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """SQLite keeps a whole number beyond 64 bits in a NUMERIC column as a REAL. It went up as NUMERIC
    100000000000000000000; written back down as a Python int, SQLite's driver refused it (OverflowError) and every
    job after a central edit of the record failed."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, amount NUMERIC(30, 2), note TEXT)",
        "INSERT INTO t VALUES (1, 1e20, 'a'), (2, '-100000000000000000000', 'b'), (3, 9223372036854775807, 'c'),"
        " (4, '9223372036854775808', 'd'), (5, -9223372036854775808, 'e'), (6, 123456789012345678901234, 'f')",
    )
    held = sync.local("SELECT id, amount, typeof(amount) FROM t ORDER BY id")
    assert [kind for _, _, kind in held] == ["real", "real", "integer", "real", "integer", "real"]
    assert sync.run()["status"] == "succeeded"
    sync.central(f"UPDATE {sync.central_table} SET note = note || '!'")  # every record comes down again

    jobs = [sync.run(), sync.run()]

    assert [(job["status"], job["pulled"], error_of(job)) for job in jobs] == [
        ("succeeded", 6, ""),
        ("succeeded", 0, ""),
    ]
    assert sync.local("SELECT id, amount, typeof(amount) FROM t ORDER BY id") == held
    assert sync.local("SELECT note FROM t ORDER BY id") == [(note + "!",) for note in "abcdef"]
    assert sync.central(f"SELECT amount FROM {sync.central_table} WHERE id IN (1, 3) ORDER BY id") == [
        (Decimal("100000000000000000000"),),
        (Decimal(2**63 - 1),),
    ]


@pytest.mark.parametrize(
    ("create", "insert", "reason"),
    [
        (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER)",
            "INSERT INTO t VALUES (1, 'abc')",
            "table 't' column 'n' record 1: 'abc' cannot be stored centrally as it is: the central copy of an INTEGER "
            "column holds integers",
        ),
        (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, r REAL)",
            "INSERT INTO t VALUES (1, 'n/a')",
            "table 't' column 'r' record 1: 'n/a' cannot be stored centrally as it is: the central copy of a REAL "
            "column holds numbers",
        ),
        (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, ok BOOLEAN)",
            "INSERT INTO t VALUES (1, 'false')",
            "table 't' column 'ok' record 1: 'false' cannot be stored centrally as it is: the central copy of a "
            "BOOLEAN column holds 0 and 1",
        ),
        (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT)",
            "INSERT INTO t VALUES (1, 'a' || char(0) || 'b')",
            "table 't' column 'note' record 1: 'a\\x00b' cannot be stored centrally as it is: PostgreSQL text "
            "cannot hold a NUL character",
        ),
        (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, anything)",
            "INSERT INTO t VALUES (1, 2)",
            "table 't' column 'anything' has no declared type: SQLite lets it hold any value, which no one central "
            "type holds as it is; declare its type",
        ),
    ],
    ids=["text-in-integer", "text-in-real", "text-in-boolean", "nul-in-text", "untyped"],
)
def test_a_value_the_central_copy_cannot_hold_fails_the_job_naming_table_column_and_record(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    tmp_path: Path,
    create: str,
    insert: str,
    reason: str,
) -> None:
    sync = open_table_sync(sync_api, sync_context, org_id, tmp_path, create, insert, "INSERT INTO t (id) VALUES (2)")

    job = sync.run()

    assert (job["status"], error_of(job)) == ("failed", reason)


KEY_TYPE_REFUSED = (
    "a type whose values the sync service cannot name exactly (two records could be taken for one, or a record for "
    "none); a synced table's key is an integer or text column (or a uuid, between PostgreSQL stores)"
)


@pytest.mark.parametrize(
    ("declared", "keys"),
    [
        ("REAL", "(1.5), (1e20), (0.3), (0.30000000000000004)"),
        ("NUMERIC(10, 2)", "(1.5), (2)"),
        ("DATETIME", "('2024-01-01 00:00:00'), ('2024-01-02 10:00:00.5')"),
    ],
    ids=["real", "numeric", "datetime"],
)
def test_a_table_keyed_by_a_type_the_change_log_cannot_name_exactly_fails_its_job_and_installs_nothing(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, declared: str, keys: str
) -> None:
    """SQLite logs CAST(key AS TEXT) ('1.0e+20', and '0.3' for two distinct floats) where the service names a record
    by Python's str() ('1e+20'): those records were taken for deleted on both sides and never synced, while the job
    succeeded."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        f"CREATE TABLE t (id {declared} PRIMARY KEY, v TEXT)",
        f"INSERT INTO t (id) VALUES {keys}",
    )

    job = sync.run()

    assert (job["status"], job["pushed"], error_of(job)) == (
        "failed",
        0,
        f"table 't': its primary key 'id' is {declared}, {KEY_TYPE_REFUSED}",
    )
    # Refused before anything was installed: no trigger logs the table's writes, and it has no central copy.
    assert sync.local("SELECT name FROM sqlite_master WHERE type = 'trigger'") == []
    assert sync.central("SELECT to_regclass(:t) IS NULL", {"t": sync.central_table}) == [(True,)]


def test_a_sqlite_table_syncing_down_with_a_generated_column_fails_the_job_naming_it_and_installs_nothing(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, price REAL, qty INTEGER, total REAL AS (price * qty))",
        "INSERT INTO t (id, price, qty) VALUES (1, 2.5, 4)",
    )

    job = sync.run()

    assert (job["status"], error_of(job)) == (
        "failed",
        "table 't' column 'total' is a generated column: the store computes its values and refuses any written to "
        "it, so central records could not be written down; make it a plain column, or sync the table up only "
        '(direction "up")',
    )
    assert sync.local("SELECT name FROM sqlite_master WHERE type = 'trigger'") == []
    assert sync.central("SELECT to_regclass(:t) IS NULL", {"t": sync.central_table}) == [(True,)]


def test_a_table_refused_up_front_fails_the_job_naming_it_while_the_sources_other_tables_sync(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A source's tables cannot be changed once registered: a refused table listed first stopped the job before the
    others, on every run."""
    org = create_org_with_keys(sync_api, org_id)
    path = tmp_path / org_id / "plant.db"
    path.parent.mkdir()
    wide = "x" * 64
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE floats (id REAL PRIMARY KEY, v TEXT)")
        connection.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, v TEXT)")
        connection.execute(f'CREATE TABLE wide (id INTEGER PRIMARY KEY, "{wide}" TEXT)')
        for table in ("floats", "readings", "wide"):
            connection.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    url = f"sqlite:///{path}"
    tables = [{"name": name, "primaryKey": "id"} for name in ("floats", "readings", "wide")]
    response = sync_api.post(f"/v1/orgs/{org_id}/sync-sources", json={"url": url, "tables": tables}, headers=org.admin)
    assert response.status_code == 201, response.text
    sync = Sync(
        sync_api, sync_context, org, url, response.json()["sourceId"], sync_context.settings.resolved_database_url
    )

    first = sync.run()
    sync.local("INSERT INTO readings VALUES (2, 'b')")
    second = sync.run()

    reason = (
        f"table 'floats': its primary key 'id' is REAL, {KEY_TYPE_REFUSED}; table 'wide' column {wide!r}: its name "
        "is 64 bytes long (UTF-8), longer than the 63 bytes of a PostgreSQL identifier, which the central copy's "
        "column would be cut to; rename the column"
    )
    assert [(job["status"], job["pushed"], error_of(job)) for job in (first, second)] == [
        ("failed", 1, reason),
        ("failed", 1, reason),
    ]
    assert sync.central(f"SELECT id, v FROM {sync.central_table} ORDER BY id") == [(1, "a"), (2, "b")]
    assert sync.local("SELECT DISTINCT tbl_name FROM sqlite_master WHERE type = 'trigger'") == [("readings",)]
    refused_copies = {name: f"sync_{sync.source_id}_{name}" for name in ("floats", "wide")}
    assert sync.central("SELECT to_regclass(:floats), to_regclass(:wide)", refused_copies) == [(None, None)]


def test_a_key_an_integer_column_holds_otherwise_fails_the_job_naming_the_record(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """SQLite lets a BIGINT key column hold 1.5: its record is not taken for deleted and skipped."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id BIGINT PRIMARY KEY, v TEXT)",
        "INSERT INTO t VALUES (1, 'a'), (1.5, 'b')",
    )

    job = sync.run()

    assert (job["status"], error_of(job)) == (
        "failed",
        "table 't' column 'id' record 1.5: '1.5' cannot be synced: the key of an integer column is an integer",
    )


TEXT_KEY_IS_TEXT = "a BLOB cannot be synced: the key of a text column is text"
INTEGER_KEY_IS_INTEGER = "cannot be synced: the key of an integer column is an integer"
NULL_KEY = "NULL cannot be synced: a synced record's key is never NULL"


@pytest.mark.parametrize(
    ("declared", "odd", "reason"),
    [
        ("TEXT", "X'41424344'", f"record X'41424344': {TEXT_KEY_IS_TEXT}"),
        ("TEXT", "X'FF'", f"record X'FF': {TEXT_KEY_IS_TEXT}"),
        ("TEXT", "NULL", f"record NULL: {NULL_KEY}"),
        ("BIGINT", "X'FF'", f"record X'FF': a BLOB {INTEGER_KEY_IS_INTEGER}"),
        ("BIGINT", "'abc'", f"record abc: 'abc' {INTEGER_KEY_IS_INTEGER}"),
        ("BIGINT", "NULL", f"record NULL: {NULL_KEY}"),
    ],
    ids=[
        "blob-in-text",
        "non-utf8-blob-in-text",
        "null-in-text",
        "blob-in-integer",
        "text-in-integer",
        "null-in-integer",
    ],
)
def test_a_key_sqlite_holds_as_neither_text_nor_an_integer_fails_every_job_naming_the_record_until_it_is_one(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, declared: str, odd: str, reason: str
) -> None:
    """SQLite keeps a BLOB written to a TEXT key as it is, and lets a PRIMARY KEY other than an INTEGER PRIMARY KEY
    hold NULL. The change log names a record by CAST(key AS TEXT): X'41424344' as 'ABCD', which no text key is (the
    record was taken for deleted and skipped while the job succeeded), X'FF' as no UTF-8 at all (every job after
    was retried as if the store were out of reach), NULL not at all (a bare NOT NULL error on every job)."""
    plain, fixed = ("'plain'", "'fixed'") if declared == "TEXT" else ("1", "2")
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        f"CREATE TABLE t (k {declared} PRIMARY KEY, v TEXT)",
        f"INSERT INTO t VALUES ({plain}, 'a'), ({odd}, 'b')",
        key="k",
    )

    jobs = [sync.run(), sync.run()]
    sync.local(f"UPDATE t SET k = {fixed} WHERE k IS {odd}")
    jobs.append(sync.run())

    failed = ("failed", 0, 1, f"table 't' column 'k' {reason}")
    assert [(job["status"], job["pushed"], job["attempts"], error_of(job)) for job in jobs] == [
        failed,
        failed,
        ("succeeded", 2, 1, ""),
    ]
    assert sync.central(f"SELECT CAST(k AS text), v FROM {sync.central_table} ORDER BY v") == [
        (plain.strip("'"), "a"),
        (fixed.strip("'"), "b"),
    ]


@pytest.mark.parametrize("blob", ["X'41424344'", "X'FF'"], ids=["utf8", "not-utf8"])
def test_a_blob_key_written_to_a_synced_text_key_fails_the_job_naming_it_and_its_fix_goes_up(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, blob: str
) -> None:
    """Written once the table syncs, the blob is logged by its trigger: the job fails naming it, edited or not, and
    once its key is text, the record goes up under it."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)",
        "INSERT INTO t VALUES ('plain', 'a')",
        key="k",
    )
    jobs = [sync.run()]
    sync.local(f"INSERT INTO t VALUES ({blob}, 'b')")
    jobs.append(sync.run())
    sync.local(f"UPDATE t SET v = 'b, edited' WHERE k = {blob}")
    jobs.append(sync.run())
    sync.local(f"UPDATE t SET k = 'fixed' WHERE k = {blob}")
    jobs.append(sync.run())

    failed = ("failed", 0, 1, f"table 't' column 'k' record {blob}: {TEXT_KEY_IS_TEXT}")
    assert [(job["status"], job["pushed"], job["attempts"], error_of(job)) for job in jobs] == [
        ("succeeded", 1, 1, ""),
        failed,
        failed,
        ("succeeded", 1, 1, ""),
    ]
    records = [("plain", "a"), ("fixed", "b, edited")]
    assert sync.central(f"SELECT k, v FROM {sync.central_table} ORDER BY k DESC") == records


def test_a_text_key_holding_a_nul_fails_every_job_naming_the_record_until_its_key_is_put_right(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """SQLite text may hold a NUL, PostgreSQL text may not: every job failed on the driver's "A string literal
    cannot contain NUL (0x00) characters", naming neither the column nor the record. Once the key is put right,
    its old key's change has nothing to delete centrally and the record goes up under its new key."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)",
        "INSERT INTO t VALUES ('plain', 'a'), ('a' || char(0) || 'b', 'b')",
        key="k",
    )

    jobs = [sync.run(), sync.run()]
    sync.local("UPDATE t SET k = 'fixed' WHERE k = 'a' || char(0) || 'b'")
    jobs.append(sync.run())

    failed = (
        "failed",
        0,
        1,
        "table 't' column 'k' record 'a\\x00b': a key holding a NUL character cannot be synced: PostgreSQL text "
        "cannot hold one",
    )
    assert [(job["status"], job["pushed"], job["attempts"], error_of(job)) for job in jobs] == [
        failed,
        failed,
        ("succeeded", 2, 1, ""),
    ]
    assert sync.central(f"SELECT k, v FROM {sync.central_table} ORDER BY v") == [("plain", "a"), ("fixed", "b")]


@pytest.mark.parametrize("declared", ["TEXT", "VARCHAR(20)", "CHAR(5)", "BIGINT"])
def test_integer_and_text_keys_of_any_declared_type_sync_both_ways(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, declared: str
) -> None:
    keys = (10, 20) if declared == "BIGINT" else ("ab", "1e20")
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        f"CREATE TABLE t (id {declared} PRIMARY KEY, v TEXT)",
        f"INSERT INTO t VALUES ('{keys[0]}', 'a'), ('{keys[1]}', 'b')",
    )
    pushed = sync.run()
    sync.central(f"UPDATE {sync.central_table} SET v = 'central' WHERE id = :k", {"k": keys[1]})

    pulled = sync.run()

    assert (pushed["status"], pushed["pushed"], pulled["status"], pulled["pulled"]) == ("succeeded", 2, "succeeded", 1)
    records = [(keys[0], "a"), (keys[1], "central")]
    assert sync.local("SELECT id, v FROM t ORDER BY v") == records
    assert sync.central(f"SELECT id, v FROM {sync.central_table} ORDER BY v") == records


@pytest.mark.parametrize(
    ("table", "field", "words"),
    [
        ({"name": "_kiln_changes", "primaryKey": "id"}, "tables.0.name", "'_kiln_changes': names starting '_kiln_'"),
        ({"name": "t", "primaryKey": "_kiln_hlc"}, "tables.0.primaryKey", "'_kiln_hlc': names starting '_kiln_'"),
        (
            {"name": "t", "primaryKey": "id", "sensitiveColumns": ["_kiln_version"]},
            "tables.0.sensitiveColumns",
            "names starting '_kiln_' are the sync service's own: _kiln_version",
        ),
        (
            {"name": "t", "primaryKey": "id", "sensitiveColumns": ["patient", "patient"]},
            "tables.0.sensitiveColumns",
            "columns named more than once: patient",
        ),
        (
            {"name": "t", "primaryKey": "id", "sensitiveColumns": [f"c{number}" for number in range(1601)]},
            "tables.0.sensitiveColumns",
            "at most 1600 items",
        ),
    ],
    ids=["reserved-table", "reserved-key", "reserved-sensitive", "repeated-sensitive", "more-than-a-table-holds"],
)
def test_reserved_and_repeated_names_are_refused_naming_the_field(
    sync_api: TestClient, org_id: str, table: dict[str, Any], field: str, words: str
) -> None:
    org = create_org_with_keys(sync_api, org_id)
    body = {"url": "sqlite:////tmp/plant.db", "tables": [table]}

    answer = sync_api.post(f"/v1/orgs/{org_id}/sync-sources", json=body, headers=org.admin)

    assert (answer.status_code, answer.json()["field"]) == (422, field), answer.text
    assert words in answer.json()["error"]


def test_reserved_words_and_names_that_need_quotes_sync_both_ways(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        'CREATE TABLE "order" ("group" INTEGER PRIMARY KEY, "my col" TEXT, "select" TEXT, "q""uote" TEXT)',
        """INSERT INTO "order" VALUES (1, 'a', 'b', 'c')""",
        name="order",
        key="group",
    )
    assert sync.run()["status"] == "succeeded"
    sync.local("""UPDATE "order" SET "my col" = 'local' WHERE "group" = 1""")
    sync.local("""INSERT INTO "order" VALUES (2, 'd', 'e', 'f')""")
    pushed = sync.run()
    sync.central(f"""UPDATE {sync.central_table} SET "select" = 'central', "q""uote" = 'q' WHERE "group" = 2""")

    pulled = sync.run()

    assert (pushed["status"], pushed["pushed"], pulled["status"], pulled["pulled"]) == ("succeeded", 2, "succeeded", 1)
    records = [(1, "local", "b", "c"), (2, "d", "central", "q")]
    assert sync.local('SELECT * FROM "order" ORDER BY "group"') == records
    assert (
        sync.central(f'SELECT "group", "my col", "select", "q""uote" FROM {sync.central_table} ORDER BY 1') == records
    )


def test_columns_named_with_colons_percents_and_quotes_sync_both_ways(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A column named `:id` failed every job after the first with `A value is required for bind parameter 'id'`:
    the statements reading a batch's records, and adding a new column centrally, were text() built from names."""
    sync = open_table_sync(sync_api, sync_context, org_id, tmp_path, *ODDLY_NAMED_TABLE, policy="field-merge")

    synced = oddly_named(sync)

    assert synced == {**ODDLY_NAMED_SYNCED, "central": ODDLY_NAMED_SYNCED["local"]}


def test_a_local_column_named_like_the_sync_columns_is_refused_naming_it(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_table_sync(
        sync_api, sync_context, org_id, tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY, _kiln_version INTEGER)"
    )

    job = sync.run()

    assert (job["status"], error_of(job)) == (
        "failed",
        "table 't' has columns _kiln_version, which are the sync service's own in its central copy",
    )


@pytest.mark.parametrize(
    ("column", "size"),
    [("measurement_" + "x" * 60, 72), ("é" * 32, 64)],
    ids=["72-ascii-characters", "32-two-byte-characters"],
)
def test_a_local_column_name_longer_than_postgresqls_63_bytes_fails_the_job_naming_it(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, column: str, size: int
) -> None:
    """PostgreSQL cut the central copy's column to 63 bytes; the job then added the column again, failing every run
    with `DuplicateColumn`."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        f'CREATE TABLE t (id INTEGER PRIMARY KEY, "{column}" REAL)',
        "INSERT INTO t VALUES (1, 1.5)",
    )

    jobs = [sync.run(), sync.run()]

    reason = (
        f"table 't' column {column!r}: its name is {size} bytes long (UTF-8), longer than the 63 bytes of a "
        "PostgreSQL identifier, which the central copy's column would be cut to; rename the column"
    )
    assert [(job["status"], job["pushed"], error_of(job)) for job in jobs] == [("failed", 0, reason)] * 2
    assert sync.local("SELECT name FROM sqlite_master WHERE type = 'trigger'") == []
    assert sync.central("SELECT to_regclass(:t) IS NULL", {"t": sync.central_table}) == [(True,)]


def test_a_local_column_named_with_empty_text_fails_the_job_naming_the_table(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """SQLite takes `""` for a name; the job failed with SQLAlchemy's "Column must be constructed with a non-blank
    name"."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        'CREATE TABLE t (id INTEGER PRIMARY KEY, "" REAL)',
        "INSERT INTO t VALUES (1, 1.5)",
    )

    job = sync.run()

    reason = "table 't' has a column named with empty text, which the central copy cannot have; rename it"
    assert (job["status"], job["pushed"], error_of(job)) == ("failed", 0, reason)
    assert sync.local("SELECT name FROM sqlite_master WHERE type = 'trigger'") == []


def test_a_column_named_in_63_bytes_syncs_and_one_added_with_a_longer_name_waits_for_its_renaming(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    fits, longer = "é" * 31 + "x", "measurement_" + "x" * 60
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        f'CREATE TABLE t (id INTEGER PRIMARY KEY, "{fits}" TEXT)',
        "INSERT INTO t VALUES (1, 'a')",
    )
    first = sync.run()
    sync.local(f'ALTER TABLE t ADD COLUMN "{longer}" REAL')
    sync.local(f'UPDATE t SET "{longer}" = 1.5')
    refused = sync.run()
    sync.local(f'ALTER TABLE t RENAME COLUMN "{longer}" TO measurement')

    renamed = sync.run()

    assert (first["status"], refused["status"], renamed["status"], renamed["pushed"]) == (
        "succeeded",
        "failed",
        "succeeded",
        1,
    )
    assert f"table 't' column {longer!r}: its name is 72 bytes long" in error_of(refused)
    assert sync.central(f'SELECT id, "{fits}", measurement FROM {sync.central_table}') == [(1, "a", 1.5)]


def test_the_longest_table_name_a_source_takes_fits_its_central_copys_name(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A table's name is 40 characters at most, so that `sync_<sourceId>_<table>` fits PostgreSQL's 63 bytes."""
    longest = "t" * 40
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        f"CREATE TABLE {longest} (id INTEGER PRIMARY KEY, v TEXT)",
        f"INSERT INTO {longest} VALUES (1, 'a')",
        name=longest,
    )
    longer = {"url": sync.local_url, "tables": [{"name": longest + "t", "primaryKey": "id"}]}

    job = sync.run()
    refused = sync_api.post(f"/v1/orgs/{org_id}/sync-sources", json=longer, headers=sync.org.admin)

    assert (job["status"], job["pushed"], len(sync.central_table)) == ("succeeded", 1, 59)
    assert sync.central(f"SELECT id, v FROM {sync.central_table}") == [(1, "a")]
    assert (refused.status_code, refused.json()["field"]) == (422, "tables.0.name"), refused.text


def test_a_column_added_to_the_local_table_after_its_first_sync_is_added_centrally(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
        "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
    )
    assert sync.run()["status"] == "succeeded"
    sync.local("ALTER TABLE t ADD COLUMN unit TEXT")
    sync.local("UPDATE t SET unit = 'kg' WHERE id = 1")

    pushed = sync.run()
    sync.central(f"UPDATE {sync.central_table} SET unit = 'g' WHERE id = 2")
    pulled = sync.run()

    assert (pushed["status"], pushed["pushed"], pulled["status"], pulled["pulled"]) == ("succeeded", 1, "succeeded", 1)
    records = [(1, "a", "kg"), (2, "b", "g")]
    assert sync.local("SELECT id, v, unit FROM t ORDER BY id") == records
    assert sync.central(f"SELECT id, v, unit FROM {sync.central_table} ORDER BY id") == records


def test_a_second_source_naming_a_table_of_the_same_store_is_refused_naming_it(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    tables = [{"name": "visits", "primaryKey": "id"}, {"name": "readings", "primaryKey": "id"}]
    spelled_otherwise = sync.local_url.replace("/plant.db", "/../" + org_id + "/./plant.db")

    for url in (sync.local_url, spelled_otherwise):
        again = sync_api.post(
            f"/v1/orgs/{org_id}/sync-sources", json={"url": url, "tables": tables}, headers=sync.org.admin
        )

        assert (again.status_code, again.json()["field"]) == (409, "tables"), again.text
        assert again.json()["error"] == (
            f"table 'readings' of this store is synced by source {sync.source_id} already: two sources of one table "
            "would each miss what the other brings down"
        )
    assert len(sync_api.get(f"/v1/orgs/{org_id}/sync-sources", headers=sync.org.viewer).json()) == 1


def test_a_second_source_of_the_same_sqlite_file_is_refused_whatever_its_urls_spelling(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    (tmp_path / "linked-folder").symlink_to(sync.local_path.parent)
    (tmp_path / "linked.db").symlink_to(sync.local_path)
    spellings = [
        f"sqlite+pysqlite:///{sync.local_path}",
        f"sqlite:///{tmp_path}/linked-folder/plant.db",
        f"sqlite+pysqlite:///{tmp_path}/linked.db",
    ]

    answers = [
        sync_api.post(
            f"/v1/orgs/{org_id}/sync-sources",
            json={"url": url, "tables": [{"name": "readings", "primaryKey": "id"}]},
            headers=sync.org.admin,
        )
        for url in spellings
    ]

    assert [answer.status_code for answer in answers] == [409, 409, 409], [answer.text for answer in answers]
    assert {answer.json()["error"] for answer in answers} == {
        f"table 'readings' of this store is synced by source {sync.source_id} already: two sources of one table "
        "would each miss what the other brings down"
    }
    assert len(sync_api.get(f"/v1/orgs/{org_id}/sync-sources", headers=sync.org.viewer).json()) == 1


@pytest.mark.parametrize(
    ("first", "second", "status"),
    [
        ("postgresql+psycopg2://plant@DB.example.org:5432/records", "postgresql://plant@db.example.org/records", 409),
        ("postgresql://plant@db.example.org/records", "postgresql+psycopg2://reader@Db.Example.Org/records", 409),
        ("postgresql://plant@localhost/records", "postgresql+psycopg2://plant@127.0.0.1:5432/records", 409),
        ("postgresql://plant@[::1]/records", "postgresql://plant@localhost:5432/records?sslmode=disable", 409),
        ("postgresql://plant@127.0.0.1/records", "postgresql://plant@[::ffff:127.0.0.1]/records", 409),
        ("postgresql://plant@10.0.0.5/records", "postgresql://plant@[::ffff:a00:5]/records", 409),
        ("postgresql://plant@localhost/records", "postgresql://plant@0.0.0.0/records", 409),
        ("postgresql://plant@localhost/records", "postgresql://plant@[::]/records", 409),
        ("postgresql://plant@127.0.0.1/records", "postgresql://plant@127.1/records", 409),
        ("postgresql://plant@127.0.0.1/records", "postgresql://plant@2130706433/records", 409),
        ("postgresql://plant@10.0.0.5/records", "postgresql://plant@0x0a.0.5/records", 409),
        ("postgresql://plant@db.example.org/records", "postgresql://plant@db.example.org/records2", 201),
        ("postgresql://plant@db.example.org/records", "postgresql://plant@db.example.org:5433/records", 201),
        ("postgresql://plant@db.example.org/records", "postgresql://plant@db2.example.org/records", 201),
    ],
    ids=[
        "driver-port-case",
        "user-driver-case",
        "loopback-v4",
        "loopback-v6",
        "loopback-v4-mapped-v6",
        "v4-mapped-v6",
        "unspecified-v4",
        "unspecified-v6",
        "loopback-short-form",
        "loopback-one-number",
        "short-hex-form",
        "database",
        "port",
        "host",
    ],
)
def test_a_second_source_of_the_same_postgresql_database_is_refused_whatever_its_urls_spelling(
    sync_api: TestClient, org_id: str, first: str, second: str, status: int
) -> None:
    org = create_org_with_keys(sync_api, org_id)
    tables = [{"name": "readings", "primaryKey": "id"}]
    url = f"/v1/orgs/{org_id}/sync-sources"
    created = sync_api.post(url, json={"url": first, "tables": tables}, headers=org.admin)
    assert created.status_code == 201, created.text

    again = sync_api.post(url, json={"url": second, "tables": tables}, headers=org.admin)

    assert again.status_code == status, again.text
    if status == 409:
        assert (again.json()["field"], again.json()["error"]) == (
            "tables",
            f"table 'readings' of this store is synced by source {created.json()['sourceId']} already: two sources "
            "of one table would each miss what the other brings down",
        )
        assert created.json()["url"] == first.replace(
            "DB.example.org", "db.example.org"
        )  # kept as given, host lowercased as before


def test_one_table_registered_by_several_requests_at_once_makes_one_source_and_the_others_are_refused(
    backend_api: TestClient, org_id: str
) -> None:
    """Each registration looked for another source of the table, found none, and was created: 4 to 8 sources of
    one table out of 8 requests, on PostgreSQL and on SQLite. They take turns now: one 201, then 409s naming it."""
    org = create_org_with_keys(backend_api, org_id)
    spellings = ["postgresql://plant@db.example.org/records", "postgresql+psycopg2://plant@DB.example.org:5432/records"]
    start = threading.Barrier(8)

    def register_at_once(attempt: int) -> tuple[int, dict[str, Any]]:
        body = {"url": spellings[attempt % 2], "tables": [{"name": "readings", "primaryKey": "id"}]}
        start.wait()
        response = backend_api.post(f"/v1/orgs/{org_id}/sync-sources", json=body, headers=org.admin)
        return response.status_code, response.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(register_at_once, range(8)))

    assert sorted(status for status, _ in answers) == [201] + [409] * 7, answers
    created = next(body for status, body in answers if status == 201)
    assert {body["error"] for status, body in answers if status == 409} == {
        f"table 'readings' of this store is synced by source {created['sourceId']} already: two sources of one "
        "table would each miss what the other brings down"
    }
    sources = backend_api.get(f"/v1/orgs/{org_id}/sync-sources", headers=org.viewer).json()
    assert [source["sourceId"] for source in sources] == [created["sourceId"]]


def test_a_synced_sqlite_tables_text_timestamps_select_a_training_runs_date_range(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, at DATETIME, v REAL)",
        "INSERT INTO t VALUES (1, '2024-01-01 23:30:00', 1.0), (2, '2024-01-02T01:30:00+02:00', 2.0),"
        " (3, '2024-01-02 12:00:00', 3.0), (4, '2024-01-03T00:30:00+00:00', 4.0)",
    )
    assert sync.run()["status"] == "succeeded"
    with session_scope(sync_context.sessions) as session:
        rules = StoreRules.for_training(session, sync_context.settings, org_id)
    target = tmp_path / "training.parquet"

    rows = extract_database(
        DatabaseSource(
            url=sync.central_url,
            password_encrypted=None,
            table=sync.central_table,
            timestamp_column="at",
            column_map={},
        ),
        None,
        columns=["id"],
        start=datetime(2024, 1, 2, tzinfo=UTC),
        end=datetime(2024, 1, 2, 23, 59, tzinfo=UTC),
        target=target,
        rules=rules,
    )

    assert rows == 1  # 01:30+02:00 is the 1st in UTC; text without a zone is UTC
    assert pq.read_table(target).column("id").to_pylist() == [3]


# A local table with rules its central copy does not carry: the local store refuses some writes the central one took.
RULED_TABLE = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL, n INTEGER CHECK (n >= 0))"


@pytest.mark.parametrize("policy", ["last-writer-wins", "field-merge"])
def test_a_central_edit_the_local_stores_rules_refuse_is_kept_in_a_conflict_and_the_rest_goes_down(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, policy: str
) -> None:
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        RULED_TABLE,
        "INSERT INTO t VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)",
        policy=policy,
    )
    assert sync.run()["status"] == "succeeded"
    sync.central(f"UPDATE {sync.central_table} SET v = NULL WHERE id = 1")  # NOT NULL, locally
    sync.central(f"UPDATE {sync.central_table} SET n = -5 WHERE id = 2")  # CHECK, locally
    sync.central(f"UPDATE {sync.central_table} SET v = 'central' WHERE id = 3")

    job = sync.run()

    assert (job["status"], job["pulled"], job["conflicts"]) == ("succeeded", 1, 2), job
    expected = [(1, "a", 1), (2, "b", 2), (3, "central", 3)]
    assert sync.local("SELECT id, v, n FROM t ORDER BY id") == expected
    assert sync.central(f"SELECT id, v, n FROM {sync.central_table} ORDER BY id") == expected
    refused = sorted((c["recordKey"], c["outcome"], c["centralVersion"]["v"]) for c in sync.conflicts())
    assert refused == [("1", "update-refused", None), ("2", "update-refused", "b")]


def test_a_central_insert_the_local_store_refuses_leaves_both_stores_and_is_kept_in_a_conflict(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE)",
        "INSERT INTO t VALUES (1, 'a')",
    )
    assert sync.run()["status"] == "succeeded"
    sync.central(f"INSERT INTO {sync.central_table} (id, v) VALUES (7, NULL), (8, 'a'), (9, 'fine')")

    job = sync.run()

    assert (job["status"], job["pulled"], job["conflicts"]) == ("succeeded", 1, 2), job
    assert sync.local("SELECT id, v FROM t ORDER BY id") == [(1, "a"), (9, "fine")]
    assert sync.central(f"SELECT id, v FROM {sync.central_table} ORDER BY id") == [(1, "a"), (9, "fine")]
    kept = sorted((c["recordKey"], c["outcome"], c["centralVersion"]["v"]) for c in sync.conflicts())
    assert kept == [("7", "insert-refused", None), ("8", "insert-refused", "a")]
    assert sync.audit_actions().count("sync.delete") == 2
    assert sync.run()["status"] == "succeeded"  # nothing is left to go down again


@pytest.mark.parametrize(
    ("refused", "fix", "fixed"),
    [
        ("UPDATE {t} SET n = -5 WHERE id = 2", "UPDATE {t} SET n = 7 WHERE id = 2", [(2, "b", 7)]),
        (
            "INSERT INTO {t} (id, v, n) VALUES (3, NULL, 3)",
            "UPDATE {t} SET v = 'fixed' WHERE id = 3",
            [(3, "fixed", 3)],
        ),
    ],
    ids=["update", "insert"],
)
def test_a_central_fix_made_while_the_pull_writes_what_the_local_store_refuses_is_kept_and_goes_down(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    refused: str,
    fix: str,
    fixed: list[tuple[Any, ...]],
) -> None:
    """The pull read the refused version and the local store refused it; the central application fixed the record
    before the pull settled the refusal. Settling it over the fix would lose the fix: the fix comes down instead."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        RULED_TABLE,
        "INSERT INTO t VALUES (1, 'a', 1), (2, 'b', 2)",
    )
    assert sync.run()["status"] == "succeeded"
    sync.central(refused.format(t=sync.central_table))
    acknowledge = transfer._acknowledge_pull
    fixes = [fix.format(t=sync.central_table)]

    def fixed_centrally_meanwhile(*args: Any) -> None:
        if fixes:  # once: every edit is one more central change to pull
            sync.central(fixes.pop())
        acknowledge(*args)

    with monkeypatch.context() as meanwhile:
        meanwhile.setattr(transfer, "_acknowledge_pull", fixed_centrally_meanwhile)
        assert sync.run()["status"] == "succeeded"
    assert sync.run()["status"] == "succeeded"

    record = fixed[0][0]
    assert sync.local(f"SELECT id, v, n FROM t WHERE id = {record}") == fixed
    assert sync.central(f"SELECT id, v, n FROM {sync.central_table} WHERE id = {record}") == fixed
    assert sync.conflicts() == []


def test_a_down_only_table_holds_a_central_edit_its_local_store_refuses_without_sending_the_local_record(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A table that does not send up puts no local record centrally, not even to settle a refusal: both records stay
    as they are, and the review queue holds the central one with the local store's reason, the local one withheld."""
    sync = open_down_only_vitals(sync_api, sync_context, org_id, tmp_path)
    assert sync.run()["status"] == "succeeded"
    sync.central(f"INSERT INTO {sync.central_table} (id, diagnosis, temperature) VALUES (1, 'central', 99.0)")

    job = sync.run()

    assert (job["status"], job["pulled"], job["conflicts"]) == ("succeeded", 0, 1), job
    assert sync.central(f"SELECT id, diagnosis, temperature FROM {sync.central_table}") == [(1, "central", 99.0)]
    assert sync.local("SELECT id, diagnosis, temperature FROM vitals WHERE id = 1") == [(1, f"{LOCAL_ONLY}-AAA", 37.0)]
    [held] = sync.conflicts("open")
    assert (held["recordKey"], held["outcome"], held["kept"]) == ("1", "update-refused", None)
    assert (held["centralVersion"]["diagnosis"], held["centralVersion"]["temperature"]) == ("central", 99.0)
    assert held["localVersion"] == {
        "_kiln_withheld": True,
        "_kiln_refusal": "CHECK constraint failed: temperature < 50",
    }
    assert LOCAL_ONLY not in central_copies(sync)


def test_a_central_copy_an_earlier_kiln_made_too_narrow_is_widened_at_the_next_sync(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, label VARCHAR(5), amount NUMERIC(10, 2))",
        "INSERT INTO t VALUES (1, 1, 'a', 1.5)",
    )
    assert sync.run()["status"] == "succeeded"
    sync.central(  # the types an earlier Kiln gave the copy
        f"ALTER TABLE {sync.central_table} ALTER COLUMN n TYPE integer, ALTER COLUMN label TYPE varchar(5),"
        " ALTER COLUMN amount TYPE numeric(10, 2)"
    )
    sync.local("INSERT INTO t VALUES (2, 3000000000, 'longer than five', 12.345)")

    job = sync.run()

    assert job["status"] == "succeeded", job
    central = sync.central(f"SELECT id, n, label, amount FROM {sync.central_table} WHERE id = 2")
    assert central == [(2, 3_000_000_000, "longer than five", Decimal("12.345"))]
