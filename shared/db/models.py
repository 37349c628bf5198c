"""The tables Kiln keeps its state in. The database is the source of truth; Redis only carries work and events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, MetaData, String, Text, false, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.db.types import JsonType, UTCDateTime, utcnow

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute as is
        dict[str, Any]: JsonType,
        list[Any]: JsonType,
        datetime: UTCDateTime,
    }


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The last fire of the org's schedule when it was deleted: one set again starts from it, as a schedule set
    # again without being deleted does, so an api clock behind beat's never stores that fire again.
    schedule_last_fired_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    object_key: Mapped[str] = mapped_column(String(300))
    filename: Mapped[str] = mapped_column(String(300))
    row_count: Mapped[int] = mapped_column(BigInteger)
    columns: Mapped[list[Any]] = mapped_column()
    timestamp_column: Mapped[str | None] = mapped_column(String(200), default=None)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # DELETE /v1/orgs/{org}/datasets/{id}: its object is removed from the store, and the row stays as a tombstone
    # (runs name it), which no submission, schedule or run may read from again.
    erased_at: Mapped[datetime | None] = mapped_column(default=None)


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    status: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column()
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), default=None)
    version: Mapped[str | None] = mapped_column(String(48), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # Fencing: each claim takes the next token, and an attempt's writes only land while the token is still its own.
    claim_token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set when the org had no free slot at claim time: the run waits for a slot without a message in the queue,
    # and whoever frees a slot sends it one.
    waiting_for_slot: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    trigger: Mapped[str] = mapped_column(String(16), default="api", server_default="api")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # When its latest message was queued (a retry's: when its backoff ends): a run still queued long after may have
    # lost it, and a worker's sweep queues it again (services/trainer/runs.py, requeue_lost). None: its created_at.
    message_queued_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (
        Index("ix_training_runs_org_created", "org_id", "created_at"),
        Index("ix_training_runs_status_lease", "status", "lease_expires_at"),
        Index("ix_training_runs_org_status", "org_id", "status"),
        Index("uq_training_runs_org_idempotency", "org_id", "idempotency_key", unique=True),
    )


class RunLog(Base):
    """The training log of a run (the seed's TrainingLog): one line per step, error or gate."""

    __tablename__ = "run_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8))
    stage: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


class CandidateFolder(Base):
    """The folder of a version an attempt is uploading and has not registered yet, recorded before its first upload:
    were the attempt to die or the store to fail its clean-up, nothing else would name the folder, its held-out rows
    (a share of the org's rows) included. Deleted with the version's registration or the folder's removal; a sweep
    removes a folder whose attempt no longer holds its run (services/trainer/candidates.py)."""

    __tablename__ = "candidate_folders"

    prefix: Mapped[str] = mapped_column(String(300), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id"), index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    # The attempt's claim token: the folder is the attempt's while the run's token is still this one.
    claim_token: Mapped[int] = mapped_column(Integer)
    # Whether the held-out rows went to the org's premises folder, which only the org's own workers reach.
    holdout_on_premises: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DataSource(Base):
    """An org's own database to train from (the seed's scadaDbConfig + schemaConfig). The URL is kept without its
    password, which is stored encrypted."""

    __tablename__ = "datasources"

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    password_encrypted: Mapped[str | None] = mapped_column(Text, default=None)
    table_name: Mapped[str] = mapped_column(String(200))
    timestamp_column: Mapped[str | None] = mapped_column(String(200), default=None)
    column_map: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[str] = mapped_column(String(48), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id"))
    status: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    artifact_prefix: Mapped[str] = mapped_column(String(300))
    feature_columns: Mapped[list[Any]] = mapped_column()
    target_column: Mapped[str] = mapped_column(String(200))
    classes: Mapped[list[Any]] = mapped_column()
    metrics: Mapped[dict[str, Any]] = mapped_column()
    validation: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    validated_at: Mapped[datetime | None] = mapped_column(default=None)
    # DELETE /v1/orgs/{org}/models/{version}/artifacts: status "erased", every stored artifact removed; the row, its
    # metrics and report stay, as the deployment history and the audit trail name it.
    erased_at: Mapped[datetime | None] = mapped_column(default=None)
    # Where the run wrote its held-out rows: the org's premises folder (its config said dataResidency "local" when
    # the run was claimed) or the central store. An erasure follows this, never the org's config of the day, which
    # may have changed since.
    holdout_on_premises: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (Index("ix_model_versions_org_created", "org_id", "created_at"),)


class Deployment(Base):
    """One row per deploy, rollback or undeploy: the history. CurrentDeployment is the pointer the predictor follows.

    An undeploy's row has no version: from it on nothing serves the org (previous_version names what served)."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    version: Mapped[str | None] = mapped_column(ForeignKey("model_versions.version"))
    previous_version: Mapped[str | None] = mapped_column(String(48), default=None)
    action: Mapped[str] = mapped_column(String(16))  # deploy, rollback or undeploy
    actor: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # "deployed", or "failed" when a predictor refused the version (corrupt, wrong signature, NaN) and kept the old;
    # "undeployed" for an undeploy; "superseded" when an undeploy came before any predictor had loaded it.
    status: Mapped[str] = mapped_column(String(16), default="deployed", server_default="deployed")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # When a predictor first loaded and warmed it: from then on the version has shown it serves, and a later failure
    # to load it again (the store out, its file gone or changed) is a passing error, never a refusal.
    loaded_at: Mapped[datetime | None] = mapped_column(default=None)


DEPLOYMENT_DEPLOYED = "deployed"
DEPLOYMENT_FAILED = "failed"
DEPLOYMENT_UNDEPLOYED = "undeployed"
DEPLOYMENT_SUPERSEDED = "superseded"
ACTION_UNDEPLOY = "undeploy"


class CurrentDeployment(Base):
    """The org's pointer: its newest deployment. A null version: the org was undeployed, and nothing serves it."""

    __tablename__ = "current_deployments"

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    version: Mapped[str | None] = mapped_column(ForeignKey("model_versions.version"))
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"))
    deployed_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutboxMessage(Base):
    """A message written in the same transaction as the state it announces; a relay sends it afterwards."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    # A failed send waits until next_send_at, longer after each failure; last_error says why it failed.
    failed_sends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_send_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)


class Prediction(Base):
    """One answered row, for orgs that keep prediction records (the seed's Prediction table)."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    version: Mapped[str] = mapped_column(String(48))
    score: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(200))
    risk_level: Mapped[str | None] = mapped_column(String(16))  # None: a multiclass model without a normal class
    latency_ms: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_predictions_org_id_id", "org_id", "id"),)


class Schedule(Base):
    """An org's recurring training: a 5-field cron pattern in its timezone, and the TrainingConfig it runs."""

    __tablename__ = "schedules"

    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    pattern: Mapped[str] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean)
    training_config: Mapped[dict[str, Any]] = mapped_column()
    next_fire_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    last_fired_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Append-only: who changed what in an org, and when. Nothing updates or deletes these rows, but for a key
    rotation re-encrypting the sealed values a `sync.delete` row keeps (services/sync/rotation.py)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(String(63))
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_audit_log_org_id_id", "org_id", "id"),)


class SyncSource(Base):
    """An org's local store (a SQLite file or a PostgreSQL database on its premises) and the tables synced with
    the central store. The URL is kept without its password, which is stored encrypted."""

    __tablename__ = "sync_sources"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    password_encrypted: Mapped[str | None] = mapped_column(Text, default=None)
    tables: Mapped[list[Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # DELETE /v1/orgs/{org}/sync-sources/{id}: asked for (the source takes no new job, resync, URL or schedule change),
    # then done by a sync worker, which drops its central copies and everything else kept for it. The row stays as
    # a tombstone (its password gone), so that its jobs' history and the audit trail still name a source.
    deletion_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    deletion_requested_by: Mapped[str | None] = mapped_column(String(64), default=None)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    # When the deletion's task was last queued (shared/sync_jobs.py, queue_source_deletion): the sync beat queues it
    # again when the source is still not deleted long after (services/sync/beat.py, resend_lost_deletions).
    deletion_queued_at: Mapped[datetime | None] = mapped_column(default=None)
    # PATCH /v1/orgs/{org}/sync-sources/{id} changed the URL: until a sync worker has found the source's own store
    # there (its marks, services/sync/store_marks.py), a job on it moves nothing and a resync does not let it through.
    url_changed_at: Mapped[datetime | None] = mapped_column(default=None)
    # The last fire of the source's schedule when it was deleted: one set again starts from it, as a schedule set
    # again without being deleted does, so an api clock behind the sync beat's never stores that fire again.
    schedule_last_fired_at: Mapped[datetime | None] = mapped_column(default=None)


class SyncJob(Base):
    """One run of a source's sync: what it moved each way, the conflicts it met and the errors it hit."""

    __tablename__ = "sync_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    source_id: Mapped[str] = mapped_column(ForeignKey("sync_sources.id"))
    status: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(16), default="api")
    pushed: Mapped[int] = mapped_column(BigInteger, default=0)
    pulled: Mapped[int] = mapped_column(BigInteger, default=0)
    conflicts: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[Any]] = mapped_column(default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # When its message was last queued, if again since created_at (shared/sync_jobs.py, REQUEUE_AFTER).
    requeued_at: Mapped[datetime | None] = mapped_column(default=None)

    # A job syncs all there is when it starts: a second one waiting beside it would have nothing left to do, so the
    # database refuses it, and queue_sync_job (shared/sync_jobs.py) answers the waiting one instead.
    __table_args__ = (
        Index("ix_sync_jobs_org_created", "org_id", "created_at"),
        Index(
            "uq_sync_jobs_one_queued_per_source",
            "source_id",
            unique=True,
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
        # The sync beat looks for running jobs whose worker died (services/sync/beat.py) every tick.
        Index(
            "ix_sync_jobs_running",
            "source_id",
            postgresql_where=text("status = 'running'"),
            sqlite_where=text("status = 'running'"),
        ),
    )


class SyncWatermark(Base):
    """The last change-log position acknowledged for (source, table, direction): up reads the local store's log,
    down the central one. A job starts from here, so a rerun moves only what is not acknowledged yet."""

    __tablename__ = "sync_watermarks"

    source_id: Mapped[str] = mapped_column(ForeignKey("sync_sources.id"), primary_key=True)
    table_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    direction: Mapped[str] = mapped_column(String(8), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Of `up`: the local log row at `seq`, its record and time. A store restored from a backup lacks it, or logs
    # another edit under that number (services/sync/store_marks.py).
    logged_key: Mapped[str | None] = mapped_column(Text, default=None)
    logged_at_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)


class SyncStoreMark(Base):
    """The token a source's local store should hold (in its `_kiln_marks`), new at the start and the end of every
    job: a store restored from a backup or replaced holds another. `previous_token` is the one the store held before
    the last new one, accepted until the store is known to hold the new one; "" stands for a store that held none."""

    __tablename__ = "sync_store_marks"

    source_id: Mapped[str] = mapped_column(ForeignKey("sync_sources.id"), primary_key=True)
    token: Mapped[str] = mapped_column(String(64))
    previous_token: Mapped[str | None] = mapped_column(String(64), default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SyncResync(Base):
    """A table whose local store was restored or replaced, to be brought back together with its central copy by
    the source's next job (POST /v1/orgs/{org}/sync-sources/{id}/resync); the job deletes the row as it does so."""

    __tablename__ = "sync_resyncs"

    source_id: Mapped[str] = mapped_column(ForeignKey("sync_sources.id"), primary_key=True)
    table_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    requested_by: Mapped[str] = mapped_column(String(64))


class SyncConflict(Base):
    """A record both sides changed since the last sync: both versions as they were, and what became of them.
    Sensitive columns are kept as ciphertext. Status is resolved (by the table's policy) or open (manual review)."""

    __tablename__ = "sync_conflicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    source_id: Mapped[str] = mapped_column(ForeignKey("sync_sources.id"))
    job_id: Mapped[str | None] = mapped_column(String(40), default=None)
    table_name: Mapped[str] = mapped_column(String(64))
    record_key: Mapped[str] = mapped_column(Text)
    policy: Mapped[str] = mapped_column(String(24))
    status: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(32))
    local_version: Mapped[dict[str, Any]] = mapped_column()
    central_version: Mapped[dict[str, Any]] = mapped_column()
    kept: Mapped[dict[str, Any] | None] = mapped_column(JsonType, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)
    resolved_by: Mapped[str | None] = mapped_column(String(64), default=None)

    __table_args__ = (Index("ix_sync_conflicts_org_status", "org_id", "status", "id"),)


class SyncKey(Base):
    """An org's envelope key for sensitive columns, wrapped under the platform key. One is active; retired ones
    still decrypt until a rotation has re-encrypted everything, after which they can be destroyed."""

    __tablename__ = "sync_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    wrapped: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(default=None)
    destroyed_at: Mapped[datetime | None] = mapped_column(default=None)

    # Two active keys would seal under either, and a rotation reads one of them: the database refuses a second.
    __table_args__ = (
        Index(
            "uq_sync_keys_one_active_per_org",
            "org_id",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )


class SyncSchedule(Base):
    """A source's recurring sync: a 5-field cron pattern in the org's timezone, fired by the sync beat."""

    __tablename__ = "sync_schedules"

    source_id: Mapped[str] = mapped_column(ForeignKey("sync_sources.id"), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    pattern: Mapped[str] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean)
    next_fire_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    last_fired_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SyncBase(Base):
    """A field-merge record as both sides last agreed on it: what tells whose fields changed since."""

    __tablename__ = "sync_bases"

    source_id: Mapped[str] = mapped_column(ForeignKey("sync_sources.id"), primary_key=True)
    table_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    record_key: Mapped[str] = mapped_column(Text, primary_key=True)
    row: Mapped[dict[str, Any]] = mapped_column()


class SyncChange(Base):
    """The central store's change log, filled by triggers on the synced tables: one row per write by anyone but
    the sync service itself (origin "app"), and per merged record the service must still send down ("merge").
    `replaced` is the stamp an edited record carried before the edit: what a local edit of it was made against."""

    __tablename__ = "sync_changes"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    tbl: Mapped[str] = mapped_column(String(64))
    pk: Mapped[str] = mapped_column(Text)
    origin: Mapped[str] = mapped_column(String(8))
    at_ms: Mapped[int] = mapped_column(BigInteger)
    replaced: Mapped[str | None] = mapped_column(String(40))

    __table_args__ = (Index("ix_sync_changes_tbl_seq", "tbl", "seq"), Index("ix_sync_changes_tbl_pk", "tbl", "pk"))


class SyncApplying(Base):
    """Holds a row only inside the sync service's own transactions, so the capture triggers skip its writes."""

    __tablename__ = "sync_applying"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
