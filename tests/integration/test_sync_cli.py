"""The sync service's operator commands: `kiln backup` / `kiln restore` of a local store (a SQLite file, a
PostgreSQL database) through the S3 object store (SeaweedFS), sealed and verified, and `kiln sync-keys`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from services.sync.backup import backup_store, restore_store
from services.sync.changes import LOCAL_LOG, create_log, install_triggers
from services.sync.context import SyncContext
from services.sync.rotation import rotate_org_key
from shared.crypto import STREAM_CHUNK_BYTES
from shared.db.migrate import upgrade
from shared.db.models import Organization
from shared.db.session import session_scope
from shared.errors import ArtifactIntegrityError, InvalidInput
from shared.settings import Settings
from shared.sync_keys import destroy_key
from tests.integration.conftest import ADMIN
from tests.integration.secret_keys_support import KEY_A, KEY_B, A, B, keyed
from tests.integration.sync_support import (
    READINGS,
    TWO_READINGS,
    an_earlier_kilns_backup,
    kiln,
    make_large_store,
    make_local_store,
    open_sync,
    run_sql,
    signalled_once_there,
)
from tests.support.servers import fresh_postgres_database

# The plain snapshot of a backup or restore run with TMPDIR=scratch, in its workspace (shared/workspaces.py).
SNAPSHOT = "**/snapshot"


def known_org(api: TestClient, org_id: str) -> str:
    """An org the central database knows, where the commands read where its data may be kept."""
    response = api.post("/v1/orgs", json={"id": org_id, "name": f"Org {org_id}"}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return org_id


@pytest.fixture
def org_id(org_id: str, sync_api: TestClient) -> str:
    """The test's org, known to the central database."""
    return known_org(sync_api, org_id)


@pytest.fixture
def new_org_id() -> str:
    """An org id the central database does not know yet: open_sync makes the org, with its keys and a store."""
    return "org-" + secrets.token_hex(4)


def backed_up(settings: Settings, org_id: str, source: str) -> str:
    """`kiln backup`, and the id it names."""
    backup = kiln(settings, "backup", org_id, source)
    assert backup.returncode == 0, backup.stderr
    return backup_id_in(backup.stdout)


def backup_id_in(output: str) -> str:
    return output.split()[1].rstrip(":")


@pytest.fixture
def org_folder(org_id: str, tmp_path: Path) -> Path:
    """The org's folder of SQLite stores (the settings' local_stores_dir), where a backup's source must be."""
    folder = tmp_path / org_id
    folder.mkdir()
    return folder


@pytest.fixture
def plant_store(org_folder: Path) -> Path:
    """A SQLite store of two readings in the org's folder."""
    store = org_folder / "plant.db"
    make_local_store(store, TWO_READINGS)
    return store


def test_a_backup_restores_to_the_same_records_and_is_stored_sealed(
    central_settings: Settings, sync_context: SyncContext, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    backup = kiln(central_settings, "backup", org_id, str(plant_store))
    assert backup.returncode == 0, backup.stderr
    backup_id = backup_id_in(backup.stdout)
    restored = tmp_path / "restored.db"
    restore = kiln(central_settings, "restore", org_id, backup_id, str(restored))

    assert restore.returncode == 0, restore.stderr
    assert "verified" in restore.stdout
    with closing(sqlite3.connect(restored)) as connection:
        assert connection.execute("SELECT * FROM readings ORDER BY id").fetchall() == TWO_READINGS
    sealed = sync_context.store.get_bytes(f"orgs/{org_id}/backups/{backup_id}.db.sealed")
    assert b"Lovelace" not in sealed and b"SQLite format" not in sealed


def test_a_restored_store_is_readable_by_its_owner_alone(
    central_settings: Settings, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    """The restored file holds the org's records in the clear: 0600 like its backup, whatever the umask."""
    backup_id = backed_up(central_settings, org_id, str(plant_store))
    restored = tmp_path / "restored.db"
    previous = os.umask(0o022)  # the common default, which the command inherits
    try:
        restore = kiln(central_settings, "restore", org_id, backup_id, str(restored))
    finally:
        os.umask(previous)

    assert restore.returncode == 0, restore.stderr
    assert stat.S_IMODE(restored.stat().st_mode) == 0o600


def test_an_orgs_backups_are_listed_newest_first_to_find_the_one_to_restore(
    central_settings: Settings, sync_api: TestClient, org_id: str, plant_store: Path
) -> None:
    first = backed_up(central_settings, org_id, str(plant_store))
    second = backed_up(central_settings, org_id, str(plant_store))

    listed = kiln(central_settings, "backups", org_id)
    none = kiln(central_settings, "backups", known_org(sync_api, "x" + org_id))

    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [second, first]
    assert all("sqlite" in line and str(plant_store) in line for line in lines)
    assert none.stdout.strip() == f"no backups of x{org_id}"


def test_an_org_keeping_its_data_local_is_backed_up_on_this_machine_and_never_centrally(
    central_settings: Settings,
    sync_context: SyncContext,
    sync_api: TestClient,
    org_id: str,
    tmp_path: Path,
    plant_store: Path,
) -> None:
    """Its snapshot goes where the trainer keeps its held-out rows: this machine's premises folder."""
    sync_api.patch(f"/v1/orgs/{org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN)

    backup = kiln(central_settings, "backup", org_id, str(plant_store))
    assert backup.returncode == 0, backup.stderr
    backup_id = backup_id_in(backup.stdout)
    listed = kiln(central_settings, "backups", org_id)
    restore = kiln(central_settings, "restore", org_id, backup_id, str(tmp_path / "restored.db"))

    sealed = (central_settings.data_dir / "premises" / f"orgs/{org_id}/backups/{backup_id}.db.sealed").resolve()
    assert sealed.is_file() and f"stored at {sealed.as_uri()}" in backup.stdout
    assert sync_context.store.list(f"orgs/{org_id}/") == []
    assert listed.stdout.split()[0] == backup_id
    assert restore.returncode == 0, restore.stderr
    with closing(sqlite3.connect(tmp_path / "restored.db")) as connection:
        assert connection.execute("SELECT * FROM readings ORDER BY id").fetchall() == TWO_READINGS


def test_listing_the_backups_of_an_org_keeping_its_data_local_leaves_secrets_status_naming_it_as_elsewhere(
    central_settings: Settings, sync_api: TestClient, org_id: str
) -> None:
    """A listing writes nothing: this machine does not become the org's premises by looking for its backups."""
    sync_api.patch(f"/v1/orgs/{org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN)
    elsewhere = f"not counted here: the backups of {org_id}, kept on their premises"

    before = kiln(central_settings, "secrets", "status")
    listed = kiln(central_settings, "backups", org_id)
    after = kiln(central_settings, "secrets", "status")

    assert elsewhere in before.stdout, (before.stdout, before.stderr)
    assert (listed.returncode, listed.stdout) == (0, f"no backups of {org_id}\n"), listed.stderr
    assert elsewhere in after.stdout, (after.stdout, after.stderr)


def test_backups_taken_before_an_org_moved_its_data_local_are_still_listed_and_restored(
    central_settings: Settings, sync_api: TestClient, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    """They stay in the central object store, where they were taken: the move writes new backups elsewhere."""
    backup_id = backed_up(central_settings, org_id, str(plant_store))
    sync_api.patch(f"/v1/orgs/{org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN)

    listed = kiln(central_settings, "backups", org_id)
    restore = kiln(central_settings, "restore", org_id, backup_id, str(tmp_path / "restored.db"))

    assert [line.split()[0] for line in listed.stdout.splitlines()] == [backup_id], listed.stderr
    assert restore.returncode == 0, restore.stderr
    with closing(sqlite3.connect(tmp_path / "restored.db")) as connection:
        assert connection.execute("SELECT * FROM readings ORDER BY id").fetchall() == TWO_READINGS


def test_a_backup_taken_before_an_org_moved_its_data_local_keeps_the_retired_key_until_it_is_rewrapped(
    central_settings: Settings, sync_api: TestClient, org_id: str, plant_store: Path
) -> None:
    """Counted on the central machine and on a premises machine alike: `kiln secrets status` may not exit 0 while
    the backup is under the retired key, or the key goes and the backup no longer opens."""
    backed_up(central_settings, org_id, str(plant_store))
    sync_api.patch(f"/v1/orgs/{org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN)
    rotated = keyed(central_settings, KEY_B, KEY_A)
    on_premises = rotated.model_copy(update={"data_dir": rotated.data_dir.parent / "premises-machine"})
    (on_premises.data_dir / "premises").mkdir(parents=True)  # this machine holds some org's premises data

    before = [kiln(machine, "secrets", "status") for machine in (rotated, on_premises)]
    rewrap = kiln(rotated, "secrets", "rewrap")
    after = [kiln(machine, "secrets", "status") for machine in (rotated, on_premises)]

    assert [status.returncode for status in before] == [3, 3], [status.stdout for status in before]
    assert all(f"backups: 1 under {A} (retired)" in status.stdout.splitlines() for status in before)
    assert f"backups: 1 moved under {B}, 0 under it already" in rewrap.stdout.splitlines(), rewrap.stderr
    assert [status.returncode for status in after] == [0, 0], [status.stdout for status in after]
    assert f"not counted here: the backups of {org_id}, kept on their premises" in after[0].stdout


def test_a_backup_says_where_it_went_and_an_org_the_central_database_does_not_know_is_refused(
    central_settings: Settings, org_id: str, plant_store: Path
) -> None:
    backup = kiln(central_settings, "backup", org_id, str(plant_store))
    unknown = kiln(central_settings, "backup", "no-such-org", str(plant_store))

    assert backup.returncode == 0, backup.stderr
    sealed = f"orgs/{org_id}/backups/{backup_id_in(backup.stdout)}.db.sealed"
    assert f"stored at {central_settings.object_store}/{sealed}" in backup.stdout  # s3://BUCKET/KEY
    assert (unknown.returncode, unknown.stderr.strip()) == (1, "kiln backup: organization 'no-such-org' not found")


def test_a_tampered_backup_is_not_restored(
    central_settings: Settings, sync_context: SyncContext, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    backup_id = backed_up(central_settings, org_id, str(plant_store))
    manifest_key = f"orgs/{org_id}/backups/{backup_id}.json"
    manifest = sync_context.store.get_bytes(manifest_key)
    sync_context.store.put_bytes(manifest_key, manifest.replace(b'"sha256":"', b'"sha256":"0'))

    with pytest.raises(ArtifactIntegrityError):
        restore_store(
            sync_context.store, sync_context.secrets, org_id=org_id, backup_id=backup_id, target=str(tmp_path / "r.db")
        )
    assert not (tmp_path / "r.db").exists()


def test_a_store_of_many_chunks_restores_byte_for_byte(
    central_settings: Settings, sync_context: SyncContext, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    with closing(sqlite3.connect(plant_store)) as connection:
        connection.execute("CREATE TABLE waveforms (id INTEGER PRIMARY KEY, samples BLOB)")
        connection.executemany("INSERT INTO waveforms VALUES (?, ?)", ((n, os.urandom(64_000)) for n in range(60)))
        connection.commit()
    rules = sync_context.store_rules(org_id)
    manifest = backup_store(sync_context.store, sync_context.secrets, rules=rules, source=str(plant_store))
    assert manifest.size_bytes > 3 * STREAM_CHUNK_BYTES

    restored = tmp_path / "restored.db"
    restore_store(
        sync_context.store, sync_context.secrets, org_id=org_id, backup_id=manifest.backup_id, target=str(restored)
    )

    with closing(sqlite3.connect(plant_store)) as original, closing(sqlite3.connect(restored)) as copy:
        query = "SELECT id, samples FROM waveforms ORDER BY id"
        assert copy.execute(query).fetchall() == original.execute(query).fetchall()


def test_an_altered_chunk_of_a_backup_is_refused_and_nothing_is_written(
    central_settings: Settings, sync_context: SyncContext, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    backup_id = backed_up(central_settings, org_id, str(plant_store))
    sealed_key = f"orgs/{org_id}/backups/{backup_id}.db.sealed"
    sealed = bytearray(sync_context.store.get_bytes(sealed_key))
    sealed[-40] ^= 1
    sync_context.store.put_bytes(sealed_key, bytes(sealed))

    restore = kiln(central_settings, "restore", org_id, backup_id, str(tmp_path / "r.db"))

    assert restore.returncode == 1
    assert f"backup {backup_id} does not open" in restore.stderr and "Traceback" not in restore.stderr
    assert not (tmp_path / "r.db").exists() and not (tmp_path / "r.db.partial").exists()


def stopped_half_way(settings: Settings, scratch: Path, number: signal.Signals, *args: str) -> int:
    """Run `kiln *args` with TMPDIR=scratch, send it `number` once its temporary folder holds a file, and return
    its exit code."""
    ended = signalled_once_there(settings, scratch, number, *args, watched=scratch, pattern=SNAPSHOT)
    assert b"Traceback" not in ended.stderr, ended.stderr
    return ended.returncode


def files_in(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
def test_a_backup_stopped_by_a_signal_leaves_no_snapshot_behind(
    central_settings: Settings, org_id: str, org_folder: Path, tmp_path: Path, number: signal.Signals
) -> None:
    store, scratch = org_folder / "plant.db", tmp_path / "tmp"
    make_large_store(store, 200)
    scratch.mkdir()

    code = stopped_half_way(central_settings, scratch, number, "backup", org_id, str(store))

    assert code == 128 + number
    assert files_in(scratch) == []


def test_the_snapshot_of_a_backup_killed_outright_is_removed_by_the_next_backup(
    central_settings: Settings, org_id: str, org_folder: Path, tmp_path: Path
) -> None:
    """SIGKILL: nothing of the process runs on to remove its plain snapshot; the next backup, on the same machine
    (TMPDIR), finds that no live process holds its workspace and removes it."""
    store, scratch = org_folder / "plant.db", tmp_path / "tmp"
    make_large_store(store, 200)
    scratch.mkdir()

    killed = signalled_once_there(
        central_settings, scratch, signal.SIGKILL, "backup", org_id, str(store), watched=scratch, pattern=SNAPSHOT
    )
    left_by_the_kill = files_in(scratch)
    again = kiln(central_settings, "backup", org_id, str(store), tmpdir=scratch)

    assert killed.returncode == -signal.SIGKILL and left_by_the_kill != []
    assert again.returncode == 0, again.stderr
    assert files_in(scratch) == []


def test_a_restore_stopped_by_a_signal_leaves_no_snapshot_behind(
    central_settings: Settings, sync_context: SyncContext, org_id: str, org_folder: Path, tmp_path: Path
) -> None:
    store, scratch = org_folder / "plant.db", tmp_path / "tmp"
    make_large_store(store, 200)
    scratch.mkdir()
    rules = sync_context.store_rules(org_id)
    manifest = backup_store(sync_context.store, sync_context.secrets, rules=rules, source=str(store))

    restored = str(tmp_path / "restored.db")
    code = stopped_half_way(central_settings, scratch, signal.SIGTERM, "restore", org_id, manifest.backup_id, restored)

    assert code == 128 + signal.SIGTERM
    assert files_in(scratch) == []
    assert not Path(restored).exists()


@pytest.fixture
def other_filesystem_scratch() -> Iterator[Path]:
    """A TMPDIR on another filesystem than the restore's target (a tmpfs /tmp, the common case): the snapshot is
    copied beside the target, not renamed there, which takes long enough to be killed half-way."""
    scratch = Path("/dev/shm") / f"kiln-test-{secrets.token_hex(4)}"
    scratch.mkdir()
    yield scratch
    shutil.rmtree(scratch, ignore_errors=True)


def test_the_copy_a_restore_killed_outright_left_beside_its_target_is_removed_by_the_next_restore(
    central_settings: Settings,
    sync_context: SyncContext,
    org_id: str,
    org_folder: Path,
    tmp_path: Path,
    other_filesystem_scratch: Path,
) -> None:
    """SIGKILL while the snapshot is staged beside the target: that plain copy of the org's records belongs to the
    killed restore's workspace, and goes with it at the next run on the machine."""
    store, folder = org_folder / "plant.db", tmp_path / "restore"
    make_large_store(store, 120)
    folder.mkdir()
    manifest = backup_store(
        sync_context.store, sync_context.secrets, rules=sync_context.store_rules(org_id), source=str(store)
    )
    arguments = ("restore", org_id, manifest.backup_id)

    killed = signalled_once_there(
        central_settings,
        other_filesystem_scratch,
        signal.SIGKILL,
        *arguments,
        str(folder / "p.db"),
        watched=folder,
        pattern=".p.db.*.restoring",
    )
    left_by_the_kill = sorted(path.name for path in folder.iterdir())
    again = kiln(central_settings, *arguments, str(folder / "q.db"), tmpdir=other_filesystem_scratch)

    assert killed.returncode == -signal.SIGKILL and left_by_the_kill != []
    assert again.returncode == 0, again.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["q.db"]
    assert files_in(other_filesystem_scratch) == []


def test_a_backup_sealed_whole_by_an_earlier_kiln_still_restores(
    central_settings: Settings, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    store = tmp_path / "plant.db"
    make_local_store(store, TWO_READINGS)
    key = central_settings.secret_key.get_secret_value()
    backup_id = an_earlier_kilns_backup(sync_context.store, key, org_id, store)

    restore = kiln(central_settings, "restore", org_id, backup_id, str(tmp_path / "r.db"))

    assert restore.returncode == 0, restore.stderr
    with closing(sqlite3.connect(tmp_path / "r.db")) as connection:
        assert connection.execute("SELECT * FROM readings ORDER BY id").fetchall() == TWO_READINGS


def restore_while(
    written: Callable[[Path], object], sync_context: SyncContext, org_id: str, source: Path, target: Path
) -> None:
    """Back `source` up and restore it into `target`, calling `written(target)` once the backup is downloaded: a file
    the operator or a writer makes there while the restore runs."""
    rules = sync_context.store_rules(org_id)
    manifest = backup_store(sync_context.store, sync_context.secrets, rules=rules, source=str(source))
    download = sync_context.store.get_file

    def download_then_write(key: str, path: Path) -> None:
        download(key, path)
        written(target)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sync_context.store, "get_file", download_then_write)
        restore_store(
            sync_context.store, sync_context.secrets, org_id=org_id, backup_id=manifest.backup_id, target=str(target)
        )


def test_a_restore_never_replaces_a_file_made_while_it_downloads(
    sync_context: SyncContext, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    target = tmp_path / "restore" / "race.db"
    target.parent.mkdir()

    with pytest.raises(InvalidInput, match=f"{target} exists; restore into a new path"):
        restore_while(lambda path: path.write_text("the operator's notes"), sync_context, org_id, plant_store, target)
    assert target.read_text() == "the operator's notes"
    assert [path.name for path in target.parent.iterdir()] == ["race.db"]  # nothing left beside it


def test_a_restore_leaves_an_operators_file_beside_its_target_alone(
    central_settings: Settings, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    backup_id = backed_up(central_settings, org_id, str(plant_store))
    target = tmp_path / "restore" / "p.db"
    target.parent.mkdir()
    notes = target.with_name("p.db.partial")
    notes.write_text("notes\n")

    restore = kiln(central_settings, "restore", org_id, backup_id, str(target))

    assert restore.returncode == 0, restore.stderr
    assert notes.read_text() == "notes\n"
    with closing(sqlite3.connect(target)) as connection:
        assert connection.execute("SELECT * FROM readings ORDER BY id").fetchall() == TWO_READINGS
    assert sorted(path.name for path in target.parent.iterdir()) == ["p.db", "p.db.partial"]


def test_kilns_own_sqlite_database_is_never_backed_up_as_an_orgs_store(
    central_settings: Settings, org_id: str, org_folder: Path, tmp_path: Path
) -> None:
    """Kiln's own database holds every org's records: neither its file nor a copy of it in the org's folder."""
    kiln_database = tmp_path / "kiln" / "kiln.db"
    kiln_database.parent.mkdir()
    embedded = central_settings.model_copy(update={"database_url": f"sqlite:///{kiln_database}"})
    upgrade(embedded.database_url)
    with closing(SyncContext.open(embedded)) as context, session_scope(context.sessions) as session:
        session.add(Organization(id=org_id, name=f"Org {org_id}"))
    copy = Path(shutil.copy(kiln_database, org_folder / "records.db"))

    backups = [kiln(embedded, "backup", org_id, str(source)) for source in (kiln_database, copy)]

    assert [backup.returncode for backup in backups] == [1, 1]
    assert all("the database is Kiln's own" in backup.stderr for backup in backups)
    assert kiln(embedded, "backups", org_id).stdout.strip() == f"no backups of {org_id}"


def test_kilns_own_postgresql_database_is_never_backed_up_as_an_orgs_store(
    central_settings: Settings, org_id: str
) -> None:
    backup = kiln(central_settings, "backup", org_id, str(central_settings.database_url))

    assert backup.returncode == 1
    assert "the database is Kiln's own" in backup.stderr
    assert kiln(central_settings, "backups", org_id).stdout.strip() == f"no backups of {org_id}"


def test_another_orgs_store_is_not_backed_up_as_this_orgs(
    central_settings: Settings, org_id: str, org_folder: Path, tmp_path: Path
) -> None:
    other = tmp_path / "beta" / "b.db"
    other.parent.mkdir()
    make_local_store(other, TWO_READINGS)
    (org_folder / "b.db").symlink_to(other)

    backups = [kiln(central_settings, "backup", org_id, str(source)) for source in (other, org_folder / "b.db")]

    assert [backup.returncode for backup in backups] == [1, 1]
    assert all(f"is not in {org_folder}/" in backup.stderr for backup in backups)
    assert kiln(central_settings, "backups", org_id).stdout.strip() == f"no backups of {org_id}"


def test_a_postgresql_store_is_backed_up_only_on_the_store_networks(
    central_settings: Settings, org_id: str, plant_database: str
) -> None:
    """As a sync store: a server off KILN_STORE_NETWORKS is refused; one on them is dumped at the address checked."""
    plants_only = central_settings.model_copy(update={"store_networks": "10.20.0.0/16"})
    loopback = central_settings.model_copy(update={"store_networks": "127.0.0.0/8"})

    refused = kiln(plants_only, "backup", org_id, plant_database)
    pinned = kiln(loopback, "backup", org_id, plant_database)

    assert refused.returncode == 1
    assert "is not on the networks organizations' databases may be on (KILN_STORE_NETWORKS)" in refused.stderr
    assert pinned.returncode == 0, pinned.stderr
    assert [line.split()[0] for line in kiln(loopback, "backups", org_id).stdout.splitlines()] == [
        backup_id_in(pinned.stdout)
    ]


def test_a_manifest_copied_from_another_orgs_backups_is_not_restored(
    central_settings: Settings,
    sync_context: SyncContext,
    sync_api: TestClient,
    org_id: str,
    plant_store: Path,
    tmp_path: Path,
) -> None:
    backup_id = backed_up(central_settings, org_id, str(plant_store))
    beta = known_org(sync_api, "x" + org_id)
    manifest = sync_context.store.get_bytes(f"orgs/{org_id}/backups/{backup_id}.json")
    sync_context.store.put_bytes(f"orgs/{beta}/backups/{backup_id}.json", manifest)

    restore = kiln(central_settings, "restore", beta, backup_id, str(tmp_path / "x.db"))

    assert restore.returncode == 1
    assert f"backup {backup_id} among {beta}'s backups was made for organization {org_id!r}" in restore.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.fixture
def plant_database() -> Iterator[str]:
    """A PostgreSQL local store as the sync service leaves it: two readings, the change log and its triggers."""
    with fresh_postgres_database() as url:
        run_sql(url, READINGS)
        run_sql(url, "INSERT INTO readings VALUES (1, 'pump-1', 1, 'Ada Lovelace'), (2, 'pump-2', 2, 'Alan Turing')")
        engine = create_engine(url)
        with engine.begin() as connection:
            create_log(connection, LOCAL_LOG)
            install_triggers(connection, LOCAL_LOG, table="readings", key="id", logged_as="readings")
        engine.dispose()
        yield url


@pytest.fixture
def empty_database() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url


def test_a_postgresql_store_restores_into_an_empty_database_with_its_change_capture(
    central_settings: Settings, sync_context: SyncContext, org_id: str, plant_database: str, empty_database: str
) -> None:
    backup = kiln(central_settings, "backup", org_id, plant_database)
    assert backup.returncode == 0, backup.stderr
    assert "postgresql store" in backup.stdout
    backup_id = backup_id_in(backup.stdout)

    restore = kiln(central_settings, "restore", org_id, backup_id, empty_database)

    assert restore.returncode == 0, restore.stderr
    assert "verified" in restore.stdout
    assert run_sql(empty_database, "SELECT * FROM readings ORDER BY id") == TWO_READINGS
    run_sql(empty_database, "UPDATE readings SET value = 5.0 WHERE id = 2")
    assert run_sql(empty_database, "SELECT pk FROM _kiln_changes") == [("2",)]  # the triggers came back too
    sealed = sync_context.store.get_bytes(f"orgs/{org_id}/backups/{backup_id}.dump.sealed")
    assert b"Lovelace" not in sealed and b"PGDMP" not in sealed


def test_a_restore_never_writes_into_a_database_that_holds_tables(
    central_settings: Settings, org_id: str, plant_database: str
) -> None:
    backup_id = backed_up(central_settings, org_id, plant_database)
    run_sql(plant_database, "UPDATE readings SET value = 7.0 WHERE id = 1")

    restore = kiln(central_settings, "restore", org_id, backup_id, plant_database)

    assert restore.returncode == 1
    assert "restore into an empty database" in restore.stderr
    assert run_sql(plant_database, "SELECT value FROM readings WHERE id = 1") == [(7.0,)]


def test_an_unreachable_store_is_named_without_its_password(
    central_settings: Settings, org_id: str, plant_database: str
) -> None:
    unreachable = make_url(plant_database).set(password="s3cret", port=1).render_as_string(hide_password=False)

    backup = kiln(central_settings, "backup", org_id, unreachable)

    assert backup.returncode == 1
    [line] = backup.stderr.splitlines()
    assert line.startswith("kiln backup: pg_dump failed: error: connection to server at ")
    assert "port 1 failed: Connection refused Is the server running on that host" in line
    assert "s3cret" not in backup.stderr + backup.stdout


def test_a_restore_into_a_database_that_does_not_exist_says_so(
    central_settings: Settings, org_id: str, plant_database: str
) -> None:
    backup_id = backed_up(central_settings, org_id, plant_database)
    missing = make_url(plant_database).set(database="kiln_no_such_database").render_as_string(hide_password=False)

    restore = kiln(central_settings, "restore", org_id, backup_id, missing)

    assert restore.returncode == 1
    [line] = restore.stderr.splitlines()
    assert line.startswith("kiln restore: target database kiln_no_such_database cannot be reached: ")
    assert line.endswith('database "kiln_no_such_database" does not exist')


def test_a_postgresql_backup_is_not_restored_as_a_sqlite_file(
    central_settings: Settings, org_id: str, plant_database: str, tmp_path: Path
) -> None:
    backup_id = backed_up(central_settings, org_id, plant_database)

    restore = kiln(central_settings, "restore", org_id, backup_id, str(tmp_path / "r.db"))

    assert restore.returncode == 1
    assert f"backup {backup_id} is of a postgresql store, not sqlite" in restore.stderr
    assert not (tmp_path / "r.db").exists()


def test_sync_keys_name_an_unknown_org_or_key_without_a_traceback(central_settings: Settings, org_id: str) -> None:
    rotate = kiln(central_settings, "sync-keys", "rotate", "no-such-org")
    destroy = kiln(central_settings, "sync-keys", "destroy", org_id, "ek000000000000")

    assert (rotate.returncode, rotate.stderr.strip()) == (1, "kiln sync-keys: organization 'no-such-org' not found")
    assert (destroy.returncode, destroy.stderr.strip()) == (1, "kiln sync-keys: key 'ek000000000000' not found")


def test_destroying_a_destroyed_key_says_it_was_destroyed_already(
    central_settings: Settings, sync_api: TestClient, sync_context: SyncContext, new_org_id: str, tmp_path: Path
) -> None:
    open_sync(sync_api, sync_context, new_org_id, tmp_path).run()  # the org's first key
    [drained] = rotate_org_key(sync_context, new_org_id, actor="operator")["drainedKeys"]
    with session_scope(sync_context.sessions) as session:
        destroy_key(session, new_org_id, drained, actor="operator")

    again = kiln(central_settings, "sync-keys", "destroy", new_org_id, drained)

    assert (again.returncode, again.stderr) == (
        1,
        f"kiln sync-keys: key {drained!r} was destroyed already; nothing is left of it to destroy\n",
    )


def test_a_rotation_meeting_a_value_that_is_not_sealed_says_so_in_one_line_and_leaves_the_keys_usable(
    central_settings: Settings, sync_api: TestClient, sync_context: SyncContext, new_org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, new_org_id, tmp_path)
    assert sync.run()["status"] == "succeeded"
    # A central application writes plain text where the sealed value goes: no key opens it.
    sync.central(f"UPDATE {sync.central_table} SET patient = 'Grace Hopper' WHERE id = 1")
    [old] = [key["keyId"] for key in sync_api.get(f"/v1/orgs/{new_org_id}/sync-keys", headers=sync.org.viewer).json()]

    rotate = kiln(central_settings, "sync-keys", "rotate", new_org_id)

    assert (rotate.returncode, rotate.stderr) == (
        1,
        "kiln sync-keys: a value of readings.patient is not sealed (plain text written into its central copy?): "
        "the rotation stopped there; what it re-encrypted before stays so, and the org's keys still open every "
        "value; correct that value in the central copy, then rotate again to finish\n",
    )
    keys = sync_api.get(f"/v1/orgs/{new_org_id}/sync-keys", headers=sync.org.viewer).json()
    assert sorted(key["status"] for key in keys) == ["active", "retired"]  # the old key still opens
    assert {key["keyId"]: key["status"] for key in keys}[old] == "retired"
    assert sync.central(f"SELECT patient FROM {sync.central_table} WHERE id = 1") == [("Grace Hopper",)]


def test_destroying_a_key_without_naming_it_is_refused_saying_where_ids_are(settings: Settings) -> None:
    destroy = kiln(settings, "sync-keys", "destroy", "acme")

    assert destroy.returncode == 1
    assert destroy.stderr == (
        "kiln sync-keys: destroy needs the id of a drained key: `kiln sync-keys rotate ORG` names them\n"
    )


def test_a_database_without_the_schema_is_named_with_the_way_out(settings: Settings, tmp_path: Path) -> None:
    unmigrated = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'empty.db'}"})

    destroy = kiln(unmigrated, "sync-keys", "destroy", "acme", "ek000000000000")

    assert destroy.returncode == 1
    assert "no such table: sync_keys" in destroy.stderr and "`kiln migrate`" in destroy.stderr
    assert "Traceback" not in destroy.stderr


def test_a_file_that_is_not_sqlite_is_named_in_one_line_without_a_traceback(
    central_settings: Settings, org_id: str, org_folder: Path
) -> None:
    notes = org_folder / "notes.txt"
    notes.write_text("not a database, though long enough to look like one to a quick glance" * 4)

    backup = kiln(central_settings, "backup", org_id, str(notes))

    assert backup.returncode == 1
    assert backup.stderr.strip() == f"kiln backup: {notes} is not a SQLite database (file is not a database)"


def test_a_damaged_manifest_is_named_and_hides_none_of_the_other_backups(
    central_settings: Settings, sync_context: SyncContext, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    empty, partial, good = (backed_up(central_settings, org_id, str(plant_store)) for _ in range(3))
    sync_context.store.put_bytes(f"orgs/{org_id}/backups/{empty}.json", b"")
    manifest = json.loads(sync_context.store.get_bytes(f"orgs/{org_id}/backups/{partial}.json"))
    del manifest["sha256"], manifest["size_bytes"]
    sync_context.store.put_bytes(f"orgs/{org_id}/backups/{partial}.json", json.dumps(manifest).encode())
    undated = "20261101T000000Z_0a1b2c3d"
    manifest = json.loads(sync_context.store.get_bytes(f"orgs/{org_id}/backups/{good}.json"))
    manifest |= {"backup_id": undated, "created_at": "yesterday"}
    sync_context.store.put_bytes(f"orgs/{org_id}/backups/{undated}.json", json.dumps(manifest).encode())

    listed = kiln(central_settings, "backups", org_id)
    restore = kiln(central_settings, "restore", org_id, partial, str(tmp_path / "r.db"))

    assert listed.returncode == 1
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [good]
    damaged = f"cannot be restored: its manifest orgs/{org_id}/backups"
    partial_line = (
        f"kiln backups: backup {partial} {damaged}/{partial}.json is damaged (sha256: Field required; size_bytes: "
        "Field required)"
    )
    # In the order of their ids: the three made within one second are ordered by their random part.
    assert listed.stderr.splitlines() == [
        f"kiln backups: backup {undated} {damaged}/{undated}.json is damaged (created_at: Invalid isoformat string: "
        "'yesterday')",
        *sorted(
            [
                f"kiln backups: backup {empty} {damaged}/{empty}.json is damaged (not JSON: Input is a zero-length, "
                "empty document: line 1 column 1 (char 0))",
                partial_line,
            ]
        ),
    ]
    assert restore.returncode == 1
    assert restore.stderr == partial_line.replace("backups", "restore", 1) + "\n"


def test_a_manifest_without_a_time_zone_or_naming_another_id_is_named_as_damaged(
    central_settings: Settings, sync_context: SyncContext, org_id: str, plant_store: Path
) -> None:
    good = backed_up(central_settings, org_id, str(plant_store))
    manifest = json.loads(sync_context.store.get_bytes(f"orgs/{org_id}/backups/{good}.json"))
    naive, stray = "20261101T000000Z_0a1b2c3d", "20261102T000000Z_0a1b2c3d"
    for backup_id, changes in [
        (naive, {"backup_id": naive, "created_at": "2026-11-01T00:00:00"}),
        (stray, {"backup_id": "../../../../etc/passwd"}),
    ]:
        sync_context.store.put_bytes(f"orgs/{org_id}/backups/{backup_id}.json", json.dumps(manifest | changes).encode())

    listed = kiln(central_settings, "backups", org_id)
    status = kiln(central_settings, "secrets", "status")

    assert listed.returncode == 1
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [good]
    assert "Traceback" not in listed.stderr + status.stderr
    assert f"backup {naive} cannot be restored" in listed.stderr and "names no time zone" in listed.stderr
    assert f"backup {stray} cannot be restored" in listed.stderr and "is not a backup id" in listed.stderr


def test_a_sealed_backup_cut_short_is_refused_and_nothing_is_restored(
    central_settings: Settings, sync_context: SyncContext, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    backup_id = backed_up(central_settings, org_id, str(plant_store))
    sync_context.store.put_bytes(f"orgs/{org_id}/backups/{backup_id}.db.sealed", b"abc")

    restore = kiln(central_settings, "restore", org_id, backup_id, str(tmp_path / "r.db"))

    assert restore.returncode == 1
    assert (
        restore.stderr.startswith(f"kiln restore: backup {backup_id} does not open") and "too short" in restore.stderr
    )
    assert not (tmp_path / "r.db").exists()


def crash_after_writing(store: Path, sql: str) -> None:
    """A writer that commits to a WAL-mode store and dies before closing it, leaving its -wal file behind."""
    code = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "c.execute(sys.argv[2]); c.commit(); os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(store), sql], check=True)


def test_a_restore_beside_a_lost_stores_wal_file_is_refused_naming_it_and_writes_nothing(
    central_settings: Settings, org_id: str, plant_store: Path
) -> None:
    """The store's writer died, leaving plant.db-wal; the operator removed plant.db alone. SQLite would replay that
    file's stale writes into a store restored at plant.db, after the restore said its checksum was verified."""
    with closing(sqlite3.connect(plant_store)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
    backup_id = backed_up(central_settings, org_id, str(plant_store))
    crash_after_writing(plant_store, "UPDATE readings SET value = -1.0")
    plant_store.unlink()
    left = sorted(path.name for path in plant_store.parent.iterdir())

    restore = kiln(central_settings, "restore", org_id, backup_id, str(plant_store))

    assert restore.returncode == 1
    assert restore.stderr == (
        f"kiln restore: {plant_store} has files of an earlier store beside it (plant.db-shm, plant.db-wal), which "
        "SQLite would replay into the restored one: move them away, or restore into a new path\n"
    )
    assert sorted(path.name for path in plant_store.parent.iterdir()) == left == ["plant.db-shm", "plant.db-wal"]


def test_a_restore_is_refused_when_a_journal_appears_beside_its_target_while_it_downloads(
    sync_context: SyncContext, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    target = tmp_path / "restore" / "race.db"
    target.parent.mkdir()

    def journal(path: Path) -> None:
        path.with_name("race.db-journal").write_bytes(b"a writer's rollback journal")

    with pytest.raises(InvalidInput, match=r"has files of an earlier store beside it \(race.db-journal\)"):
        restore_while(journal, sync_context, org_id, plant_store, target)
    assert [path.name for path in target.parent.iterdir()] == ["race.db-journal"]  # nothing written beside it


@pytest.mark.parametrize(
    ("command", "url", "words"),
    [
        ("backup", "postgresql://postgres@127.0.0.1/pl%00ant", "NUL (%00)"),
        ("backup", "postgresql://postgres:pw%00@127.0.0.1/plant", "NUL (%00)"),
        ("restore", "postgresql://postgres@127.0.0.1/plant?application_name=%00", "NUL (%00)"),
        ("restore", "postgresql://postgres@127.0.0.1/plant?passfile=/root/.pgpass", "passfile are not accepted"),
    ],
)
def test_a_database_url_with_a_nul_or_a_file_parameter_is_refused_in_one_line(
    central_settings: Settings, org_id: str, command: str, url: str, words: str
) -> None:
    arguments = [org_id, url] if command == "backup" else [org_id, "20261101T000000Z_0a1b2c3d", url]

    refused = kiln(central_settings, command, *arguments)

    assert refused.returncode == 1
    assert refused.stderr.startswith(f"kiln {command}: ") and words in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_restore_into_a_folder_it_cannot_write_is_refused_in_one_line(
    central_settings: Settings, org_id: str, plant_store: Path
) -> None:
    backup_id = backed_up(central_settings, org_id, str(plant_store))

    restore = kiln(central_settings, "restore", org_id, backup_id, "/proc/kiln-restored.db")

    assert restore.returncode == 1
    assert restore.stderr.startswith("kiln restore: ") and "/proc" in restore.stderr
    assert "Traceback" not in restore.stderr


def test_a_backup_of_a_store_a_writer_keeps_locked_gives_up_after_the_database_timeout(
    central_settings: Settings, org_id: str, plant_store: Path
) -> None:
    with closing(sqlite3.connect(plant_store, isolation_level=None)) as writer:
        writer.execute("BEGIN EXCLUSIVE")
        writer.execute("DELETE FROM readings")
        backup = kiln(central_settings.model_copy(update={"database_timeout_s": 1}), "backup", org_id, str(plant_store))

    assert backup.returncode == 1
    assert backup.stderr == (
        f"kiln backup: {plant_store} stayed locked by a writer for 1 s (KILN_DATABASE_TIMEOUT_S): back it up once "
        "the writer commits\n"
    )


def test_a_restore_refuses_a_backup_id_that_is_no_backup_id(central_settings: Settings, org_id: str) -> None:
    restore = kiln(central_settings, "restore", org_id, "../../../../etc/passwd", "x.db")

    assert restore.returncode == 1
    assert restore.stderr == (
        "kiln restore: '../../../../etc/passwd' is not a backup id such as 20261101T000000Z_0a1b2c3d: "
        f"`kiln backups {org_id}` lists them\n"
    )


def test_a_store_url_whose_query_would_be_dropped_is_refused_in_one_line(
    central_settings: Settings, org_id: str, plant_store: Path, tmp_path: Path
) -> None:
    """SQLAlchemy drops a query parameter without a value: `plant.db?x` backed up plant.db, and a restore into
    `restored?copy.db` wrote `restored`."""
    backup_id = backed_up(central_settings, org_id, str(plant_store))

    backup = kiln(central_settings, "backup", org_id, f"sqlite:///{plant_store}?x")
    restore = kiln(central_settings, "restore", org_id, backup_id, f"sqlite:///{tmp_path}/restored?copy.db")

    assert [backup.returncode, restore.returncode] == [1, 1]
    assert backup.stderr == (
        "kiln backup: source: a SQLite store's URL takes no query parameters; write a ? in the file's name as %3F\n"
    )
    assert "write a ? in the file's name as %3F" in restore.stderr and len(restore.stderr.splitlines()) == 1
    assert not (tmp_path / "restored").exists()


def test_a_store_url_whose_host_no_resolver_takes_is_refused_in_one_line(
    central_settings: Settings, org_id: str
) -> None:
    """With KILN_STORE_NETWORKS set, the idna codec's error on an empty label came out as a traceback."""
    plants_only = central_settings.model_copy(update={"store_networks": "10.20.0.0/16"})

    backup = kiln(plants_only, "backup", org_id, "postgresql://plant:pw@scada..plant/records")

    assert backup.returncode == 1
    assert (
        backup.stderr
        == "kiln backup: source: 'scada..plant' is not a host name (each dot-separated label 1 to 63 bytes)\n"
    )


def test_a_restore_into_a_folder_that_does_not_exist_is_refused_in_one_line(
    central_settings: Settings, org_id: str, tmp_path: Path, plant_store: Path
) -> None:
    backup_id = backed_up(central_settings, org_id, str(plant_store))

    restore = kiln(central_settings, "restore", org_id, backup_id, str(tmp_path / "some/missing/dir/r.db"))

    assert restore.returncode == 1
    assert restore.stderr == (
        f"kiln restore: {tmp_path / 'some/missing/dir'} is not a folder: make it, or restore into one that is\n"
    )
    assert not (tmp_path / "some").exists()


def test_a_source_url_that_does_not_parse_is_named_in_one_line(central_settings: Settings, org_id: str) -> None:
    backup = kiln(central_settings, "backup", org_id, "postgresql://::::")

    assert (backup.returncode, backup.stderr) == (1, "kiln backup: source is not a database URL\n")
