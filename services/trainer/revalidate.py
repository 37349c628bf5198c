"""`POST .../models/{version}/validate`: the gates again, on the artifacts as they are stored now.

A rejection is final: a rejected version is judged and reported like any other, but stays rejected. Every judgement
is audited with the key that asked for it, whether it changed the version's status or not.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.trainer import artifacts
from services.trainer.context import WorkerContext
from services.trainer.native_scores import score_natively
from services.trainer.pipeline.validate import Gates
from services.trainer.sandbox import Limits
from services.trainer.validation import Verdict, gates_for, judge, size_rejection, too_large, unhealthy
from shared.audit import record_change
from shared.db.models import ModelVersion, Organization
from shared.db.session import session_scope
from shared.db.types import utcnow
from shared.errors import ArtifactIntegrityError, NotFound, TransientError
from shared.layout import HOLDOUT_FILE
from shared.schemas import OrgConfig
from shared.verdicts import ERASED, REJECTED, VALIDATED, locked_version, rejected_gates

log = logging.getLogger(__name__)

# The actor of a judgement queued by an api that did not pass the key along (one older than this worker).
UNKNOWN_ACTOR = "unknown"


def revalidate(
    org_id: str, version: str, context: WorkerContext, actor: str | None = None, *, last_try: bool = True
) -> str:
    """Judge the stored version again and record the report and the judgement's audit row. A validated version
    that now fails a gate becomes rejected; a rejected one stays rejected, whatever its new report says. A store
    out of reach (TransientError) is audited as `model.validation.retrying` unless this is the `last_try`, when it is
    `model.validation.errored` like any other failure; the error is raised either way."""
    actor = actor or UNKNOWN_ACTOR
    with context.sessions() as session:
        row = session.get(ModelVersion, version)
        if row is None or row.org_id != org_id:
            raise NotFound(f"model version {version!r} not found")
        prefix, sha256, size, erased = row.artifact_prefix, row.sha256, row.size_bytes, row.status == ERASED
        on_premises = row.holdout_on_premises
        org_config = OrgConfig.model_validate(session.get_one(Organization, org_id).config)
    if erased:  # asked for before the erasure, run after it: nothing is left to judge
        return _not_judged_erased(context, org_id, version, actor)
    gates = gates_for(org_config)
    try:
        verdict = (
            size_rejection(size, gates)
            if too_large(size, gates)
            else _judge_stored(context, org_config, prefix, sha256, size, gates, holdout_on_premises=on_premises)
        )
    except Exception as error:
        if _erased_since(context, version):  # its files went while it was judged
            return _not_judged_erased(context, org_id, version, actor)
        retrying = isinstance(error, TransientError) and not last_try
        with session_scope(context.sessions) as session:
            record_change(
                session,
                org_id=org_id,
                actor=actor,
                action="model.validation.retrying" if retrying else "model.validation.errored",
                target=version,
                detail={"error": f"{type(error).__name__}: {error}"[:1000]},
            )
        raise
    with session_scope(context.sessions) as session:
        row = locked_version(session, version)
        before = row.status
        if before == ERASED:  # erased while it was judged: the report of files now gone is not kept
            _record_erased(session, org_id, version, actor)
            return ERASED
        now = utcnow()
        status, report = judged(before, row.validation, row.validated_at or row.created_at, verdict, now)
        row.status, row.validation, row.validated_at = status, report, now
        record_change(
            session,
            org_id=org_id,
            actor=actor,
            action="model.validation.judged",
            target=version,
            detail={"from": before, "to": status, "passed": verdict.passed, "failed": list(verdict.report["failed"])},
        )
    log.info("org %s version %s judged again: %s (was %s)", org_id, version, status, before)
    return status


def _erased_since(context: WorkerContext, version: str) -> bool:
    with context.sessions() as session:
        return session.scalar(select(ModelVersion.status).where(ModelVersion.version == version)) == ERASED


def _not_judged_erased(context: WorkerContext, org_id: str, version: str, actor: str) -> str:
    with session_scope(context.sessions) as session:
        _record_erased(session, org_id, version, actor)
    log.info("org %s version %s was erased: not judged", org_id, version)
    return ERASED


def _record_erased(session: Session, org_id: str, version: str, actor: str) -> None:
    record_change(
        session,
        org_id=org_id,
        actor=actor,
        action="model.validation.errored",
        target=version,
        detail={"error": f"version {version} was erased: its artifacts are gone, so it was not judged"},
    )


def judged(
    before: str, previous: dict[str, Any], previous_at: datetime, verdict: Verdict, now: datetime
) -> tuple[str, dict[str, Any]]:
    """The version's status and report after `verdict`: rejected for good once it has failed a gate, with the gates
    it failed then (under `rejection`) beside the new report of every gate."""
    report = dict(verdict.report)
    if before == REJECTED:
        earlier = previous.get("rejection")
        failed = rejected_gates(previous)
        at = earlier["at"] if isinstance(earlier, dict) and "at" in earlier else previous_at.isoformat()
    elif not verdict.passed:
        failed, at = list(verdict.report["failed"]), now.isoformat()
    else:
        return VALIDATED, report
    report["rejection"] = {
        "failed": failed,
        "at": at,
        "note": f"rejected for failing {', '.join(failed) or 'a gate'}, and a rejection is final: this version can "
        "never be deployed, whatever a later judgement (this report's `passed`) says",
    }
    return REJECTED, report


def _judge_stored(
    context: WorkerContext,
    org_config: OrgConfig,
    prefix: str,
    sha256: str,
    size: int,
    gates: Gates,
    *,
    holdout_on_premises: bool,
) -> Verdict:
    with tempfile.TemporaryDirectory(prefix="kiln-validate-") as folder:
        holdout_file = Path(folder) / HOLDOUT_FILE
        # Where the run wrote them (the version records it), whatever the org's residency says today.
        context.holdout_store(on_premises=holdout_on_premises).get_file(prefix + HOLDOUT_FILE, holdout_file)
        holdout = artifacts.load_holdout(holdout_file)
    try:
        model = artifacts.read_model(context.store, prefix, sha256)
    except (ArtifactIntegrityError, NotFound) as error:
        return unhealthy(size, gates, f"cannot be read back: {error.message}")
    native_model = artifacts.read_native_model(context.store, prefix)
    native = None
    if native_model is not None:
        limits = Limits.for_org(context.settings, org_config)
        native = score_natively(context.sandbox, native_model, holdout.features, len(holdout.classes), limits)
    return judge(model, native, holdout, gates)
