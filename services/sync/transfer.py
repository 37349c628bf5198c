"""Moving one table's changes between the local and the central store, in batches, from acknowledged watermarks.

Up (push): the local change log after the `up` watermark. Each batch is written to the central store in one
transaction with its conflicts, the job's counters and the new watermark, so a batch is acknowledged exactly when
it has landed. Down (pull): the central change log after the `down` watermark, written to the local store first
and acknowledged after; a batch replayed after a crash writes the same records again, by key, and so changes
nothing. Central edits carry their version and stamp from the moment they are made (services/sync/changes.py),
so a pull only reads the central store, except to restore an append-only record. A record changed on both sides
since its last sync goes to the table's policy (services/sync/merge.py) and is recorded with both versions
(services/sync/conflicts.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.sync.changes import (
    CENTRAL_LOG,
    LOCAL_LOG,
    ORIGIN_APP,
    Change,
    begin_applying,
    changed_records,
    changes_after,
    end_applying,
    first_change,
    forget,
    log_merges,
    pending,
    shut_out_writers,
)
from services.sync.conflicts import (
    apply_choices,
    held_conflicts,
    hold_refused_central_update,
    holds_for_review,
    join_conflict,
    record_conflict,
    record_refused_central_insert,
    record_refused_central_update,
    version_json,
)
from services.sync.deletions import (
    NotedDeletion,
    audit_local_deletions,
    audit_noted_deletions,
    delete_centrally,
    delete_locally,
    forget_audited_deletions,
    forget_bases,
    note_local_deletions,
    restore_locally,
    take_notes,
)
from services.sync.hlc import ORIGIN, Stamp, stamp_edit, wall_clock_ms
from services.sync.merge import Version, deletion, from_json, jsonable, resolve
from services.sync.pair import TablePair, Tally, hold_residency, hold_sealing_key
from services.sync.records import Records
from services.sync.store_marks import note_pulled, taken_position
from services.sync.stores import (
    STAMP,
    VERSION,
    key_text,
    read,
    refuse_unnamed_keys,
    stamp_of,
    upsert,
    upsert_values,
    without_keys_holding_nul,
)
from services.sync.watermarks import (
    DOWN,
    UP,
    count_moves,
    move_watermark_on,
    set_watermark,
    watermark,
    watermarks,
)
from shared.db.models import SyncBase, SyncConflict
from shared.errors import KilnError

log = logging.getLogger(__name__)

T = TypeVar("T")


def sync_table(pair: TablePair) -> Tally:
    """Push and pull until neither side has anything left that was there when the job looked."""
    if holds_for_review(pair):
        apply_choices(pair)
    while True:
        pushed = push_batch(pair) if pair.spec.sends_up else False
        pulled = pull_batch(pair) if pair.spec.sends_down else False
        if not (pushed or pulled):
            return pair.tally


def push_batch(pair: TablePair) -> bool:
    """One batch of local changes into the central store; False when there was none."""
    with Session(pair.central) as session:
        after = watermark(session, pair, UP)
    # Writers are shut out while the log and then the records are read: a write landing between the two would send
    # a record whose content is newer than the change it is stamped from.
    with pair.local.begin() as local:
        shut_out_writers(local, LOCAL_LOG)
        changes = changes_after(local, LOCAL_LOG, table=pair.spec.name, after=after, limit=pair.batch_size)
        if not changes:
            return False
        # A key written since the job looked that the log cannot name (a SQLite BLOB) fails it, not taken for deleted.
        refuse_unnamed_keys(local, pair.local_table, pair.key)
        latest = _last_changes_in_batch(local, pair, changes)
        # Unlocked: the log held keeps writers out already, and an application transaction that locked the record
        # before its first write (SELECT ... FOR UPDATE) would wait for the log while this waited for the record.
        rows = read(local, pair.local_table, pair.key, latest, lock=False)
        latest = without_keys_holding_nul(
            pair.spec.name, pair.key, latest, rows, central_dialect=pair.central.dialect.name
        )
        taken = taken_position(local, pair) if pair.spec.sends_down else None
    with Session(pair.central) as session, session.begin():
        hold_residency(session, pair)
        connection = session.connection()
        shut_out_writers(connection, CENTRAL_LOG)
        hold_sealing_key(session, pair)
        begin_applying(connection, CENTRAL_LOG)
        moves = _push(session, connection, pair, latest, rows, taken or 0)
        set_watermark(session, pair, UP, changes[-1].seq, logged=changes[-1])
        count_moves(session, pair, pushed=moves.copies, conflicts=moves.conflicts)
        end_applying(connection, CENTRAL_LOG)
        # Before the central commit: a batch replayed after this one was cut off finds the records back, as edits.
        written_again = restore_locally(pair, moves.restores, read_up_to=changes[-1].seq)
        _log_written_again(connection, pair, {key: moves.lost_deletions[key] for key in written_again})
    _after_batch(pair, pushed=moves.copies, conflicts=moves.conflicts)
    return True


def _last_changes_in_batch(local: Connection, pair: TablePair, changes: list[Change]) -> dict[str, Change]:
    """Each record of the batch by its last change in it, less those changed again past the batch's end: read now,
    such a record holds that later change, which goes up in a later batch, stamped from it. Only a batch cut off at
    its size can have one (writers are shut out), and the log is finite, so each record goes up in the batch holding
    its last change."""
    latest = {change.key: change for change in changes}
    if len(changes) < pair.batch_size:
        return latest
    later = pending(local, LOCAL_LOG, table=pair.spec.name, keys=latest, after=changes[-1].seq)
    return {key: change for key, change in latest.items() if key not in later}


def _log_written_again(connection: Connection, pair: TablePair, written_again: dict[str, str]) -> None:
    """Records the application wrote again after the push read their deletion, which lost: not restored, they go up
    in a later batch. Logged as changed centrally since (a merge the local store holds the deletion against), they go
    through the policy there, against the central version that won, rather than copied over it."""
    if pair.spec.sends_down:
        log_merges(connection, table=pair.central_name, merges=written_again, at_ms=wall_clock_ms())


def _push(
    session: Session,
    connection: Connection,
    pair: TablePair,
    latest: dict[str, Change],
    rows: dict[str, dict[str, Any]],
    taken: int,
) -> _Moves:
    """`taken`: the central log position the local store says it has taken. A pull cut off after the local store
    committed it, before the central store acknowledged it, leaves that ahead of the `down` watermark: the central
    changes in between are in the local store already, and a local edit since was made against them, not in
    conflict with them."""
    current = read(connection, pair.central_table, pair.key, latest)
    down_after = max(watermark(session, pair, DOWN), taken)
    changed_centrally = (
        pending(connection, CENTRAL_LOG, table=pair.central_name, keys=latest, after=down_after)
        if pair.spec.sends_down
        else {}
    )
    held = held_conflicts(session, pair, latest, lock=True)
    firsts = _first_versions(session, pair, latest)
    moves = _Moves()
    for key, change in latest.items():
        row, existing = rows.get(key), current.get(key)
        if key in held:
            newest = version_json(pair, _local_version(pair, row, change, None))
            join_conflict(session, pair, held[key], local=newest)
            continue
        first = firsts.get(key)
        # Append-only: a record written before, on either side, takes no change; the policy restores it.
        written_once = pair.spec.policy == "append-only" and (existing is not None or first is not None)
        if row is None and existing is None and not written_once:
            continue  # deleted on both sides, or a deletion already pushed by a batch now replayed
        if key not in changed_centrally and not written_once:
            moves.copy(pair, key, _local_version(pair, row, change, stamp_of(existing)), existing)
            continue
        against = _stamp_before_central_edits(connection, pair, key, existing, down_after)
        mine = _local_version(pair, row, change, against)
        theirs = _central_version(pair, existing, changed_centrally.get(key))
        resolution = resolve(pair.spec.policy, local=mine, central=theirs, base=_base(session, pair, key), first=first)
        record_conflict(session, pair, key, mine, theirs, resolution)
        moves.conflicts += 1
        if resolution.kept is not None:
            forget(connection, CENTRAL_LOG, table=pair.central_name, keys=[key], after=down_after)
            moves.settle(pair, key, resolution.kept, mine, existing)
    upsert(connection, pair.central_table, pair.key, moves.writes)
    _save_bases(session, pair, moves.bases)
    delete_centrally(session, connection, pair, moves.deletes)
    if pair.spec.sends_down:
        log_merges(connection, table=pair.central_name, merges=moves.merged, at_ms=wall_clock_ms())
    return moves


@dataclass
class _Moves:
    """What one pushed batch does to each store."""

    writes: list[dict[str, Any]] = field(default_factory=list)
    # Central records to delete, as they were: the audit keeps them.
    deletes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Central records to put back in the local store, which deleted them and lost.
    restores: list[dict[str, Any]] = field(default_factory=list)
    # By key, the stamp of each such deletion: what a local write made since, which the restore leaves, replaced.
    lost_deletions: dict[str, str] = field(default_factory=dict)
    # Records whose central version differs from the local one after the batch: they go down. By key, the stamp of
    # the local version, which the local store holds until they do.
    merged: dict[str, str] = field(default_factory=dict)
    # The bases to save (services/sync/merge.py), as the central store holds a record: sealed.
    bases: list[dict[str, Any]] = field(default_factory=list)
    copies: int = 0
    conflicts: int = 0

    def copy(self, pair: TablePair, key: str, version: Version, existing: dict[str, Any] | None) -> None:
        """A record changed on the local side only: its new version, or its deletion, goes up as it is."""
        if version.deleted:
            self.deletes[key] = existing or {}
        else:
            self.write(_central_row(pair, version, existing), base=True)
        self.copies += 1

    def write(self, row: dict[str, Any], *, base: bool) -> None:
        """A central row to write, and whether it is also the record's base: for field-merge, the version both
        stores hold once the batch commits; for append-only, the first version (the only one either side keeps)."""
        self.writes.append(row)
        if base:
            self.bases.append(row)

    def settle(self, pair: TablePair, key: str, kept: Version, mine: Version, existing: dict[str, Any] | None) -> None:
        """A conflict's outcome, written where it is not yet: the deleting side restored, if its deletion lost."""
        row = None if mine.deleted else mine.row
        if kept.deleted:
            if existing is not None:
                self.deletes[key] = existing
            if row is not None:
                self.merged[key] = mine.stamp.encode()  # deleted centrally, and that won: the pull deletes it locally
        elif row is None:
            self.restores.append(kept.row)  # before the central commit: both stores hold it once the batch has
            self.lost_deletions[key] = mine.stamp.encode()
            if existing is None or pair.plain(existing) != kept.row:
                self.write(_central_row(pair, kept, existing), base=True)  # append-only: the first version, back
            elif pair.spec.policy == "field-merge":
                self.bases.append(existing)
        elif kept.row == row:
            self.write(_central_row(pair, kept, existing), base=True)
        else:
            self.merged[key] = mine.stamp.encode()
            # Until the pull brings the kept version down, the local store still holds `row`: the version the
            # kept one was made from, so the one both sides agree on. Were the kept one the base, a local edit
            # made before that pull (or after a job cut off between the two) would find the local store's values
            # changed from it, take them all for local edits, and put them back over the central ones. The pull
            # saves the kept version as the base once the local store has it. Append-only saves what it writes, as
            # before: the first version.
            self.write(_central_row(pair, kept, existing), base=pair.spec.policy != "field-merge")
            if pair.spec.policy == "field-merge":
                self.bases.append(pair.sealed(row))


def _local_version(pair: TablePair, row: dict[str, Any] | None, change: Change, replaced: Stamp | None) -> Version:
    """The local record as its last change left it; a deletion is stamped from its log row like an edit."""
    stamp = stamp_edit(physical_ms=change.at_ms, offset_ms=pair.offset_ms, replaced=replaced, node="local")
    return deletion(stamp) if row is None else Version(row, stamp)


def _central_version(pair: TablePair, existing: dict[str, Any] | None, change: Change | None) -> Version:
    """The central record, or its deletion stamped from the central log row that recorded it."""
    if existing is not None:
        return Version(pair.plain(existing), stamp_of(existing) or ORIGIN)
    at_ms = change.at_ms if change is not None else 0
    return deletion(stamp_edit(physical_ms=at_ms, offset_ms=0, replaced=None, node="central"))


def _stamp_before_central_edits(
    connection: Connection, pair: TablePair, key: str, existing: dict[str, Any] | None, after: int
) -> Stamp | None:
    """The stamp of the version a local edit was made against: the one the first central change since `after`
    replaced. Of an application's edit, that is the version both sides last agreed on; of a merge a batch logged,
    the local version the local store still held. (Taking the central record's stamp there, that of the settled
    version, made such a local edit win, however much older.) The central record's own stamp is already that of its
    latest edit (set at capture)."""
    first = first_change(connection, CENTRAL_LOG, table=pair.central_name, key=key, after=after)
    if first is None:
        return stamp_of(existing)
    return Stamp.parse(first.replaced) if first.replaced else None


def pull_batch(pair: TablePair) -> bool:
    """One batch of central changes into the local store; False when there was none, or a local edit came first.

    One central transaction reads the batch and, once the local store has committed it, acknowledges it. Until
    then it only reads (central edits were versioned and stamped as they were made), and holds nothing but the
    org's sealing key: a rotation switching keys waits for the batch rather than falling between its two commits,
    where the batch would be redone with its local deletions done already and their audit rows lost. (On an
    embedded SQLite central store, holding the key is holding its one write lock, as a push holds it while it
    writes locally: the other writers there wait for the batch.)"""
    with Session(pair.central) as session:
        positions = watermarks(session, pair)
        after, local_after = positions.get(DOWN, 0), positions.get(UP, 0)
        changes = changes_after(
            session.connection(), CENTRAL_LOG, table=pair.central_name, after=after, limit=pair.batch_size
        )
        if not changes:
            return False
        # Read before the key is held (so it locks nothing while the local store writes); a record looked up is
        # under the active key, as the bases, conflicts and audit rows this batch copies it into must be.
        current = _changed_records(session, pair, after=after, last=changes[-1].seq).each_as(pair.under_active_key)
        held = held_conflicts(session, pair, (change.key for change in changes))
        hold_sealing_key(session, pair)  # the records read are sealed under it, and go into bases and the audit
        with pair.local.begin() as local:
            shut_out_writers(local, LOCAL_LOG)
            if pair.spec.sends_up:
                changes = _before_local_edits(local, pair, changes, local_after)
                if not changes:
                    return False  # a local edit of one of these records goes up first, through the policy
            last = changes[-1].seq
            notes = take_notes(local, pair, acknowledged=after, batch=last)
            latest = {change.key: change for change in changes if change.key not in held and change.key in current}
            gone = {change.key for change in changes if change.key not in held and change.key not in current}
            begin_applying(local, LOCAL_LOG)
            refusals = _pull(local, pair, latest, current, _first_versions(session, pair, latest))
            deleted, kept = _pull_deletions(local, pair, gone)
            end_applying(local, LOCAL_LOG)
            note_local_deletions(local, pair, deleted, batch=last, notes=notes)
            note_pulled(local, pair, last)
        pulled = [key for key in latest if key not in refusals]
        _hold_central_edits(session, pair, held, changes, current)
        _acknowledge_pull(session, pair, (after, last), current, pulled, deleted, notes.unaudited)
        _restore_all_refused(session, pair, _unless_edited_since(session, pair, {**refusals.restore, **kept}, changes))
        _hold_refused(session, pair, refusals.hold)
        _drop_refused_inserts(session, pair, _unless_edited_since(session, pair, refusals.inserts, changes))
        session.commit()
    if deleted or notes.unaudited:
        forget_audited_deletions(pair, acknowledged=last, notes=notes)
    moved = len(pulled) + len(deleted) + len(notes.unaudited)
    _after_batch(pair, pulled=moved, conflicts=len(refusals) + len(kept))
    return True


def _hold_central_edits(
    session: Session, pair: TablePair, held: dict[str, SyncConflict], changes: list[Change], current: Records
) -> None:
    """A central edit of a record held for review joins its conflict, as a local one does in a push: the batch is
    acknowledged past it, and the review queue shows (and a choice of `central` keeps) the central record as it is.
    The conflicts were read before the local store wrote, locking nothing; they are locked now, as they are."""
    if not held:
        return
    conflicts = held_conflicts(session, pair, held, lock=True)
    for change in changes:
        if change.key in conflicts:
            version = _central_version(pair, current.get(change.key), change)
            join_conflict(session, pair, conflicts[change.key], central=version_json(pair, version))


def _changed_records(session: Session, pair: TablePair, *, after: int, last: int) -> Records:
    return changed_records(
        session.connection(),
        CENTRAL_LOG,
        table=pair.central_table,
        key=pair.key,
        logged_as=pair.central_name,
        after=after,
        last=last,
    )


def _acknowledge_pull(
    session: Session,
    pair: TablePair,
    batch: tuple[int, int],
    current: Records,
    pulled: list[str],
    deleted: dict[str, dict[str, Any]],
    unaudited: list[NotedDeletion],
) -> None:
    """The batch's changes, `batch` its positions (after, last) in the central log, acknowledged; `unaudited`: the
    deletions of a batch cut off before its acknowledgement, audited and counted here (a record this batch brought
    back since keeps its base)."""
    if _keeps_bases(pair):
        _save_bases(session, pair, [current[key] for key in pulled])
    forget_bases(session, pair, [*deleted, *(key for key, _ in unaudited if key not in current)])
    audit_noted_deletions(session, pair, unaudited)
    audit_local_deletions(session, pair, deleted)
    after, last = batch
    move_watermark_on(session, pair, DOWN, after=after, seq=last)
    count_moves(session, pair, pulled=len(pulled) + len(deleted) + len(unaudited))


def _unless_edited_since(
    session: Session, pair: TablePair, refused: dict[str, T], changes: list[Change]
) -> dict[str, T]:
    """The refused records no central edit has replaced since the batch read them: those it settles centrally. The
    central log is locked from here to the batch's commit; a record edited before, a fix perhaps, is left as it is
    and comes down in the next batch, where the local store takes or refuses it anew."""
    if not refused:
        return refused
    connection = session.connection()
    shut_out_writers(connection, CENTRAL_LOG)
    edited = pending(connection, CENTRAL_LOG, table=pair.central_name, keys=refused, after=changes[-1].seq)
    return {key: record for key, record in refused.items() if key not in edited}


def _restore_all_refused(session: Session, pair: TablePair, refused: Refused) -> None:
    if not refused:
        return
    connection = session.connection()
    begin_applying(connection, CENTRAL_LOG)
    for key, (local_row, central_row) in refused.items():
        _restore_refused(session, connection, pair, key, local_row, central_row)
    count_moves(session, pair, conflicts=len(refused))
    end_applying(connection, CENTRAL_LOG)


def _hold_refused(session: Session, pair: TablePair, held: Held) -> None:
    """A table that does not send up never puts a local record centrally, not even to settle a refusal: the central
    record the local store refused stays as it is, held for review with the local store's reason."""
    if not held:
        return
    for key, (refused, reason) in held.items():
        hold_refused_central_update(session, pair, key, refused, reason)
    count_moves(session, pair, conflicts=len(held))


def _drop_refused_inserts(session: Session, pair: TablePair, rows: dict[str, dict[str, Any]]) -> None:
    """Central records the local store refused to take have no local version to go back up: they leave the central
    store too, so both sides agree, and each is kept in its conflict and in the deletion's audit row."""
    if not rows:
        return
    connection = session.connection()
    begin_applying(connection, CENTRAL_LOG)
    delete_centrally(session, connection, pair, rows)
    for key, row in rows.items():
        record_refused_central_insert(session, pair, key, row)
    count_moves(session, pair, conflicts=len(rows))
    end_applying(connection, CENTRAL_LOG)


def _before_local_edits(local: Connection, pair: TablePair, changes: list[Change], local_after: int) -> list[Change]:
    """The changes up to the first record also edited locally since the last push."""
    edited = pending(local, LOCAL_LOG, table=pair.spec.name, keys={c.key for c in changes}, after=local_after)
    for index, change in enumerate(changes):
        if change.key in edited:
            return changes[:index]
    return changes


def _pull(
    local: Connection,
    pair: TablePair,
    latest: dict[str, Change],
    current: Records,
    firsts: dict[str, Version],
) -> _Refusals:
    """Write the records down; returns those refused: append-only updates, and those the local store's rules
    refuse."""
    refused = _refused_updates(local, pair, latest, current, firsts)
    refusals = _write_down(local, pair, current, [key for key in latest if key not in refused])
    refusals.restore = refused | refusals.restore
    return refusals


Refused = dict[str, tuple[dict[str, Any], dict[str, Any] | None]]
# A down-only table's refused central updates: each central record, and the local store's reason.
Held = dict[str, tuple[dict[str, Any], str]]


@dataclass
class _Refusals:
    """The records of a pulled batch the local store did not take, by how each is settled."""

    # Updates put back centrally as the local store has them: the local version, and the central one refused.
    restore: Refused = field(default_factory=dict)
    # Updates of a table that does not send up: its local versions never go up, so they are held for review.
    hold: Held = field(default_factory=dict)
    # Inserts, as the central store has them: with no local version to go back up, they leave the central store.
    inserts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.restore or key in self.hold or key in self.inserts

    def __len__(self) -> int:
        return len(self.restore) + len(self.hold) + len(self.inserts)


def _write_down(local: Connection, pair: TablePair, records: Records, keys: list[str]) -> _Refusals:
    """Write these central records locally, all at once, or, when the local store's own rules (NOT NULL, UNIQUE,
    CHECK: the central copy does not carry them) refuse one, each on its own."""
    names = [column.name for column in pair.local_table.columns]
    rows = dict(zip(keys, pair.plain_values(records.values_in(keys, names), names), strict=True))
    try:
        with local.begin_nested():
            upsert_values(local, pair.local_table, pair.key, names, list(rows.values()))
        return _Refusals()
    except IntegrityError:
        pass
    refusals: dict[str, IntegrityError] = {}
    for key, row in rows.items():
        try:
            with local.begin_nested():
                upsert_values(local, pair.local_table, pair.key, names, [row])
        except IntegrityError as error:
            refusals[key] = error
    return _settle_refusals(local, pair, records, refusals)


def _settle_refusals(
    local: Connection, pair: TablePair, records: Records, refusals: dict[str, IntegrityError]
) -> _Refusals:
    """A refused insert has no local version: it leaves the central store too. A refused update is settled as an
    append-only one is, the local version back up and the central one kept in its conflict, when the table sends
    up; one that does not never puts a local version centrally, so the central one is held for review instead."""
    originals = read(local, pair.local_table, pair.key, refusals)
    for key, refusal in refusals.items():
        log.warning(
            "source %s table %s record %s: the local store refuses the central %s: %s",
            pair.source_id,
            pair.spec.name,
            key,
            "update" if key in originals else "insert",
            _reason(refusal),
        )
    settled = _Refusals(inserts={key: records[key] for key in refusals if key not in originals})
    updated = [key for key in refusals if key in originals]
    if pair.spec.sends_up:
        settled.restore = {key: (originals[key], records[key]) for key in updated}
    else:
        settled.hold = {key: (records[key], _reason(refusals[key])) for key in updated}
    return settled


def _reason(refusal: IntegrityError) -> str:
    """The local store's words, first line only: PostgreSQL's DETAIL line quotes the values of the row it refused."""
    lines = str(refusal.orig).strip().splitlines()
    return lines[0] if lines else type(refusal.orig).__name__


class DeletionPutOff(KilnError):
    """A pulled batch held a deletion the local store refused: the batch rolled back, for the job's second pass."""


def _pull_deletions(local: Connection, pair: TablePair, keys: set[str]) -> tuple[dict[str, dict[str, Any]], Refused]:
    """Delete locally the records deleted centrally; returns those deleted and those whose deletion is refused (the
    local version, to be restored centrally), each as the local store has it: under append-only, every one; else
    those the local store's own rules refuse to delete (a foreign key of a record of another table pointing at it).
    Such a refusal is put off on the job's first pass (DeletionPutOff): the record pointing at it may be deleted
    centrally too, in a table synced later. On the second pass it is settled, in a table that sends up; one that
    does not cannot put the record back centrally: the job fails on the refusal, naming the table."""
    if not keys:
        return {}, {}  # most batches: no savepoint for them
    if pair.spec.policy == "append-only" and pair.spec.sends_up:
        return {}, {key: (row, None) for key, row in read(local, pair.local_table, pair.key, keys).items()}
    try:
        with local.begin_nested():
            return delete_locally(local, pair, keys), {}
    except IntegrityError as refusal:
        if not pair.settle_refused_deletions:
            raise DeletionPutOff(f"table {pair.spec.name!r}: {_reason(refusal)}") from refusal
        if not pair.spec.sends_up:
            raise
    deleted: dict[str, dict[str, Any]] = {}
    refused: Refused = {}
    for key in sorted(keys):
        try:
            with local.begin_nested():
                deleted.update(delete_locally(local, pair, [key]))
        except IntegrityError as refusal:
            log.warning(
                "source %s table %s record %s: the local store refuses the central deletion: %s",
                pair.source_id,
                pair.spec.name,
                key,
                _reason(refusal),
            )
            refused.update({key: (row, None) for key, row in read(local, pair.local_table, pair.key, [key]).items()})
    return deleted, refused


def _refused_updates(
    local: Connection,
    pair: TablePair,
    latest: dict[str, Change],
    current: Records,
    firsts: dict[str, Version],
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Append-only records the central store changed after the local store had them: their update is refused.
    An update is a central edit that leaves a record synced before other than its first version (deleted and
    inserted again too), or, for one synced before first versions were kept, past the version its insert got: a
    replayed batch finds the records it inserted locally the first time, and must still take them for inserts."""
    if pair.spec.policy != "append-only" or not pair.spec.sends_up:
        return {}
    updated = {
        key
        for key, change in latest.items()
        if change.origin == ORIGIN_APP and _not_as_first_written(pair, current[key], firsts.get(key))
    }
    originals = {key: firsts[key].row for key in updated if key in firsts}
    originals |= read(local, pair.local_table, pair.key, updated - originals.keys())
    return {key: (row, current[key]) for key, row in originals.items()}


def _not_as_first_written(pair: TablePair, row: dict[str, Any], first: Version | None) -> bool:
    """Whether an append-only central record is other than its first version: compared in JSON form, as a base
    keeps it; without a first version, whether it is past the version its insert got."""
    if first is None:
        return bool(row[VERSION] > 1)
    return jsonable(pair.plain(row)) != jsonable(first.row)


def _restore_refused(
    session: Session,
    connection: Connection,
    pair: TablePair,
    key: str,
    original: dict[str, Any],
    refused: dict[str, Any] | None,
) -> None:
    """Put the original back centrally, as a version after the refused one (or the deleted one), and keep the
    refused one audited."""
    stamp = stamp_edit(physical_ms=wall_clock_ms(), offset_ms=0, replaced=stamp_of(refused), node="central")
    number = refused[VERSION] + 1 if refused is not None else 1
    restored = {**pair.sealed(original), VERSION: number, STAMP: stamp.encode()}
    upsert(connection, pair.central_table, pair.key, [restored])
    record_refused_central_update(session, pair, key, original, refused)


def _central_row(pair: TablePair, version: Version, existing: dict[str, Any] | None) -> dict[str, Any]:
    number = (existing[VERSION] or 0) + 1 if existing is not None else 1
    return {**pair.sealed(version.row), VERSION: number, STAMP: version.stamp.encode()}


def _base(session: Session, pair: TablePair, key: str) -> dict[str, Any] | None:
    """The record as both sides last agreed on it, in the JSON form merge_fields compares in: its fields read back
    as their types, sealed ones opened, which as_json turns back to text. A base kept before as_json wrote times at
    UTC has them at the offset of the server that read them: so written again, they compare as the instants they
    are."""
    if pair.spec.policy != "field-merge":
        return None
    row = session.get(SyncBase, (pair.source_id, pair.spec.name, key))
    return jsonable(pair.plain(from_json(pair.central_table, row.row))) if row is not None else None


def _keeps_bases(pair: TablePair) -> bool:
    return pair.spec.policy in ("field-merge", "append-only")


def _first_versions(session: Session, pair: TablePair, keys: Iterable[str]) -> dict[str, Version]:
    """Append-only records' first synced versions (their bases), by key, in one query per 500; other policies and
    records synced before first versions were kept have none."""
    if pair.spec.policy != "append-only":
        return {}
    key_list, found = list(keys), {}
    for start in range(0, len(key_list), 500):
        rows = session.execute(
            select(SyncBase.record_key, SyncBase.row).where(
                SyncBase.source_id == pair.source_id,
                SyncBase.table_name == pair.spec.name,
                SyncBase.record_key.in_(key_list[start : start + 500]),
            )
        )
        for key, row in rows:
            found[key] = Version(pair.plain(from_json(pair.central_table, row)), ORIGIN)
    return found


def _save_bases(session: Session, pair: TablePair, rows: list[dict[str, Any]]) -> None:
    """Field-merge needs each record as both sides last agreed on it, append-only the version first synced (the
    only one either side ever writes); other policies keep no base."""
    if not _keeps_bases(pair):
        return
    for row in rows:
        key = key_text(row[pair.key])
        session.merge(SyncBase(source_id=pair.source_id, table_name=pair.spec.name, record_key=key, row=jsonable(row)))


def _after_batch(pair: TablePair, **moved: int) -> None:
    log.debug("source %s table %s: batch acknowledged %s", pair.source_id, pair.spec.name, moved)
    if pair.after_batch is not None:
        pair.after_batch(pair.tally)
