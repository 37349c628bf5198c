"""Reading a plant's own database: only the columns and rows a run needs, renamed by columnMap, in chunks; a
clear reason when the database, the table or a column is not there."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Column, DateTime, Float, Integer, MetaData, String, Table, create_engine, insert, text
from sqlalchemy.engine import URL, make_url

from services.trainer import extract
from services.trainer.extract import extract_database
from services.trainer.runs import DatabaseSource
from shared.db.migrate import upgrade
from shared.errors import InvalidInput, TransientError
from shared.store_access import KILN_TABLES, StoreRules
from tests.support.servers import free_port, fresh_postgres_database, password_checking_postgres

START = datetime(2024, 1, 1, tzinfo=UTC)
COLUMN_MAP = {"TT_101": "temperature", "PT_7": "pressure"}
ORG = "plant-org"


def fill_scada_table(url: str, rows: int, *, aware: bool) -> None:
    """A SCADA historian's table: tag-named columns, one reading per minute, and a column Kiln never asks for."""
    engine = create_engine(url)
    table = Table(
        "readings",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("recorded_at", DateTime(timezone=aware)),
        Column("TT_101", Float),
        Column("PT_7", Float),
        Column("operator_note", String(200)),
        Column("failed", Integer),
    )
    table.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(table),
            [
                {
                    "recorded_at": (START + timedelta(minutes=i))
                    if aware
                    else (START + timedelta(minutes=i)).replace(tzinfo=None),
                    "TT_101": 70 + i % 10,
                    "PT_7": 1 + (i % 7) / 10,
                    "operator_note": "x" * 100,
                    "failed": int(i % 13 == 0),
                }
                for i in range(rows)
            ],
        )
    engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def scada_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        (tmp_path / ORG).mkdir()
        url = f"sqlite:///{tmp_path / ORG / 'plant.db'}"
        fill_scada_table(url, 3_000, aware=False)
        yield url
        return
    with fresh_postgres_database() as url:
        fill_scada_table(url, 3_000, aware=True)
        yield url


def source(url: str, **changes: object) -> DatabaseSource:
    fields: dict[str, object] = {
        "url": url,
        "password_encrypted": None,
        "table": "readings",
        "timestamp_column": "recorded_at",
        "column_map": COLUMN_MAP,
    }
    return DatabaseSource(**{**fields, **changes})  # type: ignore[arg-type]


def rules(tmp_path: Path, *, kiln_database_url: str = "sqlite:////nonexistent/kiln.db") -> StoreRules:
    """The org's SQLite files in tmp_path / ORG; Kiln's own database elsewhere, offering no table."""
    return StoreRules(ORG, tmp_path, kiln_database_url)


def test_the_rows_in_range_are_read_with_the_columns_renamed(
    scada_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extract, "CHUNK_ROWS", 500)
    target = tmp_path / "out.parquet"
    rows = extract_database(
        source(scada_url),
        None,
        columns=["temperature", "pressure", "failed"],
        start=START + timedelta(minutes=1000),
        end=START + timedelta(minutes=1999),
        target=target,
        rules=rules(tmp_path),
    )
    table = pq.read_table(target)
    assert rows == table.num_rows == 1000
    assert table.column_names == ["temperature", "pressure", "failed"]
    assert table.column("temperature").to_pylist()[:3] == [70.0, 71.0, 72.0]
    assert pq.ParquetFile(target).metadata.num_row_groups == 2


def test_without_a_range_every_row_is_read(scada_url: str, tmp_path: Path) -> None:
    target = tmp_path / "out.parquet"
    assert (
        extract_database(
            source(scada_url),
            None,
            columns=["temperature", "failed"],
            start=None,
            end=None,
            target=target,
            rules=rules(tmp_path),
        )
        == 3_000
    )


def test_a_missing_table_is_named(scada_url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="table 'historian' does not exist"):
        extract_database(
            source(scada_url, table="historian"),
            None,
            columns=["temperature"],
            start=None,
            end=None,
            target=tmp_path / "out.parquet",
            rules=rules(tmp_path),
        )


def test_a_missing_column_is_named_with_its_source_name(scada_url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"no column FT_3 \(for flow\), vibration"):
        extract_database(
            source(scada_url, column_map={**COLUMN_MAP, "FT_3": "flow"}),
            None,
            columns=["temperature", "flow", "vibration"],
            start=None,
            end=None,
            target=tmp_path / "out.parquet",
            rules=rules(tmp_path),
        )


def test_an_empty_range_is_refused(scada_url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no rows in the requested range"):
        extract_database(
            source(scada_url),
            None,
            columns=["temperature"],
            start=START - timedelta(days=9),
            end=START - timedelta(days=8),
            target=tmp_path / "out.parquet",
            rules=rules(tmp_path),
        )


def test_an_unreachable_database_is_a_transient_error(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://kiln:secret@127.0.0.1:{free_port()}/plant"
    with pytest.raises(TransientError, match=r"postgresql://127.0.0.1/plant is unreachable") as raised:
        extract_database(
            source(url),
            "secret",
            columns=["temperature"],
            start=None,
            end=None,
            target=tmp_path / "out.parquet",
            rules=rules(tmp_path),
        )
    assert "secret" not in str(raised.value)


def test_a_login_the_server_refuses_fails_naming_the_datasource_and_is_not_retried(tmp_path: Path) -> None:
    """A wrong password, role or database was taken for an outage: retried twice, three logins a run."""
    with password_checking_postgres() as url:
        refusals = [
            _refusal(make_url(url).set(password="not-the-password"), tmp_path),
            _refusal(make_url(url).set(database="no_such_database"), tmp_path),
        ]
    trusting = make_url("postgresql+psycopg2://no_such_role@127.0.0.1:5432/postgres")  # names a missing role
    refusals.append(_refusal(trusting, tmp_path))

    assert [refusal.field for refusal in refusals] == ["datasource"] * 3
    messages = [refusal.message for refusal in refusals]
    assert 'password authentication failed for user "postgres"' in messages[0]
    assert 'database "no_such_database" does not exist' in messages[1]
    assert 'role "no_such_role" does not exist' in messages[2]
    assert all(" refuses the login: " in message and "not-the-password" not in message for message in messages)


def _refusal(url: URL, tmp_path: Path) -> InvalidInput:
    password = url.password
    with pytest.raises(InvalidInput) as raised:
        extract_database(
            source(url.set(password=None).render_as_string(), table="readings"),
            str(password) if password else None,
            columns=["temperature"],
            start=None,
            end=None,
            target=tmp_path / "out.parquet",
            rules=rules(tmp_path),
        )
    return raised.value


def read_all(url: str, tmp_path: Path, store_rules: StoreRules, table: str = "readings") -> int:
    return extract_database(
        source(url, table=table, column_map={}, timestamp_column=None),
        None,
        columns=["id"],
        start=None,
        end=None,
        target=tmp_path / "out.parquet",
        rules=store_rules,
    )


def test_a_sqlite_file_outside_the_orgs_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other-org").mkdir()
    fill_scada_table(f"sqlite:///{tmp_path / 'other-org' / 'plant.db'}", 10, aware=False)
    with pytest.raises(InvalidInput, match=f"is not in {tmp_path / ORG}/"):
        read_all(f"sqlite:///{tmp_path / 'other-org' / 'plant.db'}", tmp_path, rules(tmp_path))
    with pytest.raises(InvalidInput, match="is not in"):
        read_all(f"sqlite:///{tmp_path / ORG / '..' / 'other-org' / 'plant.db'}", tmp_path, rules(tmp_path))


def test_a_link_from_the_orgs_folder_to_a_file_outside_it_is_refused(tmp_path: Path) -> None:
    fill_scada_table(f"sqlite:///{tmp_path / 'elsewhere.db'}", 10, aware=False)
    (tmp_path / ORG).mkdir()
    (tmp_path / ORG / "plant.db").symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(InvalidInput, match="is not in"):
        read_all(f"sqlite:///{tmp_path / ORG / 'plant.db'}", tmp_path, rules(tmp_path))


def test_a_missing_sqlite_file_is_refused_not_created(tmp_path: Path) -> None:
    (tmp_path / ORG).mkdir()
    with pytest.raises(InvalidInput, match="does not exist"):
        read_all(f"sqlite:///{tmp_path / ORG / 'typo.db'}", tmp_path, rules(tmp_path))
    assert not (tmp_path / ORG / "typo.db").exists()


def test_a_sqlite_url_with_a_query_stored_before_the_api_refused_it_is_not_opened(tmp_path: Path) -> None:
    (tmp_path / ORG).mkdir()
    fill_scada_table(f"sqlite:///{tmp_path / ORG / 'plant.db'}", 10, aware=False)
    with pytest.raises(InvalidInput, match="takes no query parameters"):
        read_all(f"sqlite:///{tmp_path / ORG / 'plant.db'}?uri=true&mode=rwc", tmp_path, rules(tmp_path))
    assert sorted(path.name for path in (tmp_path / ORG).iterdir()) == ["plant.db"]


def sqlite_store(tmp_path: Path, schema: str, rows: Sequence[tuple[object, ...]]) -> str:
    (tmp_path / ORG).mkdir()
    path = tmp_path / ORG / "plant.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute(schema)
        connection.executemany(f"INSERT INTO readings VALUES ({', '.join('?' * len(rows[0]))})", rows)
        connection.commit()
    return f"sqlite:///{path}"


def postgres_store(url: str, *statements: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))
    engine.dispose()


def read_columns(
    url: str, tmp_path: Path, columns: list[str], column_map: dict[str, str] | None = None
) -> dict[str, list[object]]:
    target = tmp_path / "out.parquet"
    extract_database(
        source(url, column_map=column_map or {}, timestamp_column=None),
        None,
        columns=columns,
        start=None,
        end=None,
        target=target,
        rules=rules(tmp_path),
    )
    columns_read: dict[str, list[object]] = pq.read_table(target).to_pydict()
    return columns_read


def test_a_mistyped_cell_fails_the_read_naming_its_column_without_quoting_it(tmp_path: Path) -> None:
    """SQLite keeps whatever a row was given: a patient's name in a REAL column must not reach the run's error."""
    rows = [(1, 36.6), (2, "MRN-778812 Jane Roe"), (3, 37.1)]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, temp REAL)", rows)

    with pytest.raises(InvalidInput) as raised:
        read_columns(url, tmp_path, ["temp"])

    assert (
        str(raised.value)
        == "column 'temp' of the data source holds values that do not all read as its declared type (double)"
    )
    assert "MRN" not in str(raised.value)


def test_a_column_empty_in_the_first_chunk_keeps_its_declared_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extract, "CHUNK_ROWS", 2)
    rows = [(1, None, None), (2, None, None), (3, 7, 1.5), (4, 8, 2.5)]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, count INTEGER, temp REAL)", rows)

    assert read_columns(url, tmp_path, ["count", "temp"]) == {
        "count": [None, None, 7, 8],
        "temp": [None, None, 1.5, 2.5],
    }


def test_a_column_without_a_declared_type_that_changes_type_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extract, "CHUNK_ROWS", 2)
    rows = [(1, 10), (2, 11), (3, "MRN-778812"), (4, "MRN-778813")]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, reading)", rows)

    with pytest.raises(InvalidInput) as raised:
        read_columns(url, tmp_path, ["reading"])

    assert "column 'reading' of the data source changes type within the range (first int64)" in str(raised.value)
    assert "MRN" not in str(raised.value)


def test_a_server_outside_the_store_networks_is_refused_before_connecting(tmp_path: Path) -> None:
    """The platform's own servers (here PostgreSQL on 127.0.0.1) are out of reach once KILN_STORE_NETWORKS is set."""
    plant_only = StoreRules(ORG, tmp_path, "sqlite:////nonexistent/kiln.db", networks=("10.20.0.0/16",))
    for url in ("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", "postgresql+psycopg2://postgres@/postgres"):
        with pytest.raises(InvalidInput, match="not on the networks organizations' databases may be on"):
            read_all(url, tmp_path, plant_only)


def test_a_server_name_no_resolver_takes_is_refused_naming_the_field(tmp_path: Path) -> None:
    """An empty or 64-character label: the idna codec's UnicodeError came out as a traceback of `kiln backup`."""
    plant_only = StoreRules(ORG, tmp_path, "sqlite:////nonexistent/kiln.db", networks=("10.20.0.0/16",))
    for host in ("scada..plant", "a" * 64 + ".plant"):
        with pytest.raises(InvalidInput, match=f"datasource: '{host}' is not a host name"):
            plant_only.check_before_opening(make_url(f"postgresql+psycopg2://u:pw@{host}/db"), field="datasource")


def test_a_server_on_the_store_networks_is_reached_at_the_address_checked(tmp_path: Path) -> None:
    with fresh_postgres_database() as url:
        fill_scada_table(url, 10, aware=True)
        loopback = StoreRules(ORG, tmp_path, "sqlite:////nonexistent/kiln.db", networks=("127.0.0.0/8",))
        pinned = loopback.check_before_opening(make_url(url), field="datasource")

        assert pinned.query["hostaddr"] == "127.0.0.1"
        assert read_all(url, tmp_path, loopback) == 10


def test_a_server_named_on_the_store_networks_is_taken_by_its_name(tmp_path: Path) -> None:
    named = StoreRules(ORG, tmp_path, "sqlite:////nonexistent/kiln.db", networks=("db.plant.local",))
    url = make_url("postgresql+psycopg2://historian@DB.plant.local/historian")

    assert named.check_before_opening(url, field="datasource") == url


def test_kilns_own_sqlite_database_offers_none_of_its_own_tables(tmp_path: Path) -> None:
    kiln_url = f"sqlite:///{tmp_path / 'kiln' / 'kiln.db'}"
    (tmp_path / "kiln").mkdir()
    upgrade(kiln_url)
    with pytest.raises(InvalidInput, match="Kiln's own"):
        read_all(kiln_url, tmp_path, rules(tmp_path, kiln_database_url=kiln_url), table="api_keys")


def test_kilns_own_postgresql_database_is_recognised_by_its_tables_whatever_the_url(
    postgres_url: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="Kiln's own"):
        read_all(postgres_url, tmp_path, rules(tmp_path), table="training_runs")


def test_a_postgresql_url_without_a_driver_is_read_with_the_shipped_one(tmp_path: Path) -> None:
    with fresh_postgres_database() as url:
        fill_scada_table(url, 10, aware=True)
        plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        assert plain.startswith("postgresql://")
        assert read_all(plain, tmp_path, rules(tmp_path)) == 10


def test_timestamps_kept_as_text_in_sqlite_select_the_range_as_instants(tmp_path: Path) -> None:
    (tmp_path / ORG).mkdir()
    path = tmp_path / ORG / "plant.db"
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, recorded_at TEXT)")
        connection.executemany(
            "INSERT INTO readings VALUES (?, ?)",
            [
                (1, "2024-01-01 23:30:00"),
                (2, "2024-01-02T01:30:00+02:00"),  # the 1st in UTC
                (3, "2024-01-02 12:00:00.5"),
                (4, "2024-01-02 23:30:00-05:00"),  # the 3rd in UTC
                (5, "2024-01-02T18:00:00Z"),
            ],
        )
    rows = extract_database(
        source(f"sqlite:///{path}", column_map={}),
        None,
        columns=["id"],
        start=datetime(2024, 1, 2, tzinfo=UTC),
        end=datetime(2024, 1, 2, 23, 59, tzinfo=UTC),
        target=tmp_path / "out.parquet",
        rules=rules(tmp_path),
    )
    assert rows == 2 and pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == [3, 5]


def test_a_target_renamed_by_column_map_cannot_come_back_as_a_feature_under_its_source_name(tmp_path: Path) -> None:
    """{"FAULT": "machine_failure"}: the feature FAULT would be the target itself, and the model learn its label."""
    rows = [(1, 70.5, 0), (2, 71.5, 1)]
    url = sqlite_store(
        tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, temperature REAL, FAULT INTEGER)", rows
    )

    with pytest.raises(InvalidInput) as raised:
        read_columns(url, tmp_path, ["temperature", "FAULT", "machine_failure"], {"FAULT": "machine_failure"})

    assert str(raised.value) == (
        "column 'FAULT' is renamed by columnMap to 'machine_failure': a renamed column is read only by its new name"
    )
    assert raised.value.field == "columnMap"


def test_a_name_column_map_gives_reads_the_renamed_column_and_hides_the_source_column_of_that_name(
    tmp_path: Path,
) -> None:
    """{"a": "b"} on a table holding a and b: b is the source column a; the source column b cannot be read."""
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, a REAL, b REAL)", [(1, 1.0, 9.0)])

    assert read_columns(url, tmp_path, ["id", "b"], {"a": "b"}) == {"id": [1], "b": [1.0]}
    with pytest.raises(InvalidInput, match="column 'a' is renamed by columnMap to 'b'"):
        read_columns(url, tmp_path, ["a", "b"], {"a": "b"})


def test_a_column_map_giving_two_columns_one_name_fails_the_run_naming_both(tmp_path: Path) -> None:
    """A map stored before the api refused it: x would silently have read one of a and b."""
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, a REAL, b REAL)", [(1, 1.0, 9.0)])

    with pytest.raises(InvalidInput, match="columnMap renames both 'a' and 'b' to 'x'"):
        read_columns(url, tmp_path, ["x"], {"a": "x", "b": "x"})


NOT_TIMESTAMPS = (
    "timestamp column 'recorded_at' of the data source holds values that are not timestamps "
    "(a timestamp type, or ISO 8601 text)"
)
JAN_2 = (datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 3, tzinfo=UTC))


def read_ids_in_range(url: str, tmp_path: Path, start: datetime, end: datetime) -> list[object]:
    extract_database(
        source(url, column_map={}),
        None,
        columns=["id"],
        start=start,
        end=end,
        target=tmp_path / "out.parquet",
        rules=rules(tmp_path),
    )
    ids: list[object] = pq.read_table(tmp_path / "out.parquet").column("id").to_pylist()
    return ids


def test_sqlite_timestamps_in_a_datetime_column_select_the_range_as_instants(tmp_path: Path) -> None:
    """SQLite keeps a DATETIME column's values as the text it was given: compared as text, "T" and offsets misorder."""
    rows = [
        (1, "2024-01-01 23:30:00"),
        (2, "2024-01-02T01:30:00+02:00"),  # the 1st in UTC
        (3, "2024-01-02 12:00:00.5"),
        (4, "2024-01-02 23:30:00-05:00"),  # the 3rd in UTC
        (5, "2024-01-02T18:00:00Z"),
    ]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, recorded_at DATETIME)", rows)

    ids = read_ids_in_range(url, tmp_path, datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 2, 23, 59, tzinfo=UTC))

    assert ids == [3, 5]


def test_a_sqlite_timestamp_column_keeps_the_rows_exactly_at_the_range_bounds(tmp_path: Path) -> None:
    rows = [
        (1, "2024-01-01 23:59:59"),
        (2, "2024-01-02 00:00:00"),
        (3, "2024-01-02 06:00:00"),
        (4, "2024-01-02 06:00:01"),
    ]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, recorded_at TIMESTAMP)", rows)

    ids = read_ids_in_range(url, tmp_path, datetime(2024, 1, 2, tzinfo=UTC), datetime(2024, 1, 2, 6, tzinfo=UTC))

    assert ids == [2, 3]


@pytest.mark.parametrize("cell", ["false", "no", 2, 0.5, "MRN-778812"])
def test_a_sqlite_boolean_cell_other_than_0_or_1_fails_the_read_naming_its_column(tmp_path: Path, cell: object) -> None:
    """SQLAlchemy reads a SQLite BOOLEAN through bool(): 'false', 'no' and 2 would all have been True."""
    rows = [(1, 1), (2, cell), (3, 0)]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, failed BOOLEAN)", rows)

    with pytest.raises(InvalidInput) as raised:
        read_columns(url, tmp_path, ["failed"])

    assert str(raised.value) == (
        "column 'failed' of the data source holds values that do not all read as its declared type (bool): "
        "it holds values other than 0 and 1"
    )


def test_a_sqlite_boolean_column_of_0_and_1_reads_as_booleans(tmp_path: Path) -> None:
    rows = [(1, 1), (2, 0), (3, None), (4, True)]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, failed BOOLEAN)", rows)

    assert read_columns(url, tmp_path, ["failed"]) == {"failed": [True, False, None, True]}


def test_a_fraction_in_a_sqlite_integer_column_fails_the_read_naming_its_column(tmp_path: Path) -> None:
    """SQLite keeps 1.5 in an INTEGER column as REAL; read as an integer it would have become 1."""
    rows = [(1, 1), (2, 1.5), (3, 3)]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, count INTEGER)", rows)

    with pytest.raises(InvalidInput) as raised:
        read_columns(url, tmp_path, ["count"])

    assert str(raised.value) == (
        "column 'count' of the data source holds values that do not all read as its declared type (int64): "
        "it holds values that are not whole numbers"
    )


def test_sqlite_decimals_that_widen_after_the_first_chunk_read_as_floats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extract, "CHUNK_ROWS", 2)
    rows = [(1, 1), (2, 2), (3, 1000.25), (4, 2.5)]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, price NUMERIC(10, 2))", rows)

    assert read_columns(url, tmp_path, ["price"]) == {"price": [1.0, 2.0, 1000.25, 2.5]}
    assert pq.read_schema(tmp_path / "out.parquet").field("price").type == "double"


def test_postgresql_decimals_that_widen_after_the_first_chunk_read_as_floats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extract, "CHUNK_ROWS", 2)
    with fresh_postgres_database() as url:
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(
                text("CREATE TABLE readings (id serial PRIMARY KEY, amount numeric, price numeric(10, 2))")
            )
            connection.execute(
                text("INSERT INTO readings (amount, price) VALUES (1, 1), (2, 2), (1000.25, 1000.25), (2.5, 2.5)")
            )
        engine.dispose()

        read = read_columns(url, tmp_path, ["amount", "price"])

    assert read == {"amount": [1.0, 2.0, 1000.25, 2.5], "price": [1.0, 2.0, 1000.25, 2.5]}


def test_a_postgresql_text_timestamp_that_is_no_timestamp_fails_naming_its_column_without_quoting_it(
    tmp_path: Path,
) -> None:
    """PostgreSQL casts a timestamp kept as text to select dataRange; its refusal quotes the cell it could not read."""
    with fresh_postgres_database() as url:
        postgres_store(
            url,
            "CREATE TABLE readings (id serial PRIMARY KEY, recorded_at text)",
            "INSERT INTO readings (recorded_at) VALUES ('2024-01-02 10:00'), ('MRN-778812 Jane Roe')",
        )
        with pytest.raises(InvalidInput) as raised:
            read_ids_in_range(url, tmp_path, *JAN_2)

    assert str(raised.value) == NOT_TIMESTAMPS


@pytest.mark.parametrize(
    "cell",
    ["01/02/2024 11:00", "MRN-778812 Jane Roe", 1704189600, 2460311.5, "2460311.5"],
    ids=["us-date", "name", "epoch-seconds", "julian-day", "julian-day-as-text"],
)
def test_a_sqlite_timestamp_other_than_iso_8601_text_fails_naming_its_column_rather_than_leaving_its_row_out(
    tmp_path: Path, cell: object
) -> None:
    """julianday() gives NULL for a US date, a name or epoch seconds, which the range left out where PostgreSQL fails
    the run; and it reads a Julian day number as an instant, which PostgreSQL does not."""
    rows = [(1, "2024-01-02 10:00:00"), (2, cell)]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, recorded_at DATETIME)", rows)

    with pytest.raises(InvalidInput) as raised:
        read_ids_in_range(url, tmp_path, *JAN_2)

    assert str(raised.value) == NOT_TIMESTAMPS


def test_a_timestamp_column_declared_as_numbers_is_refused_on_both_databases(tmp_path: Path) -> None:
    """Epoch seconds in an INTEGER column: SQLite read every row as out of range, PostgreSQL refused the cast."""
    rows = [(1, 1704189600), (2, 1704189700)]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, recorded_at INTEGER)", rows)
    with pytest.raises(InvalidInput) as from_sqlite:
        read_ids_in_range(url, tmp_path, *JAN_2)

    with fresh_postgres_database() as url:
        postgres_store(
            url,
            "CREATE TABLE readings (id serial PRIMARY KEY, recorded_at bigint)",
            "INSERT INTO readings (recorded_at) VALUES (1704189600), (1704189700)",
        )
        with pytest.raises(InvalidInput) as from_postgresql:
            read_ids_in_range(url, tmp_path, *JAN_2)

    assert str(from_sqlite.value) == str(from_postgresql.value) == NOT_TIMESTAMPS


@pytest.mark.parametrize(
    "domains",
    [
        ["CREATE DOMAIN celsius AS numeric(8, 2)"],
        ["CREATE DOMAIN reading AS double precision", "CREATE DOMAIN celsius AS reading"],
    ],
    ids=["over-numeric", "over-a-domain-over-double-precision"],
)
def test_a_postgresql_domain_column_reads_as_the_type_the_domain_is_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, domains: list[str]
) -> None:
    """SQLAlchemy reflects a domain as DOMAIN, no Numeric: its values read as each chunk inferred them, null for a
    chunk without one, and a later chunk could not join the file."""
    monkeypatch.setattr(extract, "CHUNK_ROWS", 2)
    with fresh_postgres_database() as url:
        postgres_store(
            url,
            *domains,
            "CREATE TABLE readings (id serial PRIMARY KEY, temp celsius)",
            "INSERT INTO readings (temp) VALUES (NULL), (NULL), (1000.25), (2.5)",
        )

        read = read_columns(url, tmp_path, ["temp"])

    assert read == {"temp": [None, None, 1000.25, 2.5]}
    assert pq.read_schema(tmp_path / "out.parquet").field("temp").type == "double"


def test_a_column_without_a_declared_type_empty_in_the_first_chunk_takes_the_type_of_its_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first chunk sets the file's schema: the column was set as null, which the later values could not join."""
    monkeypatch.setattr(extract, "CHUNK_ROWS", 2)
    rows = [(1, None), (2, None), (3, 70.5), (4, None), (5, 71.5)]
    url = sqlite_store(tmp_path, "CREATE TABLE readings (id INTEGER PRIMARY KEY, temp)", rows)

    assert read_columns(url, tmp_path, ["temp"]) == {"temp": [None, None, 70.5, None, 71.5]}
    assert pq.read_schema(tmp_path / "out.parquet").field("temp").type == "double"


def test_a_dotted_table_name_is_the_table_bearing_it_or_else_schema_dot_table(tmp_path: Path) -> None:
    """A historian's tables often live in a schema of their own; "historian.readings" was looked up as one name."""
    with fresh_postgres_database() as url:
        postgres_store(
            url,
            "CREATE SCHEMA historian",
            "CREATE TABLE historian.readings (id integer)",
            "INSERT INTO historian.readings VALUES (1), (2)",
            'CREATE TABLE "line.3" (id integer)',
            'INSERT INTO "line.3" VALUES (3)',
        )

        assert read_all(url, tmp_path, rules(tmp_path), table="historian.readings") == 2
        assert read_all(url, tmp_path, rules(tmp_path), table="line.3") == 1


def test_kilns_own_tables_in_a_schema_of_their_own_are_refused_when_named_with_it(tmp_path: Path) -> None:
    """Kiln's database was known by its tables in the default schema, where a table named with a schema need not be."""
    with fresh_postgres_database() as url:
        postgres_store(
            url,
            "CREATE SCHEMA kiln",
            *(f"CREATE TABLE kiln.{name} (id integer)" for name in sorted(KILN_TABLES)),
        )

        with pytest.raises(InvalidInput, match="Kiln's own"):
            read_all(url, tmp_path, rules(tmp_path), table="kiln.api_keys")
