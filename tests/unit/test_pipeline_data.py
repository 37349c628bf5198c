"""Loading a Parquet dataset into training arrays, filtering it by date, and holding rows out."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deploy.local import ai4i
from services.trainer.pipeline.data import TrainingData, load_training_data, split_holdout, with_positive_class
from shared.errors import InvalidInput


def _not_utf8(values: list[str]) -> pa.Array:
    """Text as a Parquet file may hold it: bytes no UTF-8 reader accepts, written under a string type."""
    encoded = [value.encode("utf-8", "surrogateescape") for value in values]
    offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int32)
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)


def _write(tmp_path: Path, columns: dict[str, Any]) -> Path:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def test_features_are_float32_rows_and_the_target_becomes_sorted_classes(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "count": pa.array([3, 1, 2], pa.int32()),
            "ratio": [0.1, 0.2, 0.3],
            "flag": [True, False, True],
            "outcome": ["yes", "no", "yes"],
        },
    )

    data = load_training_data(path, feature_columns=["ratio", "flag", "count"], target_column="outcome")

    assert data.features.dtype == np.float32
    assert data.features.flags.c_contiguous
    np.testing.assert_array_equal(data.features, np.array([[0.1, 1, 3], [0.2, 0, 1], [0.3, 1, 2]], dtype=np.float32))
    assert data.classes == ["no", "yes"]
    assert data.labels.dtype == np.int64
    assert data.labels.tolist() == [1, 0, 1]
    assert data.feature_columns == ["ratio", "flag", "count"]


@pytest.mark.parametrize(
    ("target", "classes"),
    [([True, False], [False, True]), ([7, 3], [3, 7]), ([1.0, 0.0], [0.0, 1.0])],
)
def test_classes_are_the_original_values_as_json(tmp_path: Path, target: list[Any], classes: list[Any]) -> None:
    path = _write(tmp_path, {"x": [1.0, 2.0], "y": target})

    data = load_training_data(path, feature_columns=["x"], target_column="y")

    assert json.dumps(data.classes) == json.dumps(classes)


def test_missing_feature_values_become_nan(tmp_path: Path) -> None:
    path = _write(tmp_path, {"x": pa.array([1, None, 3], pa.int64()), "y": [0, 1, 0]})

    data = load_training_data(path, feature_columns=["x"], target_column="y")

    assert np.isnan(data.features[1, 0])
    assert data.features[[0, 2], 0].tolist() == [1.0, 3.0]


@pytest.mark.parametrize(
    ("columns", "features", "target", "field", "column", "says"),
    [
        ({"x": [1.0, 2.0], "y": [0, 1]}, ["x", "gone"], "y", "featureColumns", "gone", "not in the dataset"),
        ({"x": [1.0, 2.0], "y": [0, 1]}, ["x"], "gone", "targetColumn", "gone", "not in the dataset"),
        ({"x": ["a", "b"], "y": [0, 1]}, ["x"], "y", "featureColumns", "x", "not numeric"),
        ({"x": [1.0, 2.0], "y": [1, 1]}, ["x"], "y", "targetColumn", "y", "at least 2 distinct"),
        ({"x": [1.0, 2.0, 3.0], "y": [0, None, 1]}, ["x"], "y", "targetColumn", "y", "1 missing"),
        ({"x": [1.0, 2.0, 3.0], "y": [0.0, float("nan"), 1.0]}, ["x"], "y", "targetColumn", "y", "1 missing"),
        ({"x": [1.0, 2.0], "y": [[0], [1]]}, ["x"], "y", "targetColumn", "y", "integers, floats, booleans or text"),
    ],
)
def test_data_errors_name_the_column(
    tmp_path: Path,
    columns: dict[str, Any],
    features: list[str],
    target: str,
    field: str,
    column: str,
    says: str,
) -> None:
    path = _write(tmp_path, columns)

    with pytest.raises(InvalidInput, match=says) as raised:
        load_training_data(path, feature_columns=features, target_column=target)

    assert raised.value.field == field
    assert raised.value.to_payload()["column"] == column
    assert repr(column) in raised.value.message


@pytest.fixture
def ten_minute_rows(tmp_path: Path) -> tuple[Path, list[datetime], pa.Table]:
    table = ai4i.generate(1000, start=datetime(2024, 1, 1, tzinfo=UTC), interval=timedelta(minutes=10))
    path = tmp_path / "ai4i.parquet"
    ai4i.write_parquet(table, path)
    return path, table["timestamp"].to_pylist(), table


def _load_range(path: Path, start: datetime | None, end: datetime | None) -> TrainingData:
    return load_training_data(
        path,
        feature_columns=list(ai4i.FEATURES),
        target_column=ai4i.TARGET,
        timestamp_column="timestamp",
        start=start,
        end=end,
    )


def _feature_rows(table: pa.Table, rows: slice) -> np.ndarray:
    return np.column_stack([table[name].to_numpy()[rows] for name in ai4i.FEATURES]).astype(np.float32)


def test_a_date_range_keeps_exactly_the_rows_in_it_ends_included(
    ten_minute_rows: tuple[Path, list[datetime], pa.Table],
) -> None:
    path, stamps, table = ten_minute_rows

    data = _load_range(path, stamps[100], stamps[299])

    np.testing.assert_array_equal(data.features, _feature_rows(table, slice(100, 300)))


@pytest.mark.parametrize(
    ("start", "end", "rows"),
    [
        (timedelta(microseconds=1), None, slice(501, None)),
        (None, -timedelta(microseconds=1), slice(None, 500)),
    ],
)
def test_one_sided_ranges_exclude_a_row_a_microsecond_outside(
    ten_minute_rows: tuple[Path, list[datetime], pa.Table],
    start: timedelta | None,
    end: timedelta | None,
    rows: slice,
) -> None:
    path, stamps, table = ten_minute_rows

    data = _load_range(path, None if start is None else stamps[500] + start, None if end is None else stamps[500] + end)

    np.testing.assert_array_equal(data.features, _feature_rows(table, rows))


def test_naive_bounds_and_a_zoneless_second_resolution_column_are_utc(tmp_path: Path) -> None:
    stamps = [datetime(2024, 5, 1, hour) for hour in range(6)]
    path = _write(
        tmp_path,
        {"at": pa.array(stamps, pa.timestamp("s")), "x": [float(h) for h in range(6)], "y": [0, 1] * 3},
    )

    data = load_training_data(
        path,
        feature_columns=["x"],
        target_column="y",
        timestamp_column="at",
        start=datetime(2024, 5, 1, 1, 0, 0, 1),
        end=datetime(2024, 5, 1, 6, tzinfo=UTC) - timedelta(hours=2),
    )

    assert data.features[:, 0].tolist() == [2.0, 3.0, 4.0]


def test_an_empty_range_is_refused(ten_minute_rows: tuple[Path, list[datetime], pa.Table]) -> None:
    path, stamps, _ = ten_minute_rows

    with pytest.raises(InvalidInput, match="no rows") as raised:
        _load_range(path, stamps[-1] + timedelta(days=1), None)

    assert raised.value.field == "dataRange"


def test_a_range_without_a_timestamp_column_is_refused_rather_than_ignored(tmp_path: Path) -> None:
    path = _write(tmp_path, {"x": [1.0, 2.0], "y": [0, 1]})

    with pytest.raises(InvalidInput, match="needs a timestamp column") as raised:
        load_training_data(path, feature_columns=["x"], target_column="y", start=datetime(2024, 1, 1))

    assert raised.value.field == "dataRange"


def test_a_range_on_a_column_that_is_not_a_timestamp_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, {"day": ["2024-01-01", "2024-01-02"], "x": [1.0, 2.0], "y": [0, 1]})

    with pytest.raises(InvalidInput, match="'day' is string, not a timestamp"):
        load_training_data(
            path, feature_columns=["x"], target_column="y", timestamp_column="day", start=datetime(2024, 1, 1)
        )


def _labelled(labels: list[int]) -> TrainingData:
    features = np.arange(len(labels), dtype=np.float32).reshape(-1, 1)
    return TrainingData(features, np.array(labels, dtype=np.int64), [0, 1], ["row"])


def test_holdout_keeps_the_class_balance_and_splits_every_row_once() -> None:
    data = _labelled([1] * 50 + [0] * 950)

    train, holdout = split_holdout(data, 0.2, seed=0)

    assert holdout.labels.size == 200
    assert holdout.labels.sum() == 10
    rows = np.concatenate([train.features[:, 0], holdout.features[:, 0]])
    assert np.array_equal(np.sort(rows), data.features[:, 0])
    assert train.classes == holdout.classes == [0, 1]


def test_holdout_is_repeatable_by_seed() -> None:
    data = _labelled([1] * 50 + [0] * 950)

    first, again, other = (split_holdout(data, 0.2, seed=seed)[1] for seed in (1, 1, 2))

    assert np.array_equal(first.features, again.features)
    assert not np.array_equal(first.features, other.features)


def test_a_class_with_one_row_falls_back_to_a_plain_random_split() -> None:
    data = _labelled([1] + [0] * 99)

    train, holdout = split_holdout(data, 0.25)

    assert (train.labels.size, holdout.labels.size) == (75, 25)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.99])
def test_a_holdout_that_leaves_nothing_to_train_on_is_refused(fraction: float) -> None:
    with pytest.raises(InvalidInput) as raised:
        split_holdout(_labelled([0, 1, 0, 1]), fraction)

    assert raised.value.field == "validationSplit"


@pytest.mark.parametrize("rare", [0, 1])
def test_a_rare_class_is_held_out_whether_it_sorts_first_or_last(rare: int) -> None:
    data = _labelled([rare] * 3 + [1 - rare] * 997)

    train, holdout = split_holdout(data, 0.2)

    assert holdout.labels.size == 200
    assert (holdout.labels == rare).sum() == 1 and (train.labels == rare).sum() == 2


def test_each_class_gets_its_share_of_the_holdout_by_largest_remainder() -> None:
    # Shares of 10 held-out rows: 4.5, 3.5 and 2.0; the two halves go to the first classes in class order.
    data = TrainingData(
        np.zeros((20, 1), np.float32), np.array([0] * 9 + [1] * 7 + [2] * 4, np.int64), [0, 1, 2], ["x"]
    )

    train, holdout = split_holdout(data, 0.5, seed=3)

    assert np.bincount(holdout.labels, minlength=3).tolist() == [5, 3, 2]
    assert np.bincount(train.labels, minlength=3).tolist() == [4, 4, 2]


def test_a_class_of_two_rows_lands_on_both_sides_even_when_its_share_rounds_away() -> None:
    data = TrainingData(np.zeros((12, 1), np.float32), np.array([0] * 2 + [1] * 10, np.int64), [0, 1], ["x"])

    for fraction in (0.1, 0.8):
        train, holdout = split_holdout(data, fraction)
        assert (holdout.labels == 0).sum() == 1 and (train.labels == 0).sum() == 1
        assert holdout.labels.size == int(np.ceil(fraction * 12))


def _two_classes(classes: list[Any]) -> TrainingData:
    return TrainingData(np.zeros((3, 1), np.float32), np.array([0, 1, 1], np.int64), classes, ["x"])


def test_a_named_positive_class_becomes_class_one_with_the_labels_following() -> None:
    data = with_positive_class(_two_classes(["failure", "ok"]), "failure")

    assert data.classes == ["ok", "failure"]
    assert data.labels.tolist() == [1, 0, 0]


@pytest.mark.parametrize(("classes", "positive"), [(["failure", "ok"], "ok"), (["failure", "ok"], None)])
def test_the_class_sorting_last_stays_positive_when_named_or_not_named(classes: list[Any], positive: Any) -> None:
    data = with_positive_class(_two_classes(classes), positive)

    assert data.classes == classes and data.labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize(("classes", "positive"), [([False, True], 1), ([0, 1], True), ([1, 2], "1")])
def test_a_positive_class_is_matched_as_json_types_it_not_as_python_equality(classes: list[Any], positive: Any) -> None:
    with pytest.raises(InvalidInput, match="is not a value of the target column") as raised:
        with_positive_class(_two_classes(classes), positive)

    assert raised.value.field == "positiveClass"


def test_a_half_float_target_becomes_classes_of_its_values(tmp_path: Path) -> None:
    path = _write(tmp_path, {"x": [1.0, 2.0, 3.0], "y": pa.array(np.array([1.5, 0.0, 1.5], dtype=np.float16))})

    data = load_training_data(path, feature_columns=["x"], target_column="y")

    assert (json.dumps(data.classes), data.labels.tolist()) == ("[0.0, 1.5]", [1, 0, 1])


def test_minus_zero_and_zero_are_one_class(tmp_path: Path) -> None:
    path = _write(tmp_path, {"x": [1.0, 2.0, 3.0, 4.0], "y": [0.0, -0.0, 1.0, -0.0]})

    data = load_training_data(path, feature_columns=["x"], target_column="y")

    assert json.dumps(data.classes) == "[0.0, 1.0]"
    assert data.labels.tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ([0.0, float("inf"), 1.0, float("-inf")], "target column 'y' has 2 infinite values; classes must be finite"),
        (["ok", "", "fail", ""], "target column 'y' has 2 missing values (empty text counts as missing)"),
        (pa.array(["ok", "", "fail", None]).dictionary_encode(), "target column 'y' has 2 missing values"),
        (["ok", "a\x00b", "fail", "ok"], "target column 'y' has 1 values holding a NUL"),
        (["ok", "é" * 201, "fail", "é" * 200], "target column 'y' has 1 values over 200 characters"),
        (_not_utf8(["ok", "\udcff\udcfe", "fail", "ok"]), "target column 'y' holds text that is not UTF-8"),
    ],
)
def test_a_target_value_that_is_no_class_is_refused_naming_the_column(
    tmp_path: Path, target: list[Any] | pa.Array, says: str
) -> None:
    path = _write(tmp_path, {"x": [1.0, 2.0, 3.0, 4.0], "y": target})

    with pytest.raises(InvalidInput, match=re.escape(says)) as raised:
        load_training_data(path, feature_columns=["x"], target_column="y")

    assert raised.value.field == "targetColumn" and raised.value.detail == {"column": "y"}


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), 1e39, -3.5e38])
def test_a_feature_value_beyond_float32_is_refused_naming_the_column(tmp_path: Path, value: float) -> None:
    """It became an infinity, silently: a model trained and judged on rows the predictor refuses."""
    path = _write(tmp_path, {"x": [1.0, value, 3.0, float("nan")], "y": [0, 1, 0, 1]})

    with pytest.raises(InvalidInput, match=re.escape("feature column 'x' has 1 values that are infinite or beyond")):
        load_training_data(path, feature_columns=["x"], target_column="y")


def test_a_feature_at_float32s_largest_value_and_a_missing_one_are_kept(tmp_path: Path) -> None:
    largest = float(np.finfo(np.float32).max)
    path = _write(tmp_path, {"x": [largest, -largest, float("nan"), 1.0], "y": [0, 1, 0, 1]})

    features = load_training_data(path, feature_columns=["x"], target_column="y").features[:, 0]

    assert features[:2].tolist() == [largest, -largest] and np.isnan(features[2])
