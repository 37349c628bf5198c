"""Request and response bodies of the api, camelCase on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from shared.schemas import CamelModel, OrgConfig

ORG_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"


class CamelOut(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)


class OrgCreate(CamelModel):
    id: str = Field(pattern=ORG_ID_PATTERN, description="lowercase letters, digits and dashes, 3-63 long")
    name: str = Field(min_length=1, max_length=200)
    config: OrgConfig = OrgConfig()


class OrgOut(CamelOut):
    id: str
    name: str
    config: dict[str, Any]
    created_at: datetime


class KeyCreate(CamelModel):
    role: Literal["admin", "trainer", "viewer"]


class KeyCreated(CamelOut):
    key_id: str
    role: str
    key: str = Field(description="shown once; only its digest is stored")
    created_at: datetime


class ColumnOut(CamelOut):
    name: str
    type: str
    numeric: bool


class DatasetOut(CamelOut):
    dataset_id: str
    filename: str
    rows: int
    columns: list[ColumnOut]
    timestamp_column: str | None
    size_bytes: int
    created_at: datetime


class RunAccepted(CamelOut):
    run_id: str
    status: str


class RunOut(CamelOut):
    run_id: str
    status: str
    version: str | None
    metrics: dict[str, Any] | None
    error: str | None
    attempts: int
    cancel_requested: bool
    progress: dict[str, Any]
    config: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ModelOut(CamelOut):
    version: str
    status: str
    run_id: str
    sha256: str
    size_bytes: int
    feature_columns: list[str]
    target_column: str
    classes: list[Any]
    metrics: dict[str, Any]
    validation: dict[str, Any]
    created_at: datetime


class DataSourceIn(CamelModel):
    url: str = Field(min_length=1, description="SQLAlchemy URL; its password is stored encrypted")
    table: str = Field(min_length=1, max_length=200)
    timestamp_column: str | None = Field(None, min_length=1, max_length=200)
    column_map: dict[str, str] = Field(default_factory=dict, description="source column -> name used in trainings")


class DataSourceOut(CamelOut):
    url: str
    table: str
    timestamp_column: str | None
    column_map: dict[str, str]
    has_password: bool
    updated_at: datetime


class RunLogOut(CamelOut):
    at: datetime
    attempt: int
    level: str
    stage: str
    message: str


class ValidationAccepted(CamelOut):
    version: str
    status: str


class OrgUpdate(CamelModel):
    name: str | None = Field(None, min_length=1, max_length=200)
    config: OrgConfig | None = None


class DeployRequest(CamelModel):
    version: str = Field(min_length=1)


class RollbackRequest(CamelModel):
    version: str | None = None


class DeploymentOut(CamelOut):
    version: str
    deployed_at: datetime
    rollback_available: bool
