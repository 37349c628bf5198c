"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect
from sqlalchemy.dialects.postgresql import DOMAIN, JSONB
from sqlalchemy.types import TypeDecorator, TypeEngine

JsonType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in and out; SQLite stores them naive, so the zone is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def beneath_domains(declared: TypeEngine[Any]) -> TypeEngine[Any]:
    """A PostgreSQL domain's type (CREATE DOMAIN celsius AS numeric(8, 2)) as the type it is over, a domain over a
    domain included: SQLAlchemy reflects it as DOMAIN, which is no Numeric, no Integer, no DateTime. Other types
    as they are."""
    while isinstance(declared, DOMAIN):
        declared = declared.data_type
    return declared
