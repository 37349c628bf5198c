"""Where an org's sealed values live, and how one batch of those not under the active key is re-encrypted.

Each place (a central copy, its field-merge bases, its conflicts, the org's `sync.delete` audit rows of a table) is
read in its own key order, only the rows the database finds stale: in a central copy, a sensitive value not under
the active key (plain text included, which fails the rotation); in a JSON document, one naming an older key of
the org. Python then checks each value precisely before re-encrypting it. A rotation (services/sync/rotation.py)
runs one batch per transaction, and asks each place at the end whether anything is left.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Connection, Table, Text, bindparam, cast, false, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute

from services.sync.envelope import Keyring, looks_sealed
from services.sync.stores import reflect
from shared.db.models import AuditEntry, SyncBase, SyncConflict
from shared.errors import Conflict

# A conflict keeps its record as each side had it, and as kept.
CONFLICT_DOCUMENTS = ("local_version", "central_version", "kept")


@dataclass(frozen=True)
class Resealed:
    """A row to write back, as its update's parameters, and how many sealed copies of a record it holds."""

    params: dict[str, Any]
    documents: int = 1


@dataclass(frozen=True)
class Batch:
    """One batch re-encrypted: the position the next starts after, and how many rows or documents changed."""

    last: Any
    resealed: int


class Place(ABC):
    """Rows holding sealed values of one table's sensitive columns, read by batches in key order."""

    kind: ClassVar[str]
    name: str

    def reseal_batch(self, connection: Connection, keyring: Keyring, *, after: Any, limit: int) -> Batch | None:
        """Re-encrypt the next `limit` stale rows after `after`; None when there are none left."""
        rows = self._stale(connection, keyring, after=after, limit=limit)
        if not rows:
            return None
        return Batch(last=rows[-1][0], resealed=self._rewrite(connection, keyring, rows))

    def anything_left(self, connection: Connection, keyring: Keyring, *, limit: int) -> bool:
        """Whether a value is still under an older key. The database's filter may name a row Python then finds
        current (a non-sensitive value that reads like a token): those are read past."""
        after = None
        while rows := self._stale(connection, keyring, after=after, limit=limit):
            if self._resealed_rows(keyring, rows):
                return True
            after = rows[-1][0]
        return False

    @abstractmethod
    def _stale(self, connection: Connection, keyring: Keyring, *, after: Any, limit: int) -> Sequence[Sequence[Any]]:
        """Rows the database finds stale, after `after` in key order: each row's key first."""

    @abstractmethod
    def _resealed_rows(self, keyring: Keyring, rows: Sequence[Sequence[Any]]) -> list[Resealed]:
        """The rows to write back, re-encrypted; rows whose values all are current left out."""

    @abstractmethod
    def _write(self, connection: Connection, params: list[dict[str, Any]]) -> None: ...

    def _rewrite(self, connection: Connection, keyring: Keyring, rows: Sequence[Sequence[Any]]) -> int:
        changed = self._resealed_rows(keyring, rows)
        if changed:
            self._write(connection, [row.params for row in changed])
        return sum(row.documents for row in changed)


@dataclass
class CentralCopy(Place):
    """A source's central copy of a table: only its sensitive columns are written, so an application's edit of
    another column in between stays."""

    kind: ClassVar[str] = "central copy"
    central_name: str
    key: str
    name: str
    columns: list[str]
    _table: Table | None = field(default=None, init=False, repr=False)

    def _stale(self, connection: Connection, keyring: Keyring, *, after: Any, limit: int) -> Sequence[Sequence[Any]]:
        if not connection.dialect.has_table(connection, self.central_name):  # its source was deleted
            return []
        table = self._reflected(connection)
        key = table.c[self.key]
        current = f"{keyring.active_id}:%"
        stale = or_(*((table.c[c].is_not(None) & table.c[c].not_like(current)) for c in self.columns))
        query = select(key, *(table.c[c] for c in self.columns)).where(stale).order_by(key).limit(limit)
        return connection.execute(query if after is None else query.where(key > after)).all()

    def _resealed_rows(self, keyring: Keyring, rows: Sequence[Sequence[Any]]) -> list[Resealed]:
        changed = []
        for record_key, *values in rows:
            row = resealed(dict(zip(self.columns, values, strict=True)), self.name, self.columns, keyring)
            if row is not None:
                changed.append(Resealed({"record_key": record_key, **{f"new_{c}": row[c] for c in self.columns}}))
        return changed

    def _write(self, connection: Connection, params: list[dict[str, Any]]) -> None:
        table = self._reflected(connection)
        write = (
            update(table)
            .where(table.c[self.key] == bindparam("record_key"))
            .values({column: bindparam(f"new_{column}") for column in self.columns})
        )
        connection.execute(write, params)

    def _reflected(self, connection: Connection) -> Table:
        """Once per rotation pass: a source's tables never change their columns."""
        if self._table is None:
            self._table = reflect(connection, self.central_name)
        return self._table


@dataclass
class _OfSourceTable(Place):
    """Documents the service keeps of one table of a source."""

    source_id: str
    name: str
    columns: list[str]


@dataclass
class Bases(_OfSourceTable):
    """A field-merge or append-only table's bases: a sealed record per key."""

    kind: ClassVar[str] = "bases"

    def _stale(self, connection: Connection, keyring: Keyring, *, after: Any, limit: int) -> Sequence[Sequence[Any]]:
        query = (
            select(SyncBase.record_key, SyncBase.row)
            .where(*self._of_table(), _names_older_key(SyncBase.row, keyring))
            .order_by(SyncBase.record_key)
            .limit(limit)
        )
        return connection.execute(query if after is None else query.where(SyncBase.record_key > after)).all()

    def _resealed_rows(self, keyring: Keyring, rows: Sequence[Sequence[Any]]) -> list[Resealed]:
        return [
            Resealed({"key": key, "new_row": row})
            for key, found in rows
            if (row := resealed(dict(found), self.name, self.columns, keyring))
        ]

    def _write(self, connection: Connection, params: list[dict[str, Any]]) -> None:
        write = update(SyncBase).where(*self._of_table(), SyncBase.record_key == bindparam("key"))
        connection.execute(write.values(row=bindparam("new_row")), params)

    def _of_table(self) -> tuple[ColumnElement[bool], ...]:
        return (SyncBase.source_id == self.source_id, SyncBase.table_name == self.name)


@dataclass
class Conflicts(_OfSourceTable):
    """A table's conflicts, by id: each keeps up to three sealed copies of its record.

    Read locked (FOR UPDATE), as the review queue's choice locks its conflict (services/api/routers/sync_jobs.py):
    the api writes `kept` from the versions it read, and this batch writes all three back as it read them, so
    whichever reads second waits for the other's commit and reads what it wrote. Neither would see the other's
    write otherwise: the choice would be lost, or copied from a version under the key this rotation drains. On
    SQLite, which ignores FOR UPDATE, the batch holds the database's write lock from its first statement
    (one_key_change_at_a_time), and the api takes it before reading."""

    kind: ClassVar[str] = "conflicts"

    def _stale(self, connection: Connection, keyring: Keyring, *, after: Any, limit: int) -> Sequence[Sequence[Any]]:
        documents = [getattr(SyncConflict, attribute) for attribute in CONFLICT_DOCUMENTS]
        query = (
            select(SyncConflict.id, *documents)
            .where(
                SyncConflict.source_id == self.source_id,
                SyncConflict.table_name == self.name,
                or_(*(_names_older_key(document, keyring) for document in documents)),
            )
            .order_by(SyncConflict.id)
            .limit(limit)
            .with_for_update()
        )
        return connection.execute(query if after is None else query.where(SyncConflict.id > after)).all()

    def _resealed_rows(self, keyring: Keyring, rows: Sequence[Sequence[Any]]) -> list[Resealed]:
        changed = []
        for conflict_id, *documents in rows:
            new = [
                None if document is None else resealed(dict(document), self.name, self.columns, keyring)
                for document in documents
            ]
            if any(new):
                written = [document if fresh is None else fresh for fresh, document in zip(new, documents, strict=True)]
                values = {f"new_{a}": document for a, document in zip(CONFLICT_DOCUMENTS, written, strict=True)}
                changed.append(Resealed({"conflict": conflict_id, **values}, documents=sum(map(bool, new))))
        return changed

    def _write(self, connection: Connection, params: list[dict[str, Any]]) -> None:
        write = update(SyncConflict).where(SyncConflict.id == bindparam("conflict"))
        connection.execute(write.values({a: bindparam(f"new_{a}") for a in CONFLICT_DOCUMENTS}), params)


@dataclass
class DeletionAudits(Place):
    """The org's `sync.delete` rows of a table, by id: each keeps the deleted record sealed. A row names the table,
    not the source: a value audited in plain text, while its column was not sensitive (in a source since deleted
    and registered again with it sensitive, or in another store's table of that name), stays as it was."""

    kind: ClassVar[str] = "sync.delete audit rows"
    org_id: str
    name: str
    columns: list[str]

    def _stale(self, connection: Connection, keyring: Keyring, *, after: Any, limit: int) -> Sequence[Sequence[Any]]:
        query = (
            select(AuditEntry.id, AuditEntry.detail)
            .where(
                AuditEntry.org_id == self.org_id,
                AuditEntry.action == "sync.delete",
                AuditEntry.target.startswith(f"{self.name}/", autoescape=True),
                _names_older_key(AuditEntry.detail, keyring),
            )
            .order_by(AuditEntry.id)
            .limit(limit)
        )
        return connection.execute(query if after is None else query.where(AuditEntry.id > after)).all()

    def _resealed_rows(self, keyring: Keyring, rows: Sequence[Sequence[Any]]) -> list[Resealed]:
        return [
            Resealed({"entry": entry, "new_detail": {**detail, "deleted": row}})
            for entry, detail in rows
            if (row := self._deleted_record(keyring, detail))
        ]

    def _deleted_record(self, keyring: Keyring, detail: dict[str, Any]) -> dict[str, Any] | None:
        return resealed(dict(detail.get("deleted") or {}), self.name, self.columns, keyring, sealed_only=True)

    def _write(self, connection: Connection, params: list[dict[str, Any]]) -> None:
        write = update(AuditEntry).where(AuditEntry.id == bindparam("entry"))
        connection.execute(write.values(detail=bindparam("new_detail")), params)


def _names_older_key(document: InstrumentedAttribute[Any], keyring: Keyring) -> ColumnElement[bool]:
    """Whether a JSON document's text holds a token of one of the org's older keys: `"<key id>:`. Key ids are
    letters and digits, nothing LIKE reads as a wildcard."""
    older = [key_id for key_id in keyring.keys if key_id != keyring.active_id]
    if not older:
        return false()
    return or_(*(cast(document, Text).like(f'%"{key_id}:%') for key_id in older))


def resealed(
    row: dict[str, Any], name: str, columns: list[str], keyring: Keyring, *, sealed_only: bool = False
) -> dict[str, Any] | None:
    """The row with its sealed values under the active key; None when they all are already. `sealed_only`: values
    that are no sealed token are left as they are, rather than refused."""
    stale = [
        column
        for column in columns
        if column in row and not keyring.is_current(row[column]) and (not sealed_only or looks_sealed(row[column]))
    ]
    if not stale:
        return None
    for column in stale:
        try:
            value = keyring.open(row[column], column=f"{name}.{column}")
        except ValueError as error:  # no key of the org opens it: re-encrypting cannot carry it over
            raise Conflict(
                f"{error}: the rotation stopped there; what it re-encrypted before stays so, and the org's keys "
                "still open every value; correct that value in the central copy, then rotate again to finish"
            ) from None
        row[column] = keyring.seal(value, column=f"{name}.{column}")
    return row
