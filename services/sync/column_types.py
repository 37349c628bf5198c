"""The central copy's column types, and the values a SQLite local store holds that they cannot hold as they are.

SQLite does not enforce declared types: an INTEGER column holds 64-bit integers (and, as SQLite allows, text), a
NUMERIC(10,2) holds 12.345, a VARCHAR(5) any length, a DATETIME whatever text it was given. So a SQLite table is
read and written with its values as the file holds them (no conversion on the way, which would round a NUMERIC
to its scale, turn a BOOLEAN 2 into 1, or rewrite a DATETIME's text), and its central copy takes the widest type
that gives each value back as it was: BIGINT for integers, unconstrained NUMERIC, TEXT without a length for text
and for what SQLite keeps as text (dates, times, JSON). A value no central type holds as it is (text in an
INTEGER column, a NUL character in text on PostgreSQL) fails the job naming table, column and record.

A PostgreSQL local store enforces its types, so its central copy takes them as they are, integers as BIGINT.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Enum,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import NullType, TypeEngine

from shared.db.types import beneath_domains
from shared.errors import InvalidInput
from shared.sync_tables import SyncTable

# Why a value cannot be stored centrally as it is, or None when it can.
Check = Callable[[Any], str | None]


def central_type(table: str, column: Column[Any], *, local_dialect: str) -> TypeEngine[Any]:
    """The type of `column`'s central copy (a sensitive column's is text, for its ciphertext: not decided here)."""
    declared = column.type
    if isinstance(declared, Integer):
        return BigInteger()
    if local_dialect != "sqlite":
        return _generic(table, column, declared)
    if isinstance(declared, NullType):
        raise InvalidInput(
            f"table {table!r} column {column.name!r} has no declared type: SQLite lets it hold any value, which no "
            "one central type holds as it is; declare its type",
            field="tables",
        )
    if isinstance(declared, Boolean):
        return Boolean()
    if isinstance(declared, Float):
        return Double()
    if isinstance(declared, Numeric):
        return Numeric()
    if isinstance(declared, LargeBinary):
        return LargeBinary()
    return Text()


def _generic(table: str, column: Column[Any], declared: TypeEngine[Any]) -> TypeEngine[Any]:
    """A PostgreSQL store's type as the central store declares it: a domain as the type it is over; an enum as
    text, since the central copy of a named enum type would be one type in Kiln's schema for every org's copies
    (another org's enum of the same name, or labels, would clash with it); a type with no generic form (inet,
    money, ranges, bit strings) refused naming the column, rather than failing the job with SQLAlchemy's words."""
    declared = beneath_domains(declared)
    if isinstance(declared, Integer):
        return BigInteger()
    if isinstance(declared, Enum):
        return Text()
    try:
        return declared.as_generic()
    except NotImplementedError:
        raise InvalidInput(
            f"table {table!r} column {column.name!r} is of type {type(declared).__name__.lower()}, which the central "
            "copy has no type for; store it as text or another standard SQL type",
            field="tables",
        ) from None


# SQLite's INTEGER: a whole number outside it is a REAL in a NUMERIC column (1e20, or '100000000000000000000').
_INT64 = range(-(2**63), 2**63)


class _StoredNumber(TypeDecorator[Any]):
    """A SQLite NUMERIC value as the file holds it, as a Decimal (12.345 stays 12.345, not its declared scale's
    12.35), so that it compares with the central copy's; written back as the integer or real SQLite keeps: an
    integer when it is whole and fits SQLite's 64 bits, a real otherwise (1e20 stays the REAL 1e20)."""

    impl = NullType
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return Decimal(repr(value)) if isinstance(value, int | float) else value

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if not isinstance(value, Decimal):
            return value
        # adjusted() first: int() of a Decimal such as 1E+999999 would build its million digits.
        if value.is_finite() and value == value.to_integral_value() and value.adjusted() < 19:
            whole = int(value)
            if whole in _INT64:
                return whole
        return float(value)


def as_stored(table: Table) -> Table:
    """A reflected SQLite table whose values are read and written as the file holds them."""
    columns = [
        Column(column.name, _stored_type(column.type), primary_key=column.primary_key, autoincrement=False)
        for column in table.columns
    ]
    return Table(table.name, MetaData(), *columns)


def _stored_type(declared: TypeEngine[Any]) -> TypeEngine[Any]:
    if isinstance(declared, Integer):
        return Integer()  # converts nothing on SQLite, and keeps an integer key's values integers
    if isinstance(declared, Numeric) and not isinstance(declared, Float):
        return _StoredNumber()
    return NullType()


def value_checks(reflected: Table, spec: SyncTable, *, local_dialect: str, central_dialect: str) -> dict[str, Check]:
    """For each column of a SQLite table (not the sensitive ones: they go up as ciphertext), what its central copy
    cannot hold. A PostgreSQL local store's values fit their central copy's types by construction."""
    if local_dialect != "sqlite":
        return {}
    checks = {}
    for column in reflected.columns:
        if column.name not in spec.sensitive_columns:
            checks[column.name] = _check_of(column.type, nul_free=central_dialect == "postgresql")
    return checks


def _check_of(declared: TypeEngine[Any], *, nul_free: bool) -> Check:
    if isinstance(declared, Integer):
        return _kind(lambda value: type(value) is int, "the central copy of an INTEGER column holds integers")
    if isinstance(declared, Boolean):
        return _kind(
            lambda value: type(value) is int and value in (0, 1), "the central copy of a BOOLEAN column holds 0 and 1"
        )
    if isinstance(declared, Float):
        return _kind(lambda value: type(value) in (int, float), "the central copy of a REAL column holds numbers")
    if isinstance(declared, Numeric):
        return _kind(lambda value: isinstance(value, Decimal), "the central copy of a NUMERIC column holds numbers")
    if isinstance(declared, LargeBinary):
        return _kind(lambda value: isinstance(value, bytes), "the central copy of a BLOB column holds bytes")
    return _text(nul_free=nul_free)


def _kind(fits: Callable[[Any], bool], holds: str) -> Check:
    return lambda value: None if value is None or fits(value) else holds


def _text(*, nul_free: bool) -> Check:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            return "the central copy of a text column holds text"
        if nul_free and "\x00" in value:
            return "PostgreSQL text cannot hold a NUL character"
        return None

    return check


def refuse_unstorable(table: str, key: str, row: dict[str, Any], checks: dict[str, Check]) -> None:
    """InvalidInput naming table, column and record for the first value of `row` its central copy cannot hold."""
    for name, check in checks.items():
        why = check(row.get(name))
        if why is not None:
            shown = repr(row[name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise InvalidInput(
                f"table {table!r} column {name!r} record {row[key]}: {shown} cannot be stored centrally as it is: "
                f"{why}",
                field="tables",
            )
