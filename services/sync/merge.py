"""Conflict resolution: what a record becomes when both sides changed it since the last sync.

Pure functions over plain rows (sensitive columns already decrypted). Whatever the policy, the caller keeps both
versions as they were in the conflict record, so the losing one is never lost.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from uuid import UUID

from sqlalchemy import Table
from sqlalchemy.types import TypeEngine

from services.sync.hlc import Stamp, after_both
from shared.sync_tables import Policy

LOCAL_WON, CENTRAL_WON, MERGED, HELD, REFUSED = "local-won", "central-won", "merged", "held", "update-refused"
DELETE_REFUSED = "delete-refused"
INSERT_REFUSED = "insert-refused"
# Marks a deletion where a version is kept as JSON (conflicts, the review queue's choice).
DELETED = "_kiln_deleted"


@dataclass(frozen=True)
class Version:
    row: dict[str, Any]
    stamp: Stamp
    # A deletion, stamped like an edit; its row is empty.
    deleted: bool = False


def deletion(stamp: Stamp) -> Version:
    return Version({}, stamp, deleted=True)


@dataclass(frozen=True)
class Resolution:
    outcome: str
    kept: Version | None
    overlapping: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return self.kept is None


def resolve(
    policy: Policy, *, local: Version, central: Version, base: dict[str, Any] | None, first: Version | None = None
) -> Resolution:
    """`base` is a field-merge record as both sides last agreed on it (JSON form); `first` an append-only record's
    first synced version."""
    if policy == "manual":
        return Resolution(HELD, None)
    if policy == "append-only":
        return refuse(local=local, central=central, first=first)
    if local.deleted or central.deleted:
        # A deleted record has no fields to merge: field-merge lets the later stamp win too.
        return last_writer_wins(local=local, central=central)
    if policy == "field-merge" and base is not None:
        return merge_fields(local=local, central=central, base=base)
    return last_writer_wins(local=local, central=central)


def refuse(*, local: Version, central: Version, first: Version | None) -> Resolution:
    """Append-only: a record is written once, so neither side's update or deletion stands; the first version goes
    back to both sides, stamped after both refused ones. A record synced before first versions were kept has none:
    the side that did not delete it, the central one if neither did, stays."""
    outcome = DELETE_REFUSED if local.deleted or central.deleted else REFUSED
    kept = first if first is not None else (local if central.deleted else central)
    return Resolution(outcome, Version(kept.row, after_both(local.stamp, central.stamp, node="central"), kept.deleted))


def last_writer_wins(*, local: Version, central: Version) -> Resolution:
    if local.stamp > central.stamp:
        return Resolution(LOCAL_WON, local)
    return Resolution(CENTRAL_WON, central)


def as_json(value: Any) -> Any:
    """A value as a conflict record, an audit row or a base keeps it (JSON): times, decimals and UUIDs as text (a
    time with a zone at UTC, whatever TimeZone the server that read it shows times in), durations (PostgreSQL's
    interval) as `P<days>DT<seconds>.<microseconds>S`, bytes as base64, and the floats JSON has no number for as
    their names. Fields are compared in this form, so that a field read back from its base compares equal to the
    value it was saved from, and one instant read from two servers compares equal. A PostgreSQL array's items, each
    so."""
    if isinstance(value, list):
        return [as_json(item) for item in value]
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, timedelta):
        return f"P{value.days}DT{value.seconds}.{value.microseconds:06d}S"
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan": float() reads them back
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).isoformat()
    return value.isoformat() if isinstance(value, date | time) else value


_DURATION = re.compile(r"P(-?\d+)DT(\d+)\.(\d{6})S")


def _duration(text: str) -> timedelta | str:
    """A duration as as_json wrote it; other text as it is."""
    found = _DURATION.fullmatch(text)
    if found is None:
        return text
    days, seconds, microseconds = map(int, found.groups())
    return timedelta(days=days, seconds=seconds, microseconds=microseconds)


_FROM_TEXT: dict[type, Callable[[str], Any]] = {
    datetime: datetime.fromisoformat,
    date: date.fromisoformat,
    time: time.fromisoformat,
    Decimal: Decimal,
    bytes: base64.b64decode,
    float: float,
    UUID: UUID,
    timedelta: _duration,
}


def from_json(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON kept it, with the values as_json made text read back as their column's type."""
    return {name: _typed(table, name, value) for name, value in row.items()}


def _typed(table: Table, name: str, value: Any) -> Any:
    return read_back(table.c[name].type, value) if name in table.c else value


def read_back(column_type: TypeEngine[Any], value: Any) -> Any:
    """A value as_json made text, read back as `column_type` holds it; an array's items (at any depth) as its item
    type holds them."""
    if isinstance(value, list):
        item_type = getattr(column_type, "item_type", column_type)
        return [read_back(item_type, item) for item in value]
    if not isinstance(value, str):
        return value
    try:
        parse = _FROM_TEXT.get(column_type.python_type)
    except NotImplementedError:
        return value
    return parse(value) if parse is not None else value


def merge_fields(*, local: Version, central: Version, base: dict[str, Any]) -> Resolution:
    """Each field from the side that changed it; a field both changed differently goes to the later stamp. `base`
    is in JSON form (as_json)."""
    newer = local if local.stamp > central.stamp else central
    merged: dict[str, Any] = {}
    overlapping = []
    for name in local.row.keys() | central.row.keys():
        mine, theirs = local.row.get(name), central.row.get(name)
        before = base.get(name)
        if _same(mine, as_json(theirs)) or _same(theirs, before):
            merged[name] = mine
        elif _same(mine, before):
            merged[name] = theirs
        else:
            overlapping.append(name)
            merged[name] = newer.row.get(name)
    stamp = after_both(local.stamp, central.stamp, node="central")
    return Resolution(MERGED, Version(merged, stamp), sorted(overlapping))


def _same(value: Any, kept: Any) -> bool:
    """Whether `value` equals `kept`, a value in as_json's form; a decimal by its number, not its text: a SQLite file
    gives back 12.5 for the 12.50 a central NUMERIC(10,2) keeps, which no side changed."""
    if isinstance(value, Decimal) and isinstance(kept, str):
        with suppress(InvalidOperation):
            return value == Decimal(kept)
    return bool(as_json(value) == kept)


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON keeps it (a conflict's versions, a field-merge base)."""
    return {name: as_json(value) for name, value in row.items()}
