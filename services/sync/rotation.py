"""Key rotation: a new envelope key for the org, every sealed value re-encrypted under it, the old keys drained.

Run by `kiln sync-keys rotate`, or by a sync worker for POST /v1/orgs/{org}/sync-keys/rotate, at any time: a job
that is running holds the key it seals under for each batch (services/sync/pair.py, hold_sealing_key), so the
rotation waits for that batch, re-encrypts what it wrote, and the job's next batch goes on under the new key.
Re-encryption is not a change of the record: the writes are not logged, so nothing is sent down again. Nor is it
a change of the audit trail: the `sync.delete` rows, which hold the only copy of a deleted record, get their
sealed values re-encrypted in place, as everything else does, or destroying the old key would shred them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.orm import Session

from services.sync.changes import CENTRAL_LOG, begin_applying, end_applying
from services.sync.context import SyncContext
from services.sync.envelope import Keyring, looks_sealed, mark_drained, one_key_change_at_a_time, start_rotation
from services.sync.stores import reflect
from shared.audit import record_change
from shared.db.models import AuditEntry, Organization, SyncBase, SyncConflict, SyncSource
from shared.db.session import session_scope
from shared.errors import Conflict, NotFound
from shared.sync_jobs import source_tables
from shared.sync_tables import central_table_name

PAGE_ROWS = 500


def rotate_org_key(context: SyncContext, org_id: str, *, actor: str) -> dict[str, Any]:
    """Rotate in one transaction: either every value moves to the new key, or none does. Tables are read a page at
    a time, so memory does not grow with them. A second rotation of the org asked for meanwhile waits for this one,
    then rotates again, so its caller too gets a key made after asking (refused, a rotation queued over the api
    would fail where only the worker's log shows it)."""
    with session_scope(context.sessions) as session:
        one_key_change_at_a_time(session, org_id)
        if session.get(Organization, org_id) is None:
            raise NotFound(f"organization {org_id!r} not found", field="org")
        keyring = start_rotation(session, context.secrets, org_id)
        connection = session.connection()
        begin_applying(connection, CENTRAL_LOG)
        resealed = 0
        # Deleted sources too (their central copies are gone): the audit rows of their deletions stay.
        audited: dict[str, set[str]] = {}
        for source in session.scalars(select(SyncSource).where(SyncSource.org_id == org_id)).all():
            for spec in source_tables(source):
                if not spec.sensitive_columns:
                    continue
                name = central_table_name(source.id, spec.name)
                if connection.dialect.has_table(connection, name):
                    table = reflect(connection, name)
                    resealed += _reseal_table(
                        connection, table, spec.primary_key, spec.name, spec.sensitive_columns, keyring
                    )
                resealed += _reseal_documents(session, source.id, spec.name, spec.sensitive_columns, keyring)
                audited.setdefault(spec.name, set()).update(spec.sensitive_columns)
        for name, columns in sorted(audited.items()):
            resealed += _reseal_deletion_audits(connection, org_id, name, sorted(columns), keyring)
        end_applying(connection, CENTRAL_LOG)
        drained = mark_drained(session, org_id)
        summary = {"activeKey": keyring.active_id, "drainedKeys": drained, "resealedValues": resealed}
        record_change(
            session, org_id=org_id, actor=actor, action="sync.key.rotated", target=keyring.active_id, detail=summary
        )
    return summary


def _reseal_table(
    connection: Connection, table: Table, key: str, name: str, columns: list[str], keyring: Keyring
) -> int:
    """Page by page in key order, so that memory holds one page of a table of any size."""
    resealed, last = 0, None
    read = select(table.c[key], *(table.c[column] for column in columns)).order_by(table.c[key]).limit(PAGE_ROWS)
    write = (
        update(table)
        .where(table.c[key] == bindparam("record_key"))
        .values({column: bindparam(f"new_{column}") for column in columns})
    )
    while page := connection.execute(read if last is None else read.where(table.c[key] > last)).mappings().all():
        last = page[-1][key]
        changed = [row for row in (_resealed(dict(found), name, columns, keyring) for found in page) if row]
        if changed:
            connection.execute(
                write, [{"record_key": row[key], **{f"new_{c}": row[c] for c in columns}} for row in changed]
            )
        resealed += len(changed)
    return resealed


def _reseal_documents(session: Session, source_id: str, name: str, columns: list[str], keyring: Keyring) -> int:
    """Conflicts and field-merge bases keep sealed copies of records too."""
    count = _reseal_bases(session.connection(), source_id, name, columns, keyring)
    for conflict in session.scalars(
        select(SyncConflict).where(SyncConflict.source_id == source_id, SyncConflict.table_name == name)
    ):
        for attribute in ("local_version", "central_version", "kept"):
            document = getattr(conflict, attribute)
            if document is not None and (row := _resealed(dict(document), name, columns, keyring)) is not None:
                setattr(conflict, attribute, row)
                count += 1
    return count


def _reseal_bases(connection: Connection, source_id: str, name: str, columns: list[str], keyring: Keyring) -> int:
    """A field-merge table has a base per record: paged like the table itself."""
    resealed, last = 0, ""
    of_table = (SyncBase.source_id == source_id, SyncBase.table_name == name)
    read = select(SyncBase.record_key, SyncBase.row).where(*of_table).order_by(SyncBase.record_key).limit(PAGE_ROWS)
    write = update(SyncBase).where(*of_table, SyncBase.record_key == bindparam("key")).values(row=bindparam("new_row"))
    while page := connection.execute(read.where(SyncBase.record_key > last)).all():
        last = page[-1].record_key
        changed = [(key, row) for key, found in page if (row := _resealed(dict(found), name, columns, keyring))]
        if changed:
            connection.execute(write, [{"key": key, "new_row": row} for key, row in changed])
        resealed += len(changed)
    return resealed


def _reseal_deletion_audits(
    connection: Connection, org_id: str, name: str, columns: list[str], keyring: Keyring
) -> int:
    """The org's `sync.delete` rows of this table, paged by id: each keeps the deleted record sealed. A row names
    the table, not the source: a value audited in plain text, while its column was not sensitive (in a source since
    deleted and registered again with it sensitive, or in another store's table of that name), stays as it was."""
    resealed, last = 0, 0
    of_table = (
        AuditEntry.org_id == org_id,
        AuditEntry.action == "sync.delete",
        AuditEntry.target.startswith(f"{name}/", autoescape=True),
    )
    read = select(AuditEntry.id, AuditEntry.detail).where(*of_table).order_by(AuditEntry.id).limit(PAGE_ROWS)
    write = update(AuditEntry).where(AuditEntry.id == bindparam("entry")).values(detail=bindparam("new_detail"))
    while page := connection.execute(read.where(AuditEntry.id > last)).all():
        last = page[-1].id
        changed = [
            (entry, {**detail, "deleted": row})
            for entry, detail in page
            if (row := _resealed(dict(detail.get("deleted") or {}), name, columns, keyring, sealed_only=True))
        ]
        if changed:
            connection.execute(write, [{"entry": entry, "new_detail": detail} for entry, detail in changed])
        resealed += len(changed)
    return resealed


def _resealed(
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
                f"{error}: the rotation was rolled back and nothing changed; correct that value in the central "
                "copy, then rotate again"
            ) from None
        row[column] = keyring.seal(value, column=f"{name}.{column}")
    return row
