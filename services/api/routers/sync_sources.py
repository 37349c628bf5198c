"""An org's local stores to sync with the central store, and their schedules. A store's password is stored
encrypted and never shown again. A source's URL may be changed (its store reached anew: a rotated password, a moved
server or file), its tables may not; its next job checks that the store is still its own. A source is deleted in two
steps: the api marks it (it then takes no new job, resync, URL or schedule change) and queues the deletion on
`sync.<org>`, where a sync worker removes its central copies and records once its running job ends
(services/sync/source_deletion.py); the row stays as a tombstone, answering 404, so that its jobs' history still
names it."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Response, status
from sqlalchemy import select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from services.api.deps import OrgAdmin, OrgViewer, ResourcesDep, SessionDep
from services.api.outbox_relay import commit_and_send
from services.api.resources import Resources
from services.api.routers.datasource import checked_url
from services.api.sync_schemas import (
    SyncResyncOut,
    SyncScheduleIn,
    SyncScheduleOut,
    SyncSourceChange,
    SyncSourceDeletionOut,
    SyncSourceOut,
)
from shared.audit import record_change
from shared.beat import outlook, reschedule
from shared.db.models import Organization, SyncResync, SyncSchedule, SyncSource
from shared.db.types import utcnow
from shared.db.upsert import upsert
from shared.errors import Conflict, NotFound, SourceBeingDeleted
from shared.org_lock import lock_org
from shared.queues import sync_queue
from shared.schedules import check_schedule
from shared.schemas import OrgConfig
from shared.source_lock import refused_while_a_job_runs
from shared.store_access import store_identity
from shared.stored_secrets import sync_source_context
from shared.sync_jobs import deletion_refusal, queue_source_deletion, queue_sync_job, residency_refusal, source_tables
from shared.sync_tables import SyncSourceSpec, central_table_name

router = APIRouter(prefix="/v1/orgs/{org}/sync-sources", tags=["sync"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SyncSourceOut)
def create_source(
    body: SyncSourceSpec, access: OrgAdmin, session: SessionDep, resources: ResourcesDep
) -> SyncSourceOut:
    url = checked_url(body.url)
    source = SyncSource(id="src" + secrets.token_hex(5), org_id=access.org_id, tables=[])
    _keep_url(source, url, resources)
    source.tables = [table.model_dump(mode="json", by_alias=True) for table in body.tables]
    # The org's registrations take turns: two of one table at once each found no other source of it, and both were
    # created.
    lock_org(session, access.org_id)
    # A table that may never sync (its jobs would all be refused for the org's residency) is refused now, for the
    # reason its jobs would give.
    org = session.get_one(Organization, access.org_id, populate_existing=True)  # as it is now the lock is held
    refusal = residency_refusal(OrgConfig.model_validate(org.config), source)
    if refusal is not None:
        raise Conflict(refusal, field="tables")
    _refuse_tables_synced_already(session, source)
    session.add(source)
    session.flush()
    shown = _source_out(source)
    record_change(
        session,
        org_id=access.org_id,
        actor=access.principal.key_id,
        action="sync.source.created",
        target=source.id,
        detail={"url": shown.url, "tables": source.tables},
    )
    return shown


@router.get("", response_model=list[SyncSourceOut])
def list_sources(access: OrgViewer, session: SessionDep) -> list[SyncSourceOut]:
    rows = session.scalars(
        select(SyncSource)
        .where(SyncSource.org_id == access.org_id, SyncSource.deleted_at.is_(None))
        .order_by(SyncSource.created_at)
    )
    return [_source_out(row) for row in rows]


@router.get("/{source_id}", response_model=SyncSourceOut)
def get_source(source_id: str, access: OrgViewer, session: SessionDep) -> SyncSourceOut:
    return _source_out(owned_source(session, source_id, org_id=access.org_id))


@router.delete("/{source_id}", status_code=status.HTTP_202_ACCEPTED, response_model=SyncSourceDeletionOut)
def delete_source(
    source_id: str, access: OrgAdmin, session: SessionDep, resources: ResourcesDep
) -> SyncSourceDeletionOut:
    """Delete the source and everything Kiln holds centrally for it (its central copies, their change log rows,
    watermarks, store marks, conflicts, field-merge bases, schedule and resyncs), so that its tables may be
    registered again; the audit trail and its jobs' history stay, and its local store is left as it is. From now on
    it takes no new job, resync, URL or schedule change (409); a sync worker does the deletion on `sync.<org>` once the
    source's running job ends, and audits it (`sync.source.deleted`). Asked again while that is pending, the
    deletion is queued again at once; the sync beat queues it again too when it is still pending long after (its
    message lost with Redis)."""
    # The org's deletions take turns with each other and with its registrations: two deletions at once each read
    # the source unmarked, and both were audited as the first request, the last to commit naming the asker.
    lock_org(session, access.org_id)
    source = owned_source(session, source_id, org_id=access.org_id)
    actor = access.principal.key_id
    again = source.deletion_requested_at is not None
    if not again:
        source.deletion_requested_at, source.deletion_requested_by = utcnow(), actor
    record_change(
        session,
        org_id=access.org_id,
        actor=actor,
        action="sync.source.deletion.requested",
        target=source.id,
        detail={"tables": [table.name for table in source_tables(source)], "askedBefore": again},
    )
    message = queue_source_deletion(session, source=source, at=utcnow())
    commit_and_send(session, resources, message)
    return SyncSourceDeletionOut(source_id=source.id, status="deleting", queue=sync_queue(access.org_id))


@router.patch("/{source_id}", response_model=SyncSourceOut)
def change_source_url(
    source_id: str, body: SyncSourceChange, access: OrgAdmin, session: SessionDep, resources: ResourcesDep
) -> SyncSourceOut:
    """Reach the source's store by a new URL (its password rotated, its server moved, its SQLite file's folder
    renamed), keeping its watermarks, conflicts, bases and schedule: its next job moves only what changed since.
    The api opens no org store (they are reachable from the sync workers, which check them, as at registration):
    the next job first checks that the URL reaches the source's own store (its marks) and, if it does not, fails
    and moves nothing. The change is made between the source's jobs: while one runs it is refused (409), and a job
    started after it uses the new URL."""
    url = checked_url(body.url)
    # The org's registrations, deletions and URL changes take turns: the duplicate check below sees the others'.
    lock_org(session, access.org_id)
    source = active_source(session, source_id, org_id=access.org_id)
    before = _source_out(source).url
    _keep_url(source, url, resources)
    _refuse_tables_synced_already(session, source)
    source.url_changed_at = utcnow()
    shown = _source_out(source)
    record_change(
        session,
        org_id=access.org_id,
        actor=access.principal.key_id,
        action="sync.source.url.changed",
        target=source.id,
        detail={"url": shown.url, "previousUrl": before},
    )
    # A job reads the URL when it starts, under its lock: one running now would go on with the old one.
    with refused_while_a_job_runs(session, source.id):
        session.commit()
    return shown


@router.post("/{source_id}/resync", status_code=status.HTTP_202_ACCEPTED, response_model=SyncResyncOut)
def resync(source_id: str, access: OrgAdmin, session: SessionDep, resources: ResourcesDep) -> SyncResyncOut:
    """The source's local store was restored from a backup or replaced (its jobs fail saying so): the job queued
    here brings both sides back together, keeping the edits made since the restore (README, "Restoring a store")."""
    lock_org(session, access.org_id)  # two at once: the second renews the marks the first made
    source = active_source(session, source_id, org_id=access.org_id)
    org_config = OrgConfig.model_validate(session.get_one(Organization, access.org_id, populate_existing=True).config)
    refusal = residency_refusal(org_config, source)
    if refusal is not None:
        raise Conflict(refusal)
    actor = access.principal.key_id
    tables = [table.name for table in source_tables(source)]
    # In one statement: a worker applying the previous request deletes its row without the org's lock, and may do so
    # between a read and a write of it.
    for name in tables:
        values = {"source_id": source.id, "table_name": name, "requested_at": utcnow(), "requested_by": actor}
        upsert(session, SyncResync, values, key=["source_id", "table_name"])
    record_change(
        session,
        org_id=access.org_id,
        actor=actor,
        action="sync.resync.requested",
        target=source.id,
        detail={"tables": tables},
    )
    job, messages = queue_sync_job(session, source=source, actor=actor, trigger="resync")
    commit_and_send(session, resources, *messages)
    return SyncResyncOut(source_id=source.id, tables=tables, job_id=job.id)


@router.put("/{source_id}/schedule", response_model=SyncScheduleOut)
def put_schedule(source_id: str, body: SyncScheduleIn, access: OrgAdmin, session: SessionDep) -> SyncScheduleOut:
    """Set the source's schedule; the sync beat picks the change up at its next tick."""
    check_schedule(body.pattern, body.timezone)
    lock_org(session, access.org_id)  # the first two at once: the second finds the row the first made, and sets it
    source = active_source(session, source_id, org_id=access.org_id)
    # Locked, so a beat firing it now either fires first (and its last fire is seen here) or after the change.
    # One deleted before left its last fire on the source: the new one next fires after it, as one set again without
    # being deleted does (shared.beat.fires_to_come).
    row = session.get(SyncSchedule, source.id, with_for_update=True) or SyncSchedule(
        source_id=source.id, org_id=access.org_id, last_fired_at=source.schedule_last_fired_at
    )
    reschedule(row, pattern=body.pattern, timezone=body.timezone, enabled=body.enabled, now=utcnow())
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    record_change(
        session,
        org_id=access.org_id,
        actor=access.principal.key_id,
        action="sync.schedule.set",
        target=source.id,
        detail={"pattern": body.pattern, "timezone": body.timezone, "enabled": body.enabled},
    )
    return _schedule_out(row)


@router.get("/{source_id}/schedule", response_model=SyncScheduleOut)
def get_schedule(source_id: str, access: OrgViewer, session: SessionDep) -> SyncScheduleOut:
    return _schedule_out(_existing_schedule(session, source_id, access.org_id))


@router.delete("/{source_id}/schedule", status_code=status.HTTP_204_NO_CONTENT)
def delete_schedule(source_id: str, access: OrgAdmin, session: SessionDep) -> Response:
    # Deletions take turns with each other and with a PUT: two at once each found the row, and both were audited.
    lock_org(session, access.org_id)
    source = active_source(session, source_id, org_id=access.org_id)
    # Locked, as a PUT locks it: a beat firing it now commits first, and its fire is the last one kept.
    row = _existing_schedule(session, source_id, access.org_id, locked=True)
    source.schedule_last_fired_at = row.last_fired_at
    session.delete(row)
    record_change(
        session, org_id=access.org_id, actor=access.principal.key_id, action="sync.schedule.deleted", target=source_id
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def owned_source(session: Session, source_id: str, *, org_id: str, field: str | None = None) -> SyncSource:
    """Another org's source is as absent as a missing one, and so is a deleted one (its tombstone only keeps its
    jobs' history)."""
    row = session.get(SyncSource, source_id)
    if row is None or row.org_id != org_id or row.deleted_at is not None:
        raise NotFound(f"sync source {source_id!r} not found", field=field)
    return row


def active_source(session: Session, source_id: str, *, org_id: str, field: str | None = None) -> SyncSource:
    """The org's source, refused with a 409 if its deletion was asked for: nothing new starts for it."""
    row = owned_source(session, source_id, org_id=org_id, field=field)
    refusal = deletion_refusal(row)
    if refusal is not None:
        raise SourceBeingDeleted(refusal, field=field)
    return row


def _keep_url(source: SyncSource, url: URL, resources: Resources) -> None:
    """The URL as given, without its password, which is stored encrypted for this source alone; a URL without one
    leaves the source without one."""
    password = url.password
    source.password_encrypted = (
        None if password is None else resources.secrets.encrypt(str(password), context=sync_source_context(source.id))
    )
    # URL.set(password=None) keeps the password; the NamedTuple's _replace is what removes it.
    source.url = url._replace(password=None).render_as_string(hide_password=False)


def _refuse_tables_synced_already(session: Session, source: SyncSource) -> None:
    """Two sources of one local table share its triggers and change log, and neither sees what the other writes
    down: their central copies would drift apart. One store is one store whatever its URL's spelling (driver,
    default port, host's case, a linked path: store_identity). A deleted source syncs nothing any more; one being
    deleted still counts until a sync worker has removed it, as its running job may still write to the store; the
    source itself does not (its URL being changed). The caller holds lock_org, so that no other registration or URL
    change of the org comes between this check and its write."""
    names = {table["name"] for table in source.tables}
    store = store_identity(make_url(source.url))
    others = session.scalars(
        select(SyncSource).where(
            SyncSource.org_id == source.org_id, SyncSource.id != source.id, SyncSource.deleted_at.is_(None)
        )
    )
    for other in others:
        if store_identity(make_url(other.url)) != store:
            continue
        for table in other.tables:
            if table["name"] not in names:
                continue
            if other.deletion_requested_at is not None:
                raise Conflict(
                    f"table {table['name']!r} of this store is synced by source {other.id}, which is being deleted: "
                    f"register it again once GET /v1/orgs/{source.org_id}/sync-sources/{other.id} answers 404",
                    field="tables",
                )
            raise Conflict(
                f"table {table['name']!r} of this store is synced by source {other.id} already: two sources of "
                "one table would each miss what the other brings down",
                field="tables",
            )


def _existing_schedule(session: Session, source_id: str, org_id: str, *, locked: bool = False) -> SyncSchedule:
    source = owned_source(session, source_id, org_id=org_id)
    # As it is now, should the org's lock be held.
    row = session.get(SyncSchedule, source.id, populate_existing=True, with_for_update=locked or None)
    if row is None:
        raise NotFound(f"sync source {source_id!r} has no schedule")
    return row


def _schedule_out(row: SyncSchedule) -> SyncScheduleOut:
    shown = outlook(row, utcnow())
    return SyncScheduleOut(
        source_id=row.source_id,
        pattern=row.pattern,
        timezone=row.timezone,
        enabled=row.enabled,
        next_fire_times=shown.next_fire_times,
        due_fire_at=shown.due_fire_at,
        missed_fires=shown.missed_fires,
        last_fired_at=row.last_fired_at,
    )


def _source_out(row: SyncSource) -> SyncSourceOut:
    url = make_url(row.url)
    shown = url.set(password="stored") if row.password_encrypted is not None else url  # noqa: S106 - hidden below
    return SyncSourceOut(
        source_id=row.id,
        url=shown.render_as_string(hide_password=True),
        has_password=row.password_encrypted is not None,
        tables=row.tables,
        central_tables={table["name"]: central_table_name(row.id, table["name"]) for table in row.tables},
        created_at=row.created_at,
        status="deleting" if row.deletion_requested_at is not None else "active",
        url_confirmed=row.url_changed_at is None,
    )
