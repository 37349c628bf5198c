"""`kiln backup` / `kiln restore` of a local store, through the S3 object store (SeaweedFS), sealed and verified."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from services.sync.backup import restore_sqlite
from services.sync.context import SyncContext
from shared.errors import ArtifactIntegrityError
from shared.settings import Settings
from tests.integration.sync_support import TWO_READINGS, make_local_store

REPO_ROOT = Path(__file__).resolve().parents[2]


def kiln(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.as_env()}
    command = [sys.executable, "-m", "deploy.local.cli", *args]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_a_backup_restores_to_the_same_records_and_is_stored_sealed(
    central_settings: Settings, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    store = tmp_path / "plant.db"
    make_local_store(store, TWO_READINGS)

    backup = kiln(central_settings, "backup", org_id, str(store))
    assert backup.returncode == 0, backup.stderr
    backup_id = backup.stdout.split()[1].rstrip(":")
    restored = tmp_path / "restored.db"
    restore = kiln(central_settings, "restore", org_id, backup_id, str(restored))

    assert restore.returncode == 0, restore.stderr
    assert "verified" in restore.stdout
    with closing(sqlite3.connect(restored)) as connection:
        assert connection.execute("SELECT * FROM readings ORDER BY id").fetchall() == TWO_READINGS
    sealed = sync_context.store.get_bytes(f"orgs/{org_id}/backups/{backup_id}.db.sealed")
    assert b"Lovelace" not in sealed and b"SQLite format" not in sealed


def test_a_tampered_backup_is_not_restored(
    central_settings: Settings, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    store = tmp_path / "plant.db"
    make_local_store(store, TWO_READINGS)
    backup_id = kiln(central_settings, "backup", org_id, str(store)).stdout.split()[1].rstrip(":")
    manifest_key = f"orgs/{org_id}/backups/{backup_id}.json"
    manifest = sync_context.store.get_bytes(manifest_key)
    sync_context.store.put_bytes(manifest_key, manifest.replace(b'"sha256":"', b'"sha256":"0'))

    with pytest.raises(ArtifactIntegrityError):
        restore_sqlite(
            sync_context.store, sync_context.secrets, org_id=org_id, backup_id=backup_id, target=tmp_path / "r.db"
        )
    assert not (tmp_path / "r.db").exists()
