"""Keeping the loaded models equal to the deployments table, one org or all of them."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

from sqlalchemy import ScalarSelect, func, select, update
from sqlalchemy.orm import aliased

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
    """What each org should serve, most recently deployed first: its current deployment or, while that one is
    refused, its last good one (the newest before it that is not failed). Every process reads the same, at its
    start and after an eviction too, and an org whose every deployment was refused has nothing to serve."""
    query = (
        select(Deployment.org_id, Deployment.id, ModelVersion, Organization.config)
        .select_from(CurrentDeployment)
        .join(Deployment, Deployment.id == _serving_deployment_id())
        .join(ModelVersion, Deployment.version == ModelVersion.version)
        .join(Organization, CurrentDeployment.org_id == Organization.id)
        .order_by(CurrentDeployment.deployed_at.desc())
    )
    if org_id is not None:
        query = query.where(CurrentDeployment.org_id == org_id)
    with sessions() as session:
        rows = session.execute(query).all()
    return [_deployed(row.org_id, row.id, row.ModelVersion, row.config) for row in rows]


def _serving_deployment_id() -> ScalarSelect[int]:
    """For each org's pointer: the id of the newest of its deployments up to the pointer's that was not refused."""
    candidate = aliased(Deployment)
    return (
        select(func.max(candidate.id))
        .where(
            candidate.org_id == CurrentDeployment.org_id,
            candidate.id <= CurrentDeployment.deployment_id,
            candidate.status != DEPLOYMENT_FAILED,
        )
        .correlate(CurrentDeployment)
        .scalar_subquery()
    )


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
    """Loads what the database says each org should serve. A version that fails to load is refused: its deployment
    is marked failed, and every process serves the org's last good deployment instead."""

    def __init__(self, sessions: SessionFactory, store: ObjectStore, cache: ModelCache) -> None:
        self.sessions = sessions
        self.store = store
        self.cache = cache
        self.synced_once = threading.Event()
        self._org_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def sync_all(self) -> None:
        """Every org already loaded follows the database; others are loaded while the budget lasts."""
        room = self.cache.budget_mb - self.cache.used_mb()
        for deployed in read_deployments(self.sessions):
            if self.cache.peek(deployed.org_id) is not None:
                self._follow(deployed)
            elif deployed.memory_mb <= room:
                room -= deployed.memory_mb
                self._follow(deployed)
        self.synced_once.set()

    def sync_org(self, org_id: str) -> LoadedModel | None:
        """Follow the org's deployment row; the model it serves then, or None when it has none. A request uses that
        model itself: another org's install may already have evicted it from the cache."""
        for deployed in read_deployments(self.sessions, org_id):
            return self._follow(deployed)
        return None

    def _follow(self, deployed: DeployedVersion) -> LoadedModel | None:
        model = self._apply(deployed)
        if model is None:  # refused, with nothing loaded: the database now names the deployment before it
            return self.sync_org(deployed.org_id)
        return model

    def _apply(self, deployed: DeployedVersion) -> LoadedModel | None:
        """The org's model once `deployed` serves; None when `deployed` was refused and the org has nothing loaded."""
        with self._org_locks[deployed.org_id]:
            current = self.cache.peek(deployed.org_id)
            if current is not None and current.deployed.deployment_id > deployed.deployment_id:
                return current  # read before a newer deployment was loaded: the request gets the newer one
            if current is not None and current.version == deployed.version:
                if current.deployed != deployed:  # the org's prediction settings changed
                    current = current.with_policy(deployed)
                    self.cache.install(current)
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
                return current
            self.cache.install(model)
            return model
