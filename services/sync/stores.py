"""The two stores a table is synced between: reading records by key and writing them back, on SQLite or PostgreSQL.

The central copy of a local table has the same columns (sensitive ones as text: they hold ciphertext) plus the
record's version and hybrid-logical-clock stamp, `_kiln_version` and `_kiln_hlc`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
from typing import Any, TypeVar

from sqlalchemy import (
    CHAR,
    BigInteger,
    Column,
    Connection,
    Engine,
    Enum,
    Float,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    Uuid,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import ArgumentError, NoSuchTableError
from sqlalchemy.types import NullType, TypeEngine

from services.sync.column_types import central_type
from services.sync.hlc import Stamp
from shared.db.session import Answers, make_engine
from shared.errors import InvalidInput
from shared.store_access import StoreRules
from shared.sync_tables import SyncTable

VERSION = "_kiln_version"
STAMP = "_kiln_hlc"
META_COLUMNS = (VERSION, STAMP)
READ_CHUNK = 500

T = TypeVar("T")


def open_local(url: str, password: str | None, rules: StoreRules) -> Engine:
    """The local store, for one job's length: the caller disposes of it. One pooled connection, reused by every
    batch: a new connection per batch was a tenth of a pull's time. A SQLite file outside the org's folder is
    refused before it is opened. A PostgreSQL store that stops answering fails the job (retried) once
    `rules.timeout_s` passed and the server answers no new connection either: a statement of a live one may
    rightly run long (a table's first capture logs every record, DDL waits for the org's own locks)."""
    full = make_url(url).set(password=password) if password is not None else make_url(url)
    full = rules.check_before_opening(full, field="url")
    return make_engine(
        full.render_as_string(hide_password=False),
        timeout_s=rules.timeout_s,
        answers=Answers.WHILE_SERVER_ANSWERS,
        pool_size=1,
        max_overflow=1,
    )


def refuse_kiln_database(local: Engine, rules: StoreRules) -> None:
    """Kiln's own database, however its URL is spelled, is never a local store."""
    with local.connect() as connection:
        rules.check_opened(connection, table=None, field="url")


def reflect(connection: Connection, name: str, *, field: str = "tables") -> Table:
    try:
        return Table(name, MetaData(), autoload_with=connection)
    except NoSuchTableError:
        raise InvalidInput(f"table {name!r} is not in the store", field=field) from None
    except ArgumentError:
        # SQLite lets a column be named "", which SQLAlchemy cannot build a Table with, and PostgreSQL cannot name.
        if any(not column["name"] for column in inspect(connection).get_columns(name)):
            raise InvalidInput(
                f"table {name!r} has a column named with empty text, which the central copy cannot have; rename it",
                field=field,
            ) from None
        raise


def check_key(table: Table, spec: SyncTable, *, local: Dialect, central_dialect: str) -> None:
    keys = [column.name for column in table.primary_key.columns]
    if spec.primary_key not in table.c:
        raise InvalidInput(_key_column_gone(spec, keys, local_dialect=local.name), field="tables")
    if keys != [spec.primary_key]:
        raise InvalidInput(
            f"table {spec.name!r}: primaryKey {spec.primary_key!r} is not its one-column primary key ({keys})",
            field="tables",
        )
    key = table.c[spec.primary_key]
    if not _exact_key_type(key.type, local_dialect=local.name, central_dialect=central_dialect):
        raise InvalidInput(
            f"table {spec.name!r}: its primary key {key.name!r} is {_type_name(key.type, local)}, a type whose values "
            "the sync service cannot name exactly (two records could be taken for one, or a record for none); a "
            f"synced table's key is an integer or text column{_UUID_TOO if central_dialect == 'postgresql' else ''}",
            field="tables",
        )
    taken = [name for name in META_COLUMNS if name in table.c]
    if taken:
        raise InvalidInput(
            f"table {spec.name!r} has columns {', '.join(taken)}, which are the sync service's own in its central copy",
            field="tables",
        )
    missing = [name for name in spec.sensitive_columns if name not in table.c]
    if missing:
        raise InvalidInput(f"table {spec.name!r} has no columns {', '.join(missing)}", field="sensitiveColumns")


def _key_column_gone(spec: SyncTable, keys: list[str], *, local_dialect: str) -> str:
    """A key column renamed or dropped under its source: the table cannot sync by it. A PostgreSQL store's capture
    names the column it was made for, so the table's own writes fail until a registration of the table as it is
    now has its first job make the capture anew (SQLite renames the column in its triggers too)."""
    capture = (
        f"; until then the change capture made for {spec.primary_key!r} makes the store's writes to the table fail"
        if local_dialect == "postgresql"
        else ""
    )
    return (
        f"table {spec.name!r}: its primaryKey {spec.primary_key!r} is no longer a column of the table (its primary "
        f"key is {keys}), renamed or dropped since the source was registered: delete the source and register the "
        f"table again by its key as it is now, and run a job{capture}"
    )


# The change log holds each key as SQL's CAST to text; the service names a record by its key's Python str(). Only
# types whose two texts agree, value for value, can key a synced table: integers, and text (as a PostgreSQL store
# keeps it: its char(n) pads values with spaces that its text form drops). SQLite's REAL gives '1.0e+20' where
# Python gives '1e+20', and two distinct floats the same '0.3'; PostgreSQL's timestamptz, numeric or date name a
# value by the session's settings or otherwise than Python does. A uuid's text is the same on both sides, as long
# as the central store is PostgreSQL too (SQLite keeps it as 32 hex digits).
_UUID_TOO = " (or a uuid, between PostgreSQL stores)"


def _exact_key_type(declared: TypeEngine[Any], *, local_dialect: str, central_dialect: str) -> bool:
    if isinstance(declared, Integer):
        return True
    if isinstance(declared, String):
        return not isinstance(declared, Enum) and not (local_dialect == "postgresql" and isinstance(declared, CHAR))
    return isinstance(declared, Uuid) and local_dialect == central_dialect == "postgresql"


def _type_name(declared: TypeEngine[Any], dialect: Dialect) -> str:
    if isinstance(declared, NullType):
        return "of no declared type"
    return str(declared.compile(dialect=dialect))


# PostgreSQL cuts a longer name to its first 63 bytes: the central copy would not have the column it was given.
POSTGRESQL_NAME_BYTES = 63


def check_central_copy(table: Table, spec: SyncTable, *, local_dialect: str, central_dialect: str) -> None:
    """Refuse, before anything is installed, a table whose central copy cannot be made as it is: a column of no type
    the central store takes, or, on PostgreSQL, a column name longer than its identifiers may be. (The copy's own
    name, `sync_<sourceId>_<table>`, fits: a table's name is 40 characters at most, shared/sync_tables.py.)"""
    for column in table.columns:
        _central_type(spec, column, local_dialect)
    if central_dialect != "postgresql":
        return
    for column in table.columns:
        size = len(column.name.encode())
        if size > POSTGRESQL_NAME_BYTES:
            raise InvalidInput(
                f"table {spec.name!r} column {column.name!r}: its name is {size} bytes long (UTF-8), longer than the "
                f"{POSTGRESQL_NAME_BYTES} bytes of a PostgreSQL identifier, which the central copy's column would be "
                "cut to; rename the column",
                field="tables",
            )


def check_written_down(table: Table, spec: SyncTable) -> None:
    """Refuse, before anything is installed, a table that syncs down with a column its store fills in itself and
    takes no value written to: the first central edit to come down would fail every job after it."""
    if not spec.sends_down:
        return
    for column in table.columns:
        if column.computed is not None:
            raise InvalidInput(
                f"table {spec.name!r} column {column.name!r} is a generated column: the store computes its values "
                "and refuses any written to it, so central records could not be written down; make it a plain "
                'column, or sync the table up only (direction "up")',
                field="tables",
            )
        if column.identity is not None and column.identity.always:
            raise InvalidInput(
                f"table {spec.name!r} column {column.name!r} is GENERATED ALWAYS AS IDENTITY: the store numbers it "
                "and refuses any value written to it, so central records could not be written down; declare it "
                'GENERATED BY DEFAULT AS IDENTITY, or sync the table up only (direction "up")',
                field="tables",
            )


def ensure_central_table(
    connection: Connection, local: Table, spec: SyncTable, name: str, *, local_dialect: str
) -> Table:
    """The central copy of `local` (as reflected), made on the first sync; sensitive columns become text for their
    ciphertext, the others take the type that holds the local values as they are (services/sync/column_types.py)."""
    if not inspect(connection).has_table(name):
        columns = [
            Column(
                column.name,
                _central_type(spec, column, local_dialect),
                primary_key=column.name == spec.primary_key,
                autoincrement=False,
            )
            for column in local.columns
        ]
        # A default of the database's own: an INSERT that leaves the version out (a central edit) must pass NOT NULL
        # before SQLite's capture trigger, which runs after the insert, versions the record.
        columns += [Column(VERSION, BigInteger, nullable=False, server_default="0"), Column(STAMP, String(40))]
        Table(name, MetaData(), *columns).create(connection)
    return reflect(connection, name)


def quote_in_text(connection: Connection, name: str) -> str:
    """A table or column name quoted as this store's SQL takes it, to be written into a statement made with text(),
    which reads the statement itself: a colon escaped (or `":id"` would be taken for a bound parameter), and a `%`
    left single, as text() doubles it for a driver that takes `%s` (the dialect's own quote() doubles it already,
    and twice doubled, `"%s"` named a column `%%s`). A column's name may be any text; quoted always, it is taken as
    it is."""
    preparer = connection.dialect.identifier_preparer
    escaped = name.replace(preparer.escape_quote, preparer.escape_to_quote)
    return f"{preparer.initial_quote}{escaped}{preparer.final_quote}".replace(":", "\\:")


def add_new_columns(
    connection: Connection, local: Table, central: Table, spec: SyncTable, *, local_dialect: str
) -> list[str]:
    """Columns added to the local table since its central copy was made, added to the copy too (empty in the records
    there until each is next edited); returns their names."""
    quote = functools.partial(quote_in_text, connection)
    added = []
    for column in local.columns:
        if column.name not in central.c:
            kind = _central_type(spec, column, local_dialect).compile(dialect=connection.dialect)
            connection.execute(text(f"ALTER TABLE {quote(central.name)} ADD COLUMN {quote(column.name)} {kind}"))
            added.append(column.name)
    return added


def widen_old_columns(
    connection: Connection, local: Table, central: Table, spec: SyncTable, *, local_dialect: str
) -> list[str]:
    """Columns of a central copy made by an earlier Kiln narrower than the type it now takes: INTEGER where a
    SQLite integer needs BIGINT, VARCHAR(n) or NUMERIC(p, s) where values may be longer or finer. Widened once, in
    place (PostgreSQL rewrites the table for INTEGER to BIGINT); returns their names. SQLite enforces none of these."""
    if connection.dialect.name != "postgresql":
        return []
    quote = functools.partial(quote_in_text, connection)
    widened = []
    for column in local.columns:
        if column.name not in central.c:
            continue
        wanted = _central_type(spec, column, local_dialect)
        if _narrower(central.c[column.name].type, wanted):
            kind = wanted.compile(dialect=connection.dialect)
            connection.execute(text(f"ALTER TABLE {quote(central.name)} ALTER COLUMN {quote(column.name)} TYPE {kind}"))
            widened.append(column.name)
    return widened


def _narrower(present: TypeEngine[Any], wanted: TypeEngine[Any]) -> bool:
    if isinstance(wanted, BigInteger):
        return isinstance(present, Integer) and not isinstance(present, BigInteger)
    if isinstance(wanted, Text):
        return isinstance(present, String) and not isinstance(present, Text) and present.length is not None
    if isinstance(wanted, Numeric) and not isinstance(wanted, Float) and wanted.precision is None:
        return isinstance(present, Numeric) and not isinstance(present, Float) and present.precision is not None
    return False


def _central_type(spec: SyncTable, column: Column[Any], local_dialect: str) -> TypeEngine[Any]:
    if column.name in spec.sensitive_columns:
        return Text()
    return central_type(spec.name, column, local_dialect=local_dialect)


def key_text(value: Any) -> str:
    """A record's key as the change log holds it (SQL's CAST to text), for the key types check_key lets through:
    integers without a decimal point, text as it is, a uuid in its hyphenated lowercase form."""
    return str(value)


def key_value(table: Table, key: str, column: str) -> Any:
    """A key from the change log as the key column's values compare: an integer for an integer column. SQLite lets
    an INTEGER column hold other values (1.5, 'abc'): such a key fails the job naming it, rather than its record be
    taken for one deleted."""
    if table.c[column].type.python_type is not int:
        return key
    try:
        return int(key)
    except ValueError:
        raise InvalidInput(
            f"table {table.name!r} column {column!r} record {key}: {key!r} cannot be synced: the key of an integer "
            "column is an integer",
            field="tables",
        ) from None


def refuse_unnamed_keys(connection: Connection, table: Table, column: str) -> None:
    """SQLite lets a key column hold what its type is not: a BLOB in a TEXT or INTEGER key (kept as it is), text in
    an INTEGER one, and NULL in any PRIMARY KEY but an INTEGER PRIMARY KEY. The change log names a record by
    CAST(key AS TEXT), which names no such record: X'41424344' is logged as 'ABCD', which no text key is (the record
    would be taken for deleted and skipped), X'FF' as no UTF-8 at all, NULL not at all. The first such key fails
    the job naming its record, before anything is logged or moved; each of the two looks is one step of the key's
    index: NULL sorts first, text after numbers and blobs last. (An integer key's REAL, 1.5, sorts among the
    integers: key_value names it, as its record is read.)"""
    if connection.dialect.name != "sqlite":
        return
    integer = isinstance(table.c[column].type, Integer)
    name, on = quote_in_text(connection, column), quote_in_text(connection, table.name)
    for order in ("ASC", "DESC"):
        row = connection.execute(text(f"SELECT typeof({name}), hex({name}) FROM {on} ORDER BY {name} {order} LIMIT 1"))
        found = row.first()
        if found is None:
            return
        refusal = _unnamed_key(found[0], found[1], integer=integer)
        if refusal is not None:
            raise InvalidInput(f"table {table.name!r} column {column!r} record {refusal}", field="tables")


def without_keys_holding_nul(
    table: str, column: str, latest: dict[str, T], records: dict[str, Any], *, central_dialect: str
) -> dict[str, T]:
    """`latest` less the keys holding a NUL, which SQLite text may and PostgreSQL text may not: with a PostgreSQL
    central store such a key fails the job naming its record while the record is there; once it is gone (deleted,
    or its key put right), its change has nothing to delete centrally, where no such key can be. A SQLite central
    store (the embedded default) holds such keys as they are: `latest` whole."""
    if central_dialect != "postgresql":
        return latest
    held = [key for key in latest if "\x00" in key]
    for key in held:
        if key in records:
            raise InvalidInput(
                f"table {table!r} column {column!r} record {key!r}: a key holding a NUL character cannot be synced: "
                "PostgreSQL text cannot hold one",
                field="tables",
            )
    return {key: change for key, change in latest.items() if key not in held} if held else latest


def _unnamed_key(kind: str, hexed: str, *, integer: bool) -> str | None:
    """Why a key SQLite holds as `kind` (its typeof) cannot be synced, after the record's name; None if it can."""
    if kind == "null":
        return "NULL: NULL cannot be synced: a synced record's key is never NULL"
    holds = "the key of an integer column is an integer" if integer else "the key of a text column is text"
    if kind == "blob":
        shown = hexed if len(hexed) <= 40 else hexed[:40] + "..."
        return f"X'{shown}': a BLOB cannot be synced: {holds}"
    if kind == ("integer" if integer else "text"):
        return None
    logged = bytes.fromhex(hexed).decode(errors="replace")  # SQLite's hex() of a number or text is its text's
    shown = repr(logged) if len(repr(logged)) <= 60 else repr(logged)[:57] + "..."
    return f"{logged}: {shown} cannot be synced: {holds}"


def read(
    connection: Connection, table: Table, column: str, keys: Iterable[str], *, lock: bool = True
) -> dict[str, dict[str, Any]]:
    """The records with these keys, by key text; a key without a record is absent. On PostgreSQL each is locked for
    update until the transaction ends, unless `lock` is False."""
    values = [key_value(table, key, column) for key in keys]
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(values), READ_CHUNK):
        chunk = values[start : start + READ_CHUNK]
        query = select(table).where(table.c[column].in_(chunk))
        if lock and connection.dialect.name == "postgresql":
            query = query.with_for_update()
        for row in connection.execute(query).mappings():
            found[key_text(row[column])] = dict(row)
    return found


def upsert(connection: Connection, table: Table, column: str, rows: Sequence[dict[str, Any]]) -> None:
    """Insert or replace each record by its key; writing the same record twice leaves one record."""
    if not rows:
        return
    if connection.dialect.name == "sqlite":
        names = list(rows[0])
        take = values_of(names)
        _upsert_sqlite(connection, table, column, names, [take(row) for row in rows])
        return
    _upsert_postgresql(connection, table, column, rows)


def upsert_values(
    connection: Connection, table: Table, column: str, names: list[str], rows: Sequence[Sequence[Any]]
) -> None:
    """upsert() of records given as their values in `names` order: the shape SQLite's driver takes as it is."""
    if not rows:
        return
    if connection.dialect.name == "sqlite":
        _upsert_sqlite(connection, table, column, names, rows)
        return
    _upsert_postgresql(connection, table, column, [dict(zip(names, row, strict=True)) for row in rows])


def values_of(names: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A row's values in `names` order (itemgetter, but always a tuple)."""
    if len(names) == 1:
        return lambda row: (row[names[0]],)
    return itemgetter(*names)


def _upsert_postgresql(connection: Connection, table: Table, column: str, rows: Sequence[dict[str, Any]]) -> None:
    statement = postgresql.insert(table)
    names = [name for name in rows[0] if name != column]
    statement = statement.on_conflict_do_update(
        index_elements=[column], set_={name: statement.excluded[name] for name in names}
    )
    connection.execute(statement, list(rows))


def _upsert_sqlite(
    connection: Connection, table: Table, column: str, names: list[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Straight to the driver's executemany, each value through its column type's bind processor as SQLAlchemy
    would: SQLAlchemy's own handling of each row's parameters is otherwise most of a pull's local write. (SQLite
    itself reads the quoted names, so a colon in one is no parameter: not quote_in_text.)"""
    quote = connection.dialect.identifier_preparer.quote
    updates = ", ".join(f"{quote(name)} = excluded.{quote(name)}" for name in names if name != column)
    statement = (
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in names)}) "
        f"VALUES ({', '.join('?' for _ in names)}) ON CONFLICT ({quote(column)}) "
        + (f"DO UPDATE SET {updates}" if updates else "DO NOTHING")
    )
    connection.exec_driver_sql(statement, _driver_values(connection, table, names, rows))


def _driver_values(
    connection: Connection, table: Table, names: list[str], rows: Sequence[Sequence[Any]]
) -> list[tuple[Any, ...]]:
    """Each row as the driver takes it; only the columns whose type converts values pay for a conversion."""
    processors = [(index, table.c[name].type.bind_processor(connection.dialect)) for index, name in enumerate(names)]
    converting = [(index, process) for index, process in processors if process is not None]
    if not converting:
        return [tuple(row) for row in rows]
    values = []
    for row in rows:
        value = list(row)
        for index, process in converting:
            value[index] = process(value[index])
        values.append(tuple(value))
    return values


def delete(connection: Connection, table: Table, column: str, keys: Iterable[str]) -> int:
    values = [key_value(table, key, column) for key in keys]
    removed = 0
    for start in range(0, len(values), READ_CHUNK):
        result = connection.execute(table.delete().where(table.c[column].in_(values[start : start + READ_CHUNK])))
        removed += result.rowcount
    return removed


def stamp_of(row: dict[str, Any] | None) -> Stamp | None:
    """A central record's stamp; None for no record, or one stamped before stamps were kept."""
    return Stamp.parse(row[STAMP]) if row is not None and row[STAMP] else None
