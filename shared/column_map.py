"""A datasource's columnMap ({source column: name used in trainings}): which source column a name in a training reads.
One rule for the api, which refuses a map it could not follow, and the worker, which follows it."""

from __future__ import annotations

from shared.errors import InvalidInput


def check_column_map(column_map: dict[str, str]) -> None:
    """Two source columns renamed to one name would leave that name meaning either: refused, naming both."""
    seen: dict[str, str] = {}
    for original, name in column_map.items():
        if name in seen:
            raise InvalidInput(
                f"columnMap renames both {seen[name]!r} and {original!r} to {name!r}; a name stands for one column",
                field="columnMap",
            )
        seen[name] = original


def source_columns(column_map: dict[str, str], names: list[str]) -> dict[str, str]:
    """Each name's source column: the one columnMap renames to it, else the source column of that name. A source
    column the map renames is read only by its new name: with {"FAULT": "machine_failure"} the name FAULT would
    otherwise read the target as a feature, and with {"a": "b"} features a and b would both read a."""
    check_column_map(column_map)
    originals = {name: original for original, name in column_map.items()}
    renamed = [name for name in names if name not in originals and name in column_map]
    if renamed:
        raise InvalidInput(
            "; ".join(f"column {name!r} is renamed by columnMap to {column_map[name]!r}" for name in renamed)
            + ": a renamed column is read only by its new name",
            field="columnMap",
        )
    return {name: originals.get(name, name) for name in names}
