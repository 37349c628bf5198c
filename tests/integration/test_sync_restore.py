"""A local store restored from a backup (or replaced) under a source: its next job fails saying so, naming the table
and the resync, and after a resync both sides hold the same records, the edits made since the restore included."""

from __future__ import annotations

import re
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from services.sync import resync as resync_steps
from services.sync.backup import backup_store, restore_store
from services.sync.context import SyncContext
from services.sync.jobs import run_job
from services.sync.pair import Tally
from shared.settings import Settings
from tests.integration.postgres_sync_support import READINGS, open_postgres_sync
from tests.integration.sync_support import (
    Sync,
    allow_connections,
    embedded,
    error_of,
    many_readings,
    open_sync,
    open_table_sync,
)
from tests.support.servers import fresh_postgres_database

# The store refusing to take a new token, as if the job were cut off between the central write and the local one.
CUT_OFF = "CREATE TRIGGER cut_off BEFORE UPDATE ON _kiln_marks BEGIN SELECT RAISE(ABORT, 'cut off'); END"
CUT_OFF_ONCE = CUT_OFF.replace("CREATE TRIGGER", "CREATE TRIGGER IF NOT EXISTS")
TAKEN_BEHIND = (
    r"table 't': the local store has taken the central changes up to (?P<taken>\d+) \(_kiln_pulled\), where the "
    r"central store acknowledged bringing it those up to (?P<acknowledged>\d+)\. It was restored from a backup"
)


def snapshot(store: Path, to: Path) -> Path:
    """A consistent copy of a SQLite store, in use or not (SQLite's online backup, as `kiln backup` takes it)."""
    with closing(sqlite3.connect(store)) as source, closing(sqlite3.connect(to)) as target:
        source.backup(target)
    return to


def put_back(backup: Path, store: Path) -> None:
    """The store is lost, and a copy of its backup is put back at its path."""
    for lost in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
        lost.unlink(missing_ok=True)
    shutil.copyfile(backup, store)


def resync(sync: Sync) -> dict[str, Any]:
    """Ask for a resync over HTTP and run the job it queues here; the job as the api shows it."""
    response = sync.api.post(f"/v1/orgs/{sync.org.org_id}/sync-sources/{sync.source_id}/resync", headers=sync.org.admin)
    assert response.status_code == 202, response.text
    run_job(sync.context, response.json()["jobId"])
    return sync.job(response.json()["jobId"])


def both_sides(sync: Sync) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    local = sync.local("SELECT id, device, value FROM readings ORDER BY id")
    return local, sync.central(f"SELECT id, device, value FROM {sync.central_table} ORDER BY id")


def restored_after_a_push(sync: Sync, tmp_path: Path) -> None:
    """The sequence the loss was found with, on a synced store of 200 records: rows 1 and 2 edited and synced, a
    backup taken (the local log at 202), rows 10-19 edited and pushed (and meanwhile a record deleted on each side
    and one edited centrally, which went up or came down), the store lost and its backup put back, then rows 50 and
    51 edited."""
    sync.local("UPDATE readings SET value = 0.5 WHERE id IN (1, 2)")
    assert sync.run()["status"] == "succeeded"
    backup = snapshot(sync.local_path, tmp_path / "backup.db")
    sync.local("UPDATE readings SET value = value + 1000 WHERE id BETWEEN 10 AND 19")
    sync.local("DELETE FROM readings WHERE id = 40")
    sync.central(f"UPDATE {sync.central_table} SET value = 3000.0 WHERE id = 30")
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 41")
    assert (sync.run()["pushed"], sync.local("SELECT max(seq) FROM _kiln_changes")) == (11, [(213,)])
    put_back(backup, sync.local_path)
    sync.local("UPDATE readings SET value = -1.0 WHERE id IN (50, 51)")


def test_a_store_put_back_from_a_copy_fails_its_job_naming_the_table_and_the_resync(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(200))
    sync.run()
    restored_after_a_push(sync, tmp_path)
    # SQLite numbers the new edits from the restored log's end: under the up watermark (213).
    assert sync.local("SELECT seq, pk FROM _kiln_changes WHERE seq > 202") == [(203, "50"), (204, "51")]

    job = sync.run()

    assert (job["status"], job["pushed"], job["pulled"]) == ("failed", 0, 0)
    assert error_of(job).startswith("table 'readings': the local store is not the one source")
    assert f"POST /v1/orgs/{org_id}/sync-sources/{sync.source_id}/resync" in error_of(job)
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id IN (50, 51)") == [(50.0,), (51.0,)]
    assert sync.local("SELECT value FROM readings WHERE id = 30") == [(30.0,)]


def test_after_a_resync_both_sides_hold_the_same_records_with_the_edits_made_since_the_restore(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(200))
    sync.run()
    restored_after_a_push(sync, tmp_path)
    assert sync.run()["status"] == "failed"
    sync.central(f"UPDATE {sync.central_table} SET value = 6000.0 WHERE id = 60")  # after the restore
    url = f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}/resync"
    assert sync_api.post(url, headers=sync.org.trainer).status_code == 403
    assert sync_api.post(url.replace(sync.source_id, "src0000000000"), headers=sync.org.admin).status_code == 404

    job = resync(sync)
    local, central = both_sides(sync)
    after = [sync.run() for _ in range(2)]

    assert (job["status"], job["trigger"], job["conflicts"]) == ("succeeded", "resync", 2)
    assert local == central and len(local) == 198
    values = {row[0]: row[2] for row in local}
    assert [values[n] for n in (10, 19, 30, 50, 51, 60)] == [1010.0, 1019.0, 3000.0, -1.0, -1.0, 6000.0]
    assert 40 not in values and 41 not in values
    # The edits since the restore went up through the policy, which kept the central versions they replaced.
    replaced = {c["recordKey"]: (c["outcome"], c["centralVersion"]["value"]) for c in sync.conflicts()}
    assert replaced == {"50": ("local-won", 50.0), "51": ("local-won", 51.0)}
    assert [(j["status"], j["pushed"], j["pulled"]) for j in after] == [("succeeded", 0, 0)] * 2
    assert {"sync.resync.requested", "sync.resync.applied"} <= set(sync.audit_actions())


def test_a_resync_asked_again_while_a_job_applies_the_first_is_applied_by_the_next_job(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store restored again while the job applying the first resync ran: the second request, made while that
    job's transaction was open, is not deleted with the first."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(20))
    sync.run()
    url = f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}/resync"
    asked_again: list[Any] = []
    restart_up = resync_steps._restart_up

    def asked_again_meanwhile(*args: Any) -> int:
        if not asked_again:
            asked_again.append(sync_api.post(url, headers=sync.org.admin))
        return restart_up(*args)

    monkeypatch.setattr(resync_steps, "_restart_up", asked_again_meanwhile)
    first = resync(sync)
    [again] = asked_again
    assert (first["status"], again.status_code) == ("succeeded", 202), again.text
    run_job(sync.context, again.json()["jobId"])

    assert sync.job(again.json()["jobId"])["status"] == "succeeded"
    assert sync.audit_actions().count("sync.resync.applied") == 2


def test_a_backup_taken_before_the_first_sync_undoes_no_central_change_once_resynced(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Such a backup holds no change capture: its records are the backup's, not edits made since the restore."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(20))
    backup = snapshot(sync.local_path, tmp_path / "before-the-first-sync.db")
    assert sync.run()["status"] == "succeeded"
    sync.central(f"UPDATE {sync.central_table} SET value = 500.0 WHERE id = 5")
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 6")
    sync.local("UPDATE readings SET value = 700.0 WHERE id = 7")
    assert sync.run()["status"] == "succeeded"
    put_back(backup, sync.local_path)
    assert sync.run()["status"] == "failed"

    job = resync(sync)
    sync.local("UPDATE readings SET value = -8.0 WHERE id = 8")
    after = sync.run()
    local, central = both_sides(sync)

    assert (job["status"], job["conflicts"], after["status"], after["pushed"]) == ("succeeded", 0, "succeeded", 1)
    assert local == central and len(local) == 19
    values = {row[0]: row[2] for row in local}
    assert [values[n] for n in (5, 7, 8)] == [500.0, 700.0, -8.0]
    assert 6 not in values


def test_a_store_put_back_by_kiln_restore_is_known_and_resynced(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(60))
    sync.run()
    backup = backup_store(
        sync_context.store, sync_context.secrets, rules=sync_context.store_rules(org_id), source=str(sync.local_path)
    )
    sync.local("UPDATE readings SET value = value + 1000 WHERE id BETWEEN 10 AND 19")
    sync.run()
    for lost in sync.local_path.parent.glob("plant.db*"):
        lost.unlink()
    restore_store(
        sync_context.store, sync_context.secrets, org_id=org_id, backup_id=backup.backup_id, target=str(sync.local_path)
    )
    sync.local("UPDATE readings SET value = -1.0 WHERE id IN (50, 51)")

    refused = sync.run()
    job = resync(sync)

    assert refused["status"] == "failed" and "table 'readings'" in error_of(refused) and "/resync" in error_of(refused)
    assert job["status"] == "succeeded"
    local, central = both_sides(sync)
    assert local == central and len(local) == 60
    assert [row[2] for row in local if row[0] in (10, 19, 50, 51)] == [1010.0, 1019.0, -1.0, -1.0]


def test_a_restored_down_only_table_is_known_and_comes_back_together_after_a_resync(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_table_sync(
        sync_api, sync_context, org_id, tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", direction="down"
    )
    sync.run()
    sync.central(f"INSERT INTO {sync.central_table} (id, v) SELECT n, 'v' || n FROM generate_series(1, 5) n")
    sync.run()
    backup = snapshot(sync.local_path, tmp_path / "backup.db")
    sync.central(f"UPDATE {sync.central_table} SET v = 'edited' WHERE id = 1")
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")
    sync.central(f"INSERT INTO {sync.central_table} (id, v) VALUES (6, 'v6')")
    assert sync.run()["pulled"] == 3
    put_back(backup, sync.local_path)

    refused = sync.run()
    job = resync(sync)

    assert (refused["status"], refused["pulled"]) == ("failed", 0)
    assert "table 't'" in error_of(refused) and f"{sync.source_id}/resync" in error_of(refused)
    assert job["status"] == "succeeded"
    central = sync.central(f"SELECT id, v FROM {sync.central_table} ORDER BY id")
    assert central == [(1, "edited"), (3, "v3"), (4, "v4"), (5, "v5"), (6, "v6")]
    assert sync.local("SELECT id, v FROM t ORDER BY id") == central
    assert sync.run()["status"] == "succeeded"


def test_a_store_never_restored_is_never_flagged_even_by_jobs_cut_off_midway(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Cut off from the central store mid-job, and between the central and the local write of a token at a job's
    start and at its end (after its batches): each next job runs. The same store put back from a copy is refused."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(1200))
    before = snapshot(sync.local_path, tmp_path / "before.db")
    database = make_url(sync.central_url).database
    job_id = sync.submit()

    def cut_after_a_batch(tally: Tally) -> None:
        if tally.pushed == 500:
            allow_connections(database, allowed=False)

    assert run_job(sync_context, job_id, after_batch=cut_after_a_batch) == "running"  # left for the sync beat
    allow_connections(database, allowed=True)
    statuses = [run_job(sync_context, job_id)]
    sync.local(CUT_OFF)  # the store refuses the next token: a job cut off after the central store expects it
    edit_both_sides(sync)
    cut_at_the_start = sync.run()
    sync.local("DROP TRIGGER cut_off")
    statuses += [cut_at_the_start["status"], sync.run()["status"]]
    edit_both_sides(sync)
    cut_at_the_end = sync.submit()

    def refuse_the_last_token(_tally: Tally) -> None:
        sync.local(CUT_OFF_ONCE)

    statuses.append(run_job(sync_context, cut_at_the_end, after_batch=refuse_the_last_token))
    sync.local("DROP TRIGGER cut_off")
    statuses.append(sync.run()["status"])
    synced = sync.local("SELECT value FROM readings WHERE id IN (7, 8) ORDER BY id")
    put_back(before, sync.local_path)

    assert statuses == ["succeeded", "failed", "succeeded", "failed", "succeeded"]
    assert "cut off" in error_of(cut_at_the_start) and "cut off" in error_of(sync.job(cut_at_the_end))
    assert synced == [(-1.0,), (-2.0,)]
    assert sync.run()["status"] == "failed"


def edit_both_sides(sync: Sync) -> None:
    sync.local("UPDATE readings SET value = -1.0 WHERE id = 7")
    sync.central(f"UPDATE {sync.central_table} SET value = -2.0 WHERE id = 8")


def test_a_backup_taken_while_a_job_ran_is_known_though_the_job_was_cut_off_after_it(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The backup holds the token that job gave the store, and that job never gave another: the position the store
    had taken tells it, and a resync brings down what came after."""
    sync = open_table_sync(
        sync_api, sync_context, org_id, tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", direction="down"
    )
    sync.run()
    sync.central(f"INSERT INTO {sync.central_table} (id, v) SELECT n, 'v' || n FROM generate_series(1, 1200) n")
    database = make_url(sync.central_url).database
    job_id = sync.submit()
    during = tmp_path / "during.db"

    def back_up_then_cut_off(tally: Tally) -> None:
        if tally.pulled == 500:
            snapshot(sync.local_path, during)
        elif tally.pulled == 1000:
            allow_connections(database, allowed=False)

    assert run_job(sync_context, job_id, after_batch=back_up_then_cut_off) == "running"  # left for the sync beat
    allow_connections(database, allowed=True)
    put_back(during, sync.local_path)

    retried = run_job(sync_context, job_id)
    job = resync(sync)

    assert retried == "failed"
    positions = re.match(TAKEN_BEHIND, error_of(sync.job(job_id)))
    assert positions is not None and int(positions["taken"]) < int(positions["acknowledged"])
    assert job["status"] == "succeeded"
    assert sync.local("SELECT count(*), min(v), max(id) FROM t") == [(1200, "v1", 1200)]


def test_a_backup_taken_while_a_job_pushed_is_known_by_the_log_row_last_pushed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Edits made after the backup went up before the job was cut off: the restored log lacks the row acknowledged
    last (and logs new edits under its numbers). After a resync the edits since the restore go up too."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(1200))
    database = make_url(sync.central_url).database
    job_id = sync.submit()
    during = tmp_path / "during.db"

    def back_up_edit_then_cut_off(tally: Tally) -> None:
        if tally.pushed == 500:
            snapshot(sync.local_path, during)
            sync.local("UPDATE readings SET value = -1.0 WHERE id <= 10")
        elif tally.pushed == 1210:
            allow_connections(database, allowed=False)

    assert run_job(sync_context, job_id, after_batch=back_up_edit_then_cut_off) == "running"  # left for the sync beat
    allow_connections(database, allowed=True)
    put_back(during, sync.local_path)
    sync.local("UPDATE readings SET value = -20.0 WHERE id = 20")

    retried = run_job(sync_context, job_id)
    job = resync(sync)

    assert retried == "failed"
    assert error_of(sync.job(job_id)).startswith(
        "table 'readings': the local change log (_kiln_changes) has no row 1210, where the central store "
        "acknowledged pushing up to record '10' at "
    )
    assert job["status"] == "succeeded"
    local, central = both_sides(sync)
    assert local == central and len(local) == 1200
    assert [row[2] for row in local if row[0] in (1, 10, 11, 20)] == [-1.0, -1.0, 11.0, -20.0]


def test_a_store_synced_before_stores_were_marked_is_taken_once_then_known(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(20))
    sync.run()
    # As a Kiln without these marks left both sides: no token, no position taken, no log row kept centrally.
    sync.local("DROP TABLE _kiln_marks")
    sync.local("DROP TABLE _kiln_pulled")
    sync.central("DELETE FROM sync_store_marks")
    sync.central("UPDATE sync_watermarks SET logged_key = NULL, logged_at_ms = NULL")
    unmarked = snapshot(sync.local_path, tmp_path / "unmarked.db")

    jobs = []
    for record in (3, 4):
        sync.local("UPDATE readings SET value = -1.0 WHERE id = :id", {"id": record})
        jobs.append(sync.run())
    kept = sync.central("SELECT logged_key FROM sync_watermarks WHERE direction = 'up'")
    put_back(unmarked, sync.local_path)
    refused = sync.run()

    assert [(job["status"], job["pushed"]) for job in jobs] == [("succeeded", 1), ("succeeded", 1)]
    assert kept == [("4",)]
    assert refused["status"] == "failed"
    assert "the local store is not the one source" in error_of(refused)
    assert "its _kiln_marks holds no marker" in error_of(refused)


def test_a_postgresql_store_put_back_by_pg_restore_is_known_and_resynced(
    sync_api: TestClient, sync_context: SyncContext, org_id: str
) -> None:
    with fresh_postgres_database() as local_url:
        sync = open_postgres_sync(
            sync_api,
            sync_context,
            org_id,
            local_url,
            "last-writer-wins",
            READINGS,
            "INSERT INTO readings SELECT n, 'pump-' || n, n, 'patient ' || n FROM generate_series(1, 60) n",
        )
        sync.run()
        backup = backup_store(
            sync_context.store, sync_context.secrets, rules=sync_context.store_rules(org_id), source=local_url
        )
        sync.local("UPDATE readings SET value = value + 1000 WHERE id BETWEEN 10 AND 19")
        sync.run()
        sync.local("DROP SCHEMA public CASCADE; CREATE SCHEMA public")  # the database lost, made again empty
        restore_store(
            sync_context.store, sync_context.secrets, org_id=org_id, backup_id=backup.backup_id, target=local_url
        )
        sync.local("UPDATE readings SET value = -1.0 WHERE id IN (50, 51)")

        refused = sync.run()
        job = resync(sync)
        local, central = both_sides(sync)

    assert refused["status"] == "failed" and "table 'readings'" in error_of(refused) and "/resync" in error_of(refused)
    assert job["status"] == "succeeded"
    assert local == central and len(local) == 60
    assert [row[2] for row in local if row[0] in (10, 19, 50, 51)] == [1010.0, 1019.0, -1.0, -1.0]


def test_on_the_embedded_default_a_restored_store_is_known_and_resynced(
    settings: Settings, org_id: str, tmp_path: Path
) -> None:
    with embedded(settings, org_id, tmp_path, rows=many_readings(200)) as sync:
        sync.run()
        restored_after_a_push(sync, tmp_path)

        refused = sync.run()
        job = resync(sync)
        local, central = both_sides(sync)

    assert refused["status"] == "failed" and "table 'readings'" in error_of(refused)
    assert job["status"] == "succeeded"
    assert local == central and len(local) == 198
    assert [row[2] for row in local if row[0] in (10, 30, 50)] == [1010.0, 3000.0, -1.0]
