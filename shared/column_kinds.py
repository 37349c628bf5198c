"""Which column types a training can use, by their Arrow type: the api judges an uploaded dataset's columns by these
at upload and the worker the rows it reads, so a run the api accepts does not fail on a column's type in the worker."""

from __future__ import annotations

import pyarrow as pa


def is_numeric(kind: pa.DataType) -> bool:
    """A feature: what becomes model input (decimals are read as floats)."""
    return bool(
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_decimal(kind)
    )


def is_label(kind: pa.DataType) -> bool:
    """A target: classes that are integers, floats, booleans or text, dictionary-encoded or not (a pandas category)."""
    if pa.types.is_dictionary(kind):
        return is_label(kind.value_type)
    return bool(
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    )
