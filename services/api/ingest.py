"""Turning an uploaded CSV or Parquet file into a checked Parquet dataset, or a clear reason why not."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from services.api.bounded_read import read_parquet, refuse_larger_than
from shared.column_kinds import is_label, is_numeric
from shared.errors import InvalidInput
from shared.schemas import NUL, holds_nul, repeated

PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class IngestedDataset:
    path: Path
    rows: int
    columns: list[dict[str, Any]]


def ingest(upload: Path, output: Path, *, timestamp_column: str | None, max_bytes: int) -> IngestedDataset:
    """Read the upload (refused once it takes more than `max_bytes` in memory), check it, normalise the timestamp
    column to UTC and write it as Parquet."""
    if upload.stat().st_size == 0:
        raise InvalidInput("the uploaded file is empty", field="file")
    table = _read(upload, max_bytes)
    if table.num_columns == 0:
        raise InvalidInput("the uploaded file has no columns", field="file")
    if table.num_rows == 0:
        raise InvalidInput("the uploaded file has a header but no rows", field="file")
    names = _column_names(table)
    _refuse_unnamed_columns(names)  # first: two unnamed columns are named twice too, which would say less
    _refuse_repeated_names(names)
    refuse_larger_than(table, max_bytes)
    if timestamp_column is not None:
        table = _with_utc_timestamps(table, timestamp_column)
    columns = [
        {"name": f.name, "type": str(f.type), "numeric": is_numeric(f.type), "label": is_label(f.type)}
        for f in table.schema
    ]
    if holds_nul(columns):  # a nested field's name or a zone, in a type stored in the dataset's row as a name is
        raise InvalidInput(f"the file's column types must not contain the NUL character {NUL!r}", field="file")
    pq.write_table(table, output, compression="zstd")
    return IngestedDataset(path=output, rows=table.num_rows, columns=columns)


def _read(upload: Path, max_bytes: int) -> pa.Table:
    with upload.open("rb") as handle:
        is_parquet = handle.read(4) == PARQUET_MAGIC
    try:
        return read_parquet(upload, max_bytes=max_bytes) if is_parquet else pacsv.read_csv(upload)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
        kind = "Parquet" if is_parquet else "CSV"
        # Arrow names the file it could not open: the api's temporary path, which is no business of the client's.
        reason = str(error).replace(str(upload), "the upload")
        raise InvalidInput(f"the file is not readable {kind}: {reason}", field="file") from None


def _column_names(table: pa.Table) -> list[str]:
    try:
        names = list(table.column_names)
    except UnicodeDecodeError:
        # Arrow keeps a CSV header as bytes until the names are asked for, so the reader did not refuse it.
        raise InvalidInput("the file's column names are not UTF-8 text", field="file") from None
    if holds_nul(names):  # the names are stored in the dataset's row, and PostgreSQL refuses NUL in JSONB
        raise InvalidInput(f"the file's column names must not contain the NUL character {NUL!r}", field="file")
    return names


def _refuse_repeated_names(names: list[str]) -> None:
    twice = repeated(names)
    if twice:
        raise InvalidInput(f"column names appear more than once: {', '.join(map(repr, twice))}", field="file")


def _refuse_unnamed_columns(names: list[str]) -> None:
    """A CSV header `,x,y` names its first column with empty text: stored so, it could be neither a training's
    target nor a V2 tensor's name, and nothing would say why."""
    unnamed = [str(position) for position, name in enumerate(names, start=1) if not name]
    if unnamed:
        where = f"column {unnamed[0]} has" if len(unnamed) == 1 else f"columns {', '.join(unnamed)} have"
        raise InvalidInput(f"the file's {where} no name; name every column in the header row", field="file")


def _with_utc_timestamps(table: pa.Table, name: str) -> pa.Table:
    if name not in table.column_names:
        raise InvalidInput(f"timestampColumn {name!r} is not a column of the file", field="timestampColumn")
    column = table.column(name)
    try:
        stamps = _to_utc(column)
        _refuse_outside_years(stamps)
    # UnicodeDecodeError: Arrow's Parquet reader takes text that is not UTF-8 as it is, and fails only to read it.
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, UnicodeDecodeError):
        raise InvalidInput(
            f"timestampColumn {name!r} holds values that are not timestamps; write them as ISO 8601, such as "
            "2024-01-31T12:00:00Z",
            field="timestampColumn",
        ) from None
    except OutsideYears as outside:
        text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        value = column[outside.index].as_py() if text else None
        quoted = "" if value is None else f" ({value!r})"
        raise InvalidInput(
            f"timestampColumn {name!r}: the value in row {outside.index + 1}{quoted} is outside the years 1 to 9999 "
            "in UTC",
            field="timestampColumn",
        ) from None
    if stamps.null_count:
        empty = "1 empty value" if stamps.null_count == 1 else f"{stamps.null_count} empty values"
        raise InvalidInput(f"timestampColumn {name!r} has {empty}", field="timestampColumn")
    return table.set_column(table.column_names.index(name), name, stamps)


class OutsideYears(Exception):
    """A timestamp whose instant in UTC is outside the years 1 to 9999: no datetime holds it, so reading the dataset
    back (or converting the text, an OverflowError) fails. `index` is its row's, from 0."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


UTC_MICROSECONDS = pa.timestamp("us", tz="UTC")
FIRST_INSTANT = pa.scalar(datetime.min.replace(tzinfo=UTC), type=UTC_MICROSECONDS)
LAST_INSTANT = pa.scalar(datetime.max.replace(tzinfo=UTC), type=UTC_MICROSECONDS)


def _refuse_outside_years(stamps: pa.ChunkedArray) -> None:
    """Arrow's own casts take years 0 and 10000 (what 0001-01-01T00:00:00+05:00 and 9999-12-31T23:00:00-05:00 are in
    UTC): those are refused here, as the value-by-value reading of mixed text refuses them."""
    outside = pc.or_(pc.less(stamps, FIRST_INSTANT), pc.greater(stamps, LAST_INSTANT))
    found = pc.indices_nonzero(pc.fill_null(outside, False))
    if len(found):
        raise OutsideYears(found[0].as_py())


def _to_utc(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Timestamps in UTC; text and values without a zone are read as UTC."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _text_to_utc(column)
    if pa.types.is_date(kind):
        column = pc.cast(column, pa.timestamp("us"))
    elif not pa.types.is_timestamp(kind):
        raise pa.ArrowInvalid(f"{kind} is not a timestamp type")
    if column.type.tz is None:
        column = pc.assume_timezone(column, "UTC")
    if column.type.unit == "ns":  # what pandas writes; the cast below refuses to drop the nanoseconds itself
        column = pc.floor_temporal(column, unit="microsecond")
    return pc.cast(column, pa.timestamp("us", tz="UTC"))


def _text_to_utc(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """ISO 8601 text: all with zones, all without (UTC), or a mix, which no one cast takes: then value by value."""
    utc = pa.timestamp("us", tz="UTC")
    column = _to_microseconds(column)
    try:
        return pc.cast(column, utc)
    except pa.ArrowInvalid:
        pass
    try:
        return pc.cast(pc.assume_timezone(pc.cast(column, pa.timestamp("us")), "UTC"), utc)
    except pa.ArrowInvalid:
        instants = [_instant(text, index) for index, text in enumerate(column.to_pylist())]
        return pa.chunked_array([pa.array(instants, type=utc)])


def _to_microseconds(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Text cut after the sixth fractional digit: Kiln keeps timestamps to the microsecond, and Arrow's cast refuses
    nanoseconds rather than drop them (cutting the text floors positive and negative instants alike)."""
    return pc.replace_substring_regex(column, pattern=r"(\.\d{6})\d+", replacement=r"\1")


def _instant(text: str | None, index: int) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise pa.ArrowInvalid(f"{text!r} is not a timestamp") from None
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:  # its zone takes it past year 1 or 9999 in UTC
        raise OutsideYears(index) from None
