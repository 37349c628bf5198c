"""The premises half of erasing a model version (DELETE /v1/orgs/{org}/models/{version}/artifacts): an org that
keeps its data on its premises has its held-out rows in its own workers' folder, which the api cannot reach. The
api removes what the central store holds and queues this on the org's own queue, where only its workers listen."""

from __future__ import annotations

import logging

from services.trainer.context import WorkerContext
from shared.audit import record_change
from shared.db.models import ModelVersion, Organization
from shared.db.session import session_scope
from shared.errors import NotFound
from shared.schemas import OrgConfig
from shared.verdicts import ERASED

log = logging.getLogger(__name__)

# The actor of an erasure queued without the key that asked for it.
UNKNOWN_ACTOR = "unknown"


def erase_on_premises(org_id: str, version: str, context: WorkerContext, actor: str | None = None) -> list[str]:
    """Remove every file of the erased `version` from this worker's folder for the org's data, and audit what went
    (`model.erased.premises`, also when nothing was left: the confirmation that nothing is). Returns the keys
    removed. A version not erased is left alone: only an erasure the api recorded removes anything."""
    with context.sessions() as session:
        row = session.get(ModelVersion, version)
        if row is None or row.org_id != org_id:
            raise NotFound(f"model version {version!r} not found")
        if row.status != ERASED:
            log.warning("org %s version %s is %s, not erased: its files stay", org_id, version, row.status)
            return []
        prefix = row.artifact_prefix
        org_config = OrgConfig.model_validate(session.get_one(Organization, org_id).config)
    removed = context.holdout_store(org_config).delete_prefix(prefix)
    with session_scope(context.sessions) as session:
        record_change(
            session,
            org_id=org_id,
            actor=actor or UNKNOWN_ACTOR,
            action="model.erased.premises",
            target=version,
            detail={"removed": [key.removeprefix(prefix) for key in removed]},
        )
    log.info("org %s version %s: removed %d file(s) from the premises folder", org_id, version, len(removed))
    return removed
