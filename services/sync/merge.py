"""Conflict resolution: what a record becomes when both sides changed it since the last sync.

Pure functions over plain rows (sensitive columns already decrypted). Whatever the policy, the caller keeps both
versions as they were in the conflict record, so the losing one is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, time
from decimal import Decimal
from typing import Any

from services.sync.hlc import Stamp, after_both
from shared.sync_tables import Policy

LOCAL_WON, CENTRAL_WON, MERGED, HELD, REFUSED = "local-won", "central-won", "merged", "held", "update-refused"
DELETE_REFUSED = "delete-refused"
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


def resolve(policy: Policy, *, local: Version, central: Version, base: dict[str, Any] | None) -> Resolution:
    if policy == "manual":
        return Resolution(HELD, None)
    if local.deleted or central.deleted:
        return resolve_deletion(policy, local=local, central=central)
    if policy == "append-only":
        # Telemetry is written once: the version the central store accepted first stays, the update is refused.
        return Resolution(REFUSED, central)
    if policy == "field-merge" and base is not None:
        return merge_fields(local=local, central=central, base=base)
    return last_writer_wins(local=local, central=central)


def resolve_deletion(policy: Policy, *, local: Version, central: Version) -> Resolution:
    """A deletion against an edit. Append-only refuses the deletion: the record as written stays. Every other
    policy lets the later stamp win, field-merge too: a deleted record has no fields to merge."""
    if policy == "append-only":
        return Resolution(DELETE_REFUSED, central if local.deleted else local)
    return last_writer_wins(local=local, central=central)


def last_writer_wins(*, local: Version, central: Version) -> Resolution:
    if local.stamp > central.stamp:
        return Resolution(LOCAL_WON, local)
    return Resolution(CENTRAL_WON, central)


def as_json(value: Any) -> Any:
    """A value as a base keeps it (JSON): times and decimals as text. Fields are compared in this form, so that a
    field read back from its base compares equal to the value it was saved from."""
    if isinstance(value, Decimal):
        return str(value)
    return value.isoformat() if isinstance(value, date | time) else value


def merge_fields(*, local: Version, central: Version, base: dict[str, Any]) -> Resolution:
    """Each field from the side that changed it; a field both changed differently goes to the later stamp. `base`
    is in JSON form (as_json)."""
    newer = local if local.stamp > central.stamp else central
    merged: dict[str, Any] = {}
    overlapping = []
    for name in local.row.keys() | central.row.keys():
        mine, theirs = local.row.get(name), central.row.get(name)
        before = base.get(name)
        if as_json(mine) == as_json(theirs) or as_json(theirs) == before:
            merged[name] = mine
        elif as_json(mine) == before:
            merged[name] = theirs
        else:
            overlapping.append(name)
            merged[name] = newer.row.get(name)
    stamp = after_both(local.stamp, central.stamp, node="central")
    return Resolution(MERGED, Version(merged, stamp), sorted(overlapping))


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON keeps it (a conflict's versions, a field-merge base)."""
    return {name: as_json(value) for name, value in row.items()}
