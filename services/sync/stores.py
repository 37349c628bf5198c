"""The two stores a table is synced between: reading records by key and writing them back, on SQLite or PostgreSQL.

The central copy of a local table has the same columns (sensitive ones as text: they hold ciphertext) plus the
record's version and hybrid-logical-clock stamp, `_kiln_version` and `_kiln_hlc`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import BigInteger, Column, Connection, Engine, MetaData, String, Table, Text, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchTableError
from sqlalchemy.pool import NullPool

from shared.db.session import make_engine
from shared.errors import InvalidInput
from shared.sync_tables import SyncTable

VERSION = "_kiln_version"
STAMP = "_kiln_hlc"
META_COLUMNS = (VERSION, STAMP)
READ_CHUNK = 500


def open_local(url: str, password: str | None) -> Engine:
    """The local store, without a pool: a job opens it for its own length only."""
    full = make_url(url).set(password=password) if password is not None else make_url(url)
    return make_engine(full.render_as_string(hide_password=False), poolclass=NullPool)


def reflect(connection: Connection, name: str, *, field: str = "tables") -> Table:
    try:
        return Table(name, MetaData(), autoload_with=connection)
    except NoSuchTableError:
        raise InvalidInput(f"table {name!r} is not in the store", field=field) from None


def check_key(table: Table, spec: SyncTable) -> None:
    keys = [column.name for column in table.primary_key.columns]
    if keys != [spec.primary_key]:
        raise InvalidInput(
            f"table {spec.name!r}: primaryKey {spec.primary_key!r} is not its one-column primary key ({keys})",
            field="tables",
        )
    missing = [name for name in spec.sensitive_columns if name not in table.c]
    if missing:
        raise InvalidInput(f"table {spec.name!r} has no columns {', '.join(missing)}", field="sensitiveColumns")


def ensure_central_table(connection: Connection, local: Table, spec: SyncTable, name: str) -> Table:
    """The central copy of `local`, made on the first sync; sensitive columns become text for their ciphertext."""
    if inspect(connection).has_table(name):
        return reflect(connection, name)
    columns = [
        Column(
            column.name,
            Text() if column.name in spec.sensitive_columns else column.type.as_generic(),
            primary_key=column.name == spec.primary_key,
            autoincrement=False,
        )
        for column in local.columns
    ]
    columns += [Column(VERSION, BigInteger, nullable=False, default=0), Column(STAMP, String(40))]
    table = Table(name, MetaData(), *columns)
    table.create(connection)
    return table


def key_text(value: Any) -> str:
    """A record's key as the change log holds it (SQL's CAST to text): integers without a decimal point."""
    return str(value)


def key_value(table: Table, key: str, column: str) -> Any:
    python_type = table.c[column].type.python_type
    return int(key) if python_type is int else key


def read(connection: Connection, table: Table, column: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The records with these keys, by key text; a key without a record is absent."""
    values = [key_value(table, key, column) for key in keys]
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(values), READ_CHUNK):
        chunk = values[start : start + READ_CHUNK]
        query = select(table).where(table.c[column].in_(chunk))
        if connection.dialect.name == "postgresql":
            query = query.with_for_update()
        for row in connection.execute(query).mappings():
            found[key_text(row[column])] = dict(row)
    return found


def upsert(connection: Connection, table: Table, column: str, rows: Sequence[dict[str, Any]]) -> None:
    """Insert or replace each record by its key; writing the same record twice leaves one record."""
    if not rows:
        return
    dialect_insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(table)
    names = [name for name in rows[0] if name != column]
    statement = statement.on_conflict_do_update(
        index_elements=[column], set_={name: statement.excluded[name] for name in names}
    )
    connection.execute(statement, list(rows))


def delete(connection: Connection, table: Table, column: str, keys: Iterable[str]) -> int:
    values = [key_value(table, key, column) for key in keys]
    removed = 0
    for start in range(0, len(values), READ_CHUNK):
        result = connection.execute(table.delete().where(table.c[column].in_(values[start : start + READ_CHUNK])))
        removed += result.rowcount
    return removed
