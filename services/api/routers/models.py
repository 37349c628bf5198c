"""Model versions with their metrics and validation reports, and their artifacts to download."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response, status

from services.api.deps import OrgAdmin, OrgTrainer, OrgViewer, ResourcesDep, SessionDep
from services.api.outbox_relay import commit_and_send
from services.api.ratelimit import take_submission
from services.api.registry import failed_gates, refuse_erased, refuse_in_service
from services.api.resources import Resources
from services.api.schemas import ArtifactOut, ModelErased, ModelOut, ValidationAccepted
from shared.audit import record_change
from shared.db.models import ModelVersion, Organization, OutboxMessage
from shared.db.types import utcnow
from shared.errors import Gone, KilnError, NotFound, TransientError
from shared.layout import METRICS_FILE, MODEL_FILE, NATIVE_MODEL_FILE, TRAINING_CONFIG_FILE, VALIDATION_FILE
from shared.lookups import get_owned, newest_first
from shared.org_lock import lock_org
from shared.outbox import KIND_ERASE_TASK, KIND_VALIDATE_TASK, add_message
from shared.schemas import OrgConfig
from shared.storage import get_verified_bytes
from shared.verdicts import ERASED, REJECTED

# What may be downloaded of a version, with its media type: the model in both forms, and its reports. Not the
# held-out rows stored beside them: those are the org's records (and, for an org whose data stays home, were never
# in this store).
DOWNLOADABLE = {
    MODEL_FILE: "application/octet-stream",
    NATIVE_MODEL_FILE: "text/plain; charset=utf-8",
    METRICS_FILE: "application/json",
    TRAINING_CONFIG_FILE: "application/json",
    VALIDATION_FILE: "application/json",
}

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/orgs/{org}/models", tags=["models"])


VersionStatus = Literal["validated", "rejected", "erased"]


@router.get("", response_model=list[ModelOut])
def list_models(
    access: OrgViewer,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        str | None,
        Query(min_length=1, max_length=48, description="only versions created before this version, to page back"),
    ] = None,
    state: Annotated[VersionStatus | None, Query(alias="status")] = None,
) -> list[ModelOut]:
    """The org's versions, newest first, in pages as its runs are."""
    page = newest_first(session, ModelVersion, org_id=access.org_id, limit=limit, before=before, status=state)
    return [_model_out(row) for row in page]


@router.get("/{version}", response_model=ModelOut)
def get_model(version: str, access: OrgViewer, session: SessionDep) -> ModelOut:
    return _model_out(get_owned(session, ModelVersion, version, org_id=access.org_id))


@router.post("/{version}/validate", status_code=status.HTTP_202_ACCEPTED, response_model=ValidationAccepted)
def validate_model(
    version: str, access: OrgTrainer, session: SessionDep, resources: ResourcesDep
) -> ValidationAccepted:
    """Run every gate again on the stored artifact, on the org's workers; the report replaces the version's. A
    validated version that fails a gate is rejected; a rejected one stays rejected, and can never be deployed,
    whatever its new report says. The request is audited here, its outcome by the worker, both with the key."""
    # Held: an erasure committing after this check would leave a judgement queued of artifacts that are gone.
    row = get_owned(session, ModelVersion, version, org_id=access.org_id, held=True)
    refuse_erased(row, "judged again")
    org_config = OrgConfig.model_validate(session.get_one(Organization, access.org_id).config)
    take_submission(resources.redis, access.org_id, org_config.submissions_per_minute)
    actor = access.principal.key_id
    payload = {"org_id": access.org_id, "version": row.version, "actor": actor, "on_premises": row.holdout_on_premises}
    message = add_message(session, kind=KIND_VALIDATE_TASK, payload=payload)
    record_change(
        session,
        org_id=access.org_id,
        actor=actor,
        action="model.validation.requested",
        target=row.version,
        detail={"status": row.status},
    )
    commit_and_send(session, resources, message)
    note = None
    if row.status == REJECTED:
        gates = ", ".join(failed_gates(row)) or "unknown"
        note = (
            f"version {row.version} was rejected (failed gates: {gates}) and a rejection is final: it is judged and "
            "reported again, but stays rejected and can never be deployed"
        )
    return ValidationAccepted(version=row.version, status="validating", version_status=row.status, note=note)


@router.get("/{version}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(version: str, access: OrgTrainer, session: SessionDep, resources: ResourcesDep) -> list[ArtifactOut]:
    """The version's files that can be downloaded (a model over the size gate was never stored)."""
    row = _not_erased(get_owned(session, ModelVersion, version, org_id=access.org_id))
    session.commit()  # the connection goes back to the pool for the store's listing, as for a download's read
    stored = {key.removeprefix(row.artifact_prefix) for key in resources.store.list(row.artifact_prefix)}
    return [
        ArtifactOut(
            name=name,
            path=f"/v1/orgs/{access.org_id}/models/{row.version}/artifacts/{name}",
            sha256=row.sha256 if name == MODEL_FILE else None,
        )
        for name in DOWNLOADABLE
        if name in stored
    ]


@router.get("/{version}/artifacts/{name}", response_class=Response)
def download_artifact(
    version: str, name: str, access: OrgTrainer, session: SessionDep, resources: ResourcesDep
) -> Response:
    """One artifact. The model is checked against its registered sha256 on the way out, and sent with it in
    X-Checksum-Sha256; every download is audited."""
    row = _not_erased(get_owned(session, ModelVersion, version, org_id=access.org_id))
    if name not in DOWNLOADABLE:
        raise NotFound(f"no artifact {name!r}; a version has {', '.join(DOWNLOADABLE)}", field="name")
    # Held through the read, the connection the key check took stayed out of the pool for as long as the store
    # took: a few slow downloads held all of it, and every org's requests answered 503.
    session.commit()
    try:
        data = _artifact_bytes(resources, row, name)
    finally:
        # Read again: a version whose erasure committed during the read answers 410, its bytes neither handed out
        # nor audited, and the objects the erasure removed first are not taken for a model never stored.
        _not_erased(session.get_one(ModelVersion, row.version, populate_existing=True))
    record_change(
        session,
        org_id=access.org_id,
        actor=access.principal.key_id,
        action="model.downloaded",
        target=row.version,
        detail={"artifact": name},
    )
    session.commit()
    headers = {"Content-Disposition": f'attachment; filename="{row.version}-{name}"'}
    if name == MODEL_FILE:
        headers["X-Checksum-Sha256"] = row.sha256
    return Response(data, media_type=DOWNLOADABLE[name], headers=headers)


@router.delete(
    "/{version}/artifacts",
    response_model=ModelErased,
    responses={202: {"model": ModelErased, "description": "erased here; the org's premises folder is queued"}},
)
def erase_artifacts(
    version: str, access: OrgAdmin, session: SessionDep, resources: ResourcesDep, response: Response
) -> ModelErased:
    """Erase the version's stored artifacts: every object under its prefix, the held-out rows included (for a
    version trained while its org kept its data on its premises, those are removed there by the org's own worker:
    202; where they went is recorded on the version, since the org may have changed its residency). The version
    reads `erased` and can never be deployed, rolled back to, judged or downloaded again; its row, metrics and report
    stay. Refused (409) while it serves. Asking again finishes an erasure the object store cut short, and changes
    nothing else."""
    get_owned(session, ModelVersion, version, org_id=access.org_id)
    lock_org(session, access.org_id)  # a deploy of it, or of another version, waits for this one's commit
    row = session.get_one(ModelVersion, version, populate_existing=True)
    on_premises = row.holdout_on_premises  # where the run wrote its held-out rows, not where the org keeps data now
    actor = access.principal.key_id
    if row.status != ERASED:
        refuse_in_service(session, org_id=access.org_id, version=row.version)
        before = row.status
        row.status, row.erased_at = ERASED, utcnow()
        record_change(
            session,
            org_id=access.org_id,
            actor=actor,
            action="model.erased",
            target=row.version,
            detail={"from": before, "sha256": row.sha256, "prefix": row.artifact_prefix, "premises": on_premises},
        )
    messages: list[OutboxMessage] = []
    if on_premises:  # again on every request: a message lost with Redis is sent anew, and removing is idempotent
        payload = {"org_id": access.org_id, "version": row.version, "actor": actor}
        messages.append(add_message(session, kind=KIND_ERASE_TASK, payload=payload))
    # Marked first: from this commit on nothing deploys, judges or hands out the version, whatever the store does.
    if messages:
        commit_and_send(session, resources, *messages)
    else:
        session.commit()
    try:
        removed = resources.store.delete_prefix(row.artifact_prefix)
    except Exception as error:  # an outage, a refusal: the version stays erased, and a DELETE again finishes it
        log.warning("version %s: its artifacts were not all removed", row.version, exc_info=True)
        reason = error.message if isinstance(error, KilnError) else f"{type(error).__name__}: {error}"
        raise TransientError(
            f"version {row.version} is erased (it can never be deployed or downloaded again), but its artifacts "
            f"could not all be removed yet: {reason}; DELETE it again to finish",
            headers={"Retry-After": "5"},
        ) from error
    if on_premises:
        response.status_code = status.HTTP_202_ACCEPTED
    assert row.erased_at is not None
    return ModelErased(
        version=row.version,
        status=row.status,
        erased_at=row.erased_at,
        removed=[key.removeprefix(row.artifact_prefix) for key in removed],
        premises="queued" if on_premises else None,
    )


def _artifact_bytes(resources: Resources, row: ModelVersion, name: str) -> bytes:
    """The artifact's bytes; the model's only when they match its registered sha256."""
    key = row.artifact_prefix + name
    try:
        if name == MODEL_FILE:
            return get_verified_bytes(resources.store, key, row.sha256)
        return resources.store.get_bytes(key)
    except NotFound:
        raise NotFound(f"version {row.version} has no {name}: a model over the size gate is never stored") from None


def _not_erased(row: ModelVersion) -> ModelVersion:
    if row.status == ERASED:
        erased_at = row.erased_at.isoformat() if row.erased_at is not None else "an earlier time"
        raise Gone(f"version {row.version} was erased at {erased_at}: its artifacts are gone for good")
    return row


def _model_out(row: ModelVersion) -> ModelOut:
    return ModelOut(
        version=row.version,
        status=row.status,
        run_id=row.run_id,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        feature_columns=row.feature_columns,
        target_column=row.target_column,
        classes=row.classes,
        metrics=row.metrics,
        validation=row.validation,
        created_at=row.created_at,
        validated_at=row.validated_at,
        erased_at=row.erased_at,
        holdout_on_premises=row.holdout_on_premises,
    )
