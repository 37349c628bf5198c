"""Keeping the loaded models equal to the deployments table, one org or all of them."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from sqlalchemy import select

from services.predictor.models import DeployedVersion, ModelSlots, load_model
from shared.db.models import CurrentDeployment, ModelVersion
from shared.db.session import SessionFactory
from shared.storage import ObjectStore

log = logging.getLogger(__name__)


def read_deployments(sessions: SessionFactory, org_id: str | None = None) -> dict[str, DeployedVersion]:
    query = select(
        CurrentDeployment.org_id,
        ModelVersion.version,
        ModelVersion.sha256,
        ModelVersion.artifact_prefix,
        ModelVersion.feature_columns,
        ModelVersion.classes,
    ).join(ModelVersion, CurrentDeployment.version == ModelVersion.version)
    if org_id is not None:
        query = query.where(CurrentDeployment.org_id == org_id)
    with sessions() as session:
        rows = session.execute(query).all()
    return {
        row.org_id: DeployedVersion(
            org_id=row.org_id,
            version=row.version,
            sha256=row.sha256,
            artifact_prefix=row.artifact_prefix,
            feature_columns=list(row.feature_columns),
            classes=list(row.classes),
        )
        for row in rows
    }


class Synchronizer:
    """Loads what the database says each org should serve. A version that fails to load leaves the old one
    serving; the next sync tries again."""

    def __init__(self, sessions: SessionFactory, store: ObjectStore, slots: ModelSlots) -> None:
        self.sessions = sessions
        self.store = store
        self.slots = slots
        self.synced_once = threading.Event()
        self._org_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def sync_all(self) -> None:
        for deployed in read_deployments(self.sessions).values():
            self._apply(deployed)
        self.synced_once.set()

    def sync_org(self, org_id: str) -> None:
        deployed = read_deployments(self.sessions, org_id).get(org_id)
        if deployed is not None:
            self._apply(deployed)

    def _apply(self, deployed: DeployedVersion) -> None:
        with self._org_locks[deployed.org_id]:
            current = self.slots.get(deployed.org_id)
            if current is not None and current.version == deployed.version:
                return
            try:
                model = load_model(self.store, deployed)
            except Exception:
                log.exception(
                    "org %s: version %s refused; still serving %s",
                    deployed.org_id,
                    deployed.version,
                    current.version if current else None,
                )
                return
            self.slots.install(model)
