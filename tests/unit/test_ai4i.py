"""The AI4I generator: its columns, its statistics against the published dataset, and its failure rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from deploy.local import ai4i


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    table = ai4i.generate(200_000, seed=7)
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def test_columns_have_the_documented_types() -> None:
    table = ai4i.generate(10)

    assert table.schema == pa.schema(
        [
            ("timestamp", pa.timestamp("us", tz="UTC")),
            ("product_type", pa.string()),
            ("type_code", pa.float64()),
            ("air_temperature", pa.float64()),
            ("process_temperature", pa.float64()),
            ("rotational_speed", pa.float64()),
            ("torque", pa.float64()),
            ("tool_wear", pa.float64()),
            ("machine_failure", pa.int64()),
            ("failure_type", pa.string()),
        ]
    )
    assert set(ai4i.FEATURES) | {ai4i.TARGET} <= set(table.column_names)


def test_one_row_per_interval_from_start() -> None:
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    table = ai4i.generate(5, start=start, interval=timedelta(minutes=5))

    expected = [start + timedelta(minutes=5 * i) for i in range(5)]
    assert table["timestamp"].to_pylist() == expected


def test_a_naive_start_is_read_as_utc() -> None:
    table = ai4i.generate(1, start=datetime(2025, 3, 1))

    assert table["timestamp"].to_pylist() == [datetime(2025, 3, 1, tzinfo=UTC)]


@pytest.mark.parametrize(
    ("n_rows", "interval", "says"), [(0, timedelta(minutes=1), "n_rows"), (10, timedelta(0), "interval")]
)
def test_refuses_no_rows_or_a_non_positive_interval(n_rows: int, interval: timedelta, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        ai4i.generate(n_rows, interval=interval)


def test_the_seed_alone_decides_the_rows() -> None:
    assert ai4i.generate(1000, seed=3).equals(ai4i.generate(1000, seed=3))
    assert not ai4i.generate(1000, seed=3).equals(ai4i.generate(1000, seed=4))


def test_type_code_encodes_product_type_in_the_papers_shares(rows: dict[str, np.ndarray]) -> None:
    codes = {"L": 0.0, "M": 1.0, "H": 2.0}

    assert np.array_equal(rows["type_code"], [codes[kind] for kind in rows["product_type"]])
    shares = [np.mean(rows["product_type"] == kind) for kind in codes]
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.01)


def test_columns_match_the_published_dataset(rows: dict[str, np.ndarray]) -> None:
    """Published 10k rows: air 300.0 +- 2.0 K, process 310.0 +- 1.48 K, 1538 +- 179 rpm, 40 +- 10 Nm."""
    assert rows["air_temperature"].mean() == pytest.approx(300.0, abs=0.05)
    assert rows["air_temperature"].std() == pytest.approx(2.0, abs=0.05)
    assert rows["process_temperature"].mean() == pytest.approx(310.0, abs=0.05)
    assert rows["process_temperature"].std() == pytest.approx(1.48, abs=0.05)
    assert rows["rotational_speed"].mean() == pytest.approx(1538, abs=10)
    assert rows["rotational_speed"].std() == pytest.approx(179, abs=10)
    assert np.corrcoef(rows["rotational_speed"], rows["torque"])[0, 1] == pytest.approx(-0.88, abs=0.03)
    assert rows["torque"].mean() == pytest.approx(40, abs=0.2)
    assert rows["torque"].min() >= 0.0


def test_failure_rate_is_near_the_published_three_point_four_percent(rows: dict[str, np.ndarray]) -> None:
    assert 0.030 <= rows["machine_failure"].mean() <= 0.045
    assert np.array_equal(rows["machine_failure"] == 1, rows["failure_type"] != "none")


def test_each_failure_type_obeys_its_rule_and_the_first_rule_wins(rows: dict[str, np.ndarray]) -> None:
    heat = (rows["process_temperature"] - rows["air_temperature"] < 8.6) & (rows["rotational_speed"] < 1380)
    power_w = rows["torque"] * rows["rotational_speed"] * 2 * np.pi / 60
    power = (power_w < 3500) | (power_w > 9000)
    strain_limit = np.array([11_000, 12_000, 13_000])[rows["type_code"].astype(int)]
    strain = rows["tool_wear"] * rows["torque"] > strain_limit
    kind = rows["failure_type"]

    assert heat[kind == "HDF"].all()
    assert (power & ~heat)[kind == "PWF"].all()
    assert (strain & ~heat & ~power)[kind == "OSF"].all()
    assert not (heat | power | strain)[(kind == "none") | (kind == "RNF")].any()
    assert np.all((rows["tool_wear"][kind == "TWF"] >= 200) & (rows["tool_wear"][kind == "TWF"] < 245))
    assert np.mean(kind == "RNF") == pytest.approx(0.001, abs=0.0005)


def test_tool_wear_grows_by_product_type_until_a_200_to_240_minute_limit(rows: dict[str, np.ndarray]) -> None:
    wear, code = rows["tool_wear"], rows["type_code"].astype(int)
    step = np.diff(wear)
    replaced = step < 0

    assert wear[0] == 0.0
    assert np.array_equal(step[~replaced], np.array([2.0, 3.0, 5.0])[code[:-1]][~replaced])
    assert np.all(wear[1:][replaced] == 0.0)
    assert np.all((wear[:-1][replaced] >= 200) & (wear[:-1][replaced] < 245))


def test_written_files_read_back_unchanged(tmp_path: Path) -> None:
    table = ai4i.generate(100)

    ai4i.write_parquet(table, tmp_path / "rows.parquet")
    ai4i.write_csv(table, tmp_path / "rows.csv")

    assert pq.read_table(tmp_path / "rows.parquet").equals(table)
    from_csv = pa_csv.read_csv(tmp_path / "rows.csv")
    assert from_csv["timestamp"].to_pylist() == table["timestamp"].to_pylist()
    assert from_csv["torque"].to_pylist() == table["torque"].to_pylist()
    assert from_csv["failure_type"].to_pylist() == table["failure_type"].to_pylist()


def test_a_million_rows_can_be_generated() -> None:
    table = ai4i.generate(1_000_000)

    assert table.num_rows == 1_000_000
