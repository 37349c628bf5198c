"""Deletions carried from one store to the other, each audited with the version it removed.

A deletion is logged like an edit (services/sync/changes.py) and goes through the table's policy like one
(services/sync/merge.py); here are the writes it comes to. The stores are written with their triggers quiet, as
every write of the service is, so a deletion carried over is not sent back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from services.sync.changes import LOCAL_LOG, begin_applying, end_applying, pending, shut_out_writers
from services.sync.merge import jsonable
from services.sync.pair import TablePair
from services.sync.stores import delete, key_text, read, upsert
from shared.audit import record_change
from shared.db.models import SyncBase


def delete_centrally(
    session: Session, connection: Connection, pair: TablePair, rows: dict[str, dict[str, Any]]
) -> None:
    """Delete the central records `rows` holds by key, as they were (sealed): the audit keeps each."""
    if not rows:
        return
    delete(connection, pair.central_table, pair.key, rows)
    forget_bases(session, pair, rows)
    for key, row in rows.items():
        audit_deletion(session, pair, key, row, direction="up")


def delete_locally(local: Connection, pair: TablePair, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Delete these local records; returns those there were, as they were. A replayed batch finds none left, so
    it neither deletes nor counts anything twice."""
    found = read(local, pair.local_table, pair.key, keys)
    delete(local, pair.local_table, pair.key, found)
    return found


def restore_locally(pair: TablePair, rows: list[dict[str, Any]], *, read_up_to: int) -> set[str]:
    """Put back local records whose deletion lost to the central version (or was refused), without logging them.
    A record the application has written again since the batch read the local log (up to `read_up_to`) keeps that
    write, which goes up in a later batch: other writers are shut out while this looks for such writes. Returns the
    keys of those records."""
    if not rows:
        return set()
    with pair.local.begin() as local:
        shut_out_writers(local, LOCAL_LOG)
        by_key = {key_text(row[pair.key]): row for row in rows}
        written_since = pending(local, LOCAL_LOG, table=pair.spec.name, keys=by_key, after=read_up_to)
        begin_applying(local, LOCAL_LOG)
        upsert(local, pair.local_table, pair.key, [row for key, row in by_key.items() if key not in written_since])
        end_applying(local, LOCAL_LOG)
    return set(written_since)


def audit_local_deletions(session: Session, pair: TablePair, deleted: dict[str, dict[str, Any]]) -> None:
    """Audit the local records a pull deleted. A table that sends up keeps each as the central store would hold it;
    one that does not never puts a local record centrally (it may never have gone up: a central insert and delete
    of a key the local store held apart deletes it), so its audit rows name the key and direction alone."""
    for key, row in deleted.items():
        audit_deletion(session, pair, key, pair.sealed(row) if pair.spec.sends_up else None, direction="down")


def audit_deletion(
    session: Session, pair: TablePair, key: str, row: dict[str, Any] | None, *, direction: Literal["up", "down"]
) -> None:
    """`row` as the central store holds it (sensitive columns sealed), or None to audit the key alone."""
    detail: dict[str, Any] = {"direction": direction}
    if row is not None:
        detail["deleted"] = jsonable(row)
    record_change(
        session,
        org_id=pair.org_id,
        actor="sync",
        action="sync.delete",
        target=f"{pair.spec.name}/{key}",
        detail=detail,
    )


def forget_bases(session: Session, pair: TablePair, keys: Iterable[str]) -> None:
    """A deleted record has no agreed version left for field-merge to start from."""
    if pair.spec.policy != "field-merge":
        return
    for key in keys:
        base = session.get(SyncBase, (pair.source_id, pair.spec.name, key))
        if base is not None:
            session.delete(base)
