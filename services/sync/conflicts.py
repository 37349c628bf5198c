"""Conflicts: each one recorded with both versions and audited, whatever the policy decided; the review queue of
a `manual` table (records held until someone chooses), and the choices written back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from services.sync.changes import CENTRAL_LOG, begin_applying, end_applying, forget, log_merges, shut_out_writers
from services.sync.deletions import delete_centrally
from services.sync.hlc import ORIGIN, Stamp, after_both, stamp_edit, wall_clock_ms
from services.sync.merge import (
    DELETE_REFUSED,
    DELETED,
    HELD,
    INSERT_REFUSED,
    REFUSED,
    Resolution,
    Version,
    deletion,
    from_json,
    jsonable,
)
from services.sync.pair import TablePair, hold_sealing_key
from services.sync.stores import STAMP, VERSION, read, stamp_of, upsert
from services.sync.watermarks import DOWN, watermark
from shared.audit import record_change
from shared.db.models import SyncConflict
from shared.db.row_locks import hold_sqlite_write_lock
from shared.db.types import utcnow
from shared.sync_jobs import CONFLICT_CHOSEN, CONFLICT_OPEN, CONFLICT_RESOLVED, REFUSAL, WITHHELD

# What the review queue's choice sets a conflict's outcome to (services/api/routers/sync_jobs.py).
KEPT_CENTRAL = "kept-central"
# Records held for review: a conflict open, or chosen and not yet written (the next job writes the choice).
_HELD = (CONFLICT_OPEN, CONFLICT_CHOSEN)
# Asked by every batch of a table that holds conflicts for review: made once (services/sync/watermarks.py says why).
_ANY_HELD = (
    select(SyncConflict.id)
    .where(
        SyncConflict.org_id == bindparam("org"),
        SyncConflict.status.in_(_HELD),
        SyncConflict.source_id == bindparam("source"),
        SyncConflict.table_name == bindparam("table"),
    )
    .limit(1)
)


def apply_choices(pair: TablePair) -> None:
    """Write the versions people chose in the review queue to the central store, and log them to go down.

    `central` keeps the central record as it is now, edits made since the conflict opened included. `local` keeps
    the local version chosen, unless the central record changed after the choice: the reviewer never saw that edit,
    so it joins the conflict, which is open again for a new choice."""
    with Session(pair.central) as session, session.begin():
        # The central log first, as an application's write takes it: the records are written before the merges
        # are logged, and a write waiting for one of them while holding the log would deadlock with this.
        shut_out_writers(session.connection(), CENTRAL_LOG)
        # Held before the conflicts are read: their sealed versions, copied into the central copy, are then as a
        # rotation has left them (it re-encrypts them while no batch holds the key).
        hold_sealing_key(session, pair)
        chosen = session.scalars(
            select(SyncConflict).where(
                SyncConflict.source_id == pair.source_id,
                SyncConflict.table_name == pair.spec.name,
                SyncConflict.status == CONFLICT_CHOSEN,
            )
        ).all()
        if not chosen:
            return
        connection = session.connection()
        begin_applying(connection, CENTRAL_LOG)
        current = read(connection, pair.central_table, pair.key, [conflict.record_key for conflict in chosen])
        writes, deletes, keys, going_down = [], {}, [], []
        for conflict in chosen:
            existing = current.get(conflict.record_key)
            if conflict.outcome == KEPT_CENTRAL:
                _keep_central_as_it_is(pair, conflict, existing)
                going_down.append(conflict.record_key)
            elif _central_moved(conflict, existing):
                _reopen(session, pair, conflict, existing)
                continue
            elif conflict.kept and conflict.kept.get(DELETED):
                if existing is not None:
                    deletes[conflict.record_key] = existing
            else:
                # Under the active key: a choice copied from versions under a key a rotation has since retired
                # or drained (but the org still holds) is not written centrally under it.
                kept = pair.under_active_key(from_json(pair.central_table, conflict.kept or {}))
                writes.append(_chosen_row(kept, existing))
            conflict.status = CONFLICT_RESOLVED
            keys.append(conflict.record_key)
        upsert(connection, pair.central_table, pair.key, writes)
        delete_centrally(session, connection, pair, deletes)
        forget(connection, CENTRAL_LOG, table=pair.central_name, keys=keys, after=watermark(session, pair, DOWN))
        # A local version kept is the one the local store holds (or an edit of it since, which goes up as a copy):
        # only a central one has to go down. Logged, a kept local one made that edit a conflict again, held anew.
        log_merges(connection, table=pair.central_name, merges=dict.fromkeys(going_down), at_ms=wall_clock_ms())
        end_applying(connection, CENTRAL_LOG)


def _keep_central_as_it_is(pair: TablePair, conflict: SyncConflict, existing: dict[str, Any] | None) -> None:
    """The central record stays, and goes down as it is: the conflict names it as the version kept."""
    current = version_json(pair, _as_version(pair, conflict, existing))
    conflict.central_version = current
    conflict.kept = current


def _central_moved(conflict: SyncConflict, existing: dict[str, Any] | None) -> bool:
    """Whether the central record is not the version the conflict holds: edited, deleted or written since."""
    held = conflict.central_version
    if existing is None:
        return not held.get(DELETED)
    return bool(held.get(DELETED)) or held.get(STAMP) != (stamp_of(existing) or ORIGIN).encode()


def _reopen(session: Session, pair: TablePair, conflict: SyncConflict, existing: dict[str, Any] | None) -> None:
    conflict.central_version = version_json(pair, _as_version(pair, conflict, existing))
    _open_again(session, pair, conflict, reason="the central record changed after the choice")


def _open_again(session: Session, pair: TablePair, conflict: SyncConflict, *, reason: str) -> None:
    conflict.status, conflict.outcome, conflict.kept = CONFLICT_OPEN, HELD, None
    conflict.resolved_at = conflict.resolved_by = None
    record_change(
        session,
        org_id=pair.org_id,
        actor="sync",
        action="sync.conflict.reopened",
        target=f"{pair.spec.name}/{conflict.record_key}",
        detail={"conflictId": conflict.id, "reason": reason},
    )


def _as_version(pair: TablePair, conflict: SyncConflict, existing: dict[str, Any] | None) -> Version:
    """The central record as a conflict version; its deletion keeps the stamp the conflict knew it by, or now."""
    if existing is not None:
        return Version(pair.plain(existing), stamp_of(existing) or ORIGIN)
    known = conflict.central_version.get(STAMP) if conflict.central_version.get(DELETED) else None
    return deletion(Stamp.parse(known) if known else _now())


def _now() -> Stamp:
    return stamp_edit(physical_ms=wall_clock_ms(), offset_ms=0, replaced=None, node="central")


def _chosen_row(kept: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    """The version chosen in review as the central store's next version of the record."""
    kept_stamp = Stamp.parse(kept.pop(STAMP)) if kept.get(STAMP) else ORIGIN
    stamp = after_both(kept_stamp, stamp_of(existing) or ORIGIN, node="central")
    number = (existing[VERSION] or 0) + 1 if existing is not None else 1
    return {**kept, VERSION: number, STAMP: stamp.encode()}


def holds_for_review(pair: TablePair) -> bool:
    """Whether conflicts of the table wait in the review queue: all of a manual table's, and the central updates a
    down-only table's local store refuses (its local version, which would settle them, never goes up)."""
    return pair.spec.policy == "manual" or not pair.spec.sends_up


def held_conflicts(session: Session, pair: TablePair, keys: Any, *, lock: bool = False) -> dict[str, SyncConflict]:
    """Records held for review: neither side's version moves until someone resolves them. With `lock`, as
    locked_held_conflicts reads them: an edit joining a conflict then either comes before the choice, which is made
    from the versions it wrote, or after, and opens the conflict again (join_conflict)."""
    if not holds_for_review(pair) or not _any_held(session, pair):
        return {}
    if lock:
        rows = locked_held_conflicts(session, source_id=pair.source_id, table=pair.spec.name, keys=keys)
    else:
        rows = session.scalars(_held_of(pair.source_id, pair.spec.name, keys)).all()
    return {row.record_key: row for row in rows}


def locked_held_conflicts(session: Session, *, source_id: str, table: str, keys: Any) -> Sequence[SyncConflict]:
    """The conflicts of `keys` held for review, each read as it is now and locked until the commit, as the review
    queue's choice locks it (services/api/routers/sync_jobs.py). By id, as a rotation's reseal locks them: taken in
    one order, their locks never deadlock."""
    hold_sqlite_write_lock(session, SyncConflict.status)  # SQLite ignores FOR UPDATE
    query = _held_of(source_id, table, keys).order_by(SyncConflict.id).with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).all()


def _held_of(source_id: str, table: str, keys: Any) -> Select[SyncConflict]:
    return select(SyncConflict).where(
        SyncConflict.source_id == source_id,
        SyncConflict.table_name == table,
        SyncConflict.status.in_(_HELD),
        SyncConflict.record_key.in_(list(keys)),
    )


def join_conflict(
    session: Session, pair: TablePair, conflict: SyncConflict, *, local: Any = None, central: Any = None
) -> None:
    """An edit of a held record joins its conflict as that side's version (`local` or `central`, as conflicts keep
    them). A conflict chosen while the batch ran opens again: the reviewer never saw that edit, and the choice,
    written by the next job, would undo it (a local edit after a choice of `local`) or hide it (a central one)."""
    if local is not None:
        conflict.local_version = local
    if central is not None:
        conflict.central_version = central
    if conflict.status == CONFLICT_CHOSEN:
        side = "local" if local is not None else "central"
        _open_again(session, pair, conflict, reason=f"the {side} record changed before the choice was written")


def _any_held(session: Session, pair: TablePair) -> bool:
    """One cheap look first (the org's conflicts are indexed by status): most batches meet none, and the look-up by
    key binds a parameter per record of the batch, which was a fifth of a down-only table's pull."""
    this_table = {"org": pair.org_id, "source": pair.source_id, "table": pair.spec.name}
    return session.connection().scalar(_ANY_HELD, this_table) is not None


def record_conflict(
    session: Session, pair: TablePair, key: str, mine: Version, theirs: Version, resolution: Resolution
) -> None:
    _record(session, pair, key, version_json(pair, mine), version_json(pair, theirs), resolution)


def _record(
    session: Session,
    pair: TablePair,
    key: str,
    mine: dict[str, Any],
    theirs: dict[str, Any],
    resolution: Resolution,
) -> None:
    """The conflict with both versions as it keeps them, and its audit row (which holds neither)."""
    conflict = SyncConflict(
        org_id=pair.org_id,
        source_id=pair.source_id,
        job_id=pair.job_id,
        table_name=pair.spec.name,
        record_key=key,
        policy=pair.spec.policy,
        status=CONFLICT_OPEN if resolution.held else CONFLICT_RESOLVED,
        outcome=resolution.outcome,
        local_version=mine,
        central_version=theirs,
        kept=None if resolution.kept is None else kept_json(pair, resolution.kept),
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


def record_refused_central_update(
    session: Session, pair: TablePair, key: str, original: dict[str, Any], refused: dict[str, Any] | None
) -> None:
    stamp = stamp_of(refused) or _now()
    theirs = deletion(stamp) if refused is None else Version(pair.plain(refused), stamp)
    resolution = Resolution(REFUSED if refused is not None else DELETE_REFUSED, Version(original, stamp))
    record_conflict(session, pair, key, Version(original, stamp), theirs, resolution)


def hold_refused_central_update(
    session: Session, pair: TablePair, key: str, refused: dict[str, Any], reason: str
) -> None:
    """A central update a down-only table's local store refused: held for review with its central version. The local
    version never reaches the central store: the conflict keeps the local store's reason in its place. Kept as it is,
    the central version goes down again (apply_choices); the local one cannot be kept."""
    theirs = Version(pair.plain(refused), stamp_of(refused) or ORIGIN)
    _record(
        session, pair, key, {WITHHELD: True, REFUSAL: reason}, version_json(pair, theirs), Resolution(REFUSED, None)
    )


def record_refused_central_insert(session: Session, pair: TablePair, key: str, refused: dict[str, Any]) -> None:
    """A central record the local store refused to take, and so deleted centrally too: the conflict keeps it."""
    gone = deletion(stamp_of(refused) or _now())
    record_conflict(
        session, pair, key, gone, Version(pair.plain(refused), gone.stamp), Resolution(INSERT_REFUSED, gone)
    )


def version_json(pair: TablePair, version: Version) -> dict[str, Any]:
    """A version as a conflict keeps it: sealed, with its stamp; a deletion as a marker."""
    return {**kept_json(pair, version), STAMP: version.stamp.encode()}


def kept_json(pair: TablePair, version: Version) -> dict[str, Any]:
    return {DELETED: True} if version.deleted else jsonable(pair.sealed(version.row))
