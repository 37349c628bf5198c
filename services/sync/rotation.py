"""Key rotation: a new envelope key for the org, every sealed value re-encrypted under it, the old keys drained.

Run by `kiln sync-keys rotate`, or by a sync worker for POST /v1/orgs/{org}/sync-keys/rotate, at any time, in
bounded transactions, so that the org's jobs go on while it runs:

1. The switch, one short transaction: the active key retired, a new one made. It waits for the batches sealing
   under the old key (services/sync/pair.py, hold_sealing_key); every batch after it that loaded the old keyring
   gets KeyRotated and is redone under the new one, so nothing new is sealed under a retired key.
2. Re-encryption, place by place (services/sync/reseal.py), `batch_rows` rows per transaction. Each batch holds the
   active key alone for its length: a sync batch waits for one rotation batch at most, never for the rotation.
   The retired keys still open everything meanwhile.
3. The drain, one transaction holding the active key alone: it looks again at every place, and marks the retired
   keys `drained` (and audits the rotation) only if nothing is left under them. A job may have copied a value
   from a place not yet re-encrypted into one already done (a conflict's chosen version into its central copy, a
   central record into the audit as it deleted it): then another pass re-encrypts what it finds.

Stopped anywhere (an error, a value that does not decrypt, its worker lost, the database out of reach), what was
re-encrypted stays so, and the keys stay as they are: the new one active, the old ones retired and still opening.
The next rotation of the org, or the same task delivered again, finds those retired keys and finishes that
rotation, under its key, rather than retiring it for yet another: the summary says `"resumed": true`.

Re-encryption is not a change of the record: the writes are not logged, so nothing is sent down again. Nor is it
a change of the audit trail: the `sync.delete` rows, which hold the only copy of a deleted record, get their
sealed values re-encrypted in place, as everything else does, or destroying the old key would shred them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from services.sync.changes import CENTRAL_LOG, begin_applying, end_applying
from services.sync.context import SyncContext
from services.sync.envelope import (
    Keyring,
    hold_active_key_alone,
    load_keyring,
    mark_drained,
    one_key_change_at_a_time,
    start_rotation,
    unfinished_rotation,
)
from services.sync.reseal import Bases, Batch, CentralCopy, Conflicts, DeletionAudits, Place
from shared.audit import record_change
from shared.db.models import Organization, SyncSource
from shared.db.session import session_scope
from shared.errors import Conflict, NotFound
from shared.sync_jobs import source_tables
from shared.sync_tables import central_table_name

log = logging.getLogger(__name__)

# Rows per re-encryption transaction. Each holds the org's sealing batches off for its length: 500 rows of a few
# sealed columns are a few milliseconds of AES-GCM and one round trip of updates, so a job barely notices, while
# the transaction's own cost (two locks, a commit) is spread over enough rows not to slow the rotation down.
BATCH_ROWS = 500
# Passes before the rotation gives up on values that keep appearing under the old keys: the first re-encrypts
# everything, a second what jobs copied meanwhile; more would mean something seals under a retired key.
MAX_PASSES = 3

AfterBatch = Callable[[Batch], None]


def rotate_org_key(
    context: SyncContext,
    org_id: str,
    *,
    actor: str,
    batch_rows: int = BATCH_ROWS,
    after_batch: AfterBatch | None = None,
) -> dict[str, Any]:
    """Switch keys, re-encrypt by batches, drain; `after_batch` is called after each batch has committed. A second
    rotation of the org asked for meanwhile waits for this one, then rotates again, so its caller too gets a key
    made after asking (refused, a rotation queued over the api would fail where only the worker's log shows it)."""
    with _one_rotation_at_a_time(context.engine, org_id):
        keyring, resumed = _switch(context, org_id)
        resealed = 0
        for _ in range(MAX_PASSES):
            resealed += _reseal_pass(context, keyring, batch_rows, after_batch)
            summary = _drain_if_nothing_left(context, keyring, actor=actor, resealed=resealed, resumed=resumed)
            if summary is not None:
                return summary
    raise Conflict(
        f"values of {org_id!r} kept appearing under its retired keys after {MAX_PASSES} passes: they stay retired "
        "(every value still opens); rotate again to finish"
    )


@contextmanager
def _one_rotation_at_a_time(engine: Engine, org_id: str) -> Iterator[None]:
    """For the rotation's whole length, across its transactions: PostgreSQL's session lock, on a connection of its
    own that is closed at the end rather than pooled, so the lock goes with it whatever happened (a rotation whose
    process dies releases it with its connection). SQLite has no such lock: there, a rotation asked for while
    another runs finds that one's retired keys, and helps finish it."""
    with engine.connect() as connection:
        try:
            if connection.dialect.name == "postgresql":
                name = {"name": f"sync-key-rotation:{org_id}"}
                connection.execute(text("SELECT pg_advisory_lock(hashtext(:name))"), name)
                connection.commit()
            yield
        finally:
            connection.invalidate()


def _switch(context: SyncContext, org_id: str) -> tuple[Keyring, bool]:
    """A new active key, the old one retired; or, when a rotation was left unfinished, its keys as they are: the
    org then has one rotation to finish, not a second retired key to re-encrypt for. True when resumed."""
    with session_scope(context.sessions) as session:
        one_key_change_at_a_time(session, org_id)
        if session.get(Organization, org_id) is None:
            raise NotFound(f"organization {org_id!r} not found", field="org")
        if unfinished_rotation(session, org_id):
            log.info("org %s: finishing the key rotation left unfinished", org_id)
            return load_keyring(session, context.secrets, org_id), True
        return start_rotation(session, context.secrets, org_id), False


def _reseal_pass(context: SyncContext, keyring: Keyring, batch_rows: int, after_batch: AfterBatch | None) -> int:
    with session_scope(context.sessions) as session:
        places = _places(session, keyring.org_id)
    resealed = 0
    for place in places:
        after = None
        while (batch := _reseal_batch(context, keyring, place, after, batch_rows)) is not None:
            after, resealed = batch.last, resealed + batch.resealed
            log.info(
                "org %s key rotation: %s of %s, %d re-encrypted up to %r",
                keyring.org_id,
                place.kind,
                place.name,
                batch.resealed,
                batch.last,
            )
            if after_batch is not None:
                after_batch(batch)
    return resealed


def _reseal_batch(context: SyncContext, keyring: Keyring, place: Place, after: Any, limit: int) -> Batch | None:
    """One transaction. The key-change lock first, as a source's deletion takes it: its tables are never dropped
    while a batch reads them."""
    with session_scope(context.sessions) as session:
        one_key_change_at_a_time(session, keyring.org_id)
        hold_active_key_alone(session, keyring)
        connection = session.connection()
        begin_applying(connection, CENTRAL_LOG)
        batch = place.reseal_batch(connection, keyring, after=after, limit=limit)
        end_applying(connection, CENTRAL_LOG)
    return batch


def _drain_if_nothing_left(
    context: SyncContext, keyring: Keyring, *, actor: str, resealed: int, resumed: bool
) -> dict[str, Any] | None:
    """Mark the retired keys drained and audit the rotation, if no place holds a value under them; None if one
    does. No batch seals meanwhile: each would wait for this transaction."""
    with session_scope(context.sessions) as session:
        one_key_change_at_a_time(session, keyring.org_id)
        hold_active_key_alone(session, keyring)
        connection = session.connection()
        places = _places(session, keyring.org_id)
        if any(place.anything_left(connection, keyring, limit=BATCH_ROWS) for place in places):
            return None
        drained = mark_drained(session, keyring.org_id)
        summary = {
            "activeKey": keyring.active_id,
            "drainedKeys": drained,
            "resealedValues": resealed,
            "resumed": resumed,
        }
        record_change(
            session,
            org_id=keyring.org_id,
            actor=actor,
            action="sync.key.rotated",
            target=keyring.active_id,
            detail=summary,
        )
    return summary


def _places(session: Session, org_id: str) -> list[Place]:
    """Every place the org's sealed values may be, in an order that re-encrypts a record before its copies.
    Deleted sources too (their central copies are gone): the audit rows of their deletions stay."""
    places: list[Place] = []
    audited: dict[str, set[str]] = {}
    for source in session.scalars(select(SyncSource).where(SyncSource.org_id == org_id).order_by(SyncSource.id)):
        for spec in source_tables(source):
            if not spec.sensitive_columns:
                continue
            columns = list(spec.sensitive_columns)
            central = central_table_name(source.id, spec.name)
            places.append(CentralCopy(central, spec.primary_key, spec.name, columns))
            places.append(Bases(source.id, spec.name, columns))
            places.append(Conflicts(source.id, spec.name, columns))
            audited.setdefault(spec.name, set()).update(columns)
    places.extend(DeletionAudits(org_id, name, sorted(columns)) for name, columns in sorted(audited.items()))
    return places
