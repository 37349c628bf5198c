"""`kiln backup` / `kiln restore`: a local store snapshotted to the object store, sealed, and checked on the way
back.

A SQLite store's snapshot is SQLite's online backup; a PostgreSQL store's is pg_dump's custom format, taken in one
transaction: both are consistent while the store is in use. The snapshot is sealed with AES-GCM under the platform
key with the org and backup id bound in, at `orgs/{org}/backups/{id}.db.sealed` (SQLite) or `{id}.dump.sealed`
(PostgreSQL); beside it a manifest holds the sha256 of the snapshot itself. A restore goes ahead only when the
opened snapshot's sha256 matches, and only into a new SQLite file or an empty PostgreSQL database (pg_restore in
one transaction), so it never overwrites a store and never leaves a half-restored one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Final, Literal

import orjson
from pydantic import BaseModel
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from shared.crypto import SecretBox
from shared.db.types import utcnow
from shared.errors import ArtifactIntegrityError, InvalidInput
from shared.storage import ObjectStore

Kind = Literal["sqlite", "postgresql"]
SQLITE: Final = "sqlite"
POSTGRESQL: Final = "postgresql"
_SUFFIXES: Final = {SQLITE: "db", POSTGRESQL: "dump"}
_TOOL_TIMEOUT_S = 3600
# Relations a database holds once anything was made in it: a restore goes only into a database without any.
_USER_RELATIONS = (
    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
    "AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
)


class BackupManifest(BaseModel):
    backup_id: str
    org_id: str
    source: str
    # Manifests written before PostgreSQL stores could be backed up have no kind: they are SQLite's.
    kind: Kind = SQLITE
    sha256: str
    size_bytes: int
    created_at: str


def backup_store(store: ObjectStore, box: SecretBox, *, org_id: str, source: str) -> BackupManifest:
    """Snapshot `source` (a SQLite file's path or sqlite:/// URL, or a PostgreSQL URL) into the object store."""
    location = store_location(source, field="source")
    if isinstance(location, URL):
        kind: Kind = POSTGRESQL
        snapshot, shown = _dump_postgresql(location), location.render_as_string(hide_password=True)
    else:
        if not location.is_file():
            raise InvalidInput(f"{location} is not a SQLite file", field="source")
        kind, snapshot, shown = SQLITE, _snapshot_sqlite(location), str(location)
    backup_id = utcnow().strftime("%Y%m%dT%H%M%SZ") + "_" + secrets.token_hex(4)
    manifest = BackupManifest(
        backup_id=backup_id,
        org_id=org_id,
        source=shown,
        kind=kind,
        sha256=hashlib.sha256(snapshot).hexdigest(),
        size_bytes=len(snapshot),
        created_at=utcnow().isoformat(),
    )
    store.put_bytes(_sealed_key(manifest), box.seal(snapshot, context=_context(org_id, backup_id)))
    store.put_bytes(_manifest_key(org_id, backup_id), orjson.dumps(manifest.model_dump()))
    return manifest


def restore_store(store: ObjectStore, box: SecretBox, *, org_id: str, backup_id: str, target: str) -> BackupManifest:
    """Restore a backup into `target`: a new SQLite file for a SQLite backup, an empty PostgreSQL database for a
    PostgreSQL one."""
    manifest = BackupManifest.model_validate(orjson.loads(store.get_bytes(_manifest_key(org_id, backup_id))))
    location = store_location(target, field="target")
    kind = POSTGRESQL if isinstance(location, URL) else SQLITE
    if kind != manifest.kind:
        raise InvalidInput(f"backup {backup_id} is of a {manifest.kind} store, not {kind}", field="target")
    if isinstance(location, URL):
        _refuse_unless_empty(location)
    elif location.exists():
        raise InvalidInput(f"{location} exists; restore into a new path", field="target")
    snapshot = box.unseal(store.get_bytes(_sealed_key(manifest)), context=_context(org_id, backup_id))
    if hashlib.sha256(snapshot).hexdigest() != manifest.sha256:
        raise ArtifactIntegrityError(f"backup {backup_id} does not match its checksum; nothing was restored")
    if isinstance(location, URL):
        _restore_postgresql(snapshot, location)
    else:
        partial = location.with_name(location.name + ".partial")
        partial.write_bytes(snapshot)
        partial.rename(location)
    return manifest


def store_location(given: str, *, field: str) -> URL | Path:
    """The store `given` names: a PostgreSQL database's URL, or a SQLite file's path."""
    if "://" not in given:
        return Path(given).resolve()
    try:
        url = make_url(given)
    except ArgumentError:
        raise InvalidInput(f"{field} is not a database URL", field=field) from None
    if url.get_backend_name() == POSTGRESQL:
        return url
    if url.get_backend_name() == SQLITE and url.database:
        return Path(url.database).resolve()
    raise InvalidInput(f"{field}: only SQLite files and PostgreSQL databases can be backed up", field=field)


def _snapshot_sqlite(path: Path) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "snapshot.db"
        with closing(sqlite3.connect(path)) as source, closing(sqlite3.connect(copy)) as target:
            source.backup(target)
        return copy.read_bytes()


def _dump_postgresql(url: URL) -> bytes:
    command = [_tool("pg_dump", "source"), "--format=custom", "--no-owner", "--no-privileges"]
    return _run_tool(command, url, field="source")


def _restore_postgresql(snapshot: bytes, url: URL) -> None:
    with tempfile.TemporaryDirectory() as folder:
        dump = Path(folder) / "store.dump"
        dump.write_bytes(snapshot)
        command = [
            _tool("pg_restore", "target"),
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            f"--dbname={url.database}",
            str(dump),
        ]
        _run_tool(command, url, field="target")


def _refuse_unless_empty(url: URL) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            relations = int(connection.execute(text(_USER_RELATIONS)).scalar_one())
    except SQLAlchemyError as error:
        raise InvalidInput(f"target database cannot be reached: {type(error).__name__}", field="target") from None
    finally:
        engine.dispose()
    if relations:
        raise InvalidInput(
            f"target database {url.database} already holds {relations} tables or other relations; "
            "restore into an empty database",
            field="target",
        )


def _tool(name: str, field: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise InvalidInput(
            f"{name} is not on PATH: a PostgreSQL store is backed up and restored with PostgreSQL's client tools "
            "(pg_dump, pg_restore) of the server's major version or newer",
            field=field,
        )
    return found


def _run_tool(command: list[str], url: URL, *, field: str) -> bytes:
    """Run a PostgreSQL client tool against `url`; the connection goes in libpq's variables, so that the
    password never shows on a command line."""
    result = subprocess.run(
        command, env=_libpq_environment(url), capture_output=True, timeout=_TOOL_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise InvalidInput(
            f"{Path(command[0]).name} failed: {reason[-1] if reason else f'exit {result.returncode}'}", field=field
        )
    return result.stdout


def _libpq_environment(url: URL) -> dict[str, str]:
    parts = {
        "PGHOST": url.host,
        "PGPORT": url.port,
        "PGUSER": url.username,
        "PGPASSWORD": url.password,
        "PGDATABASE": url.database,
        "PGSSLMODE": url.query.get("sslmode"),
    }
    return {**os.environ, **{name: str(value) for name, value in parts.items() if value is not None}}


def _sealed_key(manifest: BackupManifest) -> str:
    return f"orgs/{manifest.org_id}/backups/{manifest.backup_id}.{_SUFFIXES[manifest.kind]}.sealed"


def _manifest_key(org_id: str, backup_id: str) -> str:
    return f"orgs/{org_id}/backups/{backup_id}.json"


def _context(org_id: str, backup_id: str) -> str:
    return f"backup:{org_id}:{backup_id}"
