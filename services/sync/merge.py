"""Conflict resolution: what a record becomes when both sides changed it since the last sync.

Pure functions over plain rows (sensitive columns already decrypted). Whatever the policy, the caller keeps both
versions as they were in the conflict record, so the losing one is never lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.sync.hlc import Stamp, after_both
from shared.sync_tables import Policy

LOCAL_WON, CENTRAL_WON, MERGED, HELD, REFUSED = "local-won", "central-won", "merged", "held", "update-refused"


@dataclass(frozen=True)
class Version:
    row: dict[str, Any]
    stamp: Stamp


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
    if policy == "append-only":
        # Telemetry is written once: the version the central store accepted first stays, the update is refused.
        return Resolution(REFUSED, central)
    if policy == "field-merge" and base is not None:
        return merge_fields(local=local, central=central, base=base)
    return last_writer_wins(local=local, central=central)


def last_writer_wins(*, local: Version, central: Version) -> Resolution:
    if local.stamp > central.stamp:
        return Resolution(LOCAL_WON, local)
    return Resolution(CENTRAL_WON, central)


def merge_fields(*, local: Version, central: Version, base: dict[str, Any]) -> Resolution:
    """Each field from the side that changed it; a field both changed differently goes to the later stamp."""
    newer = local if local.stamp > central.stamp else central
    merged: dict[str, Any] = {}
    overlapping = []
    for name in local.row.keys() | central.row.keys():
        mine, theirs, before = local.row.get(name), central.row.get(name), base.get(name)
        if mine == theirs or theirs == before:
            merged[name] = mine
        elif mine == before:
            merged[name] = theirs
        else:
            overlapping.append(name)
            merged[name] = newer.row.get(name)
    stamp = after_both(local.stamp, central.stamp, node="central")
    return Resolution(MERGED, Version(merged, stamp), sorted(overlapping))
