"""From a dataset file to the arrays a model is trained and checked on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.column_kinds import is_label, is_numeric
from shared.errors import InvalidInput
from shared.schemas import MAX_CLASS_LENGTH, ClassValue, same_class


@dataclass(frozen=True)
class TrainingData:
    """Rows ready for LightGBM and ONNX alike.

    `features` is float32 because that is what the ONNX model is fed: training on the very values it
    will see is what lets the exported model decide exactly as the booster does. `labels` index into
    `classes`, the target's original values in sorted order, but for a binary target's named positive class,
    which comes second (with_positive_class).
    """

    features: np.ndarray
    labels: np.ndarray
    classes: list[ClassValue]
    feature_columns: list[str]


def load_training_data(
    path: Path,
    *,
    feature_columns: list[str],
    target_column: str,
    timestamp_column: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> TrainingData:
    """Read only the named columns of a Parquet file, keeping rows with start <= timestamp <= end.

    Naive start and end are taken as UTC, and so are the values of a timestamp column without a zone.
    Missing feature values become NaN, which LightGBM and ONNX both treat as missing.
    """
    schema = pq.read_schema(path)
    _check_columns(schema, feature_columns, target_column)
    row_filter = None
    if start is not None or end is not None:
        if timestamp_column is None:
            raise InvalidInput("a date range needs a timestamp column, and this dataset has none", field="dataRange")
        row_filter = _in_range(_timestamp_type(schema, timestamp_column), timestamp_column, start, end)
    table = pq.read_table(path, columns=[*feature_columns, target_column], filters=row_filter)
    if table.num_rows == 0:
        where = "" if row_filter is None else " in the requested range"
        raise InvalidInput(f"the dataset has no rows{where}", field="dataRange")
    labels, classes = _encode_target(table[target_column], target_column)
    return TrainingData(
        features=_feature_matrix(table, feature_columns),
        labels=labels,
        classes=classes,
        feature_columns=list(feature_columns),
    )


def split_holdout(data: TrainingData, fraction: float, *, seed: int = 0) -> tuple[TrainingData, TrainingData]:
    """(train, holdout), stratified by class: exactly ceil(fraction * rows) held out, each class's share of them
    by largest remainder, and a class of 2+ rows on both sides when the totals allow; the same for a seed."""
    n_rows = data.labels.shape[0]
    n_holdout = holdout_rows(fraction, n_rows)
    if not 0 < fraction < 1 or n_holdout >= n_rows:
        raise InvalidInput(
            f"cannot hold out {fraction:g} of {n_rows} rows and keep rows to train on", field="validationSplit"
        )
    counts = np.bincount(data.labels, minlength=len(data.classes))
    # The rows shuffled, then grouped by class: each class's first rows in that order are the ones held out.
    order = np.random.default_rng(seed).permutation(n_rows)
    grouped = order[np.argsort(data.labels[order], kind="stable")]
    grouped_labels = data.labels[grouped]
    rank_in_class = np.arange(n_rows) - (np.cumsum(counts) - counts)[grouped_labels]
    held_out = np.zeros(n_rows, dtype=bool)
    held_out[grouped[rank_in_class < _holdout_counts(counts, n_holdout)[grouped_labels]]] = True
    return _subset(data, ~held_out), _subset(data, held_out)


def holdout_rows(fraction: float, n_rows: int) -> int:
    """How many of n_rows split_holdout holds out."""
    return math.ceil(fraction * n_rows)


def _holdout_counts(counts: np.ndarray, n_holdout: int) -> np.ndarray:
    """Rows of each class to hold out: its share of n_holdout by largest remainder (ties to the earlier class),
    then moved a row at a time so that a class of 2+ rows keeps one on each side where another class can give."""
    n_rows = int(counts.sum())
    held = counts * n_holdout // n_rows
    remainders = counts * n_holdout % n_rows
    held[np.argsort(-remainders, kind="stable")[: n_holdout - int(held.sum())]] += 1
    at_least = (counts >= 2).astype(np.int64)
    at_most = np.where(counts >= 2, counts - 1, counts)
    _raise_to(held, at_least)
    _lower_to(held, at_most)
    return held


def _raise_to(held: np.ndarray, at_least: np.ndarray) -> None:
    """Give each class under its minimum a row from the class with the most to spare, while one has some."""
    for short in np.flatnonzero(held < at_least):
        spare = held - at_least
        if spare.max() <= 0:
            return
        held[np.argmax(spare)] -= 1
        held[short] += 1


def _lower_to(held: np.ndarray, at_most: np.ndarray) -> None:
    """Pass a row of each class over its maximum to the class with the most room, while one has some."""
    for over in np.flatnonzero(held > at_most):
        room = at_most - held
        if room.max() <= 0:
            return
        held[np.argmax(room)] += 1
        held[over] -= 1


def with_positive_class(data: TrainingData, positive: ClassValue | None) -> TrainingData:
    """The classes ordered so that `positive` is the second: class 1 is the one a binary model's score, precision
    and recall are about. None keeps the sorted order, whose last class is then the positive one."""
    if positive is None:
        return data
    matches = [index for index, value in enumerate(data.classes) if same_class(value, positive)]
    if not matches:
        raise InvalidInput(
            f"positiveClass {positive!r} is not a value of the target column; its values are {data.classes}",
            field="positiveClass",
        )
    if len(data.classes) != 2 or matches[0] == 1:
        return data
    return TrainingData(
        features=data.features,
        labels=1 - data.labels,
        classes=[data.classes[1], data.classes[0]],
        feature_columns=data.feature_columns,
    )


def _check_columns(schema: pa.Schema, feature_columns: list[str], target_column: str) -> None:
    for name in feature_columns:
        column_type = _column_type(schema, name, field="featureColumns")
        if not is_numeric(column_type):
            raise _column_error(f"feature column {name!r} is {column_type}, not numeric", name, "featureColumns")
    target_type = _column_type(schema, target_column, field="targetColumn")
    if not is_label(target_type):
        raise _column_error(
            f"target column {target_column!r} is {target_type}; a target's classes are integers, floats, booleans "
            "or text",
            target_column,
            "targetColumn",
        )


def _column_type(schema: pa.Schema, name: str, *, field: str) -> pa.DataType:
    if name not in schema.names:
        raise _column_error(f"column {name!r} is not in the dataset", name, field)
    return schema.field(name).type


def _column_error(message: str, column: str, field: str) -> InvalidInput:
    return InvalidInput(message, field=field, detail={"column": column})


def _timestamp_type(schema: pa.Schema, name: str) -> pa.TimestampType:
    column_type = _column_type(schema, name, field="dataRange")
    if not pa.types.is_timestamp(column_type):
        raise _column_error(f"timestamp column {name!r} is {column_type}, not a timestamp", name, "dataRange")
    return column_type


def _in_range(
    column_type: pa.TimestampType, column: str, start: datetime | None, end: datetime | None
) -> pc.Expression:
    """start <= column <= end, compared at microseconds or finer so that no bound is truncated."""
    exact = pa.timestamp("ns" if column_type.unit == "ns" else "us", tz=column_type.tz)
    value = pc.field(column).cast(exact)
    bounds = []
    if start is not None:
        bounds.append(value >= pa.scalar(_as_utc(start), type=exact))
    if end is not None:
        bounds.append(value <= pa.scalar(_as_utc(end), type=exact))
    condition: pc.Expression = bounds[0] if len(bounds) == 1 else bounds[0] & bounds[1]
    return condition


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _encode_target(column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, list[ClassValue]]:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_float16(column.type):
        column = column.cast(pa.float32())  # exactly: no comparison takes halffloat
    _check_target_values(column, name)
    if pa.types.is_floating(column.type):
        # -0.0 == 0.0, yet unique() keeps both: they would be two classes of one value.
        column = pc.if_else(pc.equal(column, 0), pa.scalar(0.0, column.type), column)
    classes = pc.unique(column)
    classes = classes.take(pc.sort_indices(classes))
    if len(classes) < 2:
        raise _column_error(
            f"target column {name!r} needs at least 2 distinct values, found {len(classes)}", name, "targetColumn"
        )
    labels = pc.index_in(column, value_set=classes).to_numpy().astype(np.int64)
    return labels, classes.to_pylist()


def _check_target_values(column: pa.ChunkedArray, name: str) -> None:
    """Refuse values that would become classes no one meant: missing ones, infinities (a class that JSON stores as
    null), and empty text, which is what a CSV's empty cell of a text column is read as."""
    missing = column.null_count
    text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    if text:
        _check_text_classes(column, name)
    if pa.types.is_floating(column.type):
        missing += _count(pc.is_nan(column))
        infinite = _count(pc.is_inf(column))
        if infinite:
            raise _column_error(
                f"target column {name!r} has {infinite} infinite values; classes must be finite", name, "targetColumn"
            )
    if text:
        missing += _count(pc.equal(column, ""))
    if missing:
        empty = " (empty text counts as missing)" if text else ""
        raise _column_error(f"target column {name!r} has {missing} missing values{empty}", name, "targetColumn")


def _check_text_classes(column: pa.ChunkedArray, name: str) -> None:
    """Refuse text that no version or prediction record could keep as a class: bytes that are not UTF-8 (a Parquet
    file may hold them), a NUL (which PostgreSQL refuses in text and JSON), or more than MAX_CLASS_LENGTH
    characters (a prediction record keeps its label in that many)."""
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        raise _column_error(f"target column {name!r} holds text that is not UTF-8", name, "targetColumn") from None
    with_nul = _count(pc.match_substring(column, "\x00"))
    if with_nul:
        raise _column_error(f"target column {name!r} has {with_nul} values holding a NUL", name, "targetColumn")
    too_long = _count(pc.greater(pc.utf8_length(column), MAX_CLASS_LENGTH))
    if too_long:
        raise _column_error(
            f"target column {name!r} has {too_long} values over {MAX_CLASS_LENGTH} characters; a prediction record "
            f"keeps its label in {MAX_CLASS_LENGTH}",
            name,
            "targetColumn",
        )


def _count(matches: pa.ChunkedArray) -> int:
    return int(pc.sum(matches).as_py() or 0)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _feature_matrix(table: pa.Table, feature_columns: list[str]) -> np.ndarray:
    """Each column via float64, so float32 rounding happens once, in numpy, as it will at serving time."""
    matrix = np.empty((table.num_rows, len(feature_columns)), dtype=np.float32)
    for index, name in enumerate(feature_columns):
        values = pc.cast(table[name], pa.float64(), safe=False).to_numpy()
        _refuse_beyond_float32(values, name)
        matrix[:, index] = values
    return matrix


def _refuse_beyond_float32(values: np.ndarray, name: str) -> None:
    """The model runs on float32 and the predictor refuses a value beyond its range: such a value would become an
    infinity here, and the model be trained and judged on rows it can never be asked about. NaN is a missing value."""
    beyond = int(np.count_nonzero(np.abs(values) > FLOAT32_MAX))
    if beyond:
        raise _column_error(
            f"feature column {name!r} has {beyond} values that are infinite or beyond float32's range (±3.4e38), "
            "which the model cannot take: leave them empty (a missing value) or scale the column",
            name,
            "featureColumns",
        )


def _subset(data: TrainingData, rows: np.ndarray) -> TrainingData:
    return TrainingData(
        features=data.features[rows],
        labels=data.labels[rows],
        classes=data.classes,
        feature_columns=data.feature_columns,
    )
