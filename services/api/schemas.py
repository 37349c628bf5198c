"""Request and response bodies of the api, camelCase on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from shared.schemas import CamelModel, OrgConfigInput, TrainingConfigInput

ORG_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$"
# Row ids are BIGINT on PostgreSQL and INTEGER on SQLite: a larger number is no row, and the drivers refuse it.
MAX_ROW_ID = 2**63 - 1


class CamelOut(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)


# What a schedule's view shows of its beat's next tick (shared.beat.outlook), training and sync schedules alike.
DueFireAt = Annotated[
    datetime | None,
    Field(
        description="a fire time passed and not fired yet (beat down, or not yet ticked): beat fires it at its next "
        "tick; it heads nextFireTimes"
    ),
]
MissedFires = Annotated[
    int, Field(description="fire times passed that beat skips at its next tick, recording them missed")
]


class OrgCreate(CamelModel):
    id: str = Field(pattern=ORG_ID_PATTERN, description="lowercase letters, digits and dashes, 3-63 long")
    name: str = Field(min_length=1, max_length=200)
    config: OrgConfigInput = OrgConfigInput()


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


class KeyOut(CamelOut):
    key_id: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


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
    erased_at: datetime | None = Field(
        None, description="when its rows were erased (DELETE): the row stays so runs still name it, nothing reads it"
    )


class DatasetErased(DatasetOut):
    versions_keeping_rows: list[str] = Field(
        description="versions trained on it and not erased: each keeps a share of its rows as held-out rows, "
        "which DELETE /v1/orgs/{org}/models/{version}/artifacts erases"
    )


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
    waiting_for_slot: bool
    trigger: str
    worker: str | None
    progress: dict[str, Any]
    config: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ArtifactOut(CamelOut):
    name: str
    path: str = Field(description="where to download it, on this api")
    sha256: str | None = Field(None, description="the model's, as registered; checked on every download")


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
    validated_at: datetime | None = Field(description="when the validation report was last written")
    erased_at: datetime | None = Field(None, description="when its artifacts were erased (status `erased`)")
    holdout_on_premises: bool = Field(
        description="where its run wrote the held-out rows: true, on the org's premises (its own worker's folder), "
        "as its org kept its data then; a judgement or an erasure of the version goes there, whatever the org "
        "keeps now"
    )


class ModelErased(CamelOut):
    version: str
    status: str = Field(description="`erased`: it can never be deployed, rolled back to, judged or downloaded")
    erased_at: datetime
    removed: list[str] = Field(description="the artifacts this request removed from the object store")
    premises: str | None = Field(
        None,
        description="for an org keeping its data on its premises: `queued`, its own worker removes the held-out rows "
        "kept there and audits `model.erased.premises`",
    )


class DataSourceIn(CamelModel):
    url: str = Field(min_length=1, description="SQLAlchemy URL; its password is stored encrypted")
    table: str = Field(min_length=1, max_length=200)
    timestamp_column: str | None = Field(None, min_length=1, max_length=200)
    column_map: dict[str, str] = Field(
        default_factory=dict,
        description="source column -> name used in trainings; one column per name; a renamed one goes by its new name",
    )


class DataSourceOut(CamelOut):
    url: str
    table: str
    timestamp_column: str | None
    column_map: dict[str, str]
    has_password: bool
    updated_at: datetime


class RunLogOut(CamelOut):
    id: int
    at: datetime
    attempt: int
    level: str
    stage: str
    message: str


class ValidationAccepted(CamelOut):
    version: str
    status: str = Field(description="`validating`: the judgement is queued on the org's workers")
    version_status: str = Field(
        description="the version's status now; a rejected version stays rejected whatever the new judgement says"
    )
    note: str | None = Field(
        None, description="for a rejected version: the gates it was rejected for, and that it stays rejected"
    )


class OrgUpdate(CamelModel):
    name: str | None = Field(None, min_length=1, max_length=200)
    config: dict[str, Any] | None = Field(
        None,
        description="a JSON merge patch (RFC 7396) of the config: objects merge, any other value (a list too) "
        "replaces, null puts a setting back to its default; the result is validated as a whole",
    )

    @field_validator("name")
    @classmethod
    def _name_kept(cls, name: str | None) -> str | None:
        """In a merge patch null removes: answered 200 and changing nothing, it read as done."""
        if name is None:
            raise ValueError("an organization keeps its name; give a new one instead of null")
        return name


class DeployRequest(CamelModel):
    version: str = Field(min_length=1)


class RollbackRequest(CamelModel):
    version: str | None = None


class DeploymentOut(CamelOut):
    version: str | None = Field(description="the version deployed; null once the org was undeployed")
    deployed_at: datetime = Field(description="when the org's deployment last changed (deploy, rollback, undeploy)")
    rollback_available: bool = Field(
        description="whether `rollback {}` has a version to go to: an older validated version, or once undeployed, "
        "the version undeployed if it is validated still"
    )
    deployment_id: int
    status: str = Field(
        description="deployed; failed when a predictor refused the version (see error); undeployed when nothing "
        "serves the org"
    )
    error: str | None
    version_status: str | None = Field(
        description="the version's own status now: validated, or rejected when judging it again failed it (it keeps "
        "serving until the next deploy, rollback or undeploy); null once undeployed"
    )
    failed_gates: list[str] = Field(description="the gates the version's latest judgement failed")
    serving_version: str | None = Field(
        description="the version predictors serve: `version`, or while its deployment is failed the last good one "
        "before it; null when nothing serves (undeployed, or every deployment refused)"
    )


class DeploymentRecord(CamelOut):
    deployment_id: int
    action: str = Field(description="deploy, rollback or undeploy")
    version: str | None = Field(description="the version it deployed; null for an undeploy")
    previous_version: str | None = Field(
        description="the version before it; for an undeploy, the one it stopped: the newest a predictor had loaded, "
        "and `rollback {}` goes back to it"
    )
    actor: str
    status: str = Field(
        description="deployed; failed when a predictor refused the version (see error); undeployed for an undeploy; "
        "superseded when an undeploy came before any predictor had loaded it (it never served)"
    )
    error: str | None
    created_at: datetime


class PredictionRecord(CamelOut):
    id: int
    version: str
    score: float
    label: str
    risk_level: str | None
    latency_ms: float
    at: datetime


class ScheduleIn(CamelModel):
    pattern: str = Field(max_length=100, description="5-field cron pattern, e.g. '0 2 * * 0' for Sundays at 02:00")
    timezone: str = Field(
        "UTC", max_length=64, description="IANA timezone the pattern is read in, e.g. 'America/New_York'"
    )
    enabled: bool = True
    training_config: TrainingConfigInput


class ScheduleOut(CamelOut):
    pattern: str
    timezone: str
    enabled: bool
    training_config: dict[str, Any]
    next_fire_times: list[datetime]
    due_fire_at: DueFireAt
    missed_fires: MissedFires
    last_fired_at: datetime | None
    dst_policy: str


class AuditOut(CamelOut):
    id: int
    actor: str
    action: str
    target: str
    detail: dict[str, Any]
    at: datetime


class QueueOut(CamelOut):
    queued: int
    waiting_for_slot: int
    running: int
    max_concurrent_trainings: int
    oldest_queued_at: datetime | None
    oldest_wait_s: float | None
