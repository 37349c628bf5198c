"""Records read from a store by key, each kept as the tuple of its values, for a pull's batch of 2,000."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import itemgetter
from typing import Any


class Records(Mapping[str, dict[str, Any]]):
    """Records by key text. A pull writes most of its records' values down as they are, and a dict made for each on
    the way cost 0.75 µs a record (about a twentieth of the pull's CPU, measured): a record becomes a dict only when
    one is looked up by key (a refusal, a base, a conflict)."""

    def __init__(
        self,
        names: list[str],
        rows: dict[str, tuple[Any, ...]],
        as_record: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.names = names
        self._rows = rows
        self._as_record = as_record
        self._made: dict[str, dict[str, Any]] = {}

    def each_as(self, as_record: Callable[[dict[str, Any]], dict[str, Any]]) -> Records:
        """These records, each made by `as_record` when first looked up, and the same record at every look after."""
        return Records(self.names, self._rows, as_record)

    def __getitem__(self, key: str) -> dict[str, Any]:
        if self._as_record is None:
            return dict(zip(self.names, self._rows[key], strict=True))
        if key not in self._made:
            self._made[key] = self._as_record(dict(zip(self.names, self._rows[key], strict=True)))
        return self._made[key]

    def __contains__(self, key: object) -> bool:
        return key in self._rows  # Mapping's own would make the record a dict to say so

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def values_in(self, keys: Iterable[str], names: list[str]) -> list[list[Any]]:
        """The values of these records in `names` order, each record's a list of its own, without a dict."""
        at = [self.names.index(name) for name in names]
        if len(at) == 1:
            return [[self._rows[key][at[0]]] for key in keys]
        take = itemgetter(*at)
        return [list(take(self._rows[key])) for key in keys]
