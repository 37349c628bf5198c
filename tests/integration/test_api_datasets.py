"""Dataset uploads: CSV and Parquet in, clear 4xx for bad files, nothing stored for a refused upload."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from shared.layout import dataset_key
from shared.settings import Settings
from shared.storage import open_object_store
from tests.integration.conftest import OrgKeys, upload

CSV = b"timestamp,temperature,pressure,failed\n2024-01-01T00:00:00Z,70.5,1.2,0\n2024-01-02T00:00:00Z,71.0,1.3,1\n"


def test_a_csv_upload_reports_rows_and_typed_columns_and_is_stored_as_parquet(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    response = upload(api, org, CSV, timestampColumn="timestamp")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["rows"] == 2
    assert [c["name"] for c in body["columns"]] == ["timestamp", "temperature", "pressure", "failed"]
    assert [c["numeric"] for c in body["columns"]] == [False, True, True, True]
    assert body["timestampColumn"] == "timestamp"
    stored = open_object_store(settings).get_bytes(dataset_key(org.org_id, body["datasetId"]))
    table = pq.read_table(io.BytesIO(stored))
    assert table.num_rows == 2 and str(table.schema.field("timestamp").type) == "timestamp[us, tz=UTC]"


def test_a_parquet_upload_is_accepted(api: TestClient, org: OrgKeys) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "y": [0, 1, 0]}), sink)
    response = upload(api, org, sink.getvalue(), name="data.parquet")
    assert response.status_code == 201, response.text
    assert response.json()["rows"] == 3


def test_an_empty_file_is_refused_and_nothing_is_stored(api: TestClient, org: OrgKeys, settings: Settings) -> None:
    response = upload(api, org, b"")
    assert response.status_code == 422
    assert response.json() == {"error": "the uploaded file is empty", "field": "file", "status": 422}
    assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/") == []


def test_a_header_without_rows_is_refused(api: TestClient, org: OrgKeys) -> None:
    response = upload(api, org, b"a,b,y\n")
    assert response.status_code == 422
    assert "no rows" in response.json()["error"]


def test_ragged_csv_is_refused_with_the_parser_reason(api: TestClient, org: OrgKeys) -> None:
    response = upload(api, org, b"a,b\n1,2\n3,4,5\n")
    assert response.status_code == 422
    assert response.json()["field"] == "file" and "CSV" in response.json()["error"]


def test_a_timestamp_column_that_is_not_a_column_is_named(api: TestClient, org: OrgKeys) -> None:
    response = upload(api, org, CSV, timestampColumn="time")
    assert response.status_code == 422
    assert response.json()["field"] == "timestampColumn"


def test_a_timestamp_column_that_holds_no_timestamps_is_named(api: TestClient, org: OrgKeys) -> None:
    response = upload(api, org, CSV, timestampColumn="temperature")
    assert response.status_code == 422
    assert response.json()["field"] == "timestampColumn"
    assert "not timestamps" in response.json()["error"]


def test_a_missing_file_field_is_named(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", data={"x": "1"}, headers=org.trainer)
    assert response.status_code == 422
    assert response.json()["field"] == "file"


def test_an_upload_over_the_size_limit_is_refused_with_413(settings: Settings, org_id: str) -> None:
    from services.api.app import create_app
    from tests.integration.conftest import create_org_with_keys

    small = settings.model_copy(update={"max_upload_mb": 1})
    with TestClient(create_app(small)) as api:
        org = create_org_with_keys(api, org_id)
        response = upload(api, org, b"a,y\n" + b"1.0,0\n" * 300_000)
    assert response.status_code == 413
    assert response.json()["field"] == "file"


def test_a_viewer_cannot_upload(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", files={"file": ("d.csv", CSV)}, headers=org.viewer)
    assert response.status_code == 403


def test_a_csv_whose_header_is_not_utf8_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    response = upload(api, org, b"a,\xe9\n1,2\n")
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "file"
    assert "not UTF-8" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/") == []


def test_a_timestamp_column_name_longer_than_200_characters_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    name = "t" * 201
    response = upload(api, org, CSV.replace(b"timestamp", name.encode(), 1), timestampColumn=name)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "timestampColumn"
    assert "at most 200 characters" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/") == []


def test_a_column_name_with_a_nul_character_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    response = upload(api, org, b"a,b\x00c\n1,2\n")
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "file"
    assert "NUL character" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/") == []


def test_a_file_name_with_a_nul_character_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    part = b'Content-Disposition: form-data; name="file"; filename="a\x00b.csv"\r\nContent-Type: text/csv\r\n\r\n'
    body = b"--zzz\r\n" + part + CSV + b"\r\n--zzz--\r\n"
    headers = {**org.trainer, "content-type": "multipart/form-data; boundary=zzz"}
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", content=body, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "file"
    assert "NUL character" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/") == []


def test_a_timestamp_column_mixing_text_with_and_without_a_zone_is_read_with_the_zones_and_utc(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    mixed = b"t,temperature\n2024-01-01T00:00:00+05:00,1\n2024-01-01 12:30:00,2\n2024-01-02T00:00:00Z,3\n"
    response = upload(api, org, mixed, timestampColumn="t")
    assert response.status_code == 201, response.text
    stored = open_object_store(settings).get_bytes(dataset_key(org.org_id, response.json()["datasetId"]))
    stamps = pq.read_table(io.BytesIO(stored)).column("t").to_pylist()
    assert [None if s is None else s.isoformat() for s in stamps] == [
        "2023-12-31T19:00:00+00:00",
        "2024-01-01T12:30:00+00:00",
        "2024-01-02T00:00:00+00:00",
    ]


def stored_stamps(settings: Settings, org: OrgKeys, dataset_id: str, column: str) -> list[str]:
    stored = open_object_store(settings).get_bytes(dataset_key(org.org_id, dataset_id))
    return [stamp.isoformat() for stamp in pq.read_table(io.BytesIO(stored)).column(column).to_pylist()]


def test_nanosecond_parquet_timestamps_are_kept_to_the_microsecond(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    """What pandas and time.time_ns() write: nanoseconds, which Kiln keeps to the microsecond, as it keeps all."""
    nanoseconds = [1_704_067_200_123_456_789, -1_000_000_001, 1_704_067_200_000_000_000]
    for zone in ("UTC", None):
        sink = io.BytesIO()
        stamps = pa.array(nanoseconds, type=pa.timestamp("ns", tz=zone))
        pq.write_table(pa.table({"ts": stamps, "a": [1.0, 2.0, 3.0]}), sink)
        response = upload(api, org, sink.getvalue(), name="data.parquet", timestampColumn="ts")
        assert response.status_code == 201, response.text
        assert response.json()["columns"][0]["type"] == "timestamp[us, tz=UTC]"
        assert stored_stamps(settings, org, response.json()["datasetId"], "ts") == [
            "2024-01-01T00:00:00.123456+00:00",
            "1969-12-31T23:59:58.999999+00:00",
            "2024-01-01T00:00:00+00:00",
        ]


def test_iso_text_with_nanoseconds_is_kept_to_the_microsecond(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    for texts in (
        ["2024-01-01T00:00:00.123456789Z", "2024-01-01T05:30:00.000000999+05:30"],
        ["2024-01-01T00:00:00.123456789", "2024-01-01T00:00:00.000000999"],
        ["2024-01-01T00:00:00.123456789Z", "2024-01-01T00:00:00.000000999"],
    ):
        csv = "t,a\n" + "".join(f"{text},1\n" for text in texts)
        response = upload(api, org, csv.encode(), timestampColumn="t")
        assert response.status_code == 201, response.text
        assert stored_stamps(settings, org, response.json()["datasetId"], "t") == [
            "2024-01-01T00:00:00.123456+00:00",
            "2024-01-01T00:00:00+00:00",
        ]


def parquet(column: pa.Array) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"ts": column, "a": pa.array([1.0] * len(column))}), sink)
    return sink.getvalue()


def csv(*stamps: str) -> bytes:
    return ("ts,a\n" + "".join(f"{stamp},1\n" for stamp in stamps)).encode()


@pytest.mark.parametrize(
    ("name", "content", "row", "words"),
    [
        # Text with and without zones, read value by value: the zone takes the instant out of datetime's range.
        ("mixed.csv", csv("2024-01-01T00:00:00", "0001-01-01T00:00:00+05:00"), 2, "('0001-01-01T00:00:00+05:00')"),
        ("mixed.csv", csv("2024-01-01T00:00:00", "9999-12-31T23:59:59-05:00"), 2, "('9999-12-31T23:59:59-05:00')"),
        ("mixed.parquet", parquet(pa.array(["2024-01-01T00:00:00", "0001-01-01T00:00:00+05:00"])), 2, "+05:00"),
        # Timestamps Arrow converts itself (a CSV column all with zones is read as timestamps): into years 0 and
        # 10000, which were stored, and failed whatever read them back as datetimes.
        ("zoned.csv", csv("0001-01-01T00:00:00+05:00", "2024-01-01T00:00:00Z"), 1, "row 1 is outside"),
        ("stamps.parquet", parquet(pa.array([0, 253402300800], pa.timestamp("s", "UTC"))), 2, "row 2 is outside"),
    ],
)
def test_a_timestamp_outside_the_years_1_to_9999_in_utc_is_refused_naming_column_and_row_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings, name: str, content: bytes, row: int, words: str
) -> None:
    response = upload(api, org, content, name=name, timestampColumn="ts")

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "timestampColumn"
    assert f"timestampColumn 'ts': the value in row {row}" in response.json()["error"]
    assert "outside the years 1 to 9999 in UTC" in response.json()["error"]
    assert words in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/") == []


def test_timestamps_at_the_first_and_last_instants_of_the_years_1_to_9999_are_kept(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    response = upload(
        api, org, csv("0001-01-01T05:00:00+05:00", "9999-12-31T23:59:59.999999", "2024-01-01"), timestampColumn="ts"
    )
    assert response.status_code == 201, response.text
    assert stored_stamps(settings, org, response.json()["datasetId"], "ts") == [
        "0001-01-01T00:00:00+00:00",
        "9999-12-31T23:59:59.999999+00:00",
        "2024-01-01T00:00:00+00:00",
    ]
