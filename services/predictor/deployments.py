"""Keeping the loaded models equal to the deployments table, one org or all of them."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

from sqlalchemy import select, update

from services.predictor.models import DeployedVersion, LoadedModel, ModelCache, load_model
from shared.db.models import DEPLOYMENT_FAILED, CurrentDeployment, Deployment, ModelVersion, Organization
from shared.db.session import SessionFactory, session_scope
from shared.schemas import PredictionPolicy
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

# Without a measurement from validation, a session is taken to need this many times its file, plus a floor.
MEMORY_PER_MODEL_BYTE = 6
MEMORY_FLOOR_MB = 1.0


def read_deployments(sessions: SessionFactory, org_id: str | None = None) -> list[DeployedVersion]:
    """What each org should serve, most recently deployed first."""
    query = (
        select(CurrentDeployment.org_id, CurrentDeployment.deployment_id, ModelVersion, Organization.config)
        .join(ModelVersion, CurrentDeployment.version == ModelVersion.version)
        .join(Organization, CurrentDeployment.org_id == Organization.id)
        .order_by(CurrentDeployment.deployed_at.desc())
    )
    if org_id is not None:
        query = query.where(CurrentDeployment.org_id == org_id)
    with sessions() as session:
        rows = session.execute(query).all()
    return [_deployed(row.org_id, row.deployment_id, row.ModelVersion, row.config) for row in rows]


def _deployed(org_id: str, deployment_id: int, version: ModelVersion, config: dict[str, Any]) -> DeployedVersion:
    policy = PredictionPolicy.model_validate(config.get("predictions", {}))
    return DeployedVersion(
        org_id=org_id,
        deployment_id=deployment_id,
        version=version.version,
        sha256=version.sha256,
        artifact_prefix=version.artifact_prefix,
        feature_columns=list(version.feature_columns),
        classes=list(version.classes),
        memory_mb=_memory_mb(version),
        risk_bands=policy.risk_bands,
        record_predictions=policy.record,
    )


def _memory_mb(version: ModelVersion) -> float:
    measured = version.validation.get("serving", {}).get("memory_mb_rss_growth")
    estimate = version.size_bytes * MEMORY_PER_MODEL_BYTE / 1024 / 1024
    return max(float(measured) if measured else estimate, MEMORY_FLOOR_MB)


def record_refusal(sessions: SessionFactory, deployment_id: int, reason: str) -> None:
    """Mark the deployment failed with the first replica's reason; the old version keeps serving."""
    with session_scope(sessions) as session:
        session.execute(
            update(Deployment)
            .where(Deployment.id == deployment_id, Deployment.status != DEPLOYMENT_FAILED)
            .values(status=DEPLOYMENT_FAILED, error=reason[:2000])
        )


class Synchronizer:
    """Loads what the database says each org should serve. A version that fails to load leaves the old one
    serving and its deployment marked failed; the next sync tries again."""

    def __init__(self, sessions: SessionFactory, store: ObjectStore, cache: ModelCache) -> None:
        self.sessions = sessions
        self.store = store
        self.cache = cache
        self.synced_once = threading.Event()
        self._org_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        # Deployments this process refused: not fetched again at every reconcile, until the pointer moves on.
        self._refused: set[int] = set()

    def sync_all(self) -> None:
        """Every org already loaded follows its pointer; others are loaded while the budget lasts."""
        room = self.cache.budget_mb - self.cache.used_mb()
        for deployed in read_deployments(self.sessions):
            if self.cache.peek(deployed.org_id) is not None:
                self._apply(deployed)
            elif deployed.memory_mb <= room:
                room -= deployed.memory_mb
                self._apply(deployed)
        self.synced_once.set()

    def sync_org(self, org_id: str) -> LoadedModel | None:
        """Follow the org's deployment row; the model it serves then, or None when it has none. A request uses that
        model itself: another org's install may already have evicted it from the cache."""
        for deployed in read_deployments(self.sessions, org_id):
            return self._apply(deployed)
        return None

    def _apply(self, deployed: DeployedVersion) -> LoadedModel | None:
        with self._org_locks[deployed.org_id]:
            current = self.cache.peek(deployed.org_id)
            if current is not None and current.deployed.deployment_id > deployed.deployment_id:
                return current  # read before a newer deployment was loaded: the request gets the newer one
            if current is not None and current.version == deployed.version:
                if current.deployed != deployed:
                    current = current.with_policy(deployed)
                    self.cache.install(current)
                return current
            if deployed.deployment_id in self._refused:
                return current
            try:
                model = load_model(self.store, deployed)
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
                log.error(
                    "org %s: version %s refused (%s); still serving %s",
                    deployed.org_id,
                    deployed.version,
                    reason,
                    current.version if current else None,
                )
                record_refusal(self.sessions, deployed.deployment_id, reason)
                self._refused.add(deployed.deployment_id)
                return current
            self.cache.install(model)
            return model
