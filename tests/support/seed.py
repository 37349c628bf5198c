"""Rows a test needs in place before the part under test runs: versions as the trainer registers them."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from shared.db.models import Dataset, ModelVersion, TrainingRun
from shared.layout import dataset_key, model_prefix
from shared.versions import new_version


def seed_version(
    engine: Engine,
    org_id: str,
    *,
    passed: bool = True,
    created_at: datetime | None = None,
    model: bytes = b"",
    feature_columns: list[str] | None = None,
    classes: list[Any] | None = None,
    dataset_id: str | None = None,
    holdout_on_premises: bool = False,
) -> str:
    """A finished run and its version, as the trainer leaves them (without training anything); the run reads
    `dataset_id`, or a dataset of its own. `holdout_on_premises`: the run wrote its held-out rows to the org's
    premises folder (its org kept its data there), not beside the model."""
    created_at = created_at or datetime.now(UTC)
    version = new_version(created_at)
    failed = [] if passed else ["accuracy", "recall"]
    with Session(engine) as session, session.begin():
        if dataset_id is None:
            dataset_id = "ds_" + secrets.token_hex(8)
            session.add(
                Dataset(
                    id=dataset_id,
                    org_id=org_id,
                    object_key=dataset_key(org_id, "seed"),
                    filename="seed",
                    row_count=1,
                    columns=[],
                    size_bytes=1,
                    sha256="0" * 64,
                    created_at=created_at,
                )
            )
        run = TrainingRun(
            id="run_" + secrets.token_hex(8),
            org_id=org_id,
            status="succeeded" if passed else "rejected",
            config={},
            dataset_id=dataset_id,
            version=version,
            created_at=created_at,
        )
        session.add(run)
        session.flush()
        session.add(
            ModelVersion(
                version=version,
                org_id=org_id,
                run_id=run.id,
                status="validated" if passed else "rejected",
                sha256=hashlib.sha256(model).hexdigest(),
                size_bytes=len(model),
                artifact_prefix=model_prefix(org_id, version),
                feature_columns=feature_columns or ["a", "b"],
                target_column="y",
                classes=classes or [0, 1],
                metrics={"accuracy": 0.9},
                validation={"passed": passed, "failed": failed, "gates": []},
                created_at=created_at,
                holdout_on_premises=holdout_on_premises,
            )
        )
    return version


def seed_versions(engine: Engine, org_id: str, count: int, **kwargs: object) -> list[str]:
    """`count` validated versions, oldest first, a minute apart."""
    start = datetime.now(UTC) - timedelta(minutes=count)
    return [seed_version(engine, org_id, created_at=start + timedelta(minutes=i), **kwargs) for i in range(count)]  # type: ignore[arg-type]
