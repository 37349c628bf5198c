"""Dataset uploads: CSV and Parquet in, clear 4xx for bad files, nothing stored for a refused upload; every
upload audited. Erasure: the object leaves the store, the row stays as a tombstone nothing reads from again."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from deploy.local import ai4i
from services.api.app import create_app
from services.trainer import runs
from services.trainer.context import WorkerContext
from services.trainer.training import run_training
from shared.db.session import make_session_factory
from shared.errors import TransientError
from shared.layout import dataset_key
from shared.settings import Settings
from shared.storage import ObjectStore, open_object_store
from tests.integration.conftest import (
    ADMIN,
    API_CONNECTIONS,
    OrgKeys,
    config,
    create_org_with_keys,
    held_at_the_store,
    run_of,
    submit,
    upload,
    upload_table,
)
from tests.integration.dataset_support import CSV
from tests.support.seed import seed_version


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


def test_a_damaged_parquet_file_is_refused_with_the_parser_reason_and_no_server_path(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "y": [0, 1, 0]}), sink)
    damaged = sink.getvalue()[:4] + sink.getvalue()[-8:]  # the magic, and a footer claiming what is not there

    response = upload(api, org, damaged, name="data.parquet")

    assert_refused_storing_nothing(api, org, settings, response, field="file", words="not readable Parquet")
    assert response.json()["error"].startswith(
        "the file is not readable Parquet: Parquet file size is 12 bytes, smaller than the size reported by footer's"
    )
    assert "/" not in response.json()["error"]


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


@pytest.mark.parametrize(("header", "named"), [(b"a,b,a,b\n", "'a', 'b'"), (b"a,b,a\n", "'a'")])
def test_repeated_column_names_are_refused_quoting_each_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings, header: bytes, named: str
) -> None:
    response = upload(api, org, header + b"1,2" + b",3" * (header.count(b",") - 1) + b"\n")
    assert_refused_storing_nothing(api, org, settings, response, field="file", words=f"more than once: {named}")


@pytest.mark.parametrize(
    ("header", "words"),
    [(b",x,y\n", "the file's column 1 has no name"), (b"a,,b,\n", "the file's columns 2, 4 have no name")],
)
def test_a_column_without_a_name_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings, header: bytes, words: str
) -> None:
    """Stored with an empty name, the column could be neither a training's target nor a V2 tensor's name."""
    response = upload(api, org, header + b"1" + b",2" * header.count(b",") + b"\n")
    assert_refused_storing_nothing(api, org, settings, response, field="file", words=words)


def test_a_form_with_two_file_parts_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    files = [("file", ("a.csv", CSV, "text/csv")), ("file", ("b.csv", CSV, "text/csv"))]
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", files=files, headers=org.trainer)
    assert_refused_storing_nothing(api, org, settings, response, field="file", words="2 file parts")


@pytest.mark.parametrize(
    ("field", "words"),
    [
        ("timestamp_column", "unknown form field 'timestamp_column' (did you mean 'timestampColumn'?)"),
        ("ts", "unknown form field 'ts'; an upload takes only file and timestampColumn"),
    ],
)
def test_an_unknown_form_field_is_refused_naming_it_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings, field: str, words: str
) -> None:
    """FastAPI drops the fields a route does not name: a mistyped timestampColumn stored the dataset without it."""
    response = upload(api, org, CSV, **{field: "timestamp"})
    assert_refused_storing_nothing(api, org, settings, response, field=field, words=words)


def test_a_timestamp_column_given_twice_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    """FastAPI takes the last of a repeated field: the first, which the client may mean, went unsaid."""
    files = {"file": ("a.csv", CSV, "text/csv")}
    data = {"timestampColumn": ["timestamp", "temperature"]}
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", files=files, data=data, headers=org.trainer)
    words = "the form gives timestampColumn 2 times; give it once"
    assert_refused_storing_nothing(api, org, settings, response, field="timestampColumn", words=words)


# Starlette closes a part's temporary file when the form is closed or its parsing fails, and neither reaches the
# part that never ended: it is closed when collected, as the request ends, with a ResourceWarning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_form_cut_off_inside_its_file_part_has_no_file_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    part = b'Content-Disposition: form-data; name="file"; filename="a.csv"\r\nContent-Type: text/csv\r\n\r\n'
    headers = {**org.trainer, "content-type": "multipart/form-data; boundary=zzz"}
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", content=b"--zzz\r\n" + part + CSV, headers=headers)
    assert_refused_storing_nothing(api, org, settings, response, field="file", words="required")


def test_a_viewer_sending_two_file_parts_is_refused_for_the_role_first(api: TestClient, org: OrgKeys) -> None:
    files = [("file", ("a.csv", CSV, "text/csv")), ("file", ("b.csv", CSV, "text/csv"))]
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", files=files, headers=org.viewer)
    assert response.status_code == 403


def test_a_timestamp_column_that_is_not_a_column_is_named(api: TestClient, org: OrgKeys) -> None:
    response = upload(api, org, CSV, timestampColumn="time")
    assert response.status_code == 422
    assert response.json()["field"] == "timestampColumn"


def test_a_timestamp_column_that_holds_no_timestamps_is_named(api: TestClient, org: OrgKeys) -> None:
    response = upload(api, org, CSV, timestampColumn="temperature")
    assert response.status_code == 422
    assert response.json()["field"] == "timestampColumn"
    assert "not timestamps" in response.json()["error"]


@pytest.mark.parametrize(("empty", "words"), [(1, "has 1 empty value"), (2, "has 2 empty values")])
def test_empty_timestamps_are_counted_in_words(api: TestClient, org: OrgKeys, empty: int, words: str) -> None:
    rows = ["2024-01-01T00:00:00Z,1.0", *[",2.0"] * empty]
    content = "\n".join(["time,temperature", *rows]).encode()

    response = upload(api, org, content, timestampColumn="time")

    assert response.json() == {"error": f"timestampColumn 'time' {words}", "field": "timestampColumn", "status": 422}


def test_a_missing_file_field_is_named(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", data={"timestampColumn": "t"}, headers=org.trainer)
    assert response.status_code == 422
    assert response.json()["field"] == "file"


def test_a_file_field_sent_as_text_is_refused_saying_to_send_a_file_part(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    """`curl -F 'file=ts,x'` (no @) sends text where the file goes: the api said `Expected UploadFile, received:
    <class 'str'>`."""
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", files={"file": (None, "ts,x")}, headers=org.trainer)
    words = "file must be a file part of a multipart form (curl -F file=@path)"
    assert_refused_storing_nothing(api, org, settings, response, field="file", words=words)


def test_an_upload_over_the_size_limit_is_refused_with_413(settings: Settings, org_id: str) -> None:
    small = settings.model_copy(update={"max_upload_mb": 1})
    with TestClient(create_app(small)) as api:
        org = create_org_with_keys(api, org_id)
        response = upload(api, org, b"a,y\n" + b"1.0,0\n" * 300_000)
    assert response.status_code == 413
    assert response.json()["field"] == "file"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


@pytest.mark.parametrize(
    ("what", "table"),
    [
        # run-length encoded: 2.5M zeros in a few kilobytes, 20 MB once read
        ("a number repeated", pa.table({"a": pa.array(np.zeros(2_500_000)), "y": pa.array(np.zeros(2_500_000))})),
        # dictionary encoded: a 10 kB text on every row, 4 bytes a row in the file, 20 MB once read
        ("a long text repeated", pa.table({"a": pa.array(["x" * 10_000] * 2_000), "y": list(range(2_000))})),
    ],
)
def test_a_parquet_file_that_decodes_past_the_dataset_limit_is_refused_with_413_storing_nothing(
    settings: Settings, org_id: str, what: str, table: pa.Table
) -> None:
    """A few hundred kilobytes of Parquet held fifty million rows, 920 MB in the api's memory: the bound is on what
    the file takes once read, checked before its values are decoded."""
    content = parquet_bytes(table)
    assert len(content) < 200_000, what
    small = settings.model_copy(update={"max_dataset_mb": 10})
    with TestClient(create_app(small)) as api:
        org = create_org_with_keys(api, org_id)
        response = upload(api, org, content, name="data.parquet")
        assert response.status_code == 413, response.text
        assert response.json()["field"] == "file"
        assert response.json()["error"].startswith("the file takes more than 10 MB in memory once read")
        assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/") == []


def test_a_csv_file_that_reads_past_the_dataset_limit_is_refused_with_413(settings: Settings, org_id: str) -> None:
    small = settings.model_copy(update={"max_dataset_mb": 1})
    with TestClient(create_app(small)) as api:
        org = create_org_with_keys(api, org_id)
        response = upload(api, org, b"a,y\n" + b"1,0\n" * 100_000)  # 400 kB of text, 1.6 MB of two int64 columns
        assert response.status_code == 413, response.text
        assert response.json()["field"] == "file" and "more than 1 MB in memory" in response.json()["error"]


def test_a_parquet_file_within_the_dataset_limit_is_stored_as_written(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    written = pa.table(
        {"a": [1.5, None, 3.0], "site": ["north", None, "north"], "raw": [b"\x00", b"", None], "y": [0, 1, 0]}
    )
    response = upload(api, org, parquet_bytes(written), name="d.parquet")
    assert response.status_code == 201, response.text
    assert [c["type"] for c in response.json()["columns"]] == ["double", "string", "binary", "int64"]
    stored = open_object_store(settings).get_bytes(dataset_key(org.org_id, response.json()["datasetId"]))
    assert pq.read_table(io.BytesIO(stored)).equals(written)


def test_an_upload_sent_without_its_length_is_refused_once_past_the_limit_and_nothing_is_stored(
    settings: Settings, org_id: str
) -> None:
    """Sent chunked, with no length to check first, an upload is counted as it is read, and refused past the limit."""
    from services.api.app import create_app
    from tests.integration.conftest import create_org_with_keys

    boundary = "kilnboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.csv"\r\n\r\n'.encode()
    rows = [b"a,y\n"] + [b"1.0,0\n" * 50_000] * 6
    body = iter([head, *rows, f"\r\n--{boundary}--\r\n".encode()])
    small = settings.model_copy(update={"max_upload_mb": 1})
    with TestClient(create_app(small)) as api:
        org = create_org_with_keys(api, org_id)
        headers = {**org.trainer, "content-type": f"multipart/form-data; boundary={boundary}"}
        response = api.post(f"/v1/orgs/{org.org_id}/datasets", content=body, headers=headers)
        assert response.status_code == 413, response.text
        assert response.json()["field"] == "file" and "over 1 MB" in response.json()["error"]
        assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []


def test_an_upload_a_folder_store_cannot_write_is_a_503_and_registers_nothing(
    settings: Settings, org_id: str, tmp_path: Path
) -> None:
    """A folder store whose disk is full, or made read-only, refused the write with an OSError, answered as a 500."""
    folder = tmp_path / "objects"
    with TestClient(create_app(settings.model_copy(update={"object_store": f"file://{folder}"}))) as api:
        org = create_org_with_keys(api, org_id)
        (folder / "orgs" / org_id).mkdir(parents=True)
        (folder / "orgs" / org_id / "datasets").write_text("a file where the datasets' folder goes")

        response = upload(api, org, CSV)
        listed = api.get(f"/v1/orgs/{org_id}/datasets", headers=org.viewer).json()

    assert response.status_code == 503, response.text
    assert response.json()["error"].startswith(f"the object store cannot write orgs/{org_id}/datasets/ds_")
    assert response.json()["error"].endswith(": File exists") and str(tmp_path) not in response.text
    assert listed == []


def test_a_viewer_cannot_upload(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", files={"file": ("d.csv", CSV)}, headers=org.viewer)
    assert response.status_code == 403


def test_a_csv_whose_header_is_not_utf8_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    response = upload(api, org, b"a,\xe9\n1,2\n")
    assert_refused_storing_nothing(api, org, settings, response, field="file", words="not UTF-8")


def test_a_timestamp_column_name_longer_than_200_characters_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    name = "t" * 201
    response = upload(api, org, CSV.replace(b"timestamp", name.encode(), 1), timestampColumn=name)
    assert_refused_storing_nothing(
        api, org, settings, response, field="timestampColumn", words="at most 200 characters"
    )


def test_a_column_name_with_a_nul_character_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    response = upload(api, org, b"a,b\x00c\n1,2\n")
    assert_refused_storing_nothing(api, org, settings, response, field="file", words="NUL character")


@pytest.mark.parametrize(
    "column",
    [
        pa.array([{"x\x00y": 1}], type=pa.struct([("x\x00y", pa.int64())])),
        pa.array([0], type=pa.timestamp("us", tz="UTC\x00x")),
    ],
    ids=["nested-field-name", "zone"],
)
def test_a_column_type_with_a_nul_character_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings, column: pa.Array
) -> None:
    sink = io.BytesIO()
    pq.write_table(pa.table({"a": column, "b": [1]}), sink)
    response = upload(api, org, sink.getvalue(), name="data.parquet")
    assert_refused_storing_nothing(
        api, org, settings, response, field="file", words="column types must not contain the NUL character"
    )


def test_parquet_timestamp_text_that_is_not_utf8_is_refused_naming_the_column_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    """Arrow's Parquet reader takes such text as it is; mixed zones have it read value by value, which failed."""
    sink = io.BytesIO()
    stamps = pa.table({"ts": ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00", "QQQQ"], "b": [1, 2, 3]})
    pq.write_table(stamps, sink, compression="none", use_dictionary=False, store_schema=False)
    content = sink.getvalue().replace(b"QQQQ", b"\xff\xfe\xff\xfe")
    response = upload(api, org, content, name="data.parquet", timestampColumn="ts")
    assert_refused_storing_nothing(
        api, org, settings, response, field="timestampColumn", words="holds values that are not timestamps"
    )


def test_a_file_name_with_a_nul_character_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings
) -> None:
    part = b'Content-Disposition: form-data; name="file"; filename="a\x00b.csv"\r\nContent-Type: text/csv\r\n\r\n'
    body = b"--zzz\r\n" + part + CSV + b"\r\n--zzz--\r\n"
    headers = {**org.trainer, "content-type": "multipart/form-data; boundary=zzz"}
    response = api.post(f"/v1/orgs/{org.org_id}/datasets", content=body, headers=headers)
    assert_refused_storing_nothing(api, org, settings, response, field="file", words="NUL character")


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


def audit_of(api: TestClient, org: OrgKeys, action: str) -> list[dict[str, Any]]:
    entries = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()
    return [entry for entry in entries if entry["action"] == action]


def key_id(api: TestClient, org: OrgKeys, role: str) -> str:
    keys = api.get(f"/v1/orgs/{org.org_id}/keys", headers=org.admin).json()
    return str(next(key["keyId"] for key in keys if key["role"] == role))


def test_an_upload_is_audited_with_the_key_its_rows_size_and_sha256(
    api: TestClient, org: OrgKeys, store: ObjectStore
) -> None:
    body = upload(api, org, CSV, timestampColumn="timestamp").json()

    [entry] = audit_of(api, org, "dataset.uploaded")
    stored = store.get_bytes(dataset_key(org.org_id, body["datasetId"]))
    assert (entry["actor"], entry["target"]) == (key_id(api, org, "trainer"), body["datasetId"])
    assert entry["detail"] == {"rows": 2, "sizeBytes": len(stored), "sha256": hashlib.sha256(stored).hexdigest()}


def test_uploads_waiting_on_a_slow_object_store_leave_other_orgs_requests_a_database_connection(
    api: TestClient, org: OrgKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = create_org_with_keys(api, org.org_id + "-other")

    def send() -> httpx2.Response:
        return upload(api, org, CSV, timestampColumn="timestamp")

    with held_at_the_store(api, monkeypatch, "put_file", send) as uploads:
        meanwhile = api.get(f"/v1/orgs/{other.org_id}", headers=other.viewer)

    assert meanwhile.status_code == 200, meanwhile.text
    assert [upload.result().status_code for upload in uploads] == [201] * API_CONNECTIONS
    assert len(api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json()) == API_CONNECTIONS


def test_an_upload_finishing_after_its_org_began_keeping_its_data_on_premises_is_refused_and_nothing_is_stored(
    api: TestClient, org: OrgKeys, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: ObjectStore = api.app.state.resources.store  # type: ignore[attr-defined]
    put_file = served.put_file

    def residency_changed_meanwhile(key: str, path: Path) -> None:
        local = api.patch(f"/v1/orgs/{org.org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN)
        assert local.status_code == 200, local.text
        put_file(key, path)

    monkeypatch.setattr(served, "put_file", residency_changed_meanwhile)
    response = upload(api, org, CSV, timestampColumn="timestamp")

    assert response.status_code == 409, response.text
    assert "dataResidency local" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/") == []
    assert audit_of(api, org, "dataset.uploaded") == []


def test_erasing_a_dataset_removes_its_object_and_keeps_its_row_as_a_tombstone(
    api: TestClient, org: OrgKeys, store: ObjectStore, engine: Engine
) -> None:
    dataset_id = upload(api, org, CSV, timestampColumn="timestamp").json()["datasetId"]
    key = dataset_key(org.org_id, dataset_id)
    stored = store.get_bytes(key)
    trained = seed_version(engine, org.org_id, dataset_id=dataset_id)
    url = f"/v1/orgs/{org.org_id}/datasets/{dataset_id}"

    erased = api.delete(url, headers=org.trainer)

    assert erased.status_code == 200, erased.text
    assert not store.exists(key) and store.list(f"orgs/{org.org_id}/datasets/") == []
    body = erased.json()
    assert body["datasetId"] == dataset_id and body["erasedAt"] is not None
    assert body["versionsKeepingRows"] == [trained]  # its held-out rows are a share of the dataset's
    tombstone = api.get(url, headers=org.viewer).json()
    assert tombstone["erasedAt"] == body["erasedAt"] and tombstone["rows"] == 2
    assert [d["erasedAt"] for d in api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json()] == [
        body["erasedAt"]
    ]
    [entry] = audit_of(api, org, "dataset.erased")
    assert (entry["actor"], entry["target"]) == (key_id(api, org, "trainer"), dataset_id)
    assert entry["detail"] == {
        "rows": 2,
        "sizeBytes": len(stored),
        "sha256": hashlib.sha256(stored).hexdigest(),
        "versionsKeepingRows": [trained],
    }
    again = api.delete(url, headers=org.admin)  # finishes what a store outage cut short; changes nothing else
    assert again.status_code == 200 and again.json()["erasedAt"] == body["erasedAt"]
    assert len(audit_of(api, org, "dataset.erased")) == 1


def test_a_submission_or_schedule_naming_an_erased_dataset_is_refused_naming_it(
    api: TestClient, org: OrgKeys, dataset_id: str
) -> None:
    assert api.delete(f"/v1/orgs/{org.org_id}/datasets/{dataset_id}", headers=org.trainer).status_code == 200

    submitted = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer)
    body = {"pattern": "0 2 * * 0", "trainingConfig": config(dataset_id)}
    scheduled = api.put(f"/v1/orgs/{org.org_id}/schedule", json=body, headers=org.admin)

    for refused, field in ((submitted, "datasetId"), (scheduled, "trainingConfig.datasetId")):
        assert refused.status_code == 409, refused.text
        assert refused.json()["field"] == field
        assert f"dataset {dataset_id} was erased" in refused.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/trainings", headers=org.viewer).json() == []
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).status_code == 404


def test_a_run_queued_before_its_dataset_was_erased_fails_saying_so_when_it_starts(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    dataset_id = upload_table(api, org, ai4i.generate(500, seed=5), tmp_path)
    run_id = submit(api, org, dataset_id)
    assert api.delete(f"/v1/orgs/{org.org_id}/datasets/{dataset_id}", headers=org.trainer).status_code == 200

    assert run_training(run_id, worker) == "failed"

    run = run_of(api, org, run_id)
    assert run["status"] == "failed" and run["attempts"] == 1
    assert run["error"].startswith(f"dataset {dataset_id} was erased at ")
    assert "Traceback" not in run["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json() == []


def test_a_dataset_a_running_run_reads_is_not_erased(
    api: TestClient, org: OrgKeys, dataset_id: str, store: ObjectStore, engine: Engine
) -> None:
    """Its rows would go on into the run's version (its held-out rows): the erasure waits for the run."""
    run_id = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer).json()["runId"]
    assert runs.claim_run(make_session_factory(engine), run_id, worker="test", lease_s=30) is not None

    refused = api.delete(f"/v1/orgs/{org.org_id}/datasets/{dataset_id}", headers=org.trainer)

    assert refused.status_code == 409, refused.text
    assert run_id in refused.json()["error"] and "cancel" in refused.json()["error"]
    assert store.exists(dataset_key(org.org_id, dataset_id))
    assert api.get(f"/v1/orgs/{org.org_id}/datasets/{dataset_id}", headers=org.viewer).json()["erasedAt"] is None
    assert audit_of(api, org, "dataset.erased") == []


def test_a_dataset_the_schedule_trains_on_is_not_erased(
    api: TestClient, org: OrgKeys, dataset_id: str, store: ObjectStore
) -> None:
    body = {"pattern": "0 2 * * 0", "trainingConfig": config(dataset_id)}
    assert api.put(f"/v1/orgs/{org.org_id}/schedule", json=body, headers=org.admin).status_code == 200

    refused = api.delete(f"/v1/orgs/{org.org_id}/datasets/{dataset_id}", headers=org.trainer)

    assert refused.status_code == 409, refused.text
    assert "schedule" in refused.json()["error"]
    assert store.exists(dataset_key(org.org_id, dataset_id))
    assert api.delete(f"/v1/orgs/{org.org_id}/schedule", headers=org.admin).status_code == 204
    assert api.delete(f"/v1/orgs/{org.org_id}/datasets/{dataset_id}", headers=org.trainer).status_code == 200


def test_a_dataset_is_erased_by_the_orgs_trainers_and_admins_only(
    api: TestClient, org: OrgKeys, dataset_id: str, store: ObjectStore, org_id: str
) -> None:
    url = f"/v1/orgs/{org.org_id}/datasets/{dataset_id}"
    other = create_org_with_keys(api, "x" + org_id)

    assert api.delete(url, headers=org.viewer).status_code == 403
    assert api.delete(url, headers=other.admin).status_code == 404
    assert api.delete(f"/v1/orgs/{other.org_id}/datasets/{dataset_id}", headers=other.admin).status_code == 404
    assert store.exists(dataset_key(org.org_id, dataset_id))
    assert api.delete(url, headers=ADMIN).status_code == 200
    assert not store.exists(dataset_key(org.org_id, dataset_id))


def test_an_erasure_the_object_store_cuts_short_leaves_the_dataset_erased_and_a_second_one_finishes_it(
    api: TestClient, org: OrgKeys, dataset_id: str, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: ObjectStore = api.app.state.resources.store  # type: ignore[attr-defined]
    url = f"/v1/orgs/{org.org_id}/datasets/{dataset_id}"

    def unreachable(key: str) -> None:
        raise TransientError("the object store at s3 is unreachable: connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(served, "delete", unreachable)
        cut_short = api.delete(url, headers=org.trainer)

    assert cut_short.status_code == 503, cut_short.text
    assert "is erased" in cut_short.json()["error"] and "DELETE it again to finish" in cut_short.json()["error"]
    assert api.get(url, headers=org.viewer).json()["erasedAt"] is not None
    refused = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer)
    assert refused.status_code == 409  # nothing reads it meanwhile
    assert store.exists(dataset_key(org.org_id, dataset_id))
    assert api.delete(url, headers=org.trainer).status_code == 200
    assert not store.exists(dataset_key(org.org_id, dataset_id))
    assert len(audit_of(api, org, "dataset.erased")) == 1


def assert_refused_storing_nothing(
    api: TestClient, org: OrgKeys, settings: Settings, response: httpx2.Response, *, field: str, words: str
) -> None:
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert words in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasets", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/") == []
