"""Hybrid logical clock stamps: what orders two versions of a record under last-writer-wins.

A stamp is (wall milliseconds, counter, node). An edit is stamped from the physical time of the side it was made
on, corrected by that side's measured clock offset to the central store, and never earlier than the version it
replaced: so a new version always orders after the one it was derived from, and a local clock that runs an hour
fast does not make its edits look an hour later than they were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

NODES = ("central", "local")


@dataclass(frozen=True, order=True)
class Stamp:
    wall_ms: int
    counter: int
    node: str

    def encode(self) -> str:
        # Fixed widths make the text form sort the same way as the stamps themselves.
        return f"{self.wall_ms:015d}.{self.counter:05d}.{self.node}"

    @classmethod
    def parse(cls, text: str) -> Stamp:
        wall, counter, node = text.split(".")
        return cls(int(wall), int(counter), node)


ORIGIN = Stamp(0, 0, "central")


def stamp_edit(*, physical_ms: int, offset_ms: int, replaced: Stamp | None, node: str) -> Stamp:
    """The stamp of an edit made at `physical_ms` on a clock `offset_ms` ahead of the central one."""
    wall = physical_ms - offset_ms
    previous = replaced or ORIGIN
    if wall > previous.wall_ms:
        return Stamp(wall, 0, node)
    return Stamp(previous.wall_ms, previous.counter + 1, node)


def after_both(first: Stamp, second: Stamp, *, node: str) -> Stamp:
    """A stamp that orders after both: the stamp of a version merged from the two."""
    latest = max(first, second)
    return Stamp(latest.wall_ms, latest.counter + 1, node)


def wall_clock_ms() -> int:
    """This process's wall clock in milliseconds: the physical time of an edit the sync service makes centrally."""
    return time.time_ns() // 1_000_000
