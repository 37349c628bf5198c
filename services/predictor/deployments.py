"""Keeping the loaded models equal to the deployments table, one org or all of them."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import wait
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import select, update

from services.predictor.models import DeployedVersion, LoadedModel, ModelCache, load_model
from services.predictor.org_follows import OrgFollows
from shared.db.models import (
    DEPLOYMENT_DEPLOYED,
    DEPLOYMENT_FAILED,
    CurrentDeployment,
    Deployment,
    ModelVersion,
    Organization,
)
from shared.db.session import SessionFactory, session_scope
from shared.db.types import utcnow
from shared.deployments import serving_deployment_id
from shared.errors import ArtifactIntegrityError, KilnError, TransientError
from shared.schemas import PredictionPolicy
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

# Without a measurement from validation, a session is taken to need this many times its file, plus a floor.
MEMORY_PER_MODEL_BYTE = 6
MEMORY_FLOOR_MB = 1.0
# After a load fails for a passing cause, the org's requests are answered 503 for this long without another try:
# a store outage costs each process one attempt per org in that time, not one per request.
LOAD_RETRY_S = 2


@dataclass(frozen=True)
class Wanted:
    """A deployment an org should serve, and whether a predictor has ever loaded it (then it has shown it serves)."""

    deployed: DeployedVersion
    loaded_before: bool


@dataclass(frozen=True)
class Undeployed:
    """An org whose serving deployment is an undeploy: nothing may serve it from that deployment on."""

    org_id: str
    deployment_id: int


def read_deployments(sessions: SessionFactory, org_id: str | None = None) -> list[Wanted | Undeployed]:
    """What each org should serve, most recently deployed first: its current deployment or, while that one is
    refused, its last good one (the newest before it that is not failed), or nothing once that is an undeploy.
    Every process reads the same, at its start and after an eviction too, and an org whose every deployment was
    refused has nothing to serve."""
    query = (
        select(Deployment.org_id, Deployment.id, Deployment.loaded_at, ModelVersion, Organization.config)
        .select_from(CurrentDeployment)
        .join(Deployment, Deployment.id == serving_deployment_id())
        .outerjoin(ModelVersion, Deployment.version == ModelVersion.version)
        .join(Organization, CurrentDeployment.org_id == Organization.id)
        .order_by(CurrentDeployment.deployed_at.desc())
    )
    if org_id is not None:
        query = query.where(CurrentDeployment.org_id == org_id)
    with sessions() as session:
        rows = session.execute(query).all()
    return [_wanted(row.org_id, row.id, row.loaded_at, row.ModelVersion, row.config) for row in rows]


def _wanted(
    org_id: str, deployment_id: int, loaded_at: datetime | None, version: ModelVersion | None, config: dict[str, Any]
) -> Wanted | Undeployed:
    if version is None:  # an undeploy's row names no version
        return Undeployed(org_id, deployment_id)
    return Wanted(_deployed(org_id, deployment_id, version, config), loaded_before=loaded_at is not None)


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
        normal_class=policy.normal_class,
    )


def _memory_mb(version: ModelVersion) -> float:
    measured = version.validation.get("serving", {}).get("memory_mb_rss_growth")
    estimate = version.size_bytes * MEMORY_PER_MODEL_BYTE / 1024 / 1024
    return max(float(measured) if measured else estimate, MEMORY_FLOOR_MB)


def record_refusal(sessions: SessionFactory, deployment_id: int, reason: str) -> None:
    """Mark the deployment failed with the first replica's reason; the org's last good deployment serves. One that
    another replica has loaded meanwhile serves there, and is not refused: a process never serves a deployment the
    database then says to step back from. One an undeploy superseded before any process loaded it stays so: it never
    served, and its history says why."""
    with session_scope(sessions) as session:
        session.execute(
            update(Deployment)
            .where(
                Deployment.id == deployment_id,
                Deployment.status == DEPLOYMENT_DEPLOYED,
                Deployment.loaded_at.is_(None),
            )
            .values(status=DEPLOYMENT_FAILED, error=reason[:2000])
        )


def record_loaded(sessions: SessionFactory, deployment_id: int) -> bool:
    """The deployment's first load by any process: from now on no failure to load it is a refusal. False when
    another replica refused it first, or an undeploy superseded it while it loaded (the undeploy waits for none:
    it answers 204 once it has marked what no process had loaded yet): it serves nowhere."""
    with session_scope(sessions) as session:
        session.execute(
            update(Deployment)
            .where(Deployment.id == deployment_id, Deployment.loaded_at.is_(None))
            .where(Deployment.status == DEPLOYMENT_DEPLOYED)
            .values(loaded_at=utcnow())
        )
        status = session.scalar(select(Deployment.status).where(Deployment.id == deployment_id))
    return status == DEPLOYMENT_DEPLOYED


class Synchronizer:
    """Loads what the database says each org should serve.

    Only a candidate that never loaded anywhere and whose file is at fault (corrupt, wrong signature, sha256
    mismatch, NaN on warm-up) is refused: its deployment is marked failed, and every process serves the org's last
    good deployment instead. Any other failure passes: the store out of reach, no object at the key (for a new
    candidate too: that is the store's state, not the version's), or any failure to load again a deployment that
    has loaded before. The org keeps what it serves; with nothing loaded, its requests get 503 with Retry-After
    naming the cause, and the next request after that, the next event or the next reconcile tries again.
    """

    def __init__(self, sessions: SessionFactory, store: ObjectStore, cache: ModelCache, *, load_wait_s: float) -> None:
        self.sessions = sessions
        self.store = store
        self.cache = cache
        self.load_wait_s = load_wait_s
        self.synced_once = threading.Event()
        # Each org's follows run one at a time, in a thread of the org's own: that is what orders them.
        self.follows = OrgFollows(self.sync_org)
        # Per org: the deployment whose load last failed for a passing cause, when to try again, and the cause.
        self._failed_loads: dict[str, tuple[int, float, str]] = {}

    def sync_all(self) -> None:
        """Every org already loaded follows the database; others are loaded while the budget lasts. An undeployed
        org's model is unloaded. The first time, it waits for those follows, up to `load_wait_s` (then the process
        is ready); later, it only starts them."""
        room = self.cache.budget_mb - self.cache.used_mb()
        follows = []
        for wanted in read_deployments(self.sessions):
            if isinstance(wanted, Undeployed):
                if self.cache.undeployed(wanted.org_id) != wanted.deployment_id:  # else nothing is loaded since
                    follows.append(self.follows.after_now(wanted.org_id, partial(self._undeploy_as_read, wanted)))
                continue
            org_id = wanted.deployed.org_id
            current = self.cache.peek(org_id)
            if current is not None and current.deployed == wanted.deployed:
                continue  # the most common case by far, which needs no thread
            if current is None:
                if wanted.deployed.memory_mb > room:
                    continue
                room -= wanted.deployed.memory_mb
            follows.append(self.follows.after_now(org_id, partial(self._follow, wanted)))
        if not self.synced_once.is_set():
            wait(follows, timeout=self.load_wait_s)
            self.synced_once.set()

    def follow_event(self, org_id: str) -> None:
        """A deploy event: the org follows its deployment row as it is after the event, in the org's own thread."""
        self.follows.after_now(org_id)

    def sync_org(self, org_id: str) -> LoadedModel | None:
        """Follow the org's deployment row; the model it serves then, or None when it has none (the cache then says
        whether it was undeployed). A request uses that model itself: another org's install may already have
        evicted it from the cache. Runs as one of the org's follows."""
        return self._read_and_follow(org_id, unless=None)

    def _read_and_follow(self, org_id: str, *, unless: int | None) -> LoadedModel | None:
        """sync_org, except that a deployment row read again that is still `unless` is not followed again."""
        for wanted in read_deployments(self.sessions, org_id):
            if isinstance(wanted, Undeployed):
                self._undeploy(wanted)
                return None
            if wanted.deployed.deployment_id == unless:
                return None
            return self._follow(wanted)
        return None

    def _follow(self, wanted: Wanted) -> LoadedModel | None:
        model = self._apply(wanted)
        org_id, deployment_id = wanted.deployed.org_id, wanted.deployed.deployment_id
        if (model is None or model.deployed.deployment_id != deployment_id) and self.cache.undeployed(org_id) is None:
            # Refused (what the org had serves meanwhile), superseded by an undeploy while it loaded, or read before
            # a newer deployment since evicted: the database now names what to serve, which a process that hears no
            # events would otherwise reach only at its next reconcile. Only another deployment is followed: the same
            # one again (deployment ids gone back below one this process installed, as after a restore of Kiln's
            # database) is not read round for ever, and what the org had serves on.
            again = self._read_and_follow(org_id, unless=deployment_id)
            return again if again is not None or self.cache.undeployed(org_id) is not None else model
        return model

    def _undeploy(self, undeployed: Undeployed) -> bool:
        """Whether the org is undeployed now: not when a deployment after the undeploy was installed."""
        self._failed_loads.pop(undeployed.org_id, None)
        return self.cache.undeploy(undeployed.org_id, undeployed.deployment_id)

    def _undeploy_as_read(self, undeployed: Undeployed) -> LoadedModel | None:
        """An undeploy a reconcile read, followed in the org's turn. A deployment installed since is newer, and may
        have been evicted since: a request waiting for this follow gets what the database says serves now, not a
        404 for an org that is deployed."""
        if self._undeploy(undeployed):
            return None
        return self._read_and_follow(undeployed.org_id, unless=None)

    def _apply(self, wanted: Wanted) -> LoadedModel | None:
        """The org's model once `wanted` serves; None when `wanted` was refused and the org has nothing loaded, or
        the org was undeployed after `wanted`."""
        deployed = wanted.deployed
        undeployed = self.cache.undeployed(deployed.org_id)
        if undeployed is not None and undeployed > deployed.deployment_id:
            return None  # read before the org was undeployed: it serves nothing
        current = self.cache.peek(deployed.org_id)
        if self.cache.newest(deployed.org_id) > deployed.deployment_id:
            # Read before a newer deployment was installed: the request gets that one, read again once evicted.
            return current
        if current is not None and current.version == deployed.version:
            if not wanted.loaded_before and not record_loaded(self.sessions, deployed.deployment_id):
                # A rollback to the version loaded here serves once installed, so it is recorded as loaded first,
                # as a load is; refused meanwhile by another replica, it serves nowhere.
                return current
            if current.deployed != deployed:  # the org's prediction settings changed, or a rollback to it
                current = current.with_policy(deployed)
                self.cache.install(current)
            return current
        try:
            model = self._load(wanted)
        except TransientError:
            if current is None:
                raise
            return current
        if model is None:  # refused: what the org had serves on
            return current
        self.cache.install(model)
        return model

    def _load(self, wanted: Wanted) -> LoadedModel | None:
        """`wanted` loaded and warmed, or None once it is refused; TransientError when it failed for a passing cause."""
        deployed = wanted.deployed
        self._raise_recent_failure(deployed)
        try:
            model = load_model(self.store, deployed)
        except Exception as error:
            if isinstance(error, ArtifactIntegrityError) and not wanted.loaded_before:
                self._refuse(deployed, error)
                return None
            raise self._passing_failure(deployed, error) from error
        self._failed_loads.pop(deployed.org_id, None)
        if not wanted.loaded_before and not record_loaded(self.sessions, deployed.deployment_id):
            return None  # another replica refused it while this one loaded it: the org's last good one serves
        return model

    def _refuse(self, deployed: DeployedVersion, error: ArtifactIntegrityError) -> None:
        log.error("org %s: version %s refused (%s)", deployed.org_id, deployed.version, error.message)
        record_refusal(self.sessions, deployed.deployment_id, error.message)

    def _passing_failure(self, deployed: DeployedVersion, error: Exception) -> TransientError:
        log.warning(
            "org %s: version %s could not be loaded, trying again in %s s: %s: %s",
            deployed.org_id,
            deployed.version,
            LOAD_RETRY_S,
            type(error).__name__,
            error,
        )
        # A Kiln error's message is written for clients; another's may carry anything, so it is named only.
        cause = error.message if isinstance(error, KilnError) else type(error).__name__
        self._failed_loads[deployed.org_id] = (deployed.deployment_id, time.monotonic() + LOAD_RETRY_S, cause)
        return _unavailable(deployed, cause)

    def _raise_recent_failure(self, deployed: DeployedVersion) -> None:
        failed = self._failed_loads.get(deployed.org_id)
        if failed is not None and failed[0] == deployed.deployment_id and time.monotonic() < failed[1]:
            raise _unavailable(deployed, failed[2])


def _unavailable(deployed: DeployedVersion, cause: str) -> TransientError:
    return TransientError(
        f"the model of {deployed.org_id!r} (version {deployed.version}) cannot be loaded for now: {cause}",
        headers={"Retry-After": str(LOAD_RETRY_S)},
    )
