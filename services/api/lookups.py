"""Fetching an org's own rows: a row of another org is as absent as a missing one."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from shared.db.models import Dataset, ModelVersion, TrainingRun
from shared.errors import NotFound

Owned = TypeVar("Owned", Dataset, TrainingRun, ModelVersion)

NOUNS = {Dataset: "dataset", TrainingRun: "training run", ModelVersion: "model version"}


def get_owned(session: Session, model: type[Owned], key: str, *, org_id: str, field: str | None = None) -> Owned:
    row = session.get(model, key)
    if row is None or row.org_id != org_id:
        raise NotFound(f"{NOUNS[model]} {key!r} not found", field=field)
    return row
