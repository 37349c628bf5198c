"""Moving one table's changes between the local and the central store, in batches, from acknowledged watermarks.

Up (push): the local change log after the `up` watermark. Each batch is written to the central store in one
transaction with its conflicts, the job's counters and the new watermark, so a batch is acknowledged exactly when
it has landed. Down (pull): the central change log after the `down` watermark, written to the local store first
and acknowledged after; a batch replayed after a crash writes the same records again, by key, and so changes
nothing. Central edits carry their version and stamp from the moment they are made (services/sync/changes.py),
so a pull only reads the central store, except to restore an append-only record. A record changed on both sides
since its last sync goes to the table's policy (services/sync/merge.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, Table, select, update
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
from services.sync.envelope import Keyring
from services.sync.hlc import ORIGIN, Stamp, after_both, stamp_edit
from services.sync.merge import Resolution, Version, as_json, resolve
from services.sync.stores import META_COLUMNS, STAMP, VERSION, key_text, read, upsert, upsert_values, values_of
from shared.audit import record_change
from shared.db.models import SyncBase, SyncConflict, SyncJob, SyncWatermark
from shared.db.types import utcnow
from shared.sync_tables import SyncTable

log = logging.getLogger(__name__)

UP, DOWN = "up", "down"
OPEN, CHOSEN, RESOLVED = "open", "chosen", "resolved"


@dataclass
class Tally:
    pushed: int = 0
    pulled: int = 0
    conflicts: int = 0


@dataclass
class TablePair:
    """One table of a source, open on both sides for one job."""

    spec: SyncTable
    org_id: str
    source_id: str
    job_id: str | None
    local: Engine
    central: Engine
    local_table: Table
    central_table: Table
    central_name: str
    keyring: Keyring
    offset_ms: int
    batch_size: int
    after_batch: Callable[[Tally], None] | None = None
    tally: Tally = field(default_factory=Tally)

    @property
    def key(self) -> str:
        return self.spec.primary_key

    def sealed(self, row: dict[str, Any]) -> dict[str, Any]:
        """A local row as the central store holds it: sensitive columns encrypted."""
        return {
            name: self.keyring.seal(value, column=self._column(name)) if name in self.spec.sensitive_columns else value
            for name, value in row.items()
        }

    def plain(self, row: dict[str, Any]) -> dict[str, Any]:
        """A central row as the local store holds it: without the sync columns, sensitive columns decrypted."""
        opened = dict(row)
        for name in META_COLUMNS:
            opened.pop(name, None)
        for name in self.spec.sensitive_columns:
            if name in opened:
                opened[name] = self.keyring.open(opened[name], column=self._column(name))
        return opened

    def plain_values(self, rows: Iterable[dict[str, Any]], names: list[str]) -> list[list[Any]]:
        """plain() of many central rows, each as its values in `names` order: a pull's rows go to the local store
        in that shape, with no dict made per row on the way."""
        take = values_of(names)
        sensitive = [(names.index(name), self._column(name)) for name in self.spec.sensitive_columns if name in names]
        opened = []
        for row in rows:
            values = list(take(row))
            for index, column in sensitive:
                values[index] = self.keyring.open(values[index], column=column)
            opened.append(values)
        return opened

    def _column(self, name: str) -> str:
        return f"{self.spec.name}.{name}"


def sync_table(pair: TablePair) -> Tally:
    """Push and pull until neither side has anything left that was there when the job looked."""
    if pair.spec.policy == "manual":
        apply_choices(pair)
    while True:
        pushed = push_batch(pair) if pair.spec.sends_up else False
        pulled = pull_batch(pair) if pair.spec.sends_down else False
        if not (pushed or pulled):
            return pair.tally


def apply_choices(pair: TablePair) -> None:
    """Write the versions people chose in the review queue to the central store, and log them to go down."""
    with Session(pair.central) as session, session.begin():
        chosen = session.scalars(
            select(SyncConflict).where(
                SyncConflict.source_id == pair.source_id,
                SyncConflict.table_name == pair.spec.name,
                SyncConflict.status == CHOSEN,
            )
        ).all()
        if not chosen:
            return
        connection = session.connection()
        begin_applying(connection, CENTRAL_LOG)
        keys = [conflict.record_key for conflict in chosen]
        current = read(connection, pair.central_table, pair.key, keys)
        writes = []
        for conflict in chosen:
            kept = dict(conflict.kept or {})
            kept_stamp = Stamp.parse(kept.pop(STAMP)) if kept.get(STAMP) else ORIGIN
            existing = current.get(conflict.record_key)
            stamp = after_both(kept_stamp, _stamp_of(existing) or ORIGIN, node="central")
            number = (existing[VERSION] or 0) + 1 if existing is not None else 1
            writes.append({**kept, VERSION: number, STAMP: stamp.encode()})
            conflict.status = RESOLVED
        upsert(connection, pair.central_table, pair.key, writes)
        forget(connection, CENTRAL_LOG, table=pair.central_name, keys=keys, after=watermark(session, pair, DOWN))
        log_merges(connection, CENTRAL_LOG, table=pair.central_name, keys=keys, at_ms=utcnow_ms())
        end_applying(connection, CENTRAL_LOG)


def push_batch(pair: TablePair) -> bool:
    """One batch of local changes into the central store; False when there was none."""
    with Session(pair.central) as session:
        after = watermark(session, pair, UP)
    with pair.local.connect() as local:
        changes = changes_after(local, LOCAL_LOG, table=pair.spec.name, after=after, limit=pair.batch_size)
        if not changes:
            return False
        latest = {change.key: change for change in changes}
        rows = read(local, pair.local_table, pair.key, latest)
    with Session(pair.central) as session, session.begin():
        connection = session.connection()
        shut_out_writers(connection, CENTRAL_LOG)
        begin_applying(connection, CENTRAL_LOG)
        pushed, conflicts = _push(session, connection, pair, latest, rows)
        set_watermark(session, pair, UP, changes[-1].seq)
        _count(session, pair, pushed=pushed, conflicts=conflicts)
        end_applying(connection, CENTRAL_LOG)
    _after_batch(pair, pushed=pushed, conflicts=conflicts)
    return True


def _push(
    session: Session,
    connection: Connection,
    pair: TablePair,
    latest: dict[str, Change],
    rows: dict[str, dict[str, Any]],
) -> tuple[int, int]:
    current = read(connection, pair.central_table, pair.key, latest)
    down_after = watermark(session, pair, DOWN)
    changed_centrally = (
        pending(connection, CENTRAL_LOG, table=pair.central_name, keys=latest, after=down_after)
        if pair.spec.sends_down
        else {}
    )
    held = open_conflicts(session, pair, latest)
    writes: list[dict[str, Any]] = []
    plain_copies = conflicts = 0
    for key, change in latest.items():
        row = rows.get(key)
        if row is None:
            continue  # deleted locally: deletions are not synced; expired records go by retention
        existing = current.get(key)
        if key in held:
            held[key].local_version = pair.sealed(row)  # the review sees the newest local version
            continue
        refused_update = pair.spec.policy == "append-only" and existing is not None
        if existing is None or (key not in changed_centrally and not refused_update):
            writes.append(_central_row(pair, _local_version(pair, row, change, _stamp_of(existing)), existing))
            plain_copies += 1
            continue
        against = _stamp_before_central_edits(connection, pair, key, existing, down_after)
        mine = _local_version(pair, row, change, against)
        theirs = Version(pair.plain(existing), _stamp_of(existing) or ORIGIN)
        resolution = resolve(pair.spec.policy, local=mine, central=theirs, base=_base(session, pair, key))
        _record_conflict(session, pair, key, mine, theirs, resolution)
        conflicts += 1
        if resolution.kept is not None:
            writes.append(_central_row(pair, resolution.kept, existing))
            forget(connection, CENTRAL_LOG, table=pair.central_name, keys=[key], after=down_after)
            if resolution.kept.row != row and pair.spec.sends_down:
                log_merges(connection, CENTRAL_LOG, table=pair.central_name, keys=[key], at_ms=utcnow_ms())
    upsert(connection, pair.central_table, pair.key, writes)
    _save_bases(session, pair, writes)
    return plain_copies, conflicts


def _local_version(pair: TablePair, row: dict[str, Any], change: Change, replaced: Stamp | None) -> Version:
    stamp = stamp_edit(physical_ms=change.at_ms, offset_ms=pair.offset_ms, replaced=replaced, node="local")
    return Version(row, stamp)


def _stamp_before_central_edits(
    connection: Connection, pair: TablePair, key: str, existing: dict[str, Any], after: int
) -> Stamp | None:
    """The stamp of the version a local edit was made against: the one the central edits since `after` replaced.
    The central record's own stamp is already that of its latest edit (set at capture)."""
    first = first_change(connection, CENTRAL_LOG, table=pair.central_name, key=key, after=after)
    if first is not None and first.origin == ORIGIN_APP:
        return Stamp.parse(first.replaced) if first.replaced else None
    return _stamp_of(existing)


def pull_batch(pair: TablePair) -> bool:
    """One batch of central changes into the local store; False when there was none, or a local edit came first.

    One central transaction reads the batch and, once the local store has committed it, acknowledges it. Until
    then it only reads (central edits were versioned and stamped as they were made), so it locks nothing while
    the local store writes."""
    with Session(pair.central) as session:
        positions = watermarks(session, pair)
        after, local_after = positions.get(DOWN, 0), positions.get(UP, 0)
        changes = changes_after(
            session.connection(), CENTRAL_LOG, table=pair.central_name, after=after, limit=pair.batch_size
        )
        if not changes:
            return False
        current = _changed_records(session, pair, after=after, last=changes[-1].seq)
        held = open_conflicts(session, pair, (change.key for change in changes))
        with pair.local.begin() as local:
            shut_out_writers(local, LOCAL_LOG)
            if pair.spec.sends_up:
                changes = _before_local_edits(local, pair, changes, local_after)
                if not changes:
                    return False  # a local edit of one of these records goes up first, through the policy
            latest = {change.key: change for change in changes if change.key not in held and change.key in current}
            begin_applying(local, LOCAL_LOG)
            refused = _pull(local, pair, latest, current)
            end_applying(local, LOCAL_LOG)
        _acknowledge_pull(session, pair, changes[-1].seq, [current[key] for key in latest if key not in refused])
        _restore_all_refused(session, pair, refused)
        session.commit()
    _after_batch(pair, pulled=len(latest) - len(refused), conflicts=len(refused))
    return True


def _changed_records(session: Session, pair: TablePair, *, after: int, last: int) -> dict[str, dict[str, Any]]:
    return changed_records(
        session.connection(),
        CENTRAL_LOG,
        table=pair.central_table,
        key=pair.key,
        logged_as=pair.central_name,
        after=after,
        last=last,
    )


def _acknowledge_pull(session: Session, pair: TablePair, seq: int, pulled: list[dict[str, Any]]) -> None:
    _save_bases(session, pair, pulled)
    set_watermark(session, pair, DOWN, seq)
    _count(session, pair, pulled=len(pulled))


def _restore_all_refused(
    session: Session, pair: TablePair, refused: dict[str, tuple[dict[str, Any], dict[str, Any]]]
) -> None:
    if not refused:
        return
    connection = session.connection()
    begin_applying(connection, CENTRAL_LOG)
    for key, (local_row, central_row) in refused.items():
        _restore_refused(session, connection, pair, key, local_row, central_row)
    _count(session, pair, conflicts=len(refused))
    end_applying(connection, CENTRAL_LOG)


def _before_local_edits(local: Connection, pair: TablePair, changes: list[Change], local_after: int) -> list[Change]:
    """The changes up to the first record also edited locally since the last push."""
    edited = pending(local, LOCAL_LOG, table=pair.spec.name, keys={c.key for c in changes}, after=local_after)
    for index, change in enumerate(changes):
        if change.key in edited:
            return changes[:index]
    return changes


def _pull(
    local: Connection, pair: TablePair, latest: dict[str, Change], current: dict[str, dict[str, Any]]
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Write the records down; returns the refused ones, each as the local store has it and as the central one."""
    refused = _refused_updates(local, pair, latest, current)
    names = [column.name for column in pair.local_table.columns]
    rows = pair.plain_values((current[key] for key in latest if key not in refused), names)
    upsert_values(local, pair.local_table, pair.key, names, rows)
    return refused


def _refused_updates(
    local: Connection, pair: TablePair, latest: dict[str, Change], current: dict[str, dict[str, Any]]
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Append-only records the central store changed after the local store had them: their update is refused.
    An update is a central edit of a record past its first version (the one its insert got, here or by a push): a
    replayed batch finds the records it inserted locally the first time, and must still take them for inserts."""
    if pair.spec.policy != "append-only" or not pair.spec.sends_up:
        return {}
    updated = [key for key, change in latest.items() if change.origin == ORIGIN_APP and current[key][VERSION] > 1]
    originals = read(local, pair.local_table, pair.key, updated)
    return {key: (row, current[key]) for key, row in originals.items()}


def _restore_refused(
    session: Session,
    connection: Connection,
    pair: TablePair,
    key: str,
    original: dict[str, Any],
    refused: dict[str, Any],
) -> None:
    """Put the original back centrally, as a version after the refused one, and keep the refused one audited."""
    stamp = stamp_edit(physical_ms=utcnow_ms(), offset_ms=0, replaced=_stamp_of(refused), node="central")
    restored = {**pair.sealed(original), VERSION: refused[VERSION] + 1, STAMP: stamp.encode()}
    upsert(connection, pair.central_table, pair.key, [restored])
    _record_refused_central_update(session, pair, key, original, refused)


def _central_row(pair: TablePair, version: Version, existing: dict[str, Any] | None) -> dict[str, Any]:
    number = (existing[VERSION] or 0) + 1 if existing is not None else 1
    return {**pair.sealed(version.row), VERSION: number, STAMP: version.stamp.encode()}


def _stamp_of(row: dict[str, Any] | None) -> Stamp | None:
    return Stamp.parse(row[STAMP]) if row is not None and row[STAMP] else None


def _base(session: Session, pair: TablePair, key: str) -> dict[str, Any] | None:
    if pair.spec.policy != "field-merge":
        return None
    row = session.get(SyncBase, (pair.source_id, pair.spec.name, key))
    return pair.plain(row.row) if row is not None else None


def _save_bases(session: Session, pair: TablePair, rows: list[dict[str, Any]]) -> None:
    """Field-merge needs each record as both sides last agreed on it; other policies keep no base."""
    if pair.spec.policy != "field-merge":
        return
    for row in rows:
        key = key_text(row[pair.key])
        session.merge(SyncBase(source_id=pair.source_id, table_name=pair.spec.name, record_key=key, row=_jsonable(row)))


def _record_conflict(
    session: Session, pair: TablePair, key: str, mine: Version, theirs: Version, resolution: Resolution
) -> None:
    conflict = SyncConflict(
        org_id=pair.org_id,
        source_id=pair.source_id,
        job_id=pair.job_id,
        table_name=pair.spec.name,
        record_key=key,
        policy=pair.spec.policy,
        status=OPEN if resolution.held else RESOLVED,
        outcome=resolution.outcome,
        local_version=_jsonable({**pair.sealed(mine.row), STAMP: mine.stamp.encode()}),
        central_version=_jsonable({**pair.sealed(theirs.row), STAMP: theirs.stamp.encode()}),
        kept=None if resolution.kept is None else _jsonable(pair.sealed(resolution.kept.row)),
        resolved_at=None if resolution.held else utcnow(),
        resolved_by=None if resolution.held else "policy",
    )
    session.add(conflict)
    session.flush()
    detail = {"policy": pair.spec.policy, "outcome": resolution.outcome, "conflictId": conflict.id}
    if resolution.overlapping:
        detail["overlappingFields"] = resolution.overlapping
    record_change(
        session,
        org_id=pair.org_id,
        actor="sync",
        action="sync.conflict",
        target=f"{pair.spec.name}/{key}",
        detail=detail,
    )


def _record_refused_central_update(
    session: Session, pair: TablePair, key: str, original: dict[str, Any], refused: dict[str, Any]
) -> None:
    stamp = _stamp_of(refused) or stamp_edit(physical_ms=0, offset_ms=0, replaced=None, node="central")
    resolution = Resolution("update-refused", Version(original, stamp))
    _record_conflict(session, pair, key, Version(original, stamp), Version(pair.plain(refused), stamp), resolution)


def open_conflicts(session: Session, pair: TablePair, keys: Any) -> dict[str, SyncConflict]:
    """Records held for manual review: neither side's version moves until someone resolves them."""
    if pair.spec.policy != "manual":
        return {}
    rows = session.scalars(
        select(SyncConflict).where(
            SyncConflict.source_id == pair.source_id,
            SyncConflict.table_name == pair.spec.name,
            SyncConflict.status == OPEN,
            SyncConflict.record_key.in_(list(keys)),
        )
    )
    return {row.record_key: row for row in rows}


def watermark(session: Session, pair: TablePair, direction: str) -> int:
    return watermarks(session, pair).get(direction, 0)


def watermarks(session: Session, pair: TablePair) -> dict[str, int]:
    """Both directions' acknowledged positions, in one plain query: an ORM load per batch cost more than it."""
    rows = session.execute(
        select(SyncWatermark.direction, SyncWatermark.seq).where(
            SyncWatermark.source_id == pair.source_id, SyncWatermark.table_name == pair.spec.name
        )
    )
    return {direction: seq for direction, seq in rows}


def set_watermark(session: Session, pair: TablePair, direction: str, seq: int) -> None:
    moved = session.execute(
        update(SyncWatermark)
        .where(
            SyncWatermark.source_id == pair.source_id,
            SyncWatermark.table_name == pair.spec.name,
            SyncWatermark.direction == direction,
        )
        .values(seq=seq, updated_at=utcnow())
    )
    if moved.rowcount == 0:  # type: ignore[attr-defined]
        session.add(
            SyncWatermark(
                source_id=pair.source_id, table_name=pair.spec.name, direction=direction, seq=seq, updated_at=utcnow()
            )
        )


def _count(session: Session, pair: TablePair, *, pushed: int = 0, pulled: int = 0, conflicts: int = 0) -> None:
    """The job's counters move in the batch's own transaction, so a replayed batch is never counted twice."""
    pair.tally.pushed += pushed
    pair.tally.pulled += pulled
    pair.tally.conflicts += conflicts
    if pair.job_id is not None:
        session.execute(
            update(SyncJob)
            .where(SyncJob.id == pair.job_id)
            .values(
                pushed=SyncJob.pushed + pushed, pulled=SyncJob.pulled + pulled, conflicts=SyncJob.conflicts + conflicts
            )
        )


def _after_batch(pair: TablePair, **moved: int) -> None:
    log.debug("source %s table %s: batch acknowledged %s", pair.source_id, pair.spec.name, moved)
    if pair.after_batch is not None:
        pair.after_batch(pair.tally)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {name: as_json(value) for name, value in row.items()}


def utcnow_ms() -> int:
    return int(utcnow().timestamp() * 1000)
