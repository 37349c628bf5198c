"""`POST .../models/{version}/validate`: the gates again, on the artifacts as they are stored now."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from sqlalchemy import update

from services.trainer import artifacts
from services.trainer.context import WorkerContext
from services.trainer.pipeline.validate import Gates
from services.trainer.validation import Verdict, gates_for, judge, size_rejection, too_large, unhealthy
from shared.db.models import ModelVersion, Organization
from shared.db.session import session_scope
from shared.db.types import utcnow
from shared.errors import ArtifactIntegrityError, NotFound
from shared.layout import HOLDOUT_FILE
from shared.schemas import OrgConfig

log = logging.getLogger(__name__)


def revalidate(org_id: str, version: str, context: WorkerContext) -> str:
    """Judge the stored version again and record the report; a version that now fails becomes rejected."""
    with context.sessions() as session:
        row = session.get(ModelVersion, version)
        if row is None or row.org_id != org_id:
            raise NotFound(f"model version {version!r} not found")
        prefix, sha256, size = row.artifact_prefix, row.sha256, row.size_bytes
        org_config = OrgConfig.model_validate(session.get_one(Organization, org_id).config)
    gates = gates_for(org_config)
    verdict = (
        size_rejection(size, gates)
        if too_large(size, gates)
        else _judge_stored(context, org_config, prefix, sha256, size, gates)
    )
    status = "validated" if verdict.passed else "rejected"
    with session_scope(context.sessions) as session:
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.version == version)
            .values(status=status, validation=verdict.report, validated_at=utcnow())
        )
    log.info("org %s version %s judged again: %s", org_id, version, status)
    return status


def _judge_stored(
    context: WorkerContext, org_config: OrgConfig, prefix: str, sha256: str, size: int, gates: Gates
) -> Verdict:
    with tempfile.TemporaryDirectory(prefix="kiln-validate-") as folder:
        holdout_file = Path(folder) / HOLDOUT_FILE
        context.holdout_store(org_config).get_file(prefix + HOLDOUT_FILE, holdout_file)
        holdout = artifacts.load_holdout(holdout_file)
    try:
        model = artifacts.read_model(context.store, prefix, sha256)
    except (ArtifactIntegrityError, NotFound) as error:
        return unhealthy(size, gates, f"cannot be read back: {error.message}")
    return judge(model, artifacts.read_native_model(context.store, prefix), holdout, gates)
