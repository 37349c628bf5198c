"""Deleting a sync source (DELETE /v1/orgs/{org}/sync-sources/{id}): marked by the api, done by a sync worker, so
that a table registered with a wrong policy or without its sensitive columns can be registered again; and the
registration of a table that could never sync for the org's residency, refused."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from services.sync import source_deletion
from services.sync.beat import fire_due_sync_schedules
from services.sync.context import SyncContext
from services.sync.jobs import run_job
from services.sync.pair import Tally
from services.sync.rotation import rotate_org_key
from services.sync.source_deletion import delete_source
from shared.db.models import SyncSource
from shared.db.types import utcnow
from shared.queues import sync_queue
from shared.schemas import OrgConfig
from shared.settings import Settings
from shared.source_lock import SourceBusy, one_job_per_source
from shared.sync_jobs import REQUEUE_AFTER, residency_refusal
from tests.integration.conftest import ADMIN, create_org_with_keys
from tests.integration.postgres_sync_support import READINGS as PG_READINGS
from tests.integration.postgres_sync_support import TWO_READINGS as PG_TWO_READINGS
from tests.integration.postgres_sync_support import open_postgres_sync
from tests.integration.sync_support import (
    Sync,
    beat_tick,
    embedded,
    error_of,
    many_readings,
    open_sync,
    open_table_sync,
    register,
    run_sql,
)
from tests.support.polling import eventually
from tests.support.servers import fresh_postgres_database
from tests.support.workers import celery_worker

# Kiln's tables that keep rows for a source, and the column naming it.
SHARED_TABLES = (
    "sync_watermarks",
    "sync_store_marks",
    "sync_resyncs",
    "sync_conflicts",
    "sync_bases",
    "sync_schedules",
)


@pytest.fixture
def local_url() -> Iterator[str]:
    """A PostgreSQL local store: a second, fresh database beside the central one."""
    with fresh_postgres_database() as url:
        yield url


def ask_deletion(sync: Sync, source_id: str | None = None) -> dict[str, Any]:
    source_id = source_id or sync.source_id
    response = sync.api.delete(f"/v1/orgs/{sync.org.org_id}/sync-sources/{source_id}", headers=sync.org.admin)
    assert response.status_code == 202, response.text
    return dict(response.json())


def deleted(sync: Sync) -> dict[str, Any]:
    """Ask for the deletion over the api, and do it here as the sync worker would."""
    ask_deletion(sync)
    return delete_source(sync.context, sync.source_id, org_id=sync.org.org_id)


def deletion_queued_at(sync: Sync) -> datetime:
    with sync.context.sessions() as session:
        queued_at = session.get_one(SyncSource, sync.source_id).deletion_queued_at
    assert queued_at is not None
    return queued_at


def register_again(sync: Sync, **table: Any) -> Sync:
    source_id = register(sync.api, sync.org, sync.local_url, "last-writer-wins", **table)
    return Sync(sync.api, sync.context, sync.org, sync.local_url, source_id, sync.central_url, sync.table)


def admin_key_id(sync: Sync) -> str:
    keys = sync.api.get(f"/v1/orgs/{sync.org.org_id}/keys", headers=sync.org.admin).json()
    return str(next(key["keyId"] for key in keys if key["role"] == "admin"))


def audit_of(sync: Sync, action: str) -> list[dict[str, Any]]:
    entries = sync.api.get(f"/v1/orgs/{sync.org.org_id}/audit?limit=500", headers=sync.org.admin).json()
    return [entry for entry in entries if entry["action"] == action]


def central_tables_of(sync: Sync, source_id: str) -> list[tuple[Any, ...]]:
    return sync.central(
        "SELECT table_name FROM information_schema.tables WHERE table_name LIKE :p", {"p": f"sync_{source_id}_%"}
    )


def rows_kept_for(sync: Sync, source_id: str) -> dict[str, int]:
    counts = {
        table: sync.central(f"SELECT count(*) FROM {table} WHERE source_id = :s", {"s": source_id})[0][0]
        for table in SHARED_TABLES
    }
    counts["sync_changes"] = sync.central(
        "SELECT count(*) FROM sync_changes WHERE tbl LIKE :p", {"p": f"sync_{source_id}_%"}
    )[0][0]
    return counts


def test_a_source_registered_again_with_a_new_sensitive_column_holds_only_its_ciphertext_and_syncs_both_ways(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The reviewer's case: `patient` forgotten at registration went up in plain text. Deleted and registered again
    with it, the new central copy holds it sealed only, every local record included: those the old source wrote
    down (which the local change log never logged) as well as those edited locally."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, sensitiveColumns=[])
    assert sync.run()["status"] == "succeeded"
    assert sync.central(f"SELECT patient FROM {sync.central_table} WHERE id = 1") == [("Ada Lovelace",)]
    sync.central(f"INSERT INTO {sync.central_table} (id, device, value, patient) VALUES (3, 'pump-3', 3.0, 'Grace')")
    assert sync.run()["pulled"] == 1  # record 3 is local now, written by the service: not in the local log

    deleted(sync)
    again = register_again(sync, sensitiveColumns=["patient"])
    first = again.run()

    assert (first["status"], first["pushed"], first["pulled"]) == ("succeeded", 3, 0), first
    copied = again.central(f"SELECT id, device, patient FROM {again.central_table} ORDER BY id")
    assert [(row[0], row[1]) for row in copied] == [(1, "pump-1"), (2, "pump-2"), (3, "pump-3")]
    assert all(row[2].startswith("ek") for row in copied)
    dumped = repr(again.central(f"SELECT CAST(t AS text) FROM {again.central_table} t"))
    assert not any(name in dumped for name in ("Ada", "Lovelace", "Alan", "Turing", "Grace"))
    # Both ways, under the new source.
    again.local("INSERT INTO readings VALUES (4, 'pump-4', 4.0, 'Edsger Dijkstra')")
    again.central(f"UPDATE {again.central_table} SET value = 20.0 WHERE id = 2")
    second = again.run()
    assert (second["status"], second["pushed"], second["pulled"]) == ("succeeded", 1, 1), second
    assert again.local("SELECT id, value, patient FROM readings ORDER BY id") == [
        (1, 1.0, "Ada Lovelace"),
        (2, 20.0, "Alan Turing"),
        (3, 3.0, "Grace"),
        (4, 4.0, "Edsger Dijkstra"),
    ]
    [(sealed,)] = again.central(f"SELECT patient FROM {again.central_table} WHERE id = 4")
    assert sealed.startswith("ek") and "Dijkstra" not in sealed
    assert again.run()["pushed"] == 0


def test_a_deleted_sources_central_copies_and_its_rows_in_kilns_tables_are_gone_and_the_audit_says_what_went(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "field-merge")  # field-merge keeps bases
    first_job = sync.submit()
    run_job(sync_context, first_job)
    sync.local("UPDATE readings SET patient = 'Ada King' WHERE id = 1")
    sync.central(f"UPDATE {sync.central_table} SET device = 'pump-9' WHERE id = 1")
    assert sync.run()["conflicts"] == 1
    base = f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}"
    put = sync_api.put(f"{base}/schedule", json={"pattern": "0 * * * *"}, headers=sync.org.admin)
    assert put.status_code == 200, put.text
    resync = sync_api.post(f"{base}/resync", headers=sync.org.admin)
    assert resync.status_code == 202, resync.text
    sync.central(f"UPDATE {sync.central_table} SET value = 7.0 WHERE id = 2")  # not brought down before the deletion
    kept = rows_kept_for(sync, sync.source_id)
    assert all(kept.values()), kept  # something of each, for the deletion to remove
    audit_before = sync.central("SELECT id, action FROM audit_log WHERE org_id = :o ORDER BY id", {"o": org_id})

    summary = deleted(sync)

    assert central_tables_of(sync, sync.source_id) == []
    assert sync.central(
        "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid WHERE c.relname LIKE :p",
        {"p": f"sync_{sync.source_id}_%"},
    ) == [(0,)]
    assert rows_kept_for(sync, sync.source_id) == dict.fromkeys(kept, 0)
    # The audit trail only grew; the jobs' history stays; the source is gone from the api.
    assert (
        sync.central(
            "SELECT id, action FROM audit_log WHERE org_id = :o AND id <= :last ORDER BY id",
            {"o": org_id, "last": audit_before[-1][0]},
        )
        == audit_before
    )
    assert sync.job(first_job)["status"] == "succeeded"
    assert sync_api.get(f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}", headers=sync.org.viewer).status_code == 404
    assert sync_api.get(f"/v1/orgs/{org_id}/sync-sources", headers=sync.org.viewer).json() == []
    assert sync.central("SELECT password_encrypted FROM sync_sources WHERE id = :s", {"s": sync.source_id}) == [(None,)]
    [entry] = audit_of(sync, "sync.source.deleted")
    assert (entry["actor"], entry["target"]) == (admin_key_id(sync), sync.source_id)
    assert entry["detail"]["tables"] == [
        {
            "table": "readings",
            "centralTable": sync.central_table,
            "records": 2,
            "changeLogRows": 2,  # the two central edits
            "unpulledChanges": 1,
        }
    ]
    assert entry["detail"]["removed"] == {
        "watermarks": kept["sync_watermarks"],
        "storeMarks": 1,
        "resyncs": 1,
        "conflicts": 1,
        "bases": kept["sync_bases"],
        "schedules": 1,
    }
    assert len(entry["detail"]["jobsRefused"]) == 1  # the resync's job
    assert summary == entry["detail"]


def test_a_job_queued_before_the_deletion_ends_refused_saying_the_source_was_deleted(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    queued = sync.submit()

    deleted(sync)
    # Its message comes after the deletion: the job is finished already, and nothing runs or crashes.
    status = run_job(sync_context, queued)

    job = sync.job(queued)
    assert (status, job["status"], job["attempts"], job["pushed"]) == ("refused", "refused", 0, 0)
    assert error_of(job) == f"sync source {sync.source_id} was deleted: the job was not run"
    assert central_tables_of(sync, sync.source_id) == []
    assert [entry["target"] for entry in audit_of(sync, "sync.job.refused")] == [queued]


def test_a_job_whose_message_comes_while_its_source_is_being_deleted_is_refused_saying_so(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    queued = sync.submit()
    ask_deletion(sync)

    status = run_job(sync_context, queued)

    job = sync.job(queued)
    assert (status, job["status"], job["attempts"]) == ("refused", "refused", 0)
    assert f"sync source {sync.source_id} is being deleted" in error_of(job)
    assert sync.central("SELECT count(*) FROM sync_watermarks WHERE source_id = :s", {"s": sync.source_id}) == [(0,)]
    assert delete_source(sync_context, sync.source_id, org_id=org_id)["jobsRefused"] == []


def test_a_deletion_while_the_job_runs_holds_no_worker_and_removes_what_the_job_synced_once_it_ends(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Waiting for the job would hold one of the sync workers every org shares for the job's length: the deletion
    is refused busy at once (its task tries again later), and done once the job has ended."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(1200))
    job_id = sync.submit()
    while_running: list[Exception] = []

    def delete_after_the_first_batch(_tally: Tally) -> None:
        if not while_running:
            ask_deletion(sync)
            try:
                delete_source(sync_context, sync.source_id, org_id=org_id)
            except SourceBusy as busy:
                while_running.append(busy)

    assert run_job(sync_context, job_id, after_batch=delete_after_the_first_batch) == "succeeded"

    assert [type(error) for error in while_running] == [SourceBusy]
    assert sync.job(job_id)["pushed"] == 1200
    assert delete_source(sync_context, sync.source_id, org_id=org_id)["tables"][0]["records"] == 1200
    assert central_tables_of(sync, sync.source_id) == []


def test_a_sync_worker_takes_other_orgs_jobs_while_a_deletion_waits_for_its_sources_job_then_deletes(
    sync_api: TestClient, sync_context: SyncContext, central_settings: Settings, org_id: str, tmp_path: Path
) -> None:
    """One worker process (the solo pool): had the deletion waited for the source's job, it would have held it."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    other = open_sync(sync_api, sync_context, f"{org_id}-other", tmp_path)
    source = f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}"

    with celery_worker("services.sync.celery_app", central_settings, tmp_path / "worker.log"):
        with one_job_per_source(sync_context.engine, sync.source_id):  # the source's job runs
            ask_deletion(sync)
            other_job = other.submit()
            assert eventually(lambda: other.job(other_job)["status"] == "succeeded", seconds=60)
            assert sync_api.get(source, headers=sync.org.viewer).json()["status"] == "deleting"
        assert eventually(lambda: sync_api.get(source, headers=sync.org.viewer).status_code == 404, seconds=90)

    assert central_tables_of(sync, sync.source_id) == []


def test_a_source_being_deleted_takes_no_job_resync_schedule_change_nor_a_second_source_of_its_tables(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    base = f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}"
    assert sync_api.put(f"{base}/schedule", json={"pattern": "0 * * * *"}, headers=sync.org.admin).status_code == 200

    answer = ask_deletion(sync)

    assert answer == {"sourceId": sync.source_id, "status": "deleting", "queue": f"sync.{org_id}"}
    assert sync_api.get(base, headers=sync.org.viewer).json()["status"] == "deleting"
    refused = [
        sync_api.post(f"/v1/orgs/{org_id}/sync-jobs", json={"sourceId": sync.source_id}, headers=sync.org.trainer),
        sync_api.post(f"{base}/resync", headers=sync.org.admin),
        sync_api.put(f"{base}/schedule", json={"pattern": "5 * * * *"}, headers=sync.org.admin),
        sync_api.delete(f"{base}/schedule", headers=sync.org.admin),
    ]
    assert [response.status_code for response in refused] == [409, 409, 409, 409]
    assert all("is being deleted" in response.json()["error"] for response in refused)
    assert refused[0].json()["field"] == "sourceId"
    spec = {"name": "readings", "primaryKey": "id"}
    duplicate = sync_api.post(
        f"/v1/orgs/{org_id}/sync-sources", json={"url": sync.local_url, "tables": [spec]}, headers=sync.org.admin
    )
    assert duplicate.status_code == 409 and "which is being deleted" in duplicate.json()["error"], duplicate.text
    # A due schedule fires nothing for it meanwhile.
    assert fire_due_sync_schedules(sync_context.sessions, now=utcnow() + timedelta(hours=2)) == []
    # Asked again, it is queued again (a message lost with Redis is sent anew); it is done once.
    assert ask_deletion(sync)["status"] == "deleting"
    delete_source(sync_context, sync.source_id, org_id=org_id)
    assert delete_source(sync_context, sync.source_id, org_id=org_id) == {"status": "deleted already"}
    assert len(audit_of(sync, "sync.source.deletion.requested")) == 2
    assert len(audit_of(sync, "sync.source.deleted")) == 1
    assert sync_api.delete(base, headers=sync.org.admin).status_code == 404
    again = sync_api.post(
        f"/v1/orgs/{org_id}/sync-sources", json={"url": sync.local_url, "tables": [spec]}, headers=sync.org.admin
    )
    assert again.status_code == 201, again.text


def test_deletions_asked_at_once_are_recorded_as_one_first_request_by_its_key_and_the_others_as_asked_again(
    backend_api: TestClient, backend_engine: Engine, org_id: str
) -> None:
    """Each deletion read the source unmarked, so each was audited as the first (`askedBefore` false) and the last
    to commit wrote its key as the one that asked. They take turns now, on PostgreSQL and on SQLite."""
    org = create_org_with_keys(backend_api, org_id)
    other_admin = backend_api.post(f"/v1/orgs/{org_id}/keys", json={"role": "admin"}, headers=ADMIN).json()
    admins = [org.admin, {"Authorization": f"Bearer {other_admin['key']}"}]
    body = {"url": "postgresql://plant@db.example.org/records", "tables": [{"name": "readings", "primaryKey": "id"}]}
    created = backend_api.post(f"/v1/orgs/{org_id}/sync-sources", json=body, headers=org.admin)
    assert created.status_code == 201, created.text
    source_id = created.json()["sourceId"]
    start = threading.Barrier(8)

    def delete_at_once(attempt: int) -> int:
        start.wait()
        url = f"/v1/orgs/{org_id}/sync-sources/{source_id}"
        return backend_api.delete(url, headers=admins[attempt % 2]).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(delete_at_once, range(8))) == [202] * 8

    trail = backend_api.get(f"/v1/orgs/{org_id}/audit?limit=100", headers=org.admin).json()[::-1]
    asked = [entry for entry in trail if entry["action"] == "sync.source.deletion.requested"]
    assert [entry["detail"]["askedBefore"] for entry in asked] == [False] + [True] * 7
    with backend_engine.connect() as connection:
        marked_by = connection.scalar(select(SyncSource.deletion_requested_by).where(SyncSource.id == source_id))
    assert marked_by == asked[0]["actor"]


def test_only_an_admin_of_the_sources_own_org_may_delete_it(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    other = create_org_with_keys(sync_api, "x" + org_id)
    url = f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}"

    answers = {
        "another org's admin, on the source's org": sync_api.delete(url, headers=other.admin).status_code,
        "another org's admin, under its own org": sync_api.delete(
            f"/v1/orgs/{other.org_id}/sync-sources/{sync.source_id}", headers=other.admin
        ).status_code,
        "viewer": sync_api.delete(url, headers=sync.org.viewer).status_code,
        "trainer": sync_api.delete(url, headers=sync.org.trainer).status_code,
    }

    assert answers == {
        "another org's admin, on the source's org": 404,
        "another org's admin, under its own org": 404,
        "viewer": 403,
        "trainer": 403,
    }
    assert sync_api.get(url, headers=sync.org.viewer).json()["status"] == "active"
    assert audit_of(sync, "sync.source.deletion.requested") == []
    assert sync.run()["status"] == "succeeded"


def test_registering_a_table_that_sends_up_for_an_org_keeping_its_data_local_is_refused_for_the_jobs_reason(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    org = create_org_with_keys(sync_api, org_id)
    patched = sync_api.patch(f"/v1/orgs/{org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN)
    assert patched.status_code == 200, patched.text
    url = f"sqlite:///{tmp_path / org_id / 'plant.db'}"
    answers = {}
    for direction in ("up", "both", "down"):
        spec = {"name": f"t_{direction}", "primaryKey": "id", "direction": direction}
        response = sync_api.post(
            f"/v1/orgs/{org_id}/sync-sources", json={"url": url, "tables": [spec]}, headers=org.admin
        )
        answers[direction] = (response.status_code, response.json())

    assert answers["up"][0] == answers["both"][0] == 409
    assert answers["down"][0] == 201
    assert answers["both"][1]["field"] == "tables"
    # Word for word what a job of such a source would answer.
    local = OrgConfig.model_validate({"dataResidency": "local"})
    expected = residency_refusal(local, _unsaved_source(org_id, "t_both", "both"))
    assert answers["both"][1]["error"] == expected
    listed = sync_api.get(f"/v1/orgs/{org_id}/sync-sources", headers=org.viewer).json()
    assert [source["tables"][0]["name"] for source in listed] == ["t_down"]
    assert [e["action"] for e in sync_api.get(f"/v1/orgs/{org_id}/audit", headers=org.admin).json()].count(
        "sync.source.created"
    ) == 1


def _unsaved_source(org_id: str, name: str, direction: str) -> SyncSource:
    tables = [{"name": name, "primaryKey": "id", "direction": direction}]
    return SyncSource(id="src0", org_id=org_id, url="", tables=tables)


def test_a_key_rotation_after_a_column_was_made_sensitive_leaves_the_older_plain_audit_copies_as_they_were(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A deletion carried over while `patient` was not sensitive is audited with it in plain text (the audit trail
    is append-only). The table registered again with `patient` sealed: a rotation re-encrypts what is sealed and
    leaves those older copies as they were, rather than fail on them and never rotate again."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, sensitiveColumns=[])
    sync.run()
    sync.local("DELETE FROM readings WHERE id = 1")
    sync.run()
    deleted(sync)
    again = register_again(sync, sensitiveColumns=["patient"])
    again.run()
    again.local("DELETE FROM readings WHERE id = 2")
    again.run()

    summary = rotate_org_key(sync_context, org_id, actor="operator")

    copies = {e["target"]: e["detail"]["deleted"]["patient"] for e in audit_of(again, "sync.delete")}
    assert copies["readings/1"] == "Ada Lovelace"  # as it was audited
    assert copies["readings/2"].startswith(summary["activeKey"] + ":")
    assert summary["resealedValues"] == 1  # the sealed audit copy (the new central copy is empty now)


def test_a_deletion_on_the_embedded_central_store_drops_the_copy_and_its_triggers_and_the_table_syncs_again(
    settings: Settings, org_id: str, tmp_path: Path
) -> None:
    with embedded(settings, org_id, tmp_path) as sync:
        sync.run()
        sync.central(f"UPDATE {sync.central_table} SET value = 9.0 WHERE id = 1")

        summary = deleted(sync)

        like = {"p": f"%{sync.source_id}%"}
        assert sync.central("SELECT type, name FROM sqlite_master WHERE name LIKE :p OR tbl_name LIKE :p", like) == []
        assert sync.central("SELECT count(*) FROM sync_changes WHERE tbl LIKE :p", like) == [(0,)]
        assert summary["tables"][0]["records"] == 2 and summary["tables"][0]["unpulledChanges"] == 1
        again = register_again(sync, sensitiveColumns=["patient"])
        assert (again.run()["pushed"], again.local("SELECT value FROM readings WHERE id = 1")) == (2, [(1.0,)])
        assert again.central(f"SELECT count(*) FROM {again.central_table}") == [(2,)]


def deletion_that_fails_at_its_end(sync: Sync, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ask for the deletion, and have the worker's fail at its very end (its audit row): all of it or nothing."""
    ask_deletion(sync)

    def failing(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the central store went away")

    monkeypatch.setattr(source_deletion, "record_change", failing)
    with pytest.raises(RuntimeError):
        delete_source(sync.context, sync.source_id, org_id=sync.org.org_id)
    monkeypatch.undo()


def test_a_deletion_that_fails_removes_nothing_and_can_be_done_again(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    kept = rows_kept_for(sync, sync.source_id)

    deletion_that_fails_at_its_end(sync, monkeypatch)

    assert central_tables_of(sync, sync.source_id) == [(sync.central_table,)]
    assert sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(2,)]
    assert rows_kept_for(sync, sync.source_id) == kept
    assert (
        sync_api.get(f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}", headers=sync.org.viewer).json()["status"]
        == "deleting"
    )
    assert delete_source(sync_context, sync.source_id, org_id=org_id)["tables"][0]["records"] == 2
    assert central_tables_of(sync, sync.source_id) == []


def test_a_deletion_that_fails_on_the_embedded_central_store_removes_nothing_either(
    settings: Settings, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite runs DDL in the transaction only once it has begun: the deletion writes before it drops."""
    with embedded(settings, org_id, tmp_path) as sync:
        sync.run()

        deletion_that_fails_at_its_end(sync, monkeypatch)

        assert sync.central("SELECT count(*) FROM sqlite_master WHERE name = :t", {"t": sync.central_table}) == [(1,)]
        assert sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(2,)]
        assert sync.central("SELECT count(*) FROM sync_watermarks WHERE source_id = :s", {"s": sync.source_id}) != [
            (0,)
        ]


def test_a_table_of_a_postgresql_local_store_registered_again_syncs_with_the_triggers_already_there(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    sync = open_postgres_sync(
        sync_api, sync_context, org_id, local_url, "last-writer-wins", PG_READINGS, PG_TWO_READINGS, sensitiveColumns=[]
    )
    sync.run()
    sync.central(f"INSERT INTO {sync.central_table} (id, device, value, patient) VALUES (3, 'pump-3', 3.0, 'Grace')")
    sync.run()
    deleted(sync)

    again = register_again(sync, sensitiveColumns=["patient"])
    first = again.run()
    sync.local("UPDATE readings SET value = 5.0 WHERE id = 3")
    second = again.run()

    assert [(job["status"], job["pushed"]) for job in (first, second)] == [("succeeded", 3), ("succeeded", 1)]
    rows = again.central(f"SELECT id, value, patient FROM {again.central_table} ORDER BY id")
    assert [(row[0], row[1]) for row in rows] == [(1, 1.0), (2, 2.0), (3, 5.0)]
    assert not any(name in json.dumps([row[2] for row in rows]) for name in ("Ada", "Alan", "Grace"))
    assert run_sql(local_url, "SELECT count(*) FROM pg_trigger WHERE tgname = '_kiln_capture'") == [(1,)]


T_BY_ID: dict[str, Any] = {"name": "t", "primaryKey": "id", "sensitiveColumns": []}
T_BY_CODE: dict[str, Any] = {"name": "t", "primaryKey": "code", "sensitiveColumns": []}
# A table whose key is `id` until its source is deleted and `code` once it is registered again.
KEYED_TWICE = (
    "CREATE TABLE t (id integer PRIMARY KEY, code text NOT NULL UNIQUE, v text)",
    "INSERT INTO t VALUES (1, 'a', 'one'), (2, 'b', 'two')",
)


def test_a_postgresql_table_registered_again_under_another_key_logs_later_edits_under_the_new_one(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    """The registration being undone keyed the table by `id`; the capture made for it logged later edits by their
    `id`, which the new source (keyed by `code`) took for records deleted on both sides: never sent, and the job
    said succeeded."""
    sync = open_postgres_sync(sync_api, sync_context, org_id, local_url, "last-writer-wins", *KEYED_TWICE, **T_BY_ID)
    assert sync.run()["pushed"] == 2
    deleted(sync)
    sync.local("ALTER TABLE t DROP CONSTRAINT t_pkey")
    sync.local("ALTER TABLE t ADD PRIMARY KEY (code)")

    again = register_again(sync, **T_BY_CODE)
    first = again.run()
    again.local("UPDATE t SET v = 'one, edited' WHERE code = 'a'")
    again.local("INSERT INTO t VALUES (3, 'c', 'three')")
    second = again.run()

    assert [(job["status"], job["pushed"]) for job in (first, second)] == [("succeeded", 2), ("succeeded", 2)]
    records = [("a", 1, "one, edited"), ("b", 2, "two"), ("c", 3, "three")]
    assert again.central(f"SELECT code, id, v FROM {again.central_table} ORDER BY code") == records
    assert again.local("SELECT pk FROM _kiln_changes ORDER BY seq DESC LIMIT 2") == [("c",), ("a",)]
    assert run_sql(local_url, "SELECT count(*) FROM pg_trigger WHERE tgname = '_kiln_capture'") == [(1,)]


def renames_its_key_and_syncs_again(sync: Sync) -> None:
    """Synced, the source deleted, the key column renamed, the table registered again under the new name: the
    store's own writes work, and its later insert and edit reach the new central copy."""
    sync.run()
    deleted(sync)
    sync.local("ALTER TABLE t RENAME COLUMN id TO record_id")

    again = register_again(sync, name="t", primaryKey="record_id", sensitiveColumns=[])
    first = again.run()
    again.local("INSERT INTO t VALUES (2, 'two')")
    again.local("UPDATE t SET v = 'one, edited' WHERE record_id = 1")
    second = again.run()

    assert [(job["status"], job["pushed"]) for job in (first, second)] == [("succeeded", 1), ("succeeded", 2)]
    records = [(1, "one, edited"), (2, "two")]
    assert again.central(f"SELECT record_id, v FROM {again.central_table} ORDER BY 1") == records


def test_a_postgresql_table_whose_key_column_was_renamed_takes_writes_again_once_registered_again(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, local_url: str
) -> None:
    """The capture made for `id` named the column: once renamed, the store's own inserts failed (`column "id" not
    found`), and still did after the table was registered again under `record_id`, while its jobs succeeded."""
    sync = open_postgres_sync(
        sync_api,
        sync_context,
        org_id,
        local_url,
        "last-writer-wins",
        "CREATE TABLE t (id integer PRIMARY KEY, v text)",
        "INSERT INTO t VALUES (1, 'one')",
        **T_BY_ID,
    )
    renames_its_key_and_syncs_again(sync)


def test_a_sqlite_table_registered_again_under_another_key_syncs_its_later_edits(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """SQLite changes a primary key by making the table anew, which drops its triggers but not its log: the new
    source read the old registration's log rows, text keys that an integer key is not, and failed every job."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id INTEGER NOT NULL UNIQUE, code TEXT PRIMARY KEY, v TEXT)",
        "INSERT INTO t VALUES (1, 'a', 'one'), (2, 'b', 'two')",
        key="code",
    )
    assert sync.run()["pushed"] == 2
    sync.local("UPDATE t SET v = 'one, edited once' WHERE code = 'a'")
    sync.run()
    deleted(sync)
    for statement in (
        "CREATE TABLE t_new (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, v TEXT)",
        "INSERT INTO t_new SELECT id, code, v FROM t",
        "DROP TABLE t",
        "ALTER TABLE t_new RENAME TO t",
    ):
        sync.local(statement)

    again = register_again(sync, **T_BY_ID)
    first = again.run()
    again.local("UPDATE t SET v = 'one, edited' WHERE id = 1")
    again.local("INSERT INTO t VALUES (3, 'c', 'three')")
    second = again.run()

    assert [(job["status"], job["pushed"], error_of(job)) for job in (first, second)] == [
        ("succeeded", 2, ""),
        ("succeeded", 2, ""),
    ]
    records = [(1, "a", "one, edited"), (2, "b", "two"), (3, "c", "three")]
    assert again.central(f"SELECT id, code, v FROM {again.central_table} ORDER BY id") == records


def test_a_sqlite_table_whose_key_column_was_renamed_syncs_once_registered_again(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """SQLite renames the column in its triggers too: the store's writes go on, and are logged under the new
    registration's key."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
        "INSERT INTO t VALUES (1, 'one')",
    )
    renames_its_key_and_syncs_again(sync)


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
def test_a_job_whose_key_column_was_renamed_under_its_source_fails_naming_it_and_the_way_out(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, local_url: str, store: str
) -> None:
    """The source still registered, its key column renamed: the table cannot sync by it, and on PostgreSQL the
    capture made for it fails the store's writes; the job fails saying so, and what to do."""
    create, insert = "CREATE TABLE t (id integer PRIMARY KEY, v text)", "INSERT INTO t VALUES (1, 'one')"
    if store == "postgresql":
        sync = open_postgres_sync(
            sync_api, sync_context, org_id, local_url, "last-writer-wins", create, insert, **T_BY_ID
        )
    else:
        sync = open_table_sync(sync_api, sync_context, org_id, tmp_path, create, insert)
    assert sync.run()["status"] == "succeeded"
    sync.local("ALTER TABLE t RENAME COLUMN id TO record_id")

    job = sync.run()

    capture = "; until then the change capture made for 'id' makes the store's writes to the table fail"
    assert (job["status"], job["pushed"], error_of(job)) == (
        "failed",
        0,
        "table 't': its primaryKey 'id' is no longer a column of the table (its primary key is ['record_id']), "
        "renamed or dropped since the source was registered: delete the source and register the table again by its "
        f"key as it is now, and run a job{capture if store == 'postgresql' else ''}",
    )


def test_a_sqlite_table_whose_log_ends_with_a_blob_key_of_no_utf8_syncs_once_registered_again(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A TEXT key held as the BLOB X'FF', written and deleted since the last job, is logged as text that is no UTF-8:
    the source registered again starts after the table's last log row, which no read could get."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)",
        "INSERT INTO t VALUES ('plain', 'a')",
        key="k",
    )
    sync.run()
    sync.local("INSERT INTO t VALUES (X'FF', 'b')")
    sync.local("DELETE FROM t WHERE k = X'FF'")
    deleted(sync)

    again = register_again(sync, name="t", primaryKey="k", sensitiveColumns=[])
    first = again.run()
    again.local("INSERT INTO t VALUES ('later', 'c')")
    second = again.run()

    assert [(job["status"], job["pushed"], error_of(job)) for job in (first, second)] == [
        ("succeeded", 1, ""),
        ("succeeded", 1, ""),
    ]
    assert again.central(f"SELECT k, v FROM {again.central_table} ORDER BY k") == [("later", "c"), ("plain", "a")]


def test_a_deletion_whose_message_was_lost_is_queued_again_by_the_sync_beat_and_done_by_a_sync_worker(
    sync_api: TestClient,
    sync_context: SyncContext,
    central_settings: Settings,
    org_id: str,
    tmp_path: Path,
    producer: Celery,
    broker: redis.Redis,
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    assert sync.run()["status"] == "succeeded"
    ask_deletion(sync)
    broker.delete(sync_queue(org_id))  # the message lost: Redis restarted without persistence, the queue purged
    worker_log = tmp_path / "worker.log"
    source = f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}"

    with celery_worker("services.sync.celery_app", central_settings, worker_log):
        assert sync_api.get(source, headers=sync.org.viewer).json()["status"] == "deleting"
        sent = beat_tick(producer, sync_context, now=deletion_queued_at(sync) + REQUEUE_AFTER)
        deadline = time.monotonic() + 60
        while sync_api.get(source, headers=sync.org.viewer).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)

    assert sent == 1
    assert sync_api.get(source, headers=sync.org.viewer).status_code == 404, worker_log.read_text()
    assert central_tables_of(sync, sync.source_id) == []
    assert sync.audit_actions()[:3] == [  # newest first
        "sync.source.deleted",
        "sync.source.deletion.requeued",
        "sync.source.deletion.requested",
    ]


def test_a_deletion_queued_recently_or_queued_again_already_is_not_queued_again(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, producer: Celery, broker: redis.Redis
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    ask_deletion(sync)
    asked = deletion_queued_at(sync)
    late = asked + REQUEUE_AFTER

    recent = [beat_tick(producer, sync_context, now=now) for now in (utcnow(), late - timedelta(seconds=1))]
    queued_while_recent = broker.llen(sync_queue(org_id))
    again = [beat_tick(producer, sync_context, now=now) for now in (late, late + timedelta(minutes=1))]

    assert (recent, queued_while_recent) == ([0, 0], 1)
    assert (again, broker.llen(sync_queue(org_id))) == ([1, 0], 2)  # once; the bound runs again from then
    assert deletion_queued_at(sync) == late
    first, second = (delete_source(sync_context, sync.source_id, org_id=org_id) for _ in range(2))  # both messages
    assert (first["tables"][0]["table"], second) == ("readings", {"status": "deleted already"})


def test_a_deletion_being_done_or_done_is_not_queued_again(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    tmp_path: Path,
    producer: Celery,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    ask_deletion(sync)
    much_later = deletion_queued_at(sync) + 3 * REQUEUE_AFTER
    drop_table = source_deletion._drop_table
    sent_meanwhile: list[int] = []

    def beat_ticks_first(session: Any, name: str) -> None:
        sent_meanwhile.append(beat_tick(producer, sync_context, now=much_later))
        drop_table(session, name)

    monkeypatch.setattr(source_deletion, "_drop_table", beat_ticks_first)
    delete_source(sync_context, sync.source_id, org_id=org_id)
    sent_after = beat_tick(producer, sync_context, now=much_later)

    assert (sent_meanwhile, sent_after) == ([0], 0)
    assert broker.llen(sync_queue(org_id)) == 1  # the api's message only
    assert "sync.source.deletion.requeued" not in sync.audit_actions()
