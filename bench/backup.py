"""Backup and restore of a local store: peak memory and speed, against a plain copy of the same file.

    .venv/bin/python bench/backup.py [--megabytes 512]

Makes a SQLite store of that size, then in a fresh process each: copies the file (the floor), backs it up with
`kiln backup`'s code (snapshot, sha256, sealed stream, upload) into a folder object store, and restores it (fetch,
open, verify, move into place). Prints each one's time and how far its peak resident memory rose above the process's
own before it started, against the store's size.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import resource
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from services.sync.backup import backup_store, restore_store
from shared.crypto import SecretBox
from shared.storage import LocalObjectStore
from shared.store_access import StoreRules

ORG = "bench-backup"
ROW_BYTES = 64_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=512)
    args = parser.parse_args()
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-backup-") as name:
        folder = Path(name)
        store = make_store(folder / ORG / "plant.db", args.megabytes)  # in the org's folder, as a backup needs
        size = store.stat().st_size
        copy_s, copy_rise, _ = in_fresh_process(copy_file, store, folder / "copy.db")
        backup_s, backup_rise, backup_id = in_fresh_process(back_up, key, folder, store)
        restore_s, restore_rise, _ = in_fresh_process(restore, key, folder, backup_id, folder / "restored.db")
    mb = size / 1e6
    print(f"store {mb:,.0f} MB")
    for label, seconds, rise in (
        ("plain copy", copy_s, copy_rise),
        ("backup", backup_s, backup_rise),
        ("restore", restore_s, restore_rise),
    ):
        print(
            f"{label:<11} {seconds:6.2f} s  {mb / seconds:7,.0f} MB/s  ({seconds / copy_s:4.1f}x the copy)   "
            f"peak memory +{rise / 1e6:6.1f} MB  ({rise / size:.3f} of the store)"
        )


def make_store(path: Path, megabytes: int) -> Path:
    path.parent.mkdir()
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE waveforms (id INTEGER PRIMARY KEY, samples BLOB)")
        rows = megabytes * 1_000_000 // ROW_BYTES
        connection.executemany("INSERT INTO waveforms VALUES (?, ?)", ((n, os.urandom(ROW_BYTES)) for n in range(rows)))
        connection.commit()
    return path


def copy_file(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)


def back_up(key: str, folder: Path, store: Path) -> str:
    rules = StoreRules(ORG, stores_dir=folder, kiln_database_url=f"sqlite:///{folder / 'kiln.db'}")
    manifest = backup_store(LocalObjectStore(folder / "objects"), SecretBox(key), rules=rules, source=str(store))
    return manifest.backup_id


def restore(key: str, folder: Path, backup_id: str, target: Path) -> None:
    restore_store(
        LocalObjectStore(folder / "objects"), SecretBox(key), org_id=ORG, backup_id=backup_id, target=str(target)
    )


def in_fresh_process(work: Callable[..., Any], *args: object) -> tuple[float, int, Any]:
    """Time `work` in a new process, how far its peak resident memory rose while it ran, and what it returned."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_measured, (work, *args))


def _measured(work: Callable[..., object], *args: object) -> tuple[float, int, object]:
    before = _peak_rss_bytes()
    started = time.perf_counter()
    result = work(*args)
    return time.perf_counter() - started, _peak_rss_bytes() - before, result


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


if __name__ == "__main__":
    main()
