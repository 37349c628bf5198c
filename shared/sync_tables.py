"""What a sync source declares about each table, validated the same way by the api and by the sync workers."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from shared.schemas import CamelModel, repeated

# Lowercase SQL identifiers only, of 40 characters at most: they go into the central table's name, which then fits
# PostgreSQL's 63-byte identifiers (`sync_` + a 13-character source id + `_` + 40), and, quoted, into the service's SQL.
IDENTIFIER = r"^[a-z_][a-z0-9_]{0,39}$"
# The sync service's own names (its change log, its columns `_kiln_version` and `_kiln_hlc`) start so.
RESERVED_PREFIX = "_kiln_"
# PostgreSQL's most columns in a table: no table has more sensitive columns.
MAX_COLUMNS = 1600
Policy = Literal["append-only", "last-writer-wins", "field-merge", "manual"]
Direction = Literal["up", "down", "both"]


class SyncTable(CamelModel):
    name: str = Field(pattern=IDENTIFIER, description="the table in the local store")
    primary_key: str = Field(pattern=IDENTIFIER, description="its one-column primary key")
    policy: Policy = Field("last-writer-wins", description="what decides when both sides changed a record")
    direction: Direction = Field("both", description="up: local to central; down: central to local; or both")
    sensitive_columns: list[str] = Field(
        default_factory=list,
        max_length=MAX_COLUMNS,
        description="encrypted before they leave the local store",
    )

    @field_validator("name", "primary_key")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name.startswith(RESERVED_PREFIX):
            raise ValueError(f"{name!r}: names starting {RESERVED_PREFIX!r} are the sync service's own")
        return name

    @field_validator("sensitive_columns")
    @classmethod
    def _identifiers(cls, columns: list[str]) -> list[str]:
        bad = [name for name in columns if not _is_identifier(name)]
        if bad:
            raise ValueError(f"not lowercase column names: {', '.join(bad)}")
        reserved = [name for name in columns if name.startswith(RESERVED_PREFIX)]
        if reserved:
            raise ValueError(f"names starting {RESERVED_PREFIX!r} are the sync service's own: {', '.join(reserved)}")
        twice = repeated(columns)
        if twice:
            raise ValueError(f"columns named more than once: {', '.join(twice)}")
        return columns

    @field_validator("sensitive_columns")
    @classmethod
    def _key_is_not_sensitive(cls, columns: list[str], info: ValidationInfo) -> list[str]:
        key = info.data.get("primary_key")
        if key in columns:
            raise ValueError(f"the primary key {key!r} cannot be a sensitive column: records are found by it")
        return columns

    @property
    def sends_up(self) -> bool:
        return self.direction in ("up", "both")

    @property
    def sends_down(self) -> bool:
        return self.direction in ("down", "both")


class SyncSourceSpec(CamelModel):
    url: str = Field(min_length=1, description="SQLAlchemy URL of the local store; its password is stored encrypted")
    tables: list[SyncTable] = Field(min_length=1, max_length=100)

    @field_validator("tables")
    @classmethod
    def _names_unique(cls, tables: list[SyncTable]) -> list[SyncTable]:
        twice = repeated(table.name for table in tables)
        if twice:
            raise ValueError(f"tables named more than once: {', '.join(twice)}")
        return tables


def _is_identifier(name: str) -> bool:
    return re.fullmatch(IDENTIFIER, name) is not None


def central_table_name(source_id: str, table: str) -> str:
    """Where a source's table lives in the central database: one table per (source, table), so orgs never share."""
    return f"sync_{source_id}_{table}"
