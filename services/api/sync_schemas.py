"""Request and response bodies of the sync routes, camelCase on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from services.api.schemas import CamelOut, DueFireAt, MissedFires
from shared.schemas import CamelModel


class SyncSourceOut(CamelOut):
    source_id: str
    url: str
    has_password: bool
    tables: list[dict[str, Any]]
    central_tables: dict[str, str] = Field(description="where each table's central copy lives")
    created_at: datetime
    status: Literal["active", "deleting"] = Field(
        "active", description="deleting: DELETE was asked for; a sync worker is removing it (then GET answers 404)"
    )
    url_confirmed: bool = Field(
        True,
        description="false once the URL was changed (PATCH), until a job of the source finds its own store there; "
        "a job that finds another database fails and moves nothing",
    )


class SyncSourceChange(CamelModel):
    url: str = Field(
        min_length=1,
        description="the source's store reached anew (a new password, host, port or path); the whole URL, its "
        "password included, replaces the old one",
    )


class SyncSourceDeletionOut(CamelOut):
    source_id: str
    status: Literal["deleting"]
    queue: str = Field(description="the org's sync queue, where a sync worker deletes it once its running job ends")


class SyncResyncOut(CamelOut):
    source_id: str
    tables: list[str] = Field(description="each brought back together with the restored local store by the job")
    job_id: str = Field(description="the job queued to do it")


class SyncJobIn(CamelModel):
    source_id: str = Field(min_length=1, max_length=40)


class SyncJobOut(CamelOut):
    job_id: str
    source_id: str
    status: str
    trigger: str
    pushed: int = Field(description="records sent up, local to central")
    pulled: int = Field(description="records brought down, central to local")
    conflicts: int
    errors: list[dict[str, Any]]
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ConflictOut(CamelOut):
    conflict_id: int
    source_id: str
    job_id: str | None
    table: str
    record_key: str
    policy: str
    status: str
    outcome: str
    local_version: dict[str, Any] = Field(
        description="sensitive columns as stored: sealed; a down-only table's is withheld: "
        '{"_kiln_withheld": true, "_kiln_refusal": <the local store\'s reason>}'
    )
    central_version: dict[str, Any]
    kept: dict[str, Any] | None
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None


class ConflictResolution(CamelModel):
    keep: Literal["local", "central"] = Field(description="which version the record becomes on both sides")


class SyncScheduleIn(CamelModel):
    pattern: str = Field(max_length=100, description="5-field cron pattern, e.g. '*/15 * * * *'")
    timezone: str = Field("UTC", max_length=64, description="IANA timezone the pattern is read in")
    enabled: bool = True


class SyncScheduleOut(CamelOut):
    source_id: str
    pattern: str
    timezone: str
    enabled: bool
    next_fire_times: list[datetime]
    due_fire_at: DueFireAt
    missed_fires: MissedFires
    last_fired_at: datetime | None


class SyncKeyOut(CamelOut):
    key_id: str
    status: str = Field(description="active, retired, drained (may be destroyed) or destroyed")
    created_at: datetime
    retired_at: datetime | None
    destroyed_at: datetime | None


class RotationOut(CamelOut):
    status: Literal["queued"]
    queue: str = Field(description="the org's sync queue, where the rotation runs between its jobs' batches")
