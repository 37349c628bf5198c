"""`kiln backup` / `kiln restore`: a local store snapshotted to the object store, sealed, and checked on the way
back.

A SQLite store's snapshot is SQLite's online backup; a PostgreSQL store's is pg_dump's custom format, taken in one
transaction: both are consistent while the store is in use. The snapshot is sealed with AES-GCM as a stream of
1 MiB chunks (shared/crypto.py, seal_stream), under a key derived from the platform key with the org and backup id
bound in, at `orgs/{org}/backups/{id}.db.sealed` (SQLite) or `{id}.dump.sealed` (PostgreSQL); beside it a manifest
holds the sha256 of the snapshot itself. Backup and restore go through temporary files, one chunk at a time, so a
store of any size passes through bounded memory; the plain snapshot is in a workspace of the user's alone under
TMPDIR (shared/workspaces.py), which the next backup, restore or rewrap removes when a process killed outright left
it behind, with the copy a restore stages beside its target, which that workspace claims. A restore goes ahead
only when the opened snapshot's sha256 matches, and only into a new SQLite file or an empty PostgreSQL database
(pg_restore in one transaction), so it never overwrites a store and never leaves a half-restored one.

The manifest names the platform key the backup is sealed under (`sealed_under`, a key id; absent from manifests
written before keys had ids). Once KILN_SECRET_KEY is rotated, `kiln secrets rewrap` re-seals each backup under the
new key (rewrap_backup), passing the snapshot from one sealing to the other in memory, never on disk in the clear:
the old sealed object is replaced only by a copy verified to open under the new key alone.

A backup is of a store the org's sync may open (shared/store_access.py): a SQLite file in the org's folder, or a
PostgreSQL server, and never Kiln's own database, which holds every org's data. A restore restores only a backup
whose manifest names the org asked for: the manifest says which sealed object to open, and under which org's key.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Literal, NamedTuple

import orjson
from psycopg2.extensions import make_dsn
from pydantic import BaseModel, ValidationError, field_validator
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from shared import workspaces
from shared.crypto import STREAM_MAGIC, SecretBox, is_sealed_stream
from shared.db.session import DATABASE_TIMEOUT_S, driver_message, libpq_bounds, make_org_engine, with_shipped_driver
from shared.db.types import utcnow
from shared.errors import (
    ArtifactIntegrityError,
    Forbidden,
    InvalidInput,
    NotFound,
    SecretUnreadable,
    TransientError,
)
from shared.schemas import problems
from shared.storage import ObjectStore, sha256_file
from shared.store_access import (
    StoreRules,
    refuse_dropped_query,
    refuse_malformed_host,
    refuse_nul,
    refuse_unsafe_parameters,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

Kind = Literal["sqlite", "postgresql"]
SQLITE: Final = "sqlite"
POSTGRESQL: Final = "postgresql"
_SUFFIXES: Final = {SQLITE: "db", POSTGRESQL: "dump"}
Sealing = Literal["whole", "stream"]
WHOLE: Final = "whole"
STREAM: Final = "stream"
_TOOL_TIMEOUT_S = 3600
# Files SQLite keeps beside a store and reads as that store's when it opens it.
_LEFTOVERS: Final = ("-wal", "-shm", "-journal")
# What backup_store names a backup: its time, then 8 random hex digits.
_BACKUP_ID = re.compile(r"\d{8}T\d{6}Z_[0-9a-f]{8}")
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
    # And those written before backups were sealed as streams were sealed whole.
    sealing: Sealing = WHOLE
    sha256: str
    size_bytes: int
    created_at: str
    # The platform key's id (shared/crypto.py, key_id); None: sealed before keys had ids.
    sealed_under: str | None = None

    @field_validator("backup_id")
    @classmethod
    def _made_by_backup_store(cls, value: str) -> str:
        # It names the sealed object's key: no other text, such as ../, may reach the store.
        if not _BACKUP_ID.fullmatch(value):
            raise ValueError(f"{value!r} is not a backup id such as 20260101T000000Z_0a1b2c3d")
        return value

    @field_validator("created_at")
    @classmethod
    def _an_iso_time(cls, value: str) -> str:
        if datetime.fromisoformat(value).tzinfo is None:  # backups are listed in its order, against aware times
            raise ValueError(f"{value!r} names no time zone")
        return value


class Backups(NamedTuple):
    """An org's backups, newest first, and why each of those whose manifest is damaged cannot be restored."""

    manifests: list[BackupManifest]
    damaged: list[str]


def backup_store(store: ObjectStore, box: SecretBox, *, rules: StoreRules, source: str) -> BackupManifest:
    """Snapshot `source` (a SQLite file's path or sqlite:/// URL, or a PostgreSQL URL), a store of the org of
    `rules` (the org's sync rules, SyncContext.store_rules), into the object store under that org. The snapshot goes
    through temporary files (TMPDIR needs room for it twice), never whole through memory."""
    org_id = rules.org_id
    location = store_location(source, field="source")
    # A server is reached as the rules return it: pinned to the address they checked (KILN_STORE_NETWORKS).
    checked = rules.check_before_opening(_url_of(location), field="source")
    with _working_folder() as folder:
        snapshot, sealed = Path(folder) / "snapshot", Path(folder) / "sealed"
        if isinstance(location, URL):
            kind: Kind = POSTGRESQL
            shown = location.render_as_string(hide_password=True)
            _dump_postgresql(checked, snapshot, rules.timeout_s)
        else:
            kind, shown = SQLITE, str(location)
            _snapshot_sqlite(location, snapshot, rules.timeout_s)
        # Checked once the snapshot is taken, which says best why a server is out of reach (pg_dump) or a file is
        # no database; the snapshot has not left this temporary folder yet.
        _refuse_kiln_database(checked if isinstance(location, URL) else _url_of(snapshot), rules)
        backup_id = utcnow().strftime("%Y%m%dT%H%M%SZ") + "_" + secrets.token_hex(4)
        manifest = BackupManifest(
            backup_id=backup_id,
            org_id=org_id,
            source=shown,
            kind=kind,
            sealing=STREAM,
            sealed_under=box.current_id,
            sha256=sha256_file(snapshot),
            size_bytes=snapshot.stat().st_size,
            created_at=utcnow().isoformat(),
        )
        with snapshot.open("rb") as plain, sealed.open("wb") as out:
            box.seal_stream(plain, out, context=_context(org_id, backup_id))
        store.put_file(sealed_key(manifest), sealed)
    store.put_bytes(_manifest_key(org_id, backup_id), orjson.dumps(manifest.model_dump()))
    return manifest


def restore_store(
    store: ObjectStore,
    box: SecretBox,
    *,
    org_id: str,
    backup_id: str,
    target: str,
    timeout_s: float = DATABASE_TIMEOUT_S,
) -> BackupManifest:
    """Restore a backup into `target`: a new SQLite file for a SQLite backup, an empty PostgreSQL database for a
    PostgreSQL one. The snapshot is opened and checked in temporary files before anything is written there. A
    PostgreSQL target that stops answering is waited on about `timeout_s` (KILN_DATABASE_TIMEOUT_S)."""
    if not _BACKUP_ID.fullmatch(backup_id):
        raise InvalidInput(
            f"{backup_id!r} is not a backup id such as 20261101T000000Z_0a1b2c3d: `kiln backups {org_id}` lists them",
            field="backup_id",
        )
    location = store_location(target, field="target")
    manifest = _read_manifest(store, org_id, backup_id)
    if manifest.org_id != org_id:
        raise Forbidden(
            f"backup {backup_id} among {org_id}'s backups was made for organization {manifest.org_id!r}: nothing "
            "was restored",
            field="backup_id",
        )
    kind = POSTGRESQL if isinstance(location, URL) else SQLITE
    if kind != manifest.kind:
        raise InvalidInput(f"backup {backup_id} is of a {manifest.kind} store, not {kind}", field="target")
    if isinstance(location, URL):
        _refuse_unless_empty(location, timeout_s)
    elif location.exists():
        raise _exists(location)
    elif not location.parent.is_dir():  # found out before the download, not after
        raise InvalidInput(f"{location.parent} is not a folder: make it, or restore into one that is", field="target")
    else:
        _refuse_leftovers(location)
    with _working_folder() as folder:
        sealed, snapshot = Path(folder) / "sealed", Path(folder) / "snapshot"
        store.get_file(sealed_key(manifest), sealed)
        _open_verified(box, manifest, sealed, snapshot, outcome="nothing was restored")
        if isinstance(location, URL):
            _restore_postgresql(snapshot, location, timeout_s)
        else:
            _place_new_file(snapshot, location, folder)
    return manifest


@contextmanager
def _working_folder() -> Iterator[Path]:
    """A folder of this user's alone for a backup, restore or rewrap: a workspace (shared/workspaces.py), which
    holds the plain snapshot of a backup or restore. One that a process killed outright (SIGKILL) left behind is
    removed first, here or by a training worker's start."""
    root = workspaces.default_root()
    workspaces.sweep(root)
    with workspaces.workspace(root) as folder:
        yield folder


def _place_new_file(snapshot: Path, target: Path, folder: Path) -> None:
    """Put the snapshot at `target` only if nothing is there, even a file made since the restore began. It is
    staged in the target's folder under a name made for it (never an operator's file's), then linked to `target`:
    a link fails where the path exists, which a rename would replace. The staged copy is claimed by the restore's
    workspace `folder`, so that a sweep removes it when the restore is killed outright."""
    staged = target.with_name(f".{target.name}.{secrets.token_hex(4)}.restoring")
    workspaces.claim_outside(folder, staged)
    os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        shutil.move(snapshot, staged)
        # The store holds the org's records in the clear: its owner's alone, as its backups and Kiln's files are.
        staged.chmod(0o600)
        _refuse_leftovers(target)  # again: a writer may have left one while the backup downloaded
        os.link(staged, target)
    except FileExistsError:
        raise _exists(target) from None
    finally:
        staged.unlink(missing_ok=True)


def _refuse_leftovers(target: Path) -> None:
    """SQLite takes a -wal or -journal file beside a store for that store's, and would replay an earlier store's
    uncommitted or uncheckpointed writes into the restored one: the operator must move them away first."""
    left = sorted(name for name in (target.name + suffix for suffix in _LEFTOVERS) if target.with_name(name).exists())
    if left:
        raise InvalidInput(
            f"{target} has files of an earlier store beside it ({', '.join(left)}), which SQLite would replay into "
            "the restored one: move them away, or restore into a new path",
            field="target",
        )


def _exists(target: Path) -> InvalidInput:
    return InvalidInput(f"{target} exists; restore into a new path", field="target")


def rewrap_backup(store: ObjectStore, box: SecretBox, manifest: BackupManifest) -> BackupManifest:
    """Re-seal a backup under the current platform key, and return its new manifest. The snapshot passes from the
    old sealed object into the new one a chunk at a time, in memory only: nothing of it is ever on disk in the
    clear, so a rewrap killed at any point leaves no plain store behind. The new sealed object is uploaded beside the
    old one and verified there (it opens under the current key alone, to the snapshot's checksum) before it replaces
    the old one; then the manifest is rewritten. Stopped at any point, the backup still restores: the sealed object
    is replaced whole (one PUT, or a rename in a folder store), and a restore tells a sealed stream from bytes sealed
    whole by the object itself, not by the manifest. TMPDIR needs room for the sealed store twice."""
    key = sealed_key(manifest)
    staged = f"{key}.rewrapping"
    outcome = "the backup was left as it was"
    with _working_folder() as folder:
        old, new = Path(folder) / "old", Path(folder) / "new"
        store.get_file(key, old)
        with old.open("rb") as sealed, new.open("wb") as out:
            plain = io.BufferedReader(_ChunksReader(_opened_chunks(box, manifest, sealed, outcome=outcome)))
            box.seal_stream(plain, out, context=_context(manifest.org_id, manifest.backup_id))
        store.put_file(staged, new)
        try:
            store.get_file(staged, old)  # the old object's copy is no longer needed: the uploaded one takes its place
            with old.open("rb") as uploaded:
                for _ in _opened_chunks(box.without_retired(), manifest, uploaded, outcome=outcome):
                    pass  # opened and checked, chunk by chunk, and thrown away
            store.put_file(key, new)
        finally:
            store.delete(staged)
    rewrapped = manifest.model_copy(update={"sealing": STREAM, "sealed_under": box.current_id})
    store.put_bytes(_manifest_key(manifest.org_id, manifest.backup_id), orjson.dumps(rewrapped.model_dump()))
    return rewrapped


class _ChunksReader(io.RawIOBase):
    """Chunks of bytes read as a file: seal_stream reads the snapshot a rewrap opens straight from memory."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        # Runs the chunks to their end, even past an empty last one: _opened_chunks checks the checksum there.
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = memoryview(chunk)
        target = memoryview(buffer).cast("B")
        size = min(len(target), len(self._left))
        target[:size] = self._left[:size]
        self._left = self._left[size:]
        return size


def _open_verified(box: SecretBox, manifest: BackupManifest, sealed: Path, snapshot: Path, *, outcome: str) -> None:
    """Open a sealed backup into `snapshot`, checked against the manifest's sha256; ArtifactIntegrityError, ending
    with `outcome`, when it does not open or does not match."""
    snapshot.touch(mode=0o600)  # the plain store, never readable by others, here or once moved into place
    with sealed.open("rb") as source, snapshot.open("wb") as out:
        for chunk in _opened_chunks(box, manifest, source, outcome=outcome):
            out.write(chunk)


def _opened_chunks(box: SecretBox, manifest: BackupManifest, sealed: BinaryIO, *, outcome: str) -> Iterator[bytes]:
    """The snapshot a sealed backup holds, chunk by chunk; ArtifactIntegrityError, ending with `outcome`, when it
    does not open, or, once the last chunk was taken, when it does not match the manifest's sha256."""
    context = _context(manifest.org_id, manifest.backup_id)
    digest = hashlib.sha256()
    try:
        # Told by the object, not the manifest: a rewrap stopped between replacing the object and rewriting the
        # manifest leaves a stream behind a manifest that says "whole". (Bytes sealed whole start with a random nonce.)
        stream = is_sealed_stream(sealed.read(len(STREAM_MAGIC)))
        sealed.seek(0)
        chunks = (
            box.unsealed_chunks(sealed, context=context)
            if stream
            else iter([box.unseal(sealed.read(), context=context)])
        )
        for chunk in chunks:
            digest.update(chunk)
            yield chunk
    except SecretUnreadable as error:
        raise ArtifactIntegrityError(f"backup {manifest.backup_id} does not open: {error.message}; {outcome}") from None
    if digest.hexdigest() != manifest.sha256:
        raise ArtifactIntegrityError(f"backup {manifest.backup_id} does not match its checksum; {outcome}")


def list_backups(store: ObjectStore, org_id: str) -> Backups:
    """The org's backups, newest first; a damaged manifest is named, and hides none of the others."""
    manifests, damaged = [], []
    for key in store.list(f"orgs/{org_id}/backups/"):
        if key.endswith(".json"):
            try:
                manifests.append(_read_manifest(store, org_id, Path(key).stem))
            except ArtifactIntegrityError as error:
                damaged.append(str(error))
    manifests.sort(key=lambda manifest: datetime.fromisoformat(manifest.created_at), reverse=True)
    return Backups(manifests, damaged)


def list_backups_in(stores: Sequence[ObjectStore], org_id: str) -> Backups:
    """The org's backups in all of `stores`, newest first, as list_backups."""
    listed = [list_backups(store, org_id) for store in stores]
    manifests = [manifest for backups in listed for manifest in backups.manifests]
    manifests.sort(key=lambda manifest: datetime.fromisoformat(manifest.created_at), reverse=True)
    return Backups(manifests, [problem for backups in listed for problem in backups.damaged])


def store_holding(stores: Sequence[ObjectStore], org_id: str, backup_id: str) -> ObjectStore:
    """The store of `stores` that holds the backup; the first when none does, or `backup_id` is no backup id, for
    restore_store to say so."""
    if _BACKUP_ID.fullmatch(backup_id):
        for store in stores:
            if store.exists(_manifest_key(org_id, backup_id)):
                return store
    return stores[0]


def _read_manifest(store: ObjectStore, org_id: str, backup_id: str) -> BackupManifest:
    key = _manifest_key(org_id, backup_id)
    try:
        manifest = BackupManifest.model_validate(orjson.loads(store.get_bytes(key)))
    except NotFound:
        raise NotFound(f"{org_id} has no backup {backup_id}: `kiln backups {org_id}` lists them") from None
    except orjson.JSONDecodeError as error:
        why = f"not JSON: {error}"
    except ValidationError as error:
        why = problems(error)
    else:
        if manifest.backup_id == backup_id:
            return manifest
        why = f"it names backup {manifest.backup_id}"
    raise ArtifactIntegrityError(f"backup {backup_id} cannot be restored: its manifest {key} is damaged ({why})")


def store_location(given: str, *, field: str) -> URL | Path:
    """The store `given` names: a PostgreSQL database's URL, or a SQLite file's path."""
    if "://" not in given:
        if "\0" in given:
            raise InvalidInput(f"{field}: a path holds no NUL character", field=field)
        return Path(given).resolve()
    try:
        url = make_url(given)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidInput(f"{field} is not a database URL", field=field) from None
    refuse_nul(url, field=field)
    refuse_unsafe_parameters(url, field=field)  # a restore's target too, which no store rules check
    refuse_dropped_query(given, url, field=field)
    refuse_malformed_host(url, field=field)
    if url.get_backend_name() == POSTGRESQL:
        return url
    if url.get_backend_name() == SQLITE and url.database:
        return Path(url.database).resolve()
    raise InvalidInput(f"{field}: only SQLite files and PostgreSQL databases can be backed up", field=field)


def _url_of(location: URL | Path) -> URL:
    return location if isinstance(location, URL) else URL.create(SQLITE, database=str(location))


def _refuse_kiln_database(url: URL, rules: StoreRules) -> None:
    """Kiln's own database, however it is named (its file, a copy of it, its server by any URL), is no org's store."""
    engine = make_org_engine(with_shipped_driver(url), timeout_s=rules.timeout_s)
    try:
        with engine.connect() as connection:
            rules.check_opened(connection, table=None, field="source")
    except SQLAlchemyError as error:
        raise InvalidInput(f"source database cannot be reached: {type(error).__name__}", field="source") from None
    finally:
        engine.dispose()


class _StillLocked(Exception):
    """The source stayed locked by a writer past the wait a backup gives it."""


def _snapshot_sqlite(path: Path, snapshot: Path, timeout_s: float) -> None:
    """A consistent copy of the file. SQLite's backup retries a source a writer holds locked for ever; this one
    gives up `timeout_s` after it started (a busy wait of its own lasts a second)."""
    deadline = time.monotonic() + timeout_s

    def give_up_once_locked_past_the_deadline(status: int, _remaining: int, _pages: int) -> None:
        if status in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) and time.monotonic() > deadline:
            raise _StillLocked

    with closing(sqlite3.connect(path, timeout=1)) as source, closing(sqlite3.connect(snapshot)) as target:
        try:
            source.backup(target, progress=give_up_once_locked_past_the_deadline)
        except _StillLocked:
            raise TransientError(
                f"{path} stayed locked by a writer for {timeout_s:g} s (KILN_DATABASE_TIMEOUT_S): back it up once the "
                "writer commits"
            ) from None
        except sqlite3.DatabaseError as error:  # SQLite finds out only as it reads the file
            what = "is not a SQLite database" if error.sqlite_errorname == "SQLITE_NOTADB" else "cannot be read"
            raise InvalidInput(f"{path} {what} ({error})", field="source") from None


def _dump_postgresql(url: URL, snapshot: Path, timeout_s: float) -> None:
    command = [
        _tool("pg_dump", "source"),
        "--format=custom",
        "--no-owner",
        "--no-privileges",
        f"--file={snapshot}",
        f"--dbname={_connection_string(url, timeout_s)}",
    ]
    _run_tool(command, url, field="source")


def _restore_postgresql(snapshot: Path, url: URL, timeout_s: float) -> None:
    command = [
        _tool("pg_restore", "target"),
        "--no-owner",
        "--no-privileges",
        "--single-transaction",
        "--exit-on-error",
        f"--dbname={_connection_string(url, timeout_s)}",
        str(snapshot),
    ]
    _run_tool(command, url, field="target")


def _connection_string(url: URL, timeout_s: float) -> str:
    """What a tool connects with: the database, the URL's own libpq parameters (shared/store_access.py: none names
    a secret), and make_engine's bounds on a server that stops answering where the URL sets none. A tool's
    statements (a table's whole COPY) may rightly run long: only a peer that stops acknowledging ends them early."""
    return str(make_dsn(dbname=url.database, **libpq_bounds(url, timeout_s), **url.query))


def _refuse_unless_empty(url: URL, timeout_s: float) -> None:
    engine = make_org_engine(with_shipped_driver(url), timeout_s=timeout_s)
    try:
        with engine.connect() as connection:
            relations = int(connection.execute(text(_USER_RELATIONS)).scalar_one())
    except SQLAlchemyError as error:
        raise InvalidInput(
            f"target database {url.database} cannot be reached: {driver_message(error)}", field="target"
        ) from None
    finally:
        engine.dispose()
    if relations:
        raise InvalidInput(
            f"target database {url.database} is not empty (tables, views or sequences: {relations}); "
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


def _run_tool(command: list[str], url: URL, *, field: str) -> None:
    """Run a PostgreSQL client tool against `url`; the connection goes in libpq's variables, so that the
    password never shows on a command line."""
    result = subprocess.run(
        command,
        env=_libpq_environment(url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=_TOOL_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        tool = Path(command[0]).name
        # All of it, on one line: libpq names the host and port on one line and the likely cause on the next.
        said = [line.strip().removeprefix(f"{tool}: ") for line in result.stderr.decode(errors="replace").splitlines()]
        reason = " ".join(line for line in said if line) or f"exit {result.returncode}"
        raise InvalidInput(f"{tool} failed: {reason}", field=field)


def _libpq_environment(url: URL) -> dict[str, str]:
    parts = {
        "PGHOST": url.host,
        "PGPORT": url.port,
        "PGUSER": url.username,
        "PGPASSWORD": url.password,
    }
    return {**os.environ, **{name: str(value) for name, value in parts.items() if value is not None}}


def sealed_key(manifest: BackupManifest) -> str:
    return f"orgs/{manifest.org_id}/backups/{manifest.backup_id}.{_SUFFIXES[manifest.kind]}.sealed"


def _manifest_key(org_id: str, backup_id: str) -> str:
    return f"orgs/{org_id}/backups/{backup_id}.json"


def _context(org_id: str, backup_id: str) -> str:
    return f"backup:{org_id}:{backup_id}"
