"""`kiln backup` / `kiln restore`: a local SQLite store snapshotted to the object store, sealed, and checked on the
way back.

The snapshot is SQLite's online backup (consistent while the store is in use), sealed with AES-GCM under the
platform key with the org and backup id bound in, at `orgs/{org}/backups/{id}.db.sealed`; beside it a manifest
holds the sha256 of the snapshot itself. A restore writes the file only when the opened snapshot's sha256 matches.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import orjson
from pydantic import BaseModel

from shared.crypto import SecretBox
from shared.db.types import utcnow
from shared.errors import ArtifactIntegrityError, InvalidInput
from shared.storage import ObjectStore


class BackupManifest(BaseModel):
    backup_id: str
    org_id: str
    source: str
    sha256: str
    size_bytes: int
    created_at: str


def backup_sqlite(store: ObjectStore, box: SecretBox, *, org_id: str, path: Path) -> BackupManifest:
    if not path.is_file():
        raise InvalidInput(f"{path} is not a SQLite file", field="path")
    snapshot = _snapshot(path)
    backup_id = utcnow().strftime("%Y%m%dT%H%M%SZ") + "_" + secrets.token_hex(4)
    manifest = BackupManifest(
        backup_id=backup_id,
        org_id=org_id,
        source=str(path),
        sha256=hashlib.sha256(snapshot).hexdigest(),
        size_bytes=len(snapshot),
        created_at=utcnow().isoformat(),
    )
    store.put_bytes(_sealed_key(org_id, backup_id), box.seal(snapshot, context=_context(org_id, backup_id)))
    store.put_bytes(_manifest_key(org_id, backup_id), orjson.dumps(manifest.model_dump()))
    return manifest


def restore_sqlite(store: ObjectStore, box: SecretBox, *, org_id: str, backup_id: str, target: Path) -> BackupManifest:
    if target.exists():
        raise InvalidInput(f"{target} exists; restore into a new path", field="target")
    manifest = BackupManifest.model_validate(orjson.loads(store.get_bytes(_manifest_key(org_id, backup_id))))
    snapshot = box.unseal(store.get_bytes(_sealed_key(org_id, backup_id)), context=_context(org_id, backup_id))
    if hashlib.sha256(snapshot).hexdigest() != manifest.sha256:
        raise ArtifactIntegrityError(f"backup {backup_id} does not match its checksum; nothing was restored")
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(snapshot)
    partial.rename(target)
    return manifest


def _snapshot(path: Path) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "snapshot.db"
        with closing(sqlite3.connect(path)) as source, closing(sqlite3.connect(copy)) as target:
            source.backup(target)
        return copy.read_bytes()


def _sealed_key(org_id: str, backup_id: str) -> str:
    return f"orgs/{org_id}/backups/{backup_id}.db.sealed"


def _manifest_key(org_id: str, backup_id: str) -> str:
    return f"orgs/{org_id}/backups/{backup_id}.json"


def _context(org_id: str, backup_id: str) -> str:
    return f"backup:{org_id}:{backup_id}"
