"""Reading an uploaded file into memory without letting it take more than a bound there.

A Parquet file's size says little of what it holds once read: run-length and dictionary encoding store a value
repeated fifty million times, or a long text repeated on every row, in a few hundred kilobytes. So the bound is checked
before the values are decoded: fixed-width columns from the row count, text columns batch by batch from the
lengths of the values their rows point to.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.errors import PayloadTooLarge

MIB = 1024 * 1024
BATCH_ROWS = 1_048_576


def refuse_larger_than(table: pa.Table, max_bytes: int) -> None:
    """For a table read whole, such as a CSV file's: its values are written out in the file, which the upload limit
    bounds, so they are measured once read. Only once its names are known to be UTF-8: Arrow decodes them to measure
    it."""
    size = table.nbytes
    if size > max_bytes:
        raise _too_large(size, max_bytes)


def read_parquet(upload: Path, *, max_bytes: int) -> pa.Table:
    schema = pq.ParquetFile(upload).schema_arrow
    text = [field.name for field in schema if _is_text(field.type)]
    parquet = pq.ParquetFile(upload, read_dictionary=text)
    fixed = parquet.metadata.num_rows * sum(_row_bytes(field.type) for field in schema)
    if fixed > max_bytes:
        raise _too_large(fixed, max_bytes)
    return pa.Table.from_batches(list(_decoded_batches(parquet, schema, max_bytes)), schema=schema)


def _decoded_batches(parquet: pq.ParquetFile, schema: pa.Schema, max_bytes: int) -> Iterator[pa.RecordBatch]:
    """The file's batches with their text columns decoded, each only once the bytes read so far, with it, are
    within `max_bytes`."""
    read = 0
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
        read += sum(_decoded_bytes(column) for column in batch.columns)
        if read > max_bytes:
            raise _too_large(read, max_bytes)
        columns = [_decoded(column, field.type) for column, field in zip(batch.columns, schema, strict=True)]
        yield pa.RecordBatch.from_arrays(columns, schema=schema)


def _decoded_bytes(column: pa.Array) -> int:
    """What the column takes once its text is decoded, found from its dictionary without decoding it."""
    if not isinstance(column, pa.DictionaryArray) or not _is_text(column.dictionary.type):
        return int(column.nbytes)
    lengths = pc.take(pc.binary_length(column.dictionary), column.indices)
    values = pc.sum(lengths).as_py() or 0
    kind = column.dictionary.type
    offset = 8 if pa.types.is_large_string(kind) or pa.types.is_large_binary(kind) else 4
    return int(values) + len(column) * offset


def _decoded(column: pa.Array, kind: pa.DataType) -> pa.Array:
    if isinstance(column, pa.DictionaryArray) and not pa.types.is_dictionary(kind):
        return column.dictionary_decode()
    return column


def _row_bytes(kind: pa.DataType) -> float:
    """The bytes a row takes in a column of fixed width (a bit for a boolean); 0 for others, measured as read."""
    try:
        return int(kind.bit_width) / 8
    except ValueError:  # variable width: text, lists, structs
        return 0


def _is_text(kind: pa.DataType) -> bool:
    return any(
        test(kind)
        for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    )


def _too_large(size: int | float, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the file takes more than {max_bytes // MIB:,} MB in memory once read (KILN_MAX_DATASET_MB): at least "
        f"{-(-int(size) // MIB):,} MB; split it into smaller datasets",
        field="file",
    )
