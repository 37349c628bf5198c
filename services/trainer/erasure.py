"""The premises half of erasing a model version (DELETE /v1/orgs/{org}/models/{version}/artifacts): a version
trained while its org kept its data on its premises has its held-out rows in the folder of the org's own workers,
which the api cannot reach. The api removes what the central store holds and queues this on the org's premises
queue (`premises.<org>`), where only workers started for the org listen, whatever the org's residency is now."""

from __future__ import annotations

import logging

from services.trainer.context import WorkerContext
from shared.audit import record_change
from shared.db.models import ModelVersion
from shared.db.session import session_scope
from shared.errors import NotFound, NotOnPremises
from shared.queues import send_erase_task
from shared.verdicts import ERASED

log = logging.getLogger(__name__)

# The actor of an erasure queued without the key that asked for it.
UNKNOWN_ACTOR = "unknown"


def erase_on_premises(org_id: str, version: str, context: WorkerContext, actor: str | None = None) -> list[str]:
    """Remove every file of the erased `version` from this worker's folder for the org's data, and audit what went
    (`model.erased.premises`, also when nothing was left: the confirmation that nothing is). Returns the keys
    removed. A version not erased is left alone: only an erasure the api recorded removes anything; so is one whose
    held-out rows were written to the central store, which the api erased. Raises NotOnPremises on a worker not
    started for the org: its folder never held the org's rows, and finding nothing there proves nothing."""
    if not context.on_premises_of(org_id):
        raise NotOnPremises(f"this worker was not started for organization {org_id} (KILN_WORKER_ORGS)")
    with context.sessions() as session:
        row = session.get(ModelVersion, version)
        if row is None or row.org_id != org_id:
            raise NotFound(f"model version {version!r} not found")
        if row.status != ERASED:
            log.warning("org %s version %s is %s, not erased: its files stay", org_id, version, row.status)
            return []
        if not row.holdout_on_premises:
            log.info("org %s version %s kept its held-out rows centrally: nothing on the premises", org_id, version)
            return []
        prefix = row.artifact_prefix
    removed = context.holdout_store(on_premises=True).delete_prefix(prefix)
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


def erase_here_or_forward(org_id: str, version: str, context: WorkerContext, actor: str | None = None) -> int:
    """The erasure task: done here on the org's own worker, else sent on to the org's premises queue (a message an
    older api queued on `train.<org>`, which central workers take too) rather than confirmed by a worker that holds
    none of the org's files. Returns how many files were removed here."""
    try:
        return len(erase_on_premises(org_id, version, context, actor=actor))
    except NotOnPremises:
        log.warning("org %s version %s: the premises erasure goes on to the org's own workers", org_id, version)
        send_erase_task(context.producer, {"org_id": org_id, "version": version, "actor": actor})
        return 0
