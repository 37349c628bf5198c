"""A local store (a SQLite file, or a PostgreSQL database), the central PostgreSQL in a fresh database (or, on the
embedded default, a SQLite file), and the api, for the sync tests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

import services.sync.transfer as transfer
from services.api.app import create_app
from services.sync.beat import send_due
from services.sync.context import SyncContext
from services.sync.jobs import run_job
from services.sync.pair import Tally
from shared.db.migrate import upgrade
from shared.errors import TransientError
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys
from tests.support.servers import DEFAULT_ADMIN_URL

TWO_READINGS = [(1, "pump-1", 1.0, "Ada Lovelace"), (2, "pump-2", 2.0, "Alan Turing")]
READINGS = "CREATE TABLE readings (id INTEGER PRIMARY KEY, device TEXT, value REAL, patient TEXT)"
# What only a hospital's own store holds: the central store must never see it.
LOCAL_ONLY = "hosp-local-only-diagnosis"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Sync:
    """An org with a registered local store, and what a test needs to drive and inspect both sides."""

    api: TestClient
    context: SyncContext
    org: OrgKeys
    local_url: str
    source_id: str
    central_url: str
    table: str = "readings"

    @property
    def central_table(self) -> str:
        return f"sync_{self.source_id}_{self.table}"

    @property
    def local_path(self) -> Path:
        """The local store's file, when it is a SQLite one."""
        return Path(str(make_url(self.local_url).database))

    def local(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return run_sql(self.local_url, sql, params)

    def central(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return run_sql(self.central_url, sql, params)

    def submit(self) -> str:
        response = self.api.post(
            f"/v1/orgs/{self.org.org_id}/sync-jobs", json={"sourceId": self.source_id}, headers=self.org.trainer
        )
        assert response.status_code == 202, response.text
        return str(response.json()["jobId"])

    def run(self) -> dict[str, Any]:
        """Queue a job over HTTP, run it here, and return the job as the api shows it."""
        job_id = self.submit()
        run_job(self.context, job_id)
        return self.job(job_id)

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.api.get(f"/v1/orgs/{self.org.org_id}/sync-jobs/{job_id}", headers=self.org.viewer).json())

    def conflicts(self, status: str | None = None) -> list[dict[str, Any]]:
        query = f"?status={status}" if status else ""
        response = self.api.get(f"/v1/orgs/{self.org.org_id}/conflicts{query}", headers=self.org.viewer)
        return list(response.json())

    def audit_actions(self) -> list[str]:
        entries = self.api.get(f"/v1/orgs/{self.org.org_id}/audit", headers=self.org.admin).json()
        return [entry["action"] for entry in entries]


def run_sql(url: str, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """One statement in its own transaction, on a connection of its own, as another application would."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql), params or {})
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def many_readings(count: int) -> list[tuple[int, str, float, str]]:
    """Readings 1..count, enough for a job to take several batches (the tests' batch size is 500)."""
    return [(n, f"pump-{n % 7}", float(n), f"patient {n}") for n in range(1, count + 1)]


def kiln(settings: Settings, *args: str, tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The `kiln` command in a process of its own, with these settings as its KILN_* variables (and `tmpdir` as its
    TMPDIR, when given)."""
    env = {**os.environ, **settings.as_env(), **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    command = [sys.executable, "-m", "deploy.local.cli", *args]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)


def an_earlier_kilns_backup(store: ObjectStore, key_b64: str, org_id: str, source: Path) -> str:
    """A backup of `source` as Kiln made them before they were sealed as streams: one AES-GCM message under the
    platform key, and a manifest that names no sealing and no key. Returns its id."""
    snapshot, backup_id = source.read_bytes(), "20261101T000000Z_0a1b2c3d"
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(base64.b64decode(key_b64)).encrypt(nonce, snapshot, f"backup:{org_id}:{backup_id}".encode())
    manifest = {
        "backup_id": backup_id,
        "org_id": org_id,
        "source": str(source),
        "sha256": hashlib.sha256(snapshot).hexdigest(),
        "size_bytes": len(snapshot),
        "created_at": "2026-11-01T00:00:00+00:00",
    }
    store.put_bytes(f"orgs/{org_id}/backups/{backup_id}.db.sealed", sealed)
    store.put_bytes(f"orgs/{org_id}/backups/{backup_id}.json", json.dumps(manifest).encode())
    return backup_id


def make_local_store(path: Path, rows: list[tuple[int, str, float, str]]) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute(READINGS)
        connection.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", rows)


def register(api: TestClient, org: OrgKeys, url: str, policy: str, **table: Any) -> str:
    spec = {"name": "readings", "primaryKey": "id", "policy": policy, "sensitiveColumns": ["patient"], **table}
    response = api.post(f"/v1/orgs/{org.org_id}/sync-sources", json={"url": url, "tables": [spec]}, headers=org.admin)
    assert response.status_code == 201, response.text
    return str(response.json()["sourceId"])


def open_sync(
    api: TestClient,
    context: SyncContext,
    org_id: str,
    tmp_path: Path,
    policy: str = "last-writer-wins",
    rows: list[tuple[int, str, float, str]] | None = None,
    **table: Any,
) -> Sync:
    org = create_org_with_keys(api, org_id)
    path = tmp_path / org_id / "plant.db"  # the org's folder of SQLite files (the settings' local_stores_dir)
    path.parent.mkdir()
    make_local_store(
        path, rows if rows is not None else [(1, "pump-1", 1.0, "Ada Lovelace"), (2, "pump-2", 2.0, "Alan Turing")]
    )
    url = f"sqlite:///{path}"
    source_id = register(api, org, url, policy, **table)
    return Sync(api, context, org, url, source_id, context.settings.resolved_database_url)


def open_table_sync(
    api: TestClient,
    context: SyncContext,
    org_id: str,
    tmp_path: Path,
    *statements: str,
    name: str = "t",
    key: str = "id",
    **table: Any,
) -> Sync:
    """An org syncing one table of a SQLite file that `statements` make and fill, with no sensitive column unless
    `table` names some."""
    org = create_org_with_keys(api, org_id)
    path = tmp_path / org_id / "plant.db"  # the org's folder of SQLite files (the settings' local_stores_dir)
    path.parent.mkdir()
    with sqlite3.connect(path) as connection:
        for statement in statements:
            connection.execute(statement)
    url = f"sqlite:///{path}"
    spec = {"name": name, "primaryKey": key, "sensitiveColumns": [], **table}
    response = api.post(f"/v1/orgs/{org.org_id}/sync-sources", json={"url": url, "tables": [spec]}, headers=org.admin)
    assert response.status_code == 201, response.text
    source_id = str(response.json()["sourceId"])
    return Sync(api, context, org, url, source_id, context.settings.resolved_database_url, name)


def open_down_only_vitals(api: TestClient, context: SyncContext, org_id: str, tmp_path: Path) -> Sync:
    """An org keeping its data on its premises, syncing `vitals` down only, whose two records the central store never
    saw; the local store refuses a temperature of 50 or more."""
    sync = open_table_sync(
        api,
        context,
        org_id,
        tmp_path,
        "CREATE TABLE vitals (id INTEGER PRIMARY KEY, diagnosis TEXT, temperature REAL CHECK (temperature < 50))",
        f"INSERT INTO vitals VALUES (1, '{LOCAL_ONLY}-AAA', 37.0), (2, '{LOCAL_ONLY}-BBB', 36.5)",
        name="vitals",
        direction="down",
    )
    response = api.patch(f"/v1/orgs/{org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return sync


def central_copies(sync: Sync) -> str:
    """Everything the central store keeps of the org's records, as text: the synced table, the bases, the conflicts,
    the audit trail and the jobs' errors."""
    of_org, of_source = {"o": sync.org.org_id}, {"s": sync.source_id}
    return repr(
        [
            sync.central(f"SELECT * FROM {sync.central_table}"),
            sync.central("SELECT * FROM sync_bases WHERE source_id = :s", of_source),
            sync.central("SELECT * FROM sync_conflicts WHERE org_id = :o", of_org),
            sync.central("SELECT * FROM audit_log WHERE org_id = :o", of_org),
            sync.central("SELECT errors FROM sync_jobs WHERE org_id = :o", of_org),
        ]
    )


def error_of(job: dict[str, Any]) -> str:
    """The reason a finished job gives: its last error."""
    return str(job["errors"][-1]["error"]) if job["errors"] else ""


def allow_connections(database: str | None, *, allowed: bool) -> None:
    """The central server refusing this database's connections and dropping the open ones: unreachable."""
    admin = create_engine(DEFAULT_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
        if not allowed:
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": database}
            )
    admin.dispose()


def run_twice_at_once(context: SyncContext, job_id: str) -> tuple[str, list[str], list[bool]]:
    """Run a job, and, after its first batch, the same job again in a thread (its message delivered twice, say):
    the first run's status, the second's, and whether the second was still waiting 2 s after it started."""
    second_run: list[str] = []
    twin = threading.Thread(target=lambda: second_run.append(run_job(context, job_id)))
    twin_waited: list[bool] = []

    def start_the_twin_after_the_first_batch(_tally: Tally) -> None:
        if not twin_waited:
            twin.start()
            twin.join(timeout=2)
            twin_waited.append(twin.is_alive())

    first_run = run_job(context, job_id, after_batch=start_the_twin_after_the_first_batch)
    twin.join(timeout=60)
    return first_run, second_run, twin_waited


def run_turning_local_after_the_first_batch(sync: Sync) -> tuple[str, dict[str, Any]]:
    """Run a job of `sync`, 2,000 records to send up, whose org the operator switches to dataResidency 'local' once
    its first batch of 500 is up; returns what run_job answered and the job as the api shows it."""

    def turn_local_once(_tally: Tally) -> None:
        if sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(500,)]:
            patch = {"config": {"dataResidency": "local"}}
            patched = sync.api.patch(f"/v1/orgs/{sync.org.org_id}", json=patch, headers=ADMIN)
            assert patched.status_code == 200, patched.text

    job_id = sync.submit()
    status = run_job(sync.context, job_id, after_batch=turn_local_once)
    return status, sync.job(job_id)


# Column names text() took for bound parameters (`:id`) or that a driver taking `%s` could (`%s`, `%(x)s`), with
# quotes, a backslash before a colon, and PostgreSQL's cast.
ODD_COLUMNS = (":id", "a:b", '"q"', "%s", "%(x)s", "100%", "x::text", "a\\:b")


def hold_a_conflict(sync: Sync) -> dict[str, Any]:
    """Record 1 edited on both sides of a manual table, its patient locally: held for review, the local version
    sealed under the active key."""
    sync.run()
    sync.local("UPDATE readings SET value = 10.0, patient = 'Local Name' WHERE id = 1")
    time.sleep(0.05)  # the central edit is the later one
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")
    sync.run()
    sync.run()
    [held] = sync.conflicts("open")
    return held


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def in_text(name: str) -> str:
    """A column name quoted for the tests' own SQL that goes through text() too (not the statements that make the
    table, which sqlite3 runs as they are)."""
    return quoted(name).replace(":", "\\:")


def oddly_named(sync: Sync) -> dict[str, Any]:
    """Sync a table whose columns are ODD_COLUMNS both ways, with one more added after its first sync; returns the
    jobs and both stores' records."""
    first = sync.run()
    sync.local(f"ALTER TABLE t ADD COLUMN {in_text('b:c')} TEXT")
    sync.local(f"ALTER TABLE t ADD COLUMN {in_text('50%')} TEXT")
    sync.local(
        f"UPDATE t SET {in_text(':id')} = 'local', {in_text('b:c')} = 'added', {in_text('50%')} = 'half' WHERE id = 1"
    )
    sync.local(f"INSERT INTO t (id, {in_text('a:b')}, {in_text('100%')}) VALUES (2, 'two', 2.5)")
    second = sync.run()
    sync.central(f"UPDATE {sync.central_table} SET {in_text('a:b')} = 'central', {in_text('%s')} = 'p' WHERE id = 2")
    third = sync.run()
    fourth = sync.run()
    names = ", ".join(in_text(name) for name in ("id", *ODD_COLUMNS, "b:c", "50%"))
    return {
        "jobs": [
            (job["status"], job["pushed"], job["pulled"], error_of(job)) for job in (first, second, third, fourth)
        ],
        "local": sync.local(f"SELECT {names} FROM t ORDER BY id"),
        "central": sync.central(f"SELECT {names} FROM {sync.central_table} ORDER BY id"),
    }


ODDLY_NAMED_TABLE = (
    f"CREATE TABLE t (id INTEGER PRIMARY KEY, {', '.join(f'{quoted(name)} TEXT' for name in ODD_COLUMNS)})",
    f"INSERT INTO t VALUES (1, {', '.join(repr(f'v{index}') for index in range(len(ODD_COLUMNS)))})",
)
ODDLY_NAMED_SYNCED = {
    "jobs": [("succeeded", 1, 0, ""), ("succeeded", 2, 0, ""), ("succeeded", 0, 1, ""), ("succeeded", 0, 0, "")],
    "local": [
        (1, "local", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "added", "half"),
        (2, None, "central", None, "p", None, "2.5", None, None, None, None),
    ],
}


def make_large_store(path: Path, megabytes: int) -> None:
    """A SQLite store of `megabytes` MB, made in a second or two: long enough to back up to be stopped half-way."""
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE waveforms (samples BLOB)")
        connection.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO waveforms SELECT zeroblob(1048576) FROM n",
            (megabytes,),
        )
        connection.commit()


def _stopping_signals_as_default() -> None:
    """In the child, before `kiln` starts: a test run under nohup hands SIGHUP on ignored, and `kiln` rightly keeps
    a signal its caller ignores (deploy/local/cli.py), so the signal sent would change nothing."""
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


def signalled_once_there(
    settings: Settings, scratch: Path, number: signal.Signals, *args: str, watched: Path, pattern: str
) -> subprocess.CompletedProcess[bytes]:
    """Run `kiln *args` with TMPDIR=scratch, send it `number` as soon as a file matching `pattern` is in the folder
    `watched`, and return how it ended."""
    env = {**os.environ, **settings.as_env(), "TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "deploy.local.cli", *args]
    with subprocess.Popen(
        command,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_stopping_signals_as_default,
    ) as cli:
        deadline = time.monotonic() + 60
        while not any(watched.glob(pattern)):
            assert cli.poll() is None and time.monotonic() < deadline, "the command ended before it could be stopped"
            time.sleep(0.005)
        cli.send_signal(number)
        _, stderr = cli.communicate(timeout=60)
    return subprocess.CompletedProcess(command, cli.returncode, stderr=stderr)


@contextmanager
def embedded_stack(settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, SyncContext]]:
    """The api and a sync worker's context on the embedded default: a SQLite file as the central store."""
    central_url = f"sqlite:///{tmp_path / 'kiln.db'}"
    upgrade(central_url)
    embedded = settings.model_copy(update={"database_url": central_url, "sync_batch_size": 500})
    context = SyncContext.open(embedded)
    with TestClient(create_app(embedded), raise_server_exceptions=False) as api:
        yield api, context
    context.close()


@contextmanager
def embedded(settings: Settings, org_id: str, tmp_path: Path, **options: Any) -> Iterator[Sync]:
    with embedded_stack(settings, tmp_path) as (api, context):
        yield open_sync(api, context, org_id, tmp_path, **options)


def choose(sync: Sync, conflict_id: int, keep: str) -> None:
    decided = sync.api.post(
        f"/v1/orgs/{sync.org.org_id}/conflicts/{conflict_id}", json={"keep": keep}, headers=sync.org.admin
    )
    assert decided.status_code == 200, decided.text


def a_job_cut_off_before_its_pull_is_acknowledged(sync: Sync, monkeypatch: pytest.MonkeyPatch) -> str:
    """Queue a job and run it once, the central store losing the connection after the local store committed the
    job's first pulled batch and before that batch's acknowledgement; returns the job's id, for its retry."""

    def acknowledgement_cut_off(*args: object) -> None:
        raise OperationalError("UPDATE sync_watermarks", {}, Exception("server closed the connection unexpectedly"))

    job_id = sync.submit()
    with monkeypatch.context() as cut:
        cut.setattr(transfer, "_acknowledge_pull", acknowledgement_cut_off)
        with pytest.raises(TransientError):
            run_job(sync.context, job_id)
    return job_id


def beat_tick(producer: Celery, sync_context: SyncContext, *, now: datetime) -> int:
    """What the sync beat sends on a tick at `now`."""
    return send_due(producer, sync_context.engine, sync_context.sessions, now=now)
