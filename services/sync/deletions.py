"""Deletions carried from one store to the other, each audited with the version it removed.

A deletion is logged like an edit (services/sync/changes.py) and goes through the table's policy like one
(services/sync/merge.py); here are the writes it comes to. The stores are written with their triggers quiet, as
every write of the service is, so a deletion carried over is not sent back.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    or_,
    select,
)
from sqlalchemy.orm import Session

from services.sync.changes import LOCAL_LOG, begin_applying, end_applying, pending, shut_out_writers
from services.sync.envelope import from_typed_text, typed_text
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


# A pull deletes local records in the local store's transaction and audits them in the central one that acknowledges
# the batch, after it: a batch cut off between the two commits is redone with those records gone already, and would
# audit nothing. So the deleting transaction notes each deletion in the local store, under the central log position
# of the batch carrying it and that batch's token, until a batch whose acknowledgement the `down` watermark shows
# has audited it. The batch that audits a note forgets it by its token: a batch it overlapped (two jobs let in at
# once) may have carried the note past that batch's own position meanwhile.
_NOTES = MetaData()
DELETIONS_NOTED = Table(
    "_kiln_deleted",
    _NOTES,
    Column("id", Integer, primary_key=True),
    Column("source_id", String(40), nullable=False),
    Column("tbl", String(64), nullable=False),
    Column("pk", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    # The token of the batch that wrote the note: only that batch, or one carrying the note, forgets it by it.
    Column("batch", String(32), nullable=False),
    # The record as the store held it, each value as typed_text; none for a table that does not send up.
    Column("record", Text),
    Index("_kiln_deleted_by_table", "source_id", "tbl"),
)
_THIS_TABLE = (DELETIONS_NOTED.c.source_id == bindparam("source"), DELETIONS_NOTED.c.tbl == bindparam("table"))
# Run by every pulled batch: made once (services/sync/watermarks.py says why).
_NOTED = (
    select(DELETIONS_NOTED.c.seq, DELETIONS_NOTED.c.pk, DELETIONS_NOTED.c.record, DELETIONS_NOTED.c.batch)
    .where(*_THIS_TABLE)
    .order_by(DELETIONS_NOTED.c.id)
)
_ACKNOWLEDGED = DELETIONS_NOTED.c.seq <= bindparam("acknowledged")
_FORGET_ACKNOWLEDGED = DELETIONS_NOTED.delete().where(*_THIS_TABLE, _ACKNOWLEDGED)
_FORGET_AUDITED = DELETIONS_NOTED.delete().where(
    *_THIS_TABLE, or_(_ACKNOWLEDGED, DELETIONS_NOTED.c.batch.in_(bindparam("batches", expanding=True)))
)
_CARRY = DELETIONS_NOTED.update().where(*_THIS_TABLE).values(seq=bindparam("carried_to"))

NotedDeletion = tuple[str, dict[str, Any] | None]


@dataclass(frozen=True)
class BatchNotes:
    """A pulled batch's notes: its own token, the deletions it carries from batches cut off before their audit
    (each with its record as the store held it, None for a table that does not send up), and the tokens whose
    notes it forgets once acknowledged (its own and those it carries)."""

    token: str
    unaudited: list[NotedDeletion]
    tokens: frozenset[str]


def create_deletion_notes(connection: Connection) -> None:
    """The local store's notes of deletions not audited yet, made with its change log."""
    _NOTES.create_all(connection, checkfirst=True)


def take_notes(local: Connection, pair: TablePair, *, acknowledged: int, batch: int) -> BatchNotes:
    """At a pulled batch's start (`batch`, its last position), in its local transaction: the deletions a batch noted
    whose acknowledgement (with their audit rows) was cut off, carried to this batch's position so they wait for its
    acknowledgement; those a batch acknowledged already (up to `acknowledged`) are forgotten."""
    token = secrets.token_hex(16)
    this = {"source": pair.source_id, "table": pair.spec.name}
    noted = local.execute(_NOTED, this).all()
    if not noted:
        return BatchNotes(token, [], frozenset([token]))
    local.execute(_FORGET_ACKNOWLEDGED, {**this, "acknowledged": acknowledged})
    local.execute(_CARRY, {**this, "carried_to": batch})
    carried = [note for note in noted if note.seq > acknowledged]
    unaudited = [(note.pk, None if note.record is None else _record(note.record)) for note in carried]
    return BatchNotes(token, unaudited, frozenset([token, *(note.batch for note in carried)]))


def note_local_deletions(
    local: Connection, pair: TablePair, deleted: dict[str, dict[str, Any]], *, batch: int, notes: BatchNotes
) -> None:
    """In the transaction that deleted them: the records this pulled batch (`batch`, its last position) deleted."""
    if not deleted:
        return
    rows = [
        {
            "source_id": pair.source_id,
            "tbl": pair.spec.name,
            "pk": key,
            "seq": batch,
            "batch": notes.token,
            "record": _record_text(row) if pair.spec.sends_up else None,
        }
        for key, row in deleted.items()
    ]
    local.execute(DELETIONS_NOTED.insert(), rows)


def forget_audited_deletions(pair: TablePair, *, acknowledged: int, notes: BatchNotes) -> None:
    """After the central commit that audited them (a later batch forgets them otherwise)."""
    this = {"source": pair.source_id, "table": pair.spec.name}
    with pair.local.begin() as local:
        local.execute(_FORGET_AUDITED, {**this, "acknowledged": acknowledged, "batches": sorted(notes.tokens)})


def audit_noted_deletions(session: Session, pair: TablePair, noted: list[NotedDeletion]) -> None:
    for key, row in noted:
        audit_deletion(session, pair, key, None if row is None else pair.sealed(row), direction="down")


def _record_text(row: dict[str, Any]) -> str:
    # Column names come as SQLAlchemy's quoted_name, a str subclass orjson refuses as a key.
    return orjson.dumps({str(name): typed_text(value) for name, value in row.items()}).decode()


def _record(text: str) -> dict[str, Any]:
    return {name: from_typed_text(value) for name, value in orjson.loads(text).items()}


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
