"""Loaded models and the slots that hold them: load, verify, warm, then swap in one assignment."""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from shared.errors import ArtifactIntegrityError
from shared.layout import MODEL_FILE
from shared.model_contract import INPUT_NAME, PROBABILITIES_OUTPUT, signature_problem
from shared.onnx_external import external_data_of, keeps_data_outside
from shared.schemas import ClassValue, same_class
from shared.storage import ObjectStore, get_verified_bytes

log = logging.getLogger(__name__)

# What onnxruntime raises for a file that is no model it can open or run; its other errors (out of memory, say)
# are no verdict on the version.
ONNXRUNTIME_REFUSALS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoModel,
    ort_errors.NotImplemented,
)


@dataclass(frozen=True)
class DeployedVersion:
    """What the deployments table says an org should serve, and how (its prediction policy)."""

    org_id: str
    deployment_id: int
    version: str
    sha256: str
    artifact_prefix: str
    feature_columns: list[str]
    classes: list[Any]
    memory_mb: float
    risk_bands: tuple[float, float]
    record_predictions: bool
    normal_class: ClassValue | None = None

    @functools.cached_property  # computed once per version and policy a process serves
    def normal_column(self) -> int | None:
        """A multiclass model's column of the probabilities for the org's normal class, if it names one the model
        has. Told at serving time only: the org's config names a class for every version to come."""
        if len(self.classes) == 2:
            return None
        if self.normal_class is None:
            log.warning(
                "org %s: %s is multiclass and the org names no normalClass (config.predictions.normalClass): its "
                "answers have no riskLevel",
                self.org_id,
                self.version,
            )
            return None
        column = next((i for i, value in enumerate(self.classes) if same_class(value, self.normal_class)), None)
        if column is None:
            log.warning(
                "org %s: normalClass %r is not a class of %s %s: its answers have no riskLevel",
                self.org_id,
                self.normal_class,
                self.version,
                self.classes,
            )
        return column


@dataclass(frozen=True)
class LoadedModel:
    """A warmed onnxruntime session for one org's version. Immutable: a swap replaces the whole object."""

    deployed: DeployedVersion
    session: ort.InferenceSession
    size_bytes: int

    @property
    def version(self) -> str:
        return self.deployed.version

    @property
    def n_features(self) -> int:
        return len(self.deployed.feature_columns)

    def with_policy(self, deployed: DeployedVersion) -> LoadedModel:
        """The same session under a newer description of the same version (the org's policy changed)."""
        return LoadedModel(deployed=deployed, session=self.session, size_bytes=self.size_bytes)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities, shape [rows, classes], for float32 features of shape [rows, n_features]."""
        result = self.session.run([PROBABILITIES_OUTPUT], {INPUT_NAME: features})
        return np.asarray(result[0])


def load_model(store: ObjectStore, deployed: DeployedVersion) -> LoadedModel:
    """Fetch, check the sha256, open and warm a version; raise rather than return something that cannot serve.

    ArtifactIntegrityError says the file is at fault: its sha256, or a model onnxruntime cannot open or run, or one
    that answers wrong. Anything else (the store out of reach, no object at the key) is no verdict on the version.
    """
    data = get_verified_bytes(store, deployed.artifact_prefix + MODEL_FILE, deployed.sha256)
    outside = external_data_of(data)
    if outside:
        raise ArtifactIntegrityError(f"{deployed.version}: {keeps_data_outside(outside)}, which Kiln does not load")
    try:
        session = ort.InferenceSession(data, _session_options(), providers=["CPUExecutionProvider"])
        model = LoadedModel(deployed=deployed, session=session, size_bytes=len(data))
        _check_signature(model)
        _warm_up(model)
    except ONNXRUNTIME_REFUSALS as error:
        raise ArtifactIntegrityError(f"{deployed.version}: onnxruntime cannot serve it: {error}") from error
    return model


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Requests are served concurrently by several processes; one thread per session avoids oversubscription.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def _check_signature(model: LoadedModel) -> None:
    problem = signature_problem(model.session.get_inputs(), model.session.get_outputs(), model.n_features)
    if problem is not None:
        raise ArtifactIntegrityError(f"{model.version}: {problem}")


def _warm_up(model: LoadedModel) -> None:
    """One real inference before the model takes traffic; a model that answers NaN is refused."""
    probabilities = model.probabilities(np.zeros((1, model.n_features), dtype=np.float32))
    if probabilities.shape != (1, len(model.deployed.classes)) or not np.all(np.isfinite(probabilities)):
        raise ArtifactIntegrityError(f"{model.version}: warm-up gave {probabilities.tolist()}")


class ModelCache:
    """The loaded models of one process, one per org, within a memory budget.

    Readers take an org's model without a lock: a swap is one dict assignment, so a request in flight finishes on
    the model it started with. Installs are ordered by deployment id, so a slow load of an older deployment can
    never replace a newer one, nor come in after the newer one was evicted: the newest deployment id installed is
    kept per org (one int for each org this process ever served). When the budget is exceeded the least recently
    used orgs are unloaded; their next request loads them again. An undeployed org's model is unloaded, and the
    undeploy's deployment id kept: no load of a deployment before it is installed after it.
    """

    def __init__(self, budget_mb: float) -> None:
        self.budget_mb = budget_mb
        self._models: dict[str, LoadedModel] = {}
        self._last_used: dict[str, float] = {}
        self._undeployed: dict[str, int] = {}
        self._newest: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, org_id: str) -> LoadedModel | None:
        model = self._models.get(org_id)
        if model is not None:
            self._last_used[org_id] = time.monotonic()
        return model

    def peek(self, org_id: str) -> LoadedModel | None:
        """The org's model without counting it as used."""
        return self._models.get(org_id)

    def versions(self) -> dict[str, str]:
        return {org_id: model.version for org_id, model in list(self._models.items())}

    def used_mb(self) -> float:
        return sum(model.deployed.memory_mb for model in list(self._models.values()))

    def undeployed(self, org_id: str) -> int | None:
        """The deployment id of the org's undeploy, while no deployment after it has been installed."""
        return self._undeployed.get(org_id)

    def newest(self, org_id: str) -> int:
        """The newest deployment id ever installed for the org, evicted since or not; 0 for none."""
        return self._newest.get(org_id, 0)

    def undeploy(self, org_id: str, deployment_id: int) -> bool:
        """Unload the org's model unless a newer deployment has been installed; whether the org is undeployed now."""
        with self._lock:
            current = self._models.get(org_id)
            if self.newest(org_id) > deployment_id:
                return False
            known = self._undeployed.get(org_id)
            self._undeployed[org_id] = max(deployment_id, known or 0)
            self._models.pop(org_id, None)
            self._last_used.pop(org_id, None)
        if current is not None or known is None:
            log.info(
                "org %s undeployed (deployment %s): unloaded %s",
                org_id,
                deployment_id,
                current.version if current else "nothing",
            )
        return True

    def install(self, model: LoadedModel) -> bool:
        """Put a loaded model in its org's slot unless a newer deployment (or undeploy) has been installed, even if
        evicted since; evict to the budget."""
        org_id = model.deployed.org_id
        deployment_id = model.deployed.deployment_id
        with self._lock:
            current = self._models.get(org_id)
            if self.newest(org_id) > deployment_id or self._undeployed.get(org_id, 0) > deployment_id:
                return False
            self._undeployed.pop(org_id, None)
            self._newest[org_id] = deployment_id
            self._models[org_id] = model
            self._last_used[org_id] = time.monotonic()
            evicted = self._evict_beyond_budget(keep=org_id)
        log.info(
            "org %s now serves %s (deployment %s, was %s); unloaded %s",
            org_id,
            model.version,
            model.deployed.deployment_id,
            current.version if current else None,
            evicted or "none",
        )
        return True

    def _evict_beyond_budget(self, *, keep: str) -> list[str]:
        evicted = []
        by_age = sorted((self._last_used.get(org, 0.0), org) for org in self._models if org != keep)
        for _, org_id in by_age:
            if self.used_mb() <= self.budget_mb:
                break
            del self._models[org_id]
            self._last_used.pop(org_id, None)
            evicted.append(org_id)
        return evicted
