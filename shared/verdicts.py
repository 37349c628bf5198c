"""A version's standing: `validated` (deployable) or `rejected`, and a rejection is final; either may become
`erased` (DELETE .../models/{version}/artifacts: its stored files removed), which is final too.

A version judged again (`POST .../models/{version}/validate`) gets a fresh report of every gate, but once it has
failed a gate it stays rejected whatever later judgements say (gates relaxed since, say): its report keeps, under
`rejection`, the gates it failed when it was rejected, which is what a refused deploy names.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.db.models import ModelVersion
from shared.db.row_locks import lock_row

VALIDATED = "validated"
REJECTED = "rejected"
ERASED = "erased"


def rejected_gates(validation: dict[str, Any]) -> list[str]:
    """The gates a rejected version failed when it was rejected: those of its `rejection` when a later judgement
    wrote one, else (a version rejected when its run finished, and never judged since) those its report failed."""
    rejection = validation.get("rejection")
    if isinstance(rejection, dict):
        return [str(name) for name in rejection.get("failed", [])]
    return [str(name) for name in validation.get("failed", [])]


def locked_version(session: Session, version: str) -> ModelVersion:
    """The version's row, read after taking its write lock, held until the commit: a judgement of the version (the
    worker's) and a deploy or rollback to it (the api's) take turns, so neither acts on a status the other is
    changing."""
    lock_row(session, ModelVersion.version, version, unchanged=ModelVersion.status)
    return session.get_one(ModelVersion, version, populate_existing=True)
