"""Changing a sync source's URL (PATCH /v1/orgs/{org}/sync-sources/{id}): its store reached anew, by a rotated
password or a new path, syncs on from its watermarks; a URL naming another database moves nothing."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from services.sync.context import SyncContext
from services.sync.jobs import run_job
from services.sync.pair import Tally
from services.sync.retention import purge_expired
from shared.db.types import utcnow
from shared.errors import TransientError
from shared.settings import Settings
from tests.integration.conftest import create_org_with_keys
from tests.integration.sync_support import (
    Sync,
    embedded,
    error_of,
    make_local_store,
    many_readings,
    open_sync,
    register,
    run_sql,
)
from tests.support.servers import password_checking_postgres

OLD_PASSWORD, NEW_PASSWORD = "old-Pw-4f1c", "new-Pw-9b2e"


@pytest.fixture
def plant_server() -> Iterator[str]:
    """A PostgreSQL server that checks passwords, holding the plant's database, owned by its role `plant`."""
    with password_checking_postgres() as admin_url:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as connection:
            connection.execute(text(f"CREATE ROLE plant LOGIN PASSWORD '{OLD_PASSWORD}'"))
            connection.execute(text("CREATE DATABASE plant OWNER plant"))
        admin.dispose()
        yield admin_url


def plant_url(admin_url: str, password: str) -> str:
    return (
        make_url(admin_url)
        .set(username="plant", password=password, database="plant")
        .render_as_string(hide_password=False)
    )


def change_url(sync: Sync, url: str, headers: dict[str, str] | None = None) -> Any:
    return sync.api.patch(
        f"/v1/orgs/{sync.org.org_id}/sync-sources/{sync.source_id}",
        json={"url": url},
        headers=headers or sync.org.admin,
    )


def source_of(sync: Sync) -> dict[str, Any]:
    response = sync.api.get(f"/v1/orgs/{sync.org.org_id}/sync-sources/{sync.source_id}", headers=sync.org.viewer)
    return dict(response.json())


def audit_rows(sync: Sync, action: str) -> list[dict[str, Any]]:
    entries = sync.api.get(f"/v1/orgs/{sync.org.org_id}/audit?limit=500", headers=sync.org.admin).json()
    return [entry for entry in entries if entry["action"] == action]


def up_position(sync: Sync) -> int:
    """Where the source's last push stopped in the local change log."""
    of_source = {"s": sync.source_id}
    return int(
        sync.central("SELECT seq FROM sync_watermarks WHERE source_id = :s AND direction = 'up'", of_source)[0][0]
    )


def kept_for(sync: Sync) -> list[Any]:
    """What the central store keeps of the source's progress: its watermarks and store marks."""
    of_source = {"s": sync.source_id}
    return [
        sync.central(
            "SELECT table_name, direction, seq FROM sync_watermarks WHERE source_id = :s ORDER BY 2", of_source
        ),
        sync.central("SELECT token FROM sync_store_marks WHERE source_id = :s", of_source),
    ]


def test_a_postgresql_store_whose_password_was_rotated_syncs_on_from_its_watermarks_once_its_url_is_patched(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    plant_server: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    org = create_org_with_keys(sync_api, org_id)
    local_url = plant_url(plant_server, OLD_PASSWORD)
    run_sql(local_url, "CREATE TABLE readings (id integer PRIMARY KEY, device text, value double precision)")
    run_sql(local_url, "INSERT INTO readings SELECT n, 'pump', n FROM generate_series(1, 50) AS n")
    source_id = register(sync_api, org, local_url, "manual", sensitiveColumns=[])
    sync = Sync(sync_api, sync_context, org, local_url, source_id, sync_context.settings.resolved_database_url)
    schedule = {"pattern": "*/15 * * * *", "timezone": "Europe/Paris", "enabled": True}
    base = f"/v1/orgs/{org_id}/sync-sources/{source_id}"
    assert sync_api.put(f"{base}/schedule", json=schedule, headers=org.admin).status_code == 200
    assert sync.run()["pushed"] == 50
    # Both sides edit record 1 (held for review), then each side edits what the next job must move.
    sync.local("UPDATE readings SET value = -1 WHERE id = 1")
    sync.central(f"UPDATE {sync.central_table} SET value = -2 WHERE id = 1")
    assert sync.run()["conflicts"] == 1
    sync.local("UPDATE readings SET value = 1000 WHERE id IN (7, 8)")
    sync.central(f"UPDATE {sync.central_table} SET value = 2000 WHERE id = 9")
    pushed_up_to = up_position(sync)

    run_sql(plant_server, f"ALTER ROLE plant PASSWORD '{NEW_PASSWORD}'")
    job_id = sync.submit()
    with pytest.raises(TransientError):
        run_job(sync_context, job_id)
    refused = sync.job(job_id)
    changed = change_url(sync, plant_url(plant_server, NEW_PASSWORD))
    sync.local_url = plant_url(plant_server, NEW_PASSWORD)
    run_job(sync_context, job_id)  # the worker's retry, reading the source anew
    retried = sync.job(job_id)

    assert refused["status"] == "retrying"
    assert "password authentication failed" in error_of(refused)
    assert changed.status_code == 200, changed.text
    assert changed.json() == {**source_of(sync), "urlConfirmed": False}
    assert (retried["status"], retried["pushed"], retried["pulled"]) == ("succeeded", 2, 1)
    assert source_of(sync)["urlConfirmed"] is True
    assert sync.local("SELECT value FROM readings WHERE id IN (1, 7, 9) ORDER BY id") == [(-1.0,), (1000.0,), (2000.0,)]
    # On from where it stopped: the two edits logged since, nothing logged anew.
    assert sync.local("SELECT count(*), max(seq) FROM _kiln_changes WHERE seq > :s", {"s": pushed_up_to}) == [
        (2, up_position(sync))
    ]
    open_conflicts = sync.conflicts("open")
    assert [(c["recordKey"], c["status"]) for c in open_conflicts] == [("1", "open")]
    assert {k: v for k, v in sync_api.get(f"{base}/schedule", headers=org.viewer).json().items() if k in schedule} == (
        schedule
    )
    assert sync.run()["pushed"] == 0
    # The new password: sealed for this source, never shown, audited or logged.
    [(sealed,)] = sync.central("SELECT password_encrypted FROM sync_sources WHERE id = :s", {"s": source_id})
    assert sync_context.secrets.decrypt(sealed, context=f"sync-source:{source_id}") == NEW_PASSWORD
    [audited] = audit_rows(sync, "sync.source.url.changed")
    assert audited["detail"] == {"url": source_of(sync)["url"], "previousUrl": source_of(sync)["url"]}
    assert "***" in source_of(sync)["url"]
    for shown in (changed.text, repr(audit_rows(sync, "sync.source.url.changed")), caplog.text):
        assert NEW_PASSWORD not in shown and OLD_PASSWORD not in shown


def moved(store: Path, to: Path) -> Path:
    """The store's file moved to another folder, with its write-ahead log if SQLite left one."""
    to.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{store}{suffix}").exists():
            shutil.move(f"{store}{suffix}", f"{to}{suffix}")
    return to


def test_a_sqlite_store_moved_to_another_folder_of_the_org_syncs_on_incrementally(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(300))
    assert sync.run()["pushed"] == 300
    sync.local("UPDATE readings SET value = -1.0 WHERE id IN (10, 20)")
    sync.central(f"UPDATE {sync.central_table} SET value = -3.0 WHERE id = 30")
    new_path = moved(sync.local_path, tmp_path / org_id / "ward-b" / "plant.db")

    lost = sync.run()
    changed = change_url(sync, f"sqlite:///{new_path}")
    sync.local_url = f"sqlite:///{new_path}"
    after = [sync.run(), sync.run()]

    assert lost["status"] == "failed" and "does not exist" in error_of(lost)
    assert changed.status_code == 200, changed.text
    assert changed.json()["url"] == f"sqlite:///{new_path}"
    assert [(job["status"], job["pushed"], job["pulled"]) for job in after] == [
        ("succeeded", 2, 1),
        ("succeeded", 0, 0),
    ]
    assert sync.local("SELECT value FROM readings WHERE id IN (10, 20, 30) ORDER BY id") == [(-1.0,), (-1.0,), (-3.0,)]
    assert sync.local("SELECT count(*) FROM _kiln_changes") == [(302,)]  # nothing logged anew
    assert source_of(sync)["urlConfirmed"] is True


def store_shape(path: Path) -> list[tuple[Any, ...]]:
    """What a SQLite file holds: its tables and triggers, and the records of `readings`."""
    with sqlite3.connect(path) as connection:
        schema = connection.execute("SELECT type, name FROM sqlite_master ORDER BY name").fetchall()
        return schema + connection.execute("SELECT * FROM readings ORDER BY id").fetchall()


def test_a_url_naming_another_database_fails_every_job_and_purge_moving_nothing_until_it_is_put_back(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(20))
    sync.run()
    sync.local("UPDATE readings SET value = -1.0 WHERE id = 5")
    # The org's other store, which another source syncs (its `visits`): it holds that source's marks and change log.
    other = tmp_path / org_id / "other.db"
    make_local_store(other, [(1, "scale-1", 70.5, "Mary Somerville"), (99, "scale-9", 80.0, "Emmy Noether")])
    run_sql(f"sqlite:///{other}", "CREATE TABLE visits (id INTEGER PRIMARY KEY, ward TEXT)")
    visits_id = register(
        sync_api, sync.org, f"sqlite:///{other}", "last-writer-wins", name="visits", sensitiveColumns=[]
    )
    visits = Sync(sync_api, sync_context, sync.org, f"sqlite:///{other}", visits_id, sync.central_url, "visits")
    assert visits.run()["status"] == "succeeded"
    before = (store_shape(other), kept_for(sync), sync.central(f"SELECT * FROM {sync.central_table} ORDER BY id"))
    own_url = sync.local_url

    changed = change_url(sync, f"sqlite:///{other}")
    job = sync.run()
    resync = sync_api.post(f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}/resync", headers=sync.org.admin)
    run_job(sync_context, resync.json()["jobId"])
    purged = purge_expired(sync_context, org_id, now=utcnow() + timedelta(days=10_000))
    after = (store_shape(other), kept_for(sync), sync.central(f"SELECT * FROM {sync.central_table} ORDER BY id"))
    unconfirmed = source_of(sync)["urlConfirmed"]
    put_back = change_url(sync, own_url)
    synced = sync.run()

    assert changed.status_code == 200, changed.text
    assert job["status"] == "failed"
    assert error_of(job) == (
        f"the store at sqlite:///{other} is not the one source {sync.source_id} syncs with: its _kiln_marks holds no "
        f"marker of this source, so it is another database, and nothing was moved. Give the source its own store's "
        f"URL (PATCH /v1/orgs/{org_id}/sync-sources/{sync.source_id}), or register this store as a new source "
        f"(POST /v1/orgs/{org_id}/sync-sources)"
    )
    assert sync.job(resync.json()["jobId"])["errors"][-1]["error"] == error_of(job)  # a resync does not let it in
    assert purged == 0
    assert "is not the one source" in audit_rows(sync, "sync.purge.failed")[0]["detail"]["error"]
    assert after == before and unconfirmed is False
    assert put_back.status_code == 200
    # Its own store again: the resync asked meanwhile runs there, and brings the edit made before up.
    assert (synced["status"], synced["trigger"]) == ("succeeded", "api")
    assert sync.central(f"SELECT id, value FROM {sync.central_table} ORDER BY id") == sync.local(
        "SELECT id, value FROM readings ORDER BY id"
    )
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 5") == [(-1.0,)]


def test_a_sqlite_file_outside_the_orgs_folder_fails_the_next_job_naming_the_rule_and_creates_nothing(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    outside = moved(sync.local_path, tmp_path / "elsewhere" / "plant.db")

    changed = change_url(sync, f"sqlite:///{outside}")
    job = sync.run()

    assert changed.status_code == 200, changed.text
    assert job["status"] == "failed"
    assert f"is not in {tmp_path / org_id}/" in error_of(job)
    assert source_of(sync)["urlConfirmed"] is False


def test_a_stored_url_naming_a_driver_not_installed_fails_the_job_saying_so(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A source stored before such URLs were refused: its job ends failed with the reason, never left running."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    with sync_context.engine.begin() as connection:
        connection.execute(
            text("UPDATE sync_sources SET url = :url WHERE id = :id"),
            {"url": f"sqlite+nosuch:///{sync.local_path}", "id": sync.source_id},
        )

    job = sync.run()

    assert job["status"] == "failed"
    assert "sqlite.nosuch" in error_of(job)


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "mysql://plant@db.example.org/records",
        "postgresql+asyncpg://plant@db.example.org/records",
        "postgresql://plant@db.example.org/records?password=s3cret-pw",
        "postgresql://plant@db.example.org/records?sslkey=/etc/kiln/other-org.key",
        "postgresql://plant@db.example.org/records?passfile=/root/.pgpass",
        "sqlite:///relative/plant.db",
        "sqlite:////srv/kiln/stores/acme/plant.db?mode=ro",
        "sqlite:////srv/kiln/stores/acme/plant?copy.db",
        "sqlite:////srv/kiln/stores/acme/pl%00ant.db",
        "",
    ],
    ids=[
        "not-a-url",
        "mysql",
        "unshipped-driver",
        "password-parameter",
        "sslkey",
        "passfile",
        "relative-sqlite",
        "sqlite-query",
        "sqlite-query-without-value",
        "sqlite-nul",
        "empty",
    ],
)
def test_a_bad_url_is_refused_naming_url_and_nothing_changes(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, url: str
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    before = source_of(sync)

    refused = change_url(sync, url)

    assert (refused.status_code, refused.json()["field"]) == (422, "url"), refused.text
    assert "s3cret-pw" not in refused.text
    assert source_of(sync) == before
    assert audit_rows(sync, "sync.source.url.changed") == []
    assert sync.run()["status"] == "succeeded"


def test_a_url_of_a_store_whose_table_another_source_syncs_is_refused_as_at_registration(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    second_store = tmp_path / org_id / "second.db"
    make_local_store(second_store, [])
    second_id = register(sync_api, sync.org, f"sqlite:///{second_store}", "last-writer-wins")
    second = Sync(sync_api, sync_context, sync.org, f"sqlite:///{second_store}", second_id, sync.central_url)
    before = source_of(second)
    spelled_otherwise = sync.local_url.replace("/plant.db", "/../" + org_id + "/./plant.db")

    refused = change_url(second, spelled_otherwise)
    same_store = change_url(sync, spelled_otherwise)

    assert (refused.status_code, refused.json()["field"]) == (409, "tables"), refused.text
    assert refused.json()["error"] == (
        f"table 'readings' of this store is synced by source {sync.source_id} already: two sources of one table "
        "would each miss what the other brings down"
    )
    assert source_of(second) == before
    assert [row["target"] for row in audit_rows(sync, "sync.source.url.changed")] == [sync.source_id]
    assert same_store.status_code == 200, same_store.text  # its own store, spelled otherwise


def test_only_an_admin_of_the_sources_org_changes_its_url_and_not_while_it_is_being_deleted(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    other = create_org_with_keys(sync_api, "x" + org_id)
    url = sync.local_url

    answers = [
        change_url(sync, url, sync.org.viewer).status_code,
        change_url(sync, url, sync.org.trainer).status_code,
        change_url(sync, url, other.admin).status_code,
        sync_api.patch(
            f"/v1/orgs/{other.org_id}/sync-sources/{sync.source_id}", json={"url": url}, headers=other.admin
        ).status_code,
    ]
    sync_api.delete(f"/v1/orgs/{org_id}/sync-sources/{sync.source_id}", headers=sync.org.admin)
    deleting = change_url(sync, url)

    assert answers == [403, 403, 404, 404]
    assert deleting.status_code == 409 and "is being deleted" in deleting.json()["error"]
    assert audit_rows(sync, "sync.source.url.changed") == []


def changed_during_and_after_a_job(sync: Sync) -> tuple[Any, Any]:
    """The source's URL changed (to the same one) after the first batch of a job, and again once it has ended."""
    job_id = sync.submit()
    during: list[Any] = []

    def change_after_the_first_batch(_tally: Tally) -> None:
        if not during:
            during.append(change_url(sync, sync.local_url))

    assert run_job(sync.context, job_id, after_batch=change_after_the_first_batch) == "succeeded"
    return during[0], change_url(sync, sync.local_url)


def test_a_url_change_is_refused_while_a_job_of_the_source_runs_and_taken_once_it_has_ended(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(1200))

    during, after = changed_during_and_after_a_job(sync)

    assert during.status_code == 409
    assert during.json()["error"].startswith(f"a job of sync source {sync.source_id} is running")
    assert after.status_code == 200, after.text
    assert [row["target"] for row in audit_rows(sync, "sync.source.url.changed")] == [sync.source_id]


def test_on_the_embedded_default_a_url_change_is_refused_while_a_job_runs_too(
    settings: Settings, org_id: str, tmp_path: Path
) -> None:
    with embedded(settings, org_id, tmp_path, rows=many_readings(1200)) as sync:
        during, after = changed_during_and_after_a_job(sync)

    assert (during.status_code, after.status_code) == (409, 200), (during.text, after.text)
