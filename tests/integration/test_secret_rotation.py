"""KILN_SECRET_KEY rotated, on real PostgreSQL, Redis and S3: every kind of secret stored under the old key (a
datasource's password, a sync source's password, an org's sync envelope key, a backup) is still read with the old
key retired; `kiln secrets rewrap` moves them all under the new key; `kiln secrets status` then counts none under
the old one; with the old key removed everything still works. A secret under a key no longer configured fails the
run, the job or the command saying so, without a traceback."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.engine import make_url

from deploy.local import ai4i
from services.api.app import create_app
from services.sync.backup import backup_store
from services.sync.context import SyncContext
from services.sync.jobs import run_job
from services.trainer.context import WorkerContext
from services.trainer.training import run_training
from shared.crypto import FORMAT, SecretBox
from shared.db.models import DataSource
from shared.db.session import session_scope
from shared.settings import Settings
from shared.stored_secrets import datasource_context
from tests.integration.conftest import OrgKeys, create_org_with_keys, run_of, submit
from tests.integration.plant_database_support import START, write_scada_table
from tests.integration.secret_keys_support import KEY_A, KEY_B, A, B, keyed
from tests.integration.sync_support import (
    TWO_READINGS,
    an_earlier_kilns_backup,
    error_of,
    kiln,
    make_large_store,
    make_local_store,
    register,
    run_sql,
    signalled_once_there,
)
from tests.support.servers import fresh_postgres_database

ROWS = 3000
KINDS = ("datasource passwords", "sync-source passwords", "sync envelope keys", "backups")


def with_password(url: str, password: str) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


@dataclass(frozen=True)
class Stored:
    """An org with one secret of every kind, all sealed under key A."""

    org: OrgKeys
    source_id: str
    local_url: str
    backup_id: str
    folder: Path


@pytest.fixture
def plant_database() -> Iterator[str]:
    """The org's historian on PostgreSQL, to train from."""
    with fresh_postgres_database() as url:
        write_scada_table(url, ai4i.generate(ROWS, seed=3, start=START, interval=timedelta(minutes=1)))
        yield url


@pytest.fixture
def local_store() -> Iterator[str]:
    """The org's local sync store on PostgreSQL."""
    with fresh_postgres_database() as url:
        run_sql(url, "CREATE TABLE readings (id integer PRIMARY KEY, device text, value float, patient text)")
        run_sql(url, "INSERT INTO readings VALUES (1, 'pump-1', 1.0, 'Ada Lovelace')")
        yield url


@pytest.fixture
def stored(central_settings: Settings, org_id: str, tmp_path: Path, plant_database: str, local_store: str) -> Stored:
    """Under key A: a datasource and a sync source, each with a password, the org's envelope key (made by a first
    job), and a backup of a SQLite store."""
    settings = keyed(central_settings, KEY_A)
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        org = create_org_with_keys(api, org_id)
        column_map = {f"TAG_{name.upper()}": name for name in ai4i.FEATURES} | {"failure": ai4i.TARGET}
        datasource = {
            "url": with_password(plant_database, "hist0rian-pw"),
            "table": "readings",
            "timestampColumn": "recorded_at",
            "columnMap": column_map,
        }
        assert api.put(f"/v1/orgs/{org_id}/datasource", headers=org.admin, json=datasource).status_code == 200
        source_id = register(api, org, with_password(local_store, "st0re-pw"), "last-writer-wins")
    folder = tmp_path / org_id  # the org's folder of SQLite stores (the settings' local_stores_dir)
    folder.mkdir()
    make_local_store(folder / "plant.db", TWO_READINGS)
    assert sync_job(settings, org, source_id)["status"] == "succeeded"
    with closing(SyncContext.open(settings)) as context:
        manifest = backup_store(
            context.store, context.secrets, rules=context.store_rules(org_id), source=str(folder / "plant.db")
        )
    return Stored(org, source_id, local_store, manifest.backup_id, folder)


def training(settings: Settings, org: OrgKeys) -> dict[str, object]:
    """A run from the org's datasource, carried out by a worker with these settings: the run as the api shows it."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        end = START + timedelta(minutes=ROWS - 1)
        run_id = submit(
            api,
            org,
            None,
            dataRange={"startDate": START.isoformat(), "endDate": end.isoformat()},
            hyperparameters={"numIterations": 10},
        )
        worker = WorkerContext.open(settings)
        try:
            run_training(run_id, worker)
        finally:
            worker.close()
        return run_of(api, org, run_id)


def sync_job(settings: Settings, org: OrgKeys, source_id: str) -> dict[str, object]:
    """A job of the source, run by a sync worker with these settings: the job as the api shows it."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        queued = api.post(f"/v1/orgs/{org.org_id}/sync-jobs", json={"sourceId": source_id}, headers=org.trainer)
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["jobId"]
        context = SyncContext.open(settings)
        try:
            run_job(context, job_id)
        finally:
            context.close()
        return dict(api.get(f"/v1/orgs/{org.org_id}/sync-jobs/{job_id}", headers=org.viewer).json())


def restored(settings: Settings, stored: Stored, name: str) -> list[tuple[object, ...]]:
    """The backup restored by a process with these settings: the records it holds."""
    target = stored.folder / f"{name}.db"
    restore = kiln(settings, "restore", stored.org.org_id, stored.backup_id, str(target))
    assert restore.returncode == 0, restore.stderr
    with closing(sqlite3.connect(target)) as connection:
        return connection.execute("SELECT * FROM readings ORDER BY id").fetchall()


def assert_every_kind_reads(settings: Settings, stored: Stored, name: str) -> None:
    run = training(settings, stored.org)
    assert run["status"] in {"succeeded", "rejected"}, run  # trained on the rows read with the password: gates aside
    run_sql(stored.local_url, f"INSERT INTO readings VALUES ({len(name) + 10}, 'pump-9', 9.0, 'Grace Hopper')")
    job = sync_job(settings, stored.org, stored.source_id)
    assert (job["status"], job["pushed"]) == ("succeeded", 1), job  # its password opened, and the org's envelope key
    assert restored(settings, stored, name) == TWO_READINGS


def status_lines(settings: Settings, code: int) -> list[str]:
    """`kiln secrets status`'s lines, once it exited `code`: 0 all under the current key, 3 some left to rewrap, 4
    some under a key not configured."""
    status = kiln(settings, "secrets", "status")
    assert status.returncode == code, (status.stdout, status.stderr)
    return status.stdout.splitlines()


def test_every_kind_of_secret_reads_with_its_key_retired_moves_under_the_new_key_and_reads_without_the_old(
    central_settings: Settings, stored: Stored
) -> None:
    rotated, without_a = keyed(central_settings, KEY_B, KEY_A), keyed(central_settings, KEY_B)

    assert_every_kind_reads(rotated, stored, "rotated")
    before = status_lines(rotated, 3)
    rewrap = kiln(rotated, "secrets", "rewrap")
    again = kiln(rotated, "secrets", "rewrap")
    after = status_lines(rotated, 0)
    assert_every_kind_reads(without_a, stored, "without-a")

    assert before[0] == f"KILN_SECRET_KEY {B} (current); KILN_SECRET_KEY_RETIRED: {A}"
    assert before[1:] == [
        *(f"{kind}: 1 under {A} (retired)" for kind in KINDS),
        f"retired key {A}: 4 still under it: `kiln secrets rewrap` moves them",
    ]
    assert rewrap.returncode == 0, rewrap.stderr
    assert rewrap.stdout.splitlines() == [f"{kind}: 1 moved under {B}, 0 under it already" for kind in KINDS]
    assert again.stdout.splitlines() == [f"{kind}: 0 moved under {B}, 1 under it already" for kind in KINDS]
    assert after[1:] == [*(f"{kind}: 1 under {B} (current)" for kind in KINDS), f"retired key {A}: nothing under it"]


def test_a_rewrap_is_audited_per_secret_and_backup_with_the_cli_as_actor(
    central_settings: Settings, stored: Stored
) -> None:
    rewrap = kiln(keyed(central_settings, KEY_B, KEY_A), "secrets", "rewrap")

    assert rewrap.returncode == 0, rewrap.stderr
    with TestClient(create_app(central_settings), raise_server_exceptions=False) as api:
        entries = api.get(f"/v1/orgs/{stored.org.org_id}/audit", headers=stored.org.admin).json()
    rewrapped = [entry for entry in entries if entry["action"] in {"secret.rewrapped", "backup.rewrapped"}]
    assert sorted((entry["action"], entry["detail"].get("kind", "backup")) for entry in rewrapped) == [
        ("backup.rewrapped", "backup"),
        ("secret.rewrapped", "datasource passwords"),
        ("secret.rewrapped", "sync envelope keys"),
        ("secret.rewrapped", "sync-source passwords"),
    ]
    assert {entry["actor"] for entry in rewrapped} == {"cli"}
    assert all(entry["detail"]["from"] == A and entry["detail"]["to"] == B for entry in rewrapped)
    assert stored.backup_id in {entry["target"] for entry in rewrapped}


def test_secrets_an_earlier_kiln_sealed_are_counted_as_the_old_format_and_moved_to_one_that_names_the_key(
    central_settings: Settings, stored: Stored, sync_context: SyncContext
) -> None:
    """Before tokens named their key: a `v1:` password and a backup sealed whole, both under key A."""
    token = SecretBox(KEY_A).encrypt("hist0rian-pw", context=datasource_context(stored.org.org_id))
    old_token = f"{FORMAT}:{token.rsplit(':', 1)[1]}"  # the same nonce, ciphertext and tag, naming no key
    with session_scope(sync_context.sessions) as session:
        session.execute(
            update(DataSource).where(DataSource.org_id == stored.org.org_id).values(password_encrypted=old_token)
        )
    an_earlier_kilns_backup(sync_context.store, KEY_A, stored.org.org_id, stored.folder / "plant.db")
    rotated = keyed(central_settings, KEY_B, KEY_A)

    before = status_lines(rotated, 3)
    rewrap = kiln(rotated, "secrets", "rewrap")
    after = status_lines(rotated, 0)

    assert "datasource passwords: 1 under the old format (no key named)" in before
    assert f"backups: 1 under {A} (retired), 1 under the old format (no key named)" in before
    assert "2 in the old format name no key: keep every retired key until a rewrap moved them" in before
    assert rewrap.returncode == 0, rewrap.stderr
    assert f"backups: 2 moved under {B}, 0 under it already" in rewrap.stdout.splitlines()
    assert f"retired key {A}: nothing under it" in after and not any("old format" in line for line in after)
    assert_every_kind_reads(keyed(central_settings, KEY_B), stored, "without-a")


def test_a_backup_whose_manifest_is_damaged_is_named_and_keeps_the_retired_key_from_being_called_free(
    central_settings: Settings, stored: Stored, sync_context: SyncContext
) -> None:
    """Its manifest does not say which key the backup is under: it may be the retired one, so neither command may
    let that key go."""
    org_id = stored.org.org_id
    damaged = backup_store(
        sync_context.store,
        sync_context.secrets,
        rules=sync_context.store_rules(org_id),
        source=str(stored.folder / "plant.db"),
    ).backup_id
    sync_context.store.put_bytes(f"orgs/{org_id}/backups/{damaged}.json", b"{bad")
    rotated = keyed(central_settings, KEY_B, KEY_A)
    named = (
        f"kiln secrets: backup {damaged} cannot be restored: its manifest orgs/{org_id}/backups/{damaged}.json is "
        "damaged (not JSON: "
    )

    rewrap = kiln(rotated, "secrets", "rewrap")
    status = kiln(rotated, "secrets", "status")

    assert rewrap.returncode == 1
    assert f"backups: 1 moved under {B}, 0 under it already" in rewrap.stdout.splitlines()
    assert [line.startswith(named) for line in rewrap.stderr.splitlines()] == [True]
    assert status.returncode == 4, (status.stdout, status.stderr)
    [backups] = [line.removeprefix("backups: ") for line in status.stdout.splitlines() if line.startswith("backups: ")]
    # Keys are listed in the order of their ids, which are random here: "damaged manifest" may come first.
    assert sorted(backups.split(", ")) == sorted(
        [f"1 under {B} (current)", "1 under a key unknown (their manifest is damaged)"]
    )
    assert f"retired key {A}: nothing counted under it" in status.stdout.splitlines()
    assert "1 under a damaged manifest name no key: keep every retired key until each is mended or removed" in (
        status.stdout
    )
    assert [line.startswith(named) for line in status.stderr.splitlines()] == [True]


def test_secrets_under_a_key_no_longer_configured_fail_saying_so_without_a_traceback(
    central_settings: Settings, stored: Stored
) -> None:
    without_a = keyed(central_settings, KEY_B)
    not_configured = f"was sealed under platform key {A}, which is not configured"

    run = training(without_a, stored.org)
    job = sync_job(without_a, stored.org, stored.source_id)
    restore = kiln(without_a, "restore", stored.org.org_id, stored.backup_id, str(stored.folder / "r.db"))
    rewrap = kiln(without_a, "secrets", "rewrap")
    status = status_lines(without_a, 4)

    assert run["status"] == "failed" and run["error"] == (
        f"the secret for datasource:{stored.org.org_id} {not_configured}: neither KILN_SECRET_KEY nor "
        "KILN_SECRET_KEY_RETIRED holds it"
    )
    assert job["status"] == "failed" and error_of(job) == (
        f"the secret for sync-source:{stored.source_id} {not_configured}: neither KILN_SECRET_KEY nor "
        "KILN_SECRET_KEY_RETIRED holds it"
    )
    assert restore.returncode == 1 and not_configured in restore.stderr
    assert len(restore.stderr.splitlines()) == 1 and not (stored.folder / "r.db").exists()
    assert rewrap.returncode == 1 and len(rewrap.stderr.splitlines()) == 4  # one line per secret or backup
    assert all(not_configured in line for line in rewrap.stderr.splitlines())
    assert f"datasource passwords: 1 under {A} (not configured: they do not open)" in status


def a_plain_store(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(16) == b"SQLite format 3\0"


def test_a_rewrap_killed_half_way_leaves_no_plain_store_and_run_again_no_partial_object(
    central_settings: Settings, org_id: str, tmp_path: Path
) -> None:
    """Killed while it uploads a backup re-sealed under key B, into a folder object store: the org's store was never
    on disk in the clear, and the run that finishes the rewrap removes the partial object the killed one left."""
    objects, scratch, folder = tmp_path / "objects", tmp_path / "tmp", tmp_path / org_id
    under_a = keyed(central_settings, KEY_A).model_copy(update={"object_store": f"file://{objects}"})
    rotated, without_a = keyed(under_a, KEY_B, KEY_A), keyed(under_a, KEY_B)
    with TestClient(create_app(under_a), raise_server_exceptions=False) as api:
        create_org_with_keys(api, org_id)
    folder.mkdir()
    scratch.mkdir()
    make_large_store(folder / "plant.db", 150)
    with closing(SyncContext.open(under_a)) as context:
        rules = context.store_rules(org_id)
        backups = [
            backup_store(context.store, context.secrets, rules=rules, source=str(folder / "plant.db")).backup_id
            for _ in range(2)
        ]
    backups_folder = objects / "orgs" / org_id / "backups"

    killed = signalled_once_there(
        rotated, scratch, signal.SIGKILL, "secrets", "rewrap", watched=backups_folder, pattern=".incoming-*"
    )
    left_by_the_kill = sorted(path.name for path in backups_folder.glob(".incoming-*"))
    rewrap = kiln(rotated, "secrets", "rewrap")

    assert killed.returncode == -signal.SIGKILL
    assert [path for path in scratch.rglob("*") if path.is_file() and a_plain_store(path)] == []
    assert len(left_by_the_kill) == 1
    assert rewrap.returncode == 0, rewrap.stderr
    assert f"backups: 2 moved under {B}, 0 under it already" in rewrap.stdout.splitlines()
    assert sorted(path.name for path in backups_folder.iterdir()) == sorted(
        f"{backup_id}.{suffix}" for backup_id in backups for suffix in ("db.sealed", "json")
    )
    for backup_id in backups:
        restore = kiln(without_a, "restore", org_id, backup_id, str(folder / f"{backup_id}.db"))
        assert restore.returncode == 0, restore.stderr
    assert status_lines(rotated, 0)[-1] == f"retired key {A}: nothing under it"
