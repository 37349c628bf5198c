"""Sync on the embedded default, where the central store is a SQLite file too (`make demo`, `make up`)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from services.api.routers import sync_jobs, sync_sources
from services.sync import jobs, reseal
from services.sync.beat import requeue_orphaned_jobs
from services.sync.envelope import Keyring
from services.sync.jobs import cancel_job, run_job
from services.sync.pair import Tally
from services.sync.rotation import rotate_org_key
from shared.settings import Settings
from shared.source_lock import one_job_per_source
from tests.integration.sync_support import (
    ODDLY_NAMED_SYNCED,
    ODDLY_NAMED_TABLE,
    Sync,
    embedded,
    embedded_stack,
    hold_a_conflict,
    many_readings,
    oddly_named,
    open_table_sync,
    run_turning_local_after_the_first_batch,
    run_twice_at_once,
)


@pytest.fixture
def embedded_sync(settings: Settings, org_id: str, tmp_path: Path) -> Iterator[Sync]:
    with embedded(settings, org_id, tmp_path) as sync:
        yield sync


def test_records_go_up_sealed_and_central_edits_come_down(embedded_sync: Sync) -> None:
    sync = embedded_sync
    first = sync.run()
    sync.central(f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 2")
    sync.local("INSERT INTO readings VALUES (3, 'pump-3', 3.0, 'Grace Hopper')")
    second = sync.run()

    assert (first["status"], first["pushed"], second["pushed"], second["pulled"]) == ("succeeded", 2, 1, 1)
    assert sync.local("SELECT id, value FROM readings ORDER BY id") == [(1, 1.0), (2, 20.0), (3, 3.0)]
    sealed = sync.central(f"SELECT patient FROM {sync.central_table} ORDER BY id")
    assert all(value.startswith("ek") and "Hopper" not in value for (value,) in sealed)


def test_the_later_of_two_concurrent_edits_wins_on_both_sides(embedded_sync: Sync) -> None:
    sync = embedded_sync
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 2")
    sync.local("UPDATE readings SET value = 99.0 WHERE id = 2")

    job = sync.run()

    assert job["conflicts"] == 1
    assert sync.local("SELECT value FROM readings WHERE id = 2") == [(99.0,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 2") == [(99.0,)]


def test_a_key_rotated_mid_job_leaves_nothing_sealed_under_the_old_key(
    settings: Settings, org_id: str, tmp_path: Path
) -> None:
    with embedded(settings, org_id, tmp_path, rows=many_readings(2000)) as sync:
        rotations: list[dict[str, Any]] = []

        def rotate_after_the_first_batch(_tally: Tally) -> None:
            if not rotations:
                rotations.append(rotate_org_key(sync.context, org_id, actor="operator"))

        status = run_job(sync.context, sync.submit(), after_batch=rotate_after_the_first_batch)
        sealed = [row[0] for row in sync.central(f"SELECT patient FROM {sync.central_table}")]

    assert status == "succeeded"
    assert len(sealed) == 2000 and all(value.startswith(rotations[0]["activeKey"] + ":") for value in sealed)


def test_a_job_run_twice_at_once_runs_once_on_the_embedded_default_too(
    settings: Settings, org_id: str, tmp_path: Path
) -> None:
    """Two sync workers of the embedded stack given the same job (its message delivered twice): the second run
    waits for the first, then finds the job finished."""
    with embedded(settings, org_id, tmp_path, rows=many_readings(2000)) as sync:
        job_id = sync.submit()

        first_run, second_run, twin_waited = run_twice_at_once(sync.context, job_id)

        assert (first_run, second_run, twin_waited) == ("succeeded", ["succeeded"], [True])
        assert sync.job(job_id)["pushed"] == 2000
        assert sync.central(f"SELECT count(*), max(_kiln_version) FROM {sync.central_table}") == [(2000, 1)]


def test_a_record_inserted_into_a_central_copy_is_versioned_and_comes_down(embedded_sync: Sync) -> None:
    """An application's plain INSERT into the central copy the service made, leaving the sync columns out: the
    version must not be NULL before SQLite's capture trigger (which runs after the insert) sets it."""
    sync = embedded_sync
    sync.run()

    sync.central(f"INSERT INTO {sync.central_table} (id, device, value) VALUES (3, 'pump-3', 3.0)")
    [(version, stamp)] = sync.central(f"SELECT _kiln_version, _kiln_hlc FROM {sync.central_table} WHERE id = 3")
    job = sync.run()

    assert version == 1 and stamp.endswith(".central")
    assert (job["status"], job["pulled"], job["errors"]) == ("succeeded", 1, [])
    assert sync.local("SELECT id, device, value, patient FROM readings WHERE id = 3") == [(3, "pump-3", 3.0, None)]


def test_columns_named_with_colons_percents_and_quotes_sync_both_ways_on_the_embedded_store(
    settings: Settings, org_id: str, tmp_path: Path
) -> None:
    """The embedded central copy's triggers name the columns they watch, remade when one is added: as text() built
    from names, a column named `:id` failed them."""
    with embedded_stack(settings, tmp_path) as (api, context):
        sync = open_table_sync(api, context, org_id, tmp_path, *ODDLY_NAMED_TABLE, policy="field-merge")

        synced = oddly_named(sync)

    assert synced == {**ODDLY_NAMED_SYNCED, "central": ODDLY_NAMED_SYNCED["local"]}


def test_a_choice_and_a_rotations_batch_of_conflicts_hold_the_write_lock_from_before_they_read_the_conflict(
    settings: Settings, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite ignores FOR UPDATE: each of the two writers of a conflict's versions takes the database's one write
    lock before it reads them, so the other waits for its commit (services/sync/reseal.py, Conflicts): no other
    connection can begin writing while either holds what it read."""
    with embedded(settings, org_id, tmp_path, policy="manual") as sync:
        held = hold_a_conflict(sync)
        locked_after_reading: dict[str, bool] = {}

        def write_locked() -> bool:
            database = str(make_url(sync.central_url).database)
            with closing(sqlite3.connect(database, timeout=0, isolation_level=None)) as other:
                try:
                    other.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError:  # database is locked
                    return True
                other.execute("ROLLBACK")
                return False

        read_the_conflict, re_encrypt = sync_sources.active_source, reseal.Conflicts._resealed_rows

        def look_after_the_choice_read(*args: Any, **kwargs: Any) -> Any:
            locked_after_reading.setdefault("choice", write_locked())
            return read_the_conflict(*args, **kwargs)

        def look_after_the_batch_read(place: reseal.Conflicts, keyring: Keyring, rows: Any) -> Any:
            locked_after_reading.setdefault("rotation", write_locked())
            return re_encrypt(place, keyring, rows)

        monkeypatch.setattr(sync_jobs, "active_source", look_after_the_choice_read)
        monkeypatch.setattr(reseal.Conflicts, "_resealed_rows", look_after_the_batch_read)
        decided = sync.api.post(
            f"/v1/orgs/{org_id}/conflicts/{held['conflictId']}", json={"keep": "local"}, headers=sync.org.admin
        )
        summary = rotate_org_key(sync.context, org_id, actor="operator")
        job = sync.run()
        [(value, patient)] = sync.central(f"SELECT value, patient FROM {sync.central_table} WHERE id = 1")

    assert decided.status_code == 200, decided.text
    assert locked_after_reading == {"choice": True, "rotation": True}
    assert (job["status"], value, patient.startswith(summary["activeKey"] + ":")) == ("succeeded", 10.0, True)


def test_a_job_running_when_its_org_turns_local_sends_nothing_more_up_on_the_embedded_default_too(
    settings: Settings, org_id: str, tmp_path: Path
) -> None:
    """The switch waits for the batch going up, under the database's write lock; the next batch finds the org local."""
    with embedded(settings, org_id, tmp_path, rows=many_readings(2000)) as sync:
        status, job = run_turning_local_after_the_first_batch(sync)

        assert (status, job["pushed"]) == ("refused", 500)
        assert sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(500,)]


def test_a_job_cancelled_while_a_worker_starts_it_stays_cancelled_on_the_embedded_default_too(
    embedded_sync: Sync,
) -> None:
    """SQLite ignores FOR UPDATE: a worker starting the job must still wait for a cancel (revoked in Flower) that
    holds the job's row, then find it ended, rather than read it queued and write `running` over the cancel."""
    sync = embedded_sync
    job_id = sync.submit()
    started: list[object] = []
    with Session(sync.context.engine) as session:
        assert cancel_job(session, job_id, "revoked by an operator")
        worker = threading.Thread(target=lambda: started.append(jobs._start(sync.context, job_id)))
        worker.start()
        worker.join(timeout=1)  # it reads, and waits for the cancel's commit
        session.commit()
    worker.join(timeout=30)

    assert started == [None]
    assert sync.job(job_id)["status"] == "cancelled"


def test_a_text_key_holding_a_nul_syncs_both_ways_with_a_sqlite_central_store(
    settings: Settings, org_id: str, tmp_path: Path
) -> None:
    """SQLite text holds a NUL on both sides: only a PostgreSQL central store refuses such a key, and the embedded
    default synced it, and its deletion, until a check meant for PostgreSQL refused it here too."""
    with embedded_stack(settings, tmp_path) as (api, context):
        sync = open_table_sync(
            api,
            context,
            org_id,
            tmp_path,
            "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)",
            "INSERT INTO t VALUES ('a' || char(0) || 'b', 'x')",
            key="k",
        )
        first = sync.run()
        copied = sync.central(f"SELECT hex(k), v FROM {sync.central_table}")
        sync.local("DELETE FROM t")
        second = sync.run()
        left = sync.central(f"SELECT count(*) FROM {sync.central_table}")

    assert [(job["status"], job["pushed"]) for job in (first, second)] == [("succeeded", 1), ("succeeded", 1)]
    assert copied == [("610062", "x")] and left == [(0,)]


def test_a_job_left_running_by_a_dead_worker_is_queued_again_once_no_worker_holds_its_sources_file_lock(
    embedded_sync: Sync,
) -> None:
    sync, context = embedded_sync, embedded_sync.context
    job_id = sync.submit()
    sync.central("UPDATE sync_jobs SET status = 'running', attempts = 1 WHERE id = :j", {"j": job_id})

    with one_job_per_source(context.engine, sync.source_id):  # as its live worker holds it
        while_held = requeue_orphaned_jobs(context.engine, context.sessions)
    once_free = requeue_orphaned_jobs(context.engine, context.sessions)

    assert (while_held, len(once_free), sync.job(job_id)["status"]) == ([], 1, "retrying")
    assert (run_job(context, job_id), sync.job(job_id)["attempts"]) == ("succeeded", 2)
