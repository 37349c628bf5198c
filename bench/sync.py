"""Sync throughput: 100k records up (SQLite local store -> central PostgreSQL) and down again through the sync
service, against a bare batched copy between the same two databases in the same run.

    .venv/bin/python bench/sync.py [--rows 100000] [--admin-url postgresql+psycopg2://postgres@127.0.0.1:5432/postgres]

The service's figure includes what the bare copy skips: change capture, per-record versions and stamps, the
conflict check against the other side's log, sealing one sensitive column, and the watermark per batch. Both run
in this process, its imports frozen out of the garbage collector's passes as in a sync worker's process.
"""

from __future__ import annotations

import argparse
import base64
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from services.sync.celery_app import freeze_startup_heap
from services.sync.context import SyncContext
from services.sync.envelope import load_keyring
from services.sync.jobs import open_pair
from services.sync.pair import TablePair
from services.sync.stores import open_local
from services.sync.transfer import sync_table
from shared.db.migrate import upgrade
from shared.db.models import Organization, SyncSource
from shared.db.session import session_scope
from shared.settings import Settings
from shared.sync_tables import SyncTable

SCHEMA = "CREATE TABLE readings (id INTEGER PRIMARY KEY, device TEXT, value REAL, patient TEXT)"
BARE_SCHEMA = "CREATE TABLE bare_readings (id BIGINT PRIMARY KEY, device TEXT, value DOUBLE PRECISION, patient TEXT)"
BATCH = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--admin-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, central_database(args.admin_url) as url:
        upgrade(url)
        figures = measure(Path(folder), url, args.rows)
    for direction, (service, bare) in figures.items():
        print(
            f"{direction:<5} service {service:>10,.0f} records/s   bare copy {bare:>10,.0f} records/s   "
            f"ratio {service / bare:.2f}"
        )


def measure(folder: Path, url: str, rows: int) -> dict[str, tuple[float, float]]:
    # As a sync worker's process does when it starts; the bare copies, run in this process too, gain as much.
    freeze_startup_heap()
    # Where the sync worker lets the org's SQLite files be (bench_settings: data_dir/stores/<org>/).
    local_path = folder / "kiln" / "stores" / ORG / "plant.db"
    local_path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(local_path)) as connection:
        connection.execute(SCHEMA)
        connection.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", generate(rows))
        connection.commit()
    context = SyncContext.open(bench_settings(folder, url))
    try:
        bare_up = rate(rows, lambda: bare_copy_up(local_path, url))
        up = prepare(context, local_path, "up", reuse=None)
        service_up = rate(rows, lambda: sync_table(up))
        down_path = local_path.parent / "branch.db"
        with closing(sqlite3.connect(down_path)) as connection:
            connection.execute(SCHEMA)
        bare_down = rate(rows, lambda: bare_copy_down(url, folder / "bare.db"))
        down = prepare(context, down_path, "down", reuse=up.source_id)
        service_down = rate(rows, lambda: sync_table(down))
        up.local.dispose()
        down.local.dispose()
    finally:
        context.close()
    return {"up": (service_up, bare_up), "down": (service_down, bare_down)}


def generate(rows: int) -> Iterator[tuple[int, str, float, str]]:
    return ((n, f"pump-{n % 97}", n * 0.5, f"patient {n}") for n in range(1, rows + 1))


def rate(rows: int, work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return rows / (time.perf_counter() - started)


def bare_copy_up(local_path: Path, url: str) -> None:
    """The floor: read the SQLite table in batches, executemany into PostgreSQL."""
    engine = create_engine(url)
    with closing(sqlite3.connect(local_path)) as local, engine.begin() as central:
        central.execute(text(BARE_SCHEMA))
        cursor = local.execute("SELECT id, device, value, patient FROM readings")
        while batch := cursor.fetchmany(BATCH):
            central.execute(
                text("INSERT INTO bare_readings VALUES (:i, :d, :v, :p)"),
                [{"i": i, "d": d, "v": v, "p": p} for i, d, v, p in batch],
            )
    engine.dispose()


def bare_copy_down(url: str, target: Path) -> None:
    engine = create_engine(url)
    with engine.connect() as central, closing(sqlite3.connect(target)) as local:
        local.execute(SCHEMA)
        result = central.execution_options(stream_results=True).execute(text("SELECT * FROM bare_readings"))
        while batch := result.fetchmany(BATCH):
            local.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", [tuple(row) for row in batch])
        local.commit()
    engine.dispose()


ORG = "bench-sync"


def prepare(context: SyncContext, local_path: Path, direction: str, reuse: str | None) -> TablePair:
    """A table of a source, capture installed, outside the timing. `down` reuses the central table `up` filled."""
    spec = SyncTable.model_validate(
        {"name": "readings", "primaryKey": "id", "direction": direction, "sensitiveColumns": ["patient"]}
    )
    source = register(context, local_path, spec, reuse=reuse)
    with session_scope(context.sessions) as session:
        keyring = load_keyring(session, context.secrets, ORG)
    local = open_local(source.url, None, context.store_rules(ORG))
    return open_pair(context, local, source, spec, keyring=keyring, offset_ms=0, job_id=None)


def register(context: SyncContext, local_path: Path, spec: SyncTable, reuse: str | None) -> SyncSource:
    with session_scope(context.sessions) as session:
        if session.get(Organization, ORG) is None:
            session.add(Organization(id=ORG, name="bench", config={}))
            session.flush()
        if reuse is not None:
            source = session.get_one(SyncSource, reuse)
            source.url, source.tables = f"sqlite:///{local_path}", [spec.model_dump(mode="json", by_alias=True)]
        else:
            source = SyncSource(
                id="src" + secrets.token_hex(5),
                org_id=ORG,
                url=f"sqlite:///{local_path}",
                tables=[spec.model_dump(mode="json", by_alias=True)],
            )
            session.add(source)
        session.flush()
        session.expunge(source)
    if reuse is not None:
        mark_central_rows_changed(context, source.id)
    return source


def mark_central_rows_changed(context: SyncContext, source_id: str) -> None:
    """Edit every central record (outside the timing), so that all of them go down as central edits: the capture
    triggers version, stamp and log each edit as the application's own writes would be."""
    with context.engine.begin() as connection:
        connection.execute(text(f"UPDATE sync_{source_id}_readings SET value = value + 1"))
    with context.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        # The statistics autovacuum keeps on a live log: without them PostgreSQL takes the just-filled log for a
        # few rows, and sorts all that is left of it for every batch.
        connection.execute(text("ANALYZE sync_changes"))


def bench_settings(folder: Path, url: str) -> Settings:
    return Settings(
        data_dir=folder / "kiln",
        database_url=url,
        secret_key=SecretStr(base64.b64encode(secrets.token_bytes(32)).decode()),
        sync_batch_size=BATCH,
    )


@contextmanager
def central_database(admin_url: str) -> Iterator[str]:
    name = f"kiln_bench_sync_{secrets.token_hex(3)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
