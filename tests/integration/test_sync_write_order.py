"""An application's write to a record a sync batch is writing, on a PostgreSQL store: the write waits for the batch
and then lands, and neither fails. The batch holds the store's change log and then locks the records it writes; a
write that locked its record first and then waited for the log would have made each wait for the other, and the
server would have failed one of them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import services.sync.conflicts as conflicts
import services.sync.transfer as transfer
from services.sync.context import SyncContext
from tests.integration.postgres_sync_support import READINGS, TWO_READINGS, open_postgres_sync
from tests.integration.sync_support import Sync, open_sync, run_sql
from tests.support.polling import start_until_it_waits_for_a_lock
from tests.support.servers import fresh_postgres_database


@pytest.fixture
def sync(sync_api: TestClient, sync_context: SyncContext, org_id: str) -> Iterator[Sync]:
    """An org syncing `readings` (records 1 and 2) of a local PostgreSQL database, both ways, last writer wins."""
    with fresh_postgres_database() as url:
        synced = open_postgres_sync(sync_api, sync_context, org_id, url, "last-writer-wins", READINGS, TWO_READINGS)
        synced.run()
        yield synced


def job_with_a_write_waiting(
    sync: Sync, monkeypatch: pytest.MonkeyPatch, at: tuple[Any, str], url: str, sql: str
) -> tuple[dict[str, Any], list[Exception]]:
    """A job whose call of `at` (a module, and the name of a function it calls holding a batch's locks) first starts
    the application's `sql` on the database at `url`, let on until it waits for a lock; then, once that write has
    ended, one more job. The first job, and the errors the write ended with."""
    failed: list[Exception] = []

    def application_write() -> None:
        try:
            run_sql(url, sql)
        except Exception as error:
            failed.append(error)

    write = threading.Thread(target=application_write)
    module, name = at
    act = getattr(module, name)

    def act_once_the_write_waits(*args: Any, **kwargs: Any) -> Any:
        start_until_it_waits_for_a_lock(write, url)
        return act(*args, **kwargs)

    monkeypatch.setattr(module, name, act_once_the_write_waits)
    job = sync.run()
    write.join()
    monkeypatch.undo()
    sync.run()
    return job, failed


def records(sync: Sync) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    local = sync.local("SELECT id, value FROM readings ORDER BY id")
    central = sync.central(f"SELECT id, value FROM {sync.central_table} ORDER BY id")
    return local, central


def test_a_local_write_of_a_record_a_pull_is_writing_waits_for_the_pull_and_lands(
    sync: Sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync.central(f"UPDATE {sync.central_table} SET value = 10.0 WHERE id = 1")
    local_write = "UPDATE readings SET value = 20.0 WHERE id = 1"
    job, failed = job_with_a_write_waiting(sync, monkeypatch, (transfer, "_pull"), sync.local_url, local_write)

    assert (job["status"], job["pulled"], failed) == ("succeeded", 1, [])
    assert records(sync) == ([(1, 20.0), (2, 2.0)], [(1, 20.0), (2, 2.0)])


def test_a_central_write_of_a_record_a_push_is_writing_waits_for_the_push_and_lands(
    sync: Sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync.local("UPDATE readings SET value = 10.0 WHERE id = 1")
    central_write = f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 1"
    job, failed = job_with_a_write_waiting(sync, monkeypatch, (transfer, "_push"), sync.central_url, central_write)

    assert (job["status"], job["pushed"], failed) == ("succeeded", 1, [])
    assert records(sync) == ([(1, 20.0), (2, 2.0)], [(1, 20.0), (2, 2.0)])


def test_a_central_write_of_a_record_whose_chosen_version_is_being_written_waits_for_the_choices_and_lands(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record 1's local version chosen, record 2's central one: the job writes record 1 centrally, then logs record
    2 to go down. A central write of record 1 in between waits for the job, rather than hold the log while it
    waits for the record, which the job's logging would then wait for."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    sync.run()
    sync.local("UPDATE readings SET value = 10.0 WHERE id IN (1, 2)")
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id IN (1, 2)")
    sync.run()
    held = {int(conflict["recordKey"]): conflict["conflictId"] for conflict in sync.conflicts("open")}
    for record, keep in ((1, "local"), (2, "central")):
        chosen = sync_api.post(
            f"/v1/orgs/{org_id}/conflicts/{held[record]}", json={"keep": keep}, headers=sync.org.admin
        )
        assert chosen.status_code == 200, chosen.text
    central_write = f"UPDATE {sync.central_table} SET value = 30.0 WHERE id = 1"
    job, failed = job_with_a_write_waiting(
        sync, monkeypatch, (conflicts, "log_merges"), sync.central_url, central_write
    )

    assert (job["status"], failed) == ("succeeded", [])
    assert records(sync) == ([(1, 30.0), (2, 99.0)], [(1, 30.0), (2, 99.0)])


def test_a_job_gives_tables_whose_triggers_an_older_kiln_made_the_lock_first_trigger_without_sending_them_again(
    sync: Sync,
) -> None:
    sync.local("DROP TRIGGER _kiln_log_first ON readings")
    sync.central(f"DROP TRIGGER _kiln_log_first ON {sync.central_table}")
    job = sync.run()

    trigger = "SELECT count(*) FROM pg_trigger WHERE tgname = '_kiln_log_first' AND tgrelid = CAST(:t AS regclass)"
    assert sync.local(trigger, {"t": "readings"}) == [(1,)]
    assert sync.central(trigger, {"t": sync.central_table}) == [(1,)]
    assert (job["status"], job["pushed"], job["pulled"]) == ("succeeded", 0, 0)
