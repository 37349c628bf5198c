"""The predictor's model cache: newer deployments win whatever order loads finish in; the budget evicts the
least recently used org."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from services.predictor import deployments
from services.predictor.models import DeployedVersion, LoadedModel, ModelCache
from tests.support.models import FEATURES, tiny_model


def loaded(org_id: str, deployment_id: int, *, memory_mb: float = 1.0) -> LoadedModel:
    deployed = DeployedVersion(
        org_id=org_id,
        deployment_id=deployment_id,
        version=f"v{deployment_id}",
        sha256="",
        artifact_prefix="",
        feature_columns=FEATURES,
        classes=[0, 1],
        memory_mb=memory_mb,
        risk_bands=(0.3, 0.7),
        record_predictions=False,
    )
    session = ort.InferenceSession(tiny_model(), providers=["CPUExecutionProvider"])
    return LoadedModel(deployed=deployed, session=session, size_bytes=0)


def test_a_late_load_of_an_older_deployment_never_replaces_a_newer_one() -> None:
    cache = ModelCache(budget_mb=100)
    assert cache.install(loaded("acme", 7))
    assert not cache.install(loaded("acme", 6))
    assert cache.versions() == {"acme": "v7"}
    assert cache.install(loaded("acme", 8))
    assert cache.versions() == {"acme": "v8"}


def test_the_least_recently_used_org_is_unloaded_when_the_budget_is_exceeded() -> None:
    cache = ModelCache(budget_mb=3)
    for org in ("a", "b", "c"):
        cache.install(loaded(org, 1))
    assert cache.get("a") is not None  # "a" is used again, so "b" is now the oldest
    cache.install(loaded("d", 1))
    assert sorted(cache.versions()) == ["a", "c", "d"]
    assert cache.used_mb() == 3


def test_a_model_larger_than_the_budget_still_serves_alone() -> None:
    cache = ModelCache(budget_mb=2)
    cache.install(loaded("a", 1))
    cache.install(loaded("big", 1, memory_mb=5))
    assert list(cache.versions()) == ["big"]


def test_an_undeploy_unloads_the_org_and_no_late_load_from_before_it_comes_back() -> None:
    cache = ModelCache(budget_mb=100)
    cache.install(loaded("acme", 5))
    cache.install(loaded("other", 1))

    assert cache.undeploy("acme", 6)

    assert cache.peek("acme") is None and cache.undeployed("acme") == 6
    assert not cache.install(loaded("acme", 5))  # a load of the deployment before it, finishing late
    assert cache.versions() == {"other": "v1"} and cache.used_mb() == 1
    assert cache.install(loaded("acme", 7))  # deployed again
    assert cache.undeployed("acme") is None and cache.versions() == {"acme": "v7", "other": "v1"}
    assert not cache.undeploy("acme", 6)  # an undeploy read before the deploy after it
    assert cache.versions()["acme"] == "v7"


def test_a_late_load_of_an_older_deployment_never_comes_back_once_the_newer_one_was_evicted() -> None:
    cache = ModelCache(budget_mb=1)
    assert cache.install(loaded("acme", 7))
    cache.install(loaded("other", 1))  # over budget: acme, the least recently used, is unloaded
    assert cache.peek("acme") is None

    assert not cache.install(loaded("acme", 6))  # a reconcile's read from before deployment 7, finishing late
    assert not cache.undeploy("acme", 5)  # an undeploy read before it too
    assert cache.peek("acme") is None and cache.undeployed("acme") is None
    assert cache.install(loaded("acme", 7))  # its next request loads the newest one again
    assert cache.undeploy("acme", 8)
    assert cache.install(loaded("acme", 9))  # deployed again after the undeploy
    assert cache.versions() == {"acme": "v9"}


def test_a_deployment_read_again_below_the_newest_installed_is_not_followed_round_for_ever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deployment ids gone back (Kiln's database restored from a backup) while the org's newer model was evicted:
    the database keeps naming a deployment this process will not install. It reads it once more, then answers
    none, rather than reading the table until Python's recursion limit."""
    cache = ModelCache(budget_mb=1)
    assert cache.install(loaded("acme", 9))
    assert cache.install(loaded("other", 10))  # over the budget: acme's model is unloaded
    reads: list[str | None] = []

    def restored(_sessions: object, org_id: str | None = None) -> list[deployments.Wanted]:
        reads.append(org_id)
        return [deployments.Wanted(loaded("acme", 5).deployed, loaded_before=True)]

    monkeypatch.setattr(deployments, "read_deployments", restored)
    synchronizer = deployments.Synchronizer(None, None, cache, load_wait_s=1)  # type: ignore[arg-type]

    assert synchronizer.sync_org("acme") is None
    assert reads == ["acme", "acme"]
