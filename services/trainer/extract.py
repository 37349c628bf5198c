"""Getting a run's rows onto the worker as one Parquet file: an uploaded dataset from the object store, or the
org's own database read in chunks, only the columns and the date range the run needs."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import Column, ColumnElement, MetaData, Table, cast, func, inspect, select, sql, type_coerce, types
from sqlalchemy.engine import URL, Connection, Engine, Row, make_url
from sqlalchemy.exc import DataError, NoSuchTableError, OperationalError, SQLAlchemyError

from services.trainer.runs import DatabaseSource
from shared.column_map import source_columns
from shared.cut_off import cut_off_when, never
from shared.db.answers import NoAnswer, cutter
from shared.db.session import make_org_engine, with_shipped_driver
from shared.db.types import beneath_domains
from shared.errors import InvalidInput, Stopped, TransientError
from shared.storage import ObjectStore
from shared.store_access import StoreRules

CHUNK_ROWS = 50_000


def extract_dataset(
    store: ObjectStore, object_key: str, target: Path, *, should_stop: Callable[[], bool] = never
) -> None:
    """Download the dataset to `target`. `should_stop()` turning true (a cancel, a lost lease) cuts the download
    off within STOP_CHECK_S (shared/cut_off.py), a wait on a store that stopped answering included: Stopped."""
    store.get_file(object_key, target, should_stop=should_stop)


def extract_database(
    source: DatabaseSource,
    password: str | None,
    *,
    columns: list[str],
    start: datetime | None,
    end: datetime | None,
    target: Path,
    rules: StoreRules,
    should_stop: Callable[[], bool] = never,
) -> int:
    """Write the named columns (Kiln's names, after columnMap) of the rows in [start, end] to `target`; returns
    how many rows. Unreachable, or a wait for its answer past `rules.timeout_s` (a server stopped or stuck, a link
    frozen: the run is not held for ever): TransientError. A missing table or column, or a database the org may not
    read: InvalidInput naming it. `should_stop()` turning true (a cancel, a lost lease) stops the reading within
    STOP_CHECK_S (shared/cut_off.py), a wait for the source's answer included: Stopped."""
    url = with_shipped_driver(source.url)
    url = url.set(password=password) if password is not None else url
    url = rules.check_before_opening(url, field="datasource")
    engine = _open(url, rules.timeout_s)
    try:
        with (
            _connect(engine, where=_describe(source.url)) as connection,
            cut_off_when(should_stop, _cutter(connection)),
        ):
            located = _located(connection, source.table)
            rules.check_opened(connection, table=located.name, schema=located.schema, field="datasource")
            query = _query(connection, located, source, columns, start, end)
            ranged_by = source.timestamp_column if start is not None or end is not None else None
            return _stream_to_parquet(connection, query, target, should_stop, ranged_by=ranged_by)
    except Exception as error:
        if should_stop():  # whatever failed, it failed because the attempt cut its connection off, or stopped reading
            raise Stopped("the attempt was asked to stop while reading its data source") from error
        if isinstance(error, OperationalError):
            raise _failed_while_reading(error) from error
        raise
    finally:
        engine.dispose()


def _cutter(connection: Connection) -> Callable[[], None]:
    """What ends the connection's wait on its source from another thread: SQLite's own interrupt, or the socket of a
    PostgreSQL connection shut down."""
    dbapi_connection: Any = connection.connection.dbapi_connection  # sqlite3's or psycopg2's (untyped)
    if isinstance(dbapi_connection, sqlite3.Connection):
        return dbapi_connection.interrupt
    return cutter(dbapi_connection.fileno())


def _open(url: URL, timeout_s: float) -> Engine:
    """Every wait on a PostgreSQL source bounded by `timeout_s`, each chunk's fetch among them (make_org_engine)."""
    if url.get_backend_name() == "postgresql":
        # In UTC, a timestamp kept as text without a zone reads as UTC, Kiln's convention (see _text_in_range). A
        # source's URL never sets options (shared/store_access.py refuses them), so none are replaced.
        url = url.update_query_dict({"options": "-c timezone=UTC"})
    return make_org_engine(url, timeout_s=timeout_s)


# What a server that answered says when it refuses the login itself (libpq hands on its words after "FATAL:"): a
# password, role or database that is wrong. Anything else, a server starting up or out of connections included, is
# taken for an outage.
_LOGIN_REFUSED = ("password authentication failed", "does not exist", "no pg_hba.conf entry")


def _connect(engine: Engine, *, where: str) -> Connection:
    """A connection, or TransientError for a source out of reach; a login the server refuses is the datasource's to
    put right, not retried (each attempt of a run would try it again, and might lock the account)."""
    try:
        return engine.connect()
    except OperationalError as error:
        said = _first_line(error)
        if "FATAL:" in said and any(words in said for words in _LOGIN_REFUSED):
            raise InvalidInput(f"the data source {where} refuses the login: {said}", field="datasource") from None
        raise TransientError(f"the data source {where} is unreachable: {said}") from error


class _Located(NamedTuple):
    name: str
    schema: str | None


def _located(connection: Connection, table: str) -> _Located:
    """The table as named when one bears that name (a dot in it included); else a dotted name is schema.table, split at
    its first dot ("historian.readings") when that schema exists."""
    schema, dot, name = table.partition(".")
    inspector = inspect(connection)
    if not dot or inspector.has_table(table) or schema not in inspector.get_schema_names():
        return _Located(table, None)
    return _Located(name, schema)


def _query(
    connection: Connection,
    located: _Located,
    source: DatabaseSource,
    columns: list[str],
    start: datetime | None,
    end: datetime | None,
) -> sql.Select[tuple[object, ...]]:
    try:
        table = Table(located.name, MetaData(), schema=located.schema, autoload_with=connection)
    except NoSuchTableError:
        raise InvalidInput(f"table {source.table!r} does not exist in the data source", field="datasource") from None
    wanted = source_columns(source.column_map, columns)
    missing = sorted(
        f"{original} (for {name})" if original != name else name
        for name, original in wanted.items()
        if original not in table.c
    )
    if missing:
        raise InvalidInput(f"table {source.table!r} has no column {', '.join(missing)}", field="datasource")
    query = select(*(_as_read(table.c[original]).label(name) for name, original in wanted.items()))
    if start is not None or end is not None:
        query = query.where(*_in_range(connection, table, source, start, end))
    return query


class _BooleanAsStored(types.TypeDecorator[Any]):
    """A BOOLEAN cell as the driver gives it: SQLAlchemy would read a SQLite cell through bool(), making 2, 'no' and
    'false' True. PostgreSQL gives True and False; _column checks the rest."""

    impl = types.NullType
    cache_ok = True


def _as_read(column: Column[Any]) -> ColumnElement[Any]:
    """A source column as the worker reads it. Decimals as float64, the features' type (the model sees float32): each
    chunk would otherwise infer its own decimal precision and scale, and a wider one later could not join the file."""
    declared = _as_declared(column)
    if isinstance(declared.type, types.Boolean):
        return type_coerce(column, _BooleanAsStored())
    if isinstance(declared.type, types.Numeric):
        return type_coerce(column, types.Numeric(asdecimal=False))
    return declared


def _as_declared(column: Column[Any]) -> ColumnElement[Any]:
    """A PostgreSQL domain's column as of the type the domain is over, which SQLAlchemy also compares without a
    warning."""
    declared = beneath_domains(column.type)
    return column if declared is column.type else type_coerce(column, declared)


def _in_range(
    connection: Connection, table: Table, source: DatabaseSource, start: datetime | None, end: datetime | None
) -> list[ColumnElement[bool]]:
    if source.timestamp_column is None:
        raise InvalidInput("dataRange needs the datasource's timestampColumn, and none is set", field="dataRange")
    if source.timestamp_column not in table.c:
        raise InvalidInput(
            f"table {source.table!r} has no timestamp column {source.timestamp_column!r}", field="datasource"
        )
    stamp = _as_declared(table.c[source.timestamp_column])
    declared = stamp.type
    if isinstance(declared, types.Integer | types.Numeric):
        # Epoch seconds, milliseconds or Julian days: no declared type says which, and PostgreSQL casts none of them.
        raise _not_timestamps(source.timestamp_column)
    dialect = connection.dialect.name
    if dialect == "sqlite":
        _refuse_unreadable_sqlite_timestamps(connection, stamp, source.timestamp_column)
    # SQLite has no timestamp type: a column declared DATETIME or TIMESTAMP holds text like any other, which
    # SQLAlchemy's DateTime would compare as text: "2024-01-02 00:00:00" sorts before the bound it writes,
    # "2024-01-02 00:00:00.000000", and a "T" or an offset sorts by its characters, not its instant.
    if dialect == "sqlite" or not isinstance(declared, types.DateTime):
        return _text_in_range(stamp, dialect, start, end)
    aware = bool(declared.timezone)
    # A column without a zone holds UTC by Kiln's convention, so it is compared with naive UTC bounds.
    bounds = [(start, stamp >= _as_column_time(start, aware)), (end, stamp <= _as_column_time(end, aware))]
    return [condition for bound, condition in bounds if bound is not None]


def _refuse_unreadable_sqlite_timestamps(connection: Connection, stamp: ColumnElement[Any], name: str) -> None:
    """julianday() gives NULL for text it cannot read (a US date, a name), so the range would silently leave its row
    out where PostgreSQL fails the run; and it reads a number, or text of one, as a Julian day. A cell other than
    text beginning with a year fails the run as on PostgreSQL, wherever it is in the table, since PostgreSQL's cast
    meets every row too."""
    text = type_coerce(stamp, types.String())
    unreadable = sql.exists().where(
        stamp.is_not(None),
        sql.or_(
            sql.not_(text.op("GLOB", is_comparison=True)("[0-9][0-9][0-9][0-9]-*")), func.julianday(text).is_(None)
        ),
    )
    if connection.scalar(select(unreadable)):
        raise _not_timestamps(name)


def _text_in_range(
    stamp: ColumnElement[Any], dialect: str, start: datetime | None, end: datetime | None
) -> list[ColumnElement[bool]]:
    """Timestamps kept as ISO 8601 text (a SQLite store's, whatever its declared type, or their synced central copy),
    compared as instants: text with an offset at that offset, text without one as UTC (the connection's zone, see
    _open)."""
    conditions = []
    for bound, later in ((start, True), (end, False)):
        if bound is None:
            continue
        moment, limit = _comparable(stamp, bound, dialect)
        conditions.append(moment >= limit if later else moment <= limit)
    return conditions


def _comparable(stamp: ColumnElement[Any], bound: datetime, dialect: str) -> tuple[ColumnElement[Any], Any]:
    if dialect == "sqlite":  # julianday reads ISO 8601 text, offset included, as a UTC day number
        return func.julianday(stamp), func.julianday(bound.astimezone(UTC).isoformat(sep=" "))
    return cast(stamp, types.DateTime(timezone=True)), bound


def _as_column_time(moment: datetime | None, aware: bool) -> datetime | None:
    if moment is None or aware:
        return moment
    return moment.replace(tzinfo=None)


def _stream_to_parquet(
    connection: Connection,
    query: sql.Select[tuple[object, ...]],
    target: Path,
    should_stop: Callable[[], bool],
    *,
    ranged_by: str | None,
) -> int:
    rows = 0
    writer: pq.ParquetWriter | None = None
    columns = [(column.name, _arrow_type(column.type)) for column in query.selected_columns]
    try:
        result = connection.execution_options(stream_results=True, yield_per=CHUNK_ROWS).execute(query)
        for chunk in result.partitions():
            if should_stop():  # SQLite's interrupt ends only a statement running: none between two fetches
                raise Stopped("the attempt was asked to stop while reading its data source")
            table = pa.table({name: _column(chunk, i, name, kind) for i, (name, kind) in enumerate(columns)})
            if writer is None:
                table = _with_empty_columns_typed(connection, query, table)
                writer = pq.ParquetWriter(target, table.schema)
            writer.write_table(_as_first_chunk(table, writer.schema))
            rows += table.num_rows
    except OperationalError as error:
        raise _failed_while_reading(error) from error
    except SQLAlchemyError as error:
        if isinstance(error, DataError) and ranged_by is not None:
            # The one value the server converts is a timestamp kept as text (_comparable's cast), and PostgreSQL's
            # message quotes the cell it could not read, which may be a patient's name.
            raise _not_timestamps(ranged_by) from None
        raise InvalidInput(f"the data source refused the query: {_first_line(error)}", field="datasource") from None
    finally:
        if writer is not None:
            writer.close()
    if rows == 0:
        raise InvalidInput("the data source has no rows in the requested range", field="dataRange")
    return rows


def _with_empty_columns_typed(
    connection: Connection, query: sql.Select[tuple[object, ...]], first_chunk: pa.Table
) -> pa.Table:
    """The first chunk sets the file's schema (ParquetWriter takes it up front), and a column whose values decide its
    type, with none in that chunk, would be set as null, which no later value fits. Such a column takes the type of
    its first value in the range, read by a query of one row: holding chunks back until one shows a value would hold
    the whole range of a column empty throughout."""
    table = first_chunk
    for index, field in enumerate(first_chunk.schema):
        if pa.types.is_null(field.type):
            table = table.set_column(
                index, field.name, pa.nulls(table.num_rows, _first_value_type(connection, query, field.name))
            )
    return table


def _first_value_type(connection: Connection, query: sql.Select[tuple[object, ...]], name: str) -> pa.DataType:
    """Read as the chunks read it (_column); null when the range holds no value for the column at all."""
    read = query.subquery()
    first = connection.execute(select(read.c[name]).where(read.c[name].is_not(None)).limit(1)).first()
    return pa.null() if first is None else _column([first], 0, name, None).type


def _not_timestamps(name: str) -> InvalidInput:
    return InvalidInput(
        f"timestamp column {name!r} of the data source holds values that are not timestamps (a timestamp type, or "
        "ISO 8601 text)",
        field="datasource",
    )


def _failed_while_reading(error: OperationalError) -> TransientError:
    """A source that stopped answering says so with the bound it passed; the driver's first line says the rest."""
    if isinstance(error.orig, NoAnswer):
        return TransientError(f"the data source did not answer within {error.orig.bound_s:g} s")
    return TransientError(f"the data source failed while reading: {_first_line(error)}")


def _arrow_type(column_type: types.TypeEngine[Any]) -> pa.DataType | None:
    """The Arrow type of a column as _as_read selects it; None where the values decide (timestamps with or without a
    zone, a SQLite column declared without a type)."""
    if isinstance(column_type, _BooleanAsStored):
        return pa.bool_()
    if isinstance(column_type, types.Integer):
        return pa.int64()
    if isinstance(column_type, types.Float | types.Numeric):
        return pa.float64()
    if isinstance(column_type, types.String):
        return pa.string()
    return None


def _column(chunk: Sequence[Row[Any]], index: int, name: str, kind: pa.DataType | None) -> pa.Array:
    """One column of a chunk. Its values are the org's records (a patient's name in a mistyped cell): an error
    names the column and never quotes one."""
    exact = _EXACT.get(kind)
    try:
        cells = pa.array([row[index] for row in chunk], type=kind if exact is None else None)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise _mistyped(name, kind, because=None if exact is None else exact.otherwise) from None
    if exact is None:
        return cells
    if not exact.holds(cells):
        raise _mistyped(name, kind, because=exact.otherwise)
    return cells.cast(kind)


class _Exact(NamedTuple):
    """A kind whose cells are read as they are, then checked: pyarrow's own conversion to it changes values."""

    holds: Callable[[pa.Array], bool]
    otherwise: str


def _booleans(cells: pa.Array) -> bool:
    """SQLite keeps a boolean as the integer 0 or 1; any other cell (2, 'no', 0.5) is no boolean Kiln can read."""
    if cells.type in (pa.bool_(), pa.null()):
        return True
    if not pa.types.is_integer(cells.type):
        return False
    low, high = (bound.as_py() for bound in pc.min_max(cells).values())
    return low in (0, 1) and high in (0, 1)


def _integers(cells: pa.Array) -> bool:
    """A SQLite INTEGER column keeps 1.5 as REAL, which pyarrow's conversion would cut to 1."""
    return cells.type in (pa.int64(), pa.null())


_EXACT = {
    pa.bool_(): _Exact(_booleans, "values other than 0 and 1"),
    pa.int64(): _Exact(_integers, "values that are not whole numbers"),
}


def _mistyped(name: str, kind: pa.DataType | None, *, because: str | None) -> InvalidInput:
    expected = f"its declared type ({kind})" if kind is not None else "one type"
    reason = f": it holds {because}" if because is not None else ""
    return InvalidInput(
        f"column {name!r} of the data source holds values that do not all read as {expected}{reason}",
        field="datasource",
    )


def _as_first_chunk(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A later chunk in the file's schema, which its first chunk set: a column whose values decide its type may
    read as another (whole numbers first, fractions later), and is cast where that loses nothing."""
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        changed = [field.name for field in schema if table.schema.field(field.name).type != field.type]
        raise InvalidInput(
            f"column {', '.join(repr(name) for name in changed)} of the data source changes type within the range "
            f"(first {', '.join(str(schema.field(name).type) for name in changed)}); declare its type in the store",
            field="datasource",
        ) from None


def _describe(url: str) -> str:
    parsed = make_url(url)
    return f"{parsed.get_backend_name()}://{parsed.host or ''}{'/' if parsed.host else ''}{parsed.database or ''}"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
