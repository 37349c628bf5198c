"""Deploy and roll back: only validated versions, a history of pointers, and an event per change."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from services.api import registry
from services.api.outbox_relay import commit_and_send
from services.api.routers import deployments
from services.api.schemas import MAX_ROW_ID
from services.trainer.context import WorkerContext
from shared.db.models import CurrentDeployment, Deployment, ModelVersion, OutboxMessage
from shared.lookups import get_owned
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys
from tests.support.events import ChannelListener
from tests.support.judgements import judge_queued
from tests.support.models import register_judgeable
from tests.support.seed import seed_version, seed_versions


def deploy(api: TestClient, org: OrgKeys, version: str):  # type: ignore[no-untyped-def]
    return api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)


def test_deploying_a_validated_version_points_the_org_at_it(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    response = deploy(api, org, version)
    assert response.status_code == 201, response.text
    assert response.json()["version"] == version
    assert response.json()["rollbackAvailable"] is False
    current = api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()
    assert current["version"] == version


def test_a_deploy_publishes_one_event_after_the_commit(
    api: TestClient, org: OrgKeys, engine: Engine, settings: Settings
) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    listener = ChannelListener(settings.redis_url, settings.deploy_channel)
    assert deploy(api, org, version).status_code == 201
    event = listener.next_event(seconds=5)
    assert event is not None
    assert (event.org_id, event.version) == (org.org_id, version)
    with engine.connect() as connection:
        pending = connection.execute(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))).all()
    assert [row for row in pending if row.payload.get("org_id") == org.org_id] == []
    listener.close()


def test_a_rejected_version_can_never_be_deployed(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    rejected = seed_version(engine, org.org_id, passed=False)
    response = deploy(api, org, rejected)
    assert response.status_code == 409
    assert response.json()["failedGates"] == ["accuracy", "recall"]
    assert "accuracy, recall" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).status_code == 404


def test_an_unknown_version_is_not_found(api: TestClient, org: OrgKeys) -> None:
    response = deploy(api, org, "v2024-01-15T10-30-00-000Z_a1b2c3d4")
    assert response.status_code == 404
    assert response.json()["field"] == "version"


def test_rollback_walks_back_through_older_validated_versions(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    first, second, third = seed_versions(engine, org.org_id, 3)
    for version in (first, second, third):
        assert deploy(api, org, version).status_code == 201
    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()["rollbackAvailable"] is True
    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert back.status_code == 200
    assert back.json()["version"] == second
    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert (back.json()["version"], back.json()["rollbackAvailable"]) == (first, False)
    nothing_older = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert nothing_older.status_code == 409


def test_rollback_to_a_named_version(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    first, _second, third = seed_versions(engine, org.org_id, 3)
    deploy(api, org, third)
    response = api.post(f"/v1/orgs/{org.org_id}/rollback", json={"version": first}, headers=org.admin)
    assert response.status_code == 200
    assert response.json()["version"] == first


def test_rollback_skips_rejected_versions(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    first = seed_versions(engine, org.org_id, 1)[0]
    seed_version(engine, org.org_id, passed=False)
    (latest,) = seed_versions(engine, org.org_id, 1)
    deploy(api, org, latest)
    response = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert response.json()["version"] == first


def test_a_version_rejected_for_good_is_never_a_rollback_target(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, worker: WorkerContext
) -> None:
    """An older version rejected when its run finished, judged again under relaxed gates: it passes them now, but
    stays rejected, so there is nothing to roll back to, by default or by name."""
    older = register_judgeable(engine, store, org.org_id, {"minRecall": 0.9})
    relaxed = api.patch(f"/v1/orgs/{org.org_id}", json={"config": {"gates": {"minRecall": 0.1}}}, headers=ADMIN)
    assert relaxed.status_code == 200, relaxed.text
    assert api.post(f"/v1/orgs/{org.org_id}/models/{older}/validate", headers=org.trainer).status_code == 202
    assert judge_queued(engine, worker, org.org_id, older) == "rejected"
    (latest,) = seed_versions(engine, org.org_id, 1)

    deployed = deploy(api, org, latest)
    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    named = api.post(f"/v1/orgs/{org.org_id}/rollback", json={"version": older}, headers=org.admin)

    assert deployed.status_code == 201 and deployed.json()["rollbackAvailable"] is False
    assert back.status_code == 409
    assert named.status_code == 409 and named.json()["failedGates"] == ["recall"]
    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()["version"] == latest


def test_every_deploy_and_rollback_is_audited_from_which_version_to_which(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    first, second = seed_versions(engine, org.org_id, 2)
    deploy(api, org, first)
    deploy(api, org, second)
    api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)

    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()[::-1]
    moves = [entry for entry in audit if entry["action"] in ("model.deployed", "model.rolled_back")]

    assert [(entry["action"], entry["target"], entry["detail"]) for entry in moves] == [
        ("model.deployed", first, {"from": None, "to": first}),
        ("model.deployed", second, {"from": first, "to": second}),
        ("model.rolled_back", first, {"from": second, "to": first}),
    ]


def test_every_deploy_and_rollback_is_kept_in_the_history(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    first, second = seed_versions(engine, org.org_id, 2)
    deploy(api, org, first)
    deploy(api, org, second)
    api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    with engine.connect() as connection:
        history = connection.execute(
            select(Deployment.action, Deployment.version, Deployment.previous_version)
            .where(Deployment.org_id == org.org_id)
            .order_by(Deployment.id)
        ).all()
    assert [tuple(row) for row in history] == [
        ("deploy", first, None),
        ("deploy", second, first),
        ("rollback", first, second),
    ]


def test_the_history_pages_back_by_deployment_id_with_before(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    first, second = seed_versions(engine, org.org_id, 2)
    deploy(api, org, first)
    deploy(api, org, second)
    api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    url = f"/v1/orgs/{org.org_id}/deployments"

    newest = api.get(url, params={"limit": 2}, headers=org.viewer).json()
    older = api.get(url, params={"limit": 2, "before": newest[-1]["deploymentId"]}, headers=org.viewer).json()

    assert [(row["action"], row["version"]) for row in newest] == [("rollback", first), ("deploy", second)]
    assert [(row["action"], row["version"]) for row in older] == [("deploy", first)]
    assert api.get(url, params={"before": older[-1]["deploymentId"]}, headers=org.viewer).json() == []
    assert api.get(url, params={"before": MAX_ROW_ID}, headers=org.viewer).json() == newest + older


def test_a_trainer_key_cannot_deploy(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    response = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.trainer)
    assert response.status_code == 403


def test_concurrent_deploys_leave_one_unbroken_history(
    backend_api: TestClient, backend_engine: Engine, org_id: str
) -> None:
    api = backend_api
    org = create_org_with_keys(api, org_id)
    first, second = seed_versions(backend_engine, org_id, 2)

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda version: deploy(api, org, version).status_code, [first, second] * 20))

    assert statuses == [201] * 40
    history = api.get(f"/v1/orgs/{org_id}/deployments?limit=1000", headers=org.viewer).json()[::-1]
    assert history[0]["previousVersion"] is None
    links = [(later["previousVersion"], later["version"]) for later in history[1:]]
    assert links == [(earlier["version"], later["version"]) for earlier, later in pairwise(history)]
    assert all(previous != version for previous, version in links)
    assert api.get(f"/v1/orgs/{org_id}/deployment", headers=org.viewer).json()["version"] == history[-1]["version"]


@pytest.mark.parametrize(("path", "names_the_version"), [("deployments", True), ("rollback", False)])
def test_a_deploy_or_rollback_answered_as_another_deploy_commits_describes_its_own_deployment(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch, path: str, names_the_version: bool
) -> None:
    older, newer, another = seed_versions(engine, org.org_id, 3)
    assert deploy(api, org, older).status_code == 201 and deploy(api, org, newer).status_code == 201

    def another_deploy_commits_right_after(*args: Any) -> None:
        commit_and_send(*args)
        monkeypatch.setattr(deployments, "commit_and_send", commit_and_send)
        assert deploy(api, org, another).status_code == 201

    monkeypatch.setattr(deployments, "commit_and_send", another_deploy_commits_right_after)
    named = {"version": older} if names_the_version else {}
    answer = api.post(f"/v1/orgs/{org.org_id}/{path}", json=named, headers=org.admin)

    assert answer.status_code in (200, 201), answer.text
    history = api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json()
    assert [entry["version"] for entry in history] == [another, older, newer, older]
    assert answer.json()["deploymentId"] == history[1]["deploymentId"]
    assert (answer.json()["version"], answer.json()["servingVersion"]) == (older, older)


def test_the_current_deployment_read_as_an_undeploy_commits_describes_one_state(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GET read the pointer, then what serves by the pointer as it was a statement later: an undeploy committed
    in between made it say the version was deployed and that nothing served it."""
    (version,) = seed_versions(engine, org.org_id, 1)
    assert deploy(api, org, version).status_code == 201
    rollback_default = registry.rollback_default

    def undeploy_commits_meanwhile(*args: Any) -> Any:
        monkeypatch.setattr(registry, "rollback_default", rollback_default)
        assert api.delete(f"/v1/orgs/{org.org_id}/deployment", headers=org.admin).status_code == 204
        return rollback_default(*args)

    monkeypatch.setattr(registry, "rollback_default", undeploy_commits_meanwhile)
    answer = api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()

    assert (answer["version"], answer["status"], answer["servingVersion"]) == (version, "deployed", version)
    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()["servingVersion"] is None


def test_deploying_the_version_already_deployed_changes_and_audits_nothing(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    first = deploy(api, org, version)
    again = deploy(api, org, version)

    assert again.status_code == 201
    assert again.json()["deploymentId"] == first.json()["deploymentId"]
    assert len(api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json()) == 1
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()
    assert [entry["target"] for entry in audit if entry["action"] == "model.deployed"] == [version]


def test_deploying_again_a_version_whose_deployment_failed_is_a_new_attempt(
    api: TestClient, org: OrgKeys, engine: Engine, settings: Settings
) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    first = deploy(api, org, version).json()["deploymentId"]
    with engine.begin() as connection:  # as a predictor records a version it refused
        connection.execute(update(Deployment).where(Deployment.id == first).values(status="failed", error="store down"))
    listener = ChannelListener(settings.redis_url, settings.deploy_channel)

    again = deploy(api, org, version)

    assert again.status_code == 201
    assert again.json()["deploymentId"] != first and again.json()["status"] == "deployed"
    history = api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json()
    assert [row["status"] for row in history] == ["deployed", "failed"]
    event = listener.next_event(seconds=5)
    assert event is not None and event.deployment_id == again.json()["deploymentId"]
    listener.close()


def test_the_deployment_view_names_the_version_predictors_serve_while_a_deploy_is_refused(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    good, broken = seed_versions(engine, org.org_id, 2)
    deploy(api, org, good)
    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()["servingVersion"] == good
    refused = deploy(api, org, broken).json()["deploymentId"]
    with engine.begin() as connection:  # as a predictor records a version it refused
        connection.execute(update(Deployment).where(Deployment.id == refused).values(status="failed", error="NaN"))

    current = api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()

    assert (current["version"], current["status"], current["servingVersion"]) == (broken, "failed", good)
    assert undeploy(api, org).status_code == 204
    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()["servingVersion"] is None


def reject(engine: Engine, version: str) -> None:
    """Commit a judgement that rejects the version, as the worker's final transaction of a re-validation does."""
    with engine.begin() as connection:
        connection.execute(
            update(ModelVersion)
            .where(ModelVersion.version == version)
            .values(status="rejected", validation={"passed": False, "failed": ["recall"], "gates": []})
        )


def rejected_once_the_api_has_read_it(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
    """A judgement rejecting the version commits just after the api has read it, validated, for a deploy or a
    rollback by name, and before that deploy or rollback commits."""

    def read_then_rejected(session: Session, model: type[ModelVersion], key: str, **kwargs: Any) -> ModelVersion:
        row = get_owned(session, model, key, **kwargs)
        reject(engine, key)
        return row

    monkeypatch.setattr(registry, "get_owned", read_then_rejected)


def test_a_version_rejected_while_it_is_being_deployed_is_refused(
    backend_api: TestClient, backend_engine: Engine, org_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = backend_api
    org = create_org_with_keys(api, org_id)
    (version,) = seed_versions(backend_engine, org_id, 1)
    rejected_once_the_api_has_read_it(monkeypatch, backend_engine)

    response = deploy(api, org, version)

    assert response.status_code == 409, response.text
    assert response.json()["failedGates"] == ["recall"]
    assert api.get(f"/v1/orgs/{org_id}/deployment", headers=org.viewer).status_code == 404
    assert api.get(f"/v1/orgs/{org_id}/deployments", headers=org.viewer).json() == []


def test_a_version_rejected_while_it_is_being_rolled_back_to_by_name_is_refused(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    older, latest = seed_versions(engine, org.org_id, 2)
    deploy(api, org, latest)
    rejected_once_the_api_has_read_it(monkeypatch, engine)

    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={"version": older}, headers=org.admin)

    assert back.status_code == 409, back.text
    assert back.json()["failedGates"] == ["recall"]
    current = api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()
    assert (current["version"], current["versionStatus"]) == (latest, "validated")


def test_a_rollback_whose_target_is_rejected_while_it_is_chosen_goes_to_the_next_validated_version(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third = seed_versions(engine, org.org_id, 3)
    deploy(api, org, third)
    original = registry.rollback_default
    rejected: list[str] = []

    def chosen_then_rejected(session: Session, current: CurrentDeployment) -> str | None:
        target = original(session, current)
        if target is not None and not rejected:  # the first target chosen is rejected once chosen
            reject(engine, target)
            rejected.append(target)
        return target

    monkeypatch.setattr(registry, "rollback_default", chosen_then_rejected)

    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)

    assert rejected == [second]
    assert back.status_code == 200, back.text
    assert (back.json()["version"], back.json()["versionStatus"]) == (first, "validated")
    assert [row["version"] for row in history_of(api, org)] == [third, first]


def undeploy(api: TestClient, org: OrgKeys, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return api.delete(f"/v1/orgs/{org.org_id}/deployment", headers=headers or org.admin)


def history_of(api: TestClient, org: OrgKeys) -> list[dict[str, Any]]:
    """The org's deployments, oldest first."""
    return list(api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json())[::-1]


def admin_key_id(api: TestClient, org: OrgKeys) -> str:
    keys = api.get(f"/v1/orgs/{org.org_id}/keys", headers=org.admin).json()
    return str(next(key["keyId"] for key in keys if key["role"] == "admin"))


def test_undeploying_points_the_org_at_nothing_and_the_history_shows_who_when_and_from_which_version(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    first, second = seed_versions(engine, org.org_id, 2)
    deploy(api, org, first)
    deploy(api, org, second)

    response = undeploy(api, org)

    assert response.status_code == 204, response.text
    current = api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer)
    assert current.status_code == 200
    history = history_of(api, org)
    last = history[-1]
    assert current.json() == {
        "version": None,
        "deployedAt": last["createdAt"],
        "rollbackAvailable": True,  # to the version it stopped
        "deploymentId": last["deploymentId"],
        "status": "undeployed",
        "error": None,
        "versionStatus": None,
        "failedGates": [],
        "servingVersion": None,
    }
    assert [(row["action"], row["previousVersion"], row["version"], row["status"]) for row in history] == [
        ("deploy", None, first, "deployed"),
        ("deploy", first, second, "deployed"),
        ("undeploy", second, None, "undeployed"),
    ]
    assert last["actor"] == admin_key_id(api, org)
    assert last["deploymentId"] > history[-2]["deploymentId"]


def test_an_undeploy_is_audited_from_the_version_it_stopped(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    deploy(api, org, version)

    assert undeploy(api, org).status_code == 204

    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()
    undeploys = [entry for entry in audit if entry["action"] == "model.undeployed"]
    assert [(entry["actor"], entry["target"], entry["detail"]) for entry in undeploys] == [
        (admin_key_id(api, org), version, {"from": version, "to": None})
    ]


def test_an_undeploy_publishes_one_event_after_the_commit(
    api: TestClient, org: OrgKeys, engine: Engine, settings: Settings
) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    deploy(api, org, version)
    listener = ChannelListener(settings.redis_url, settings.deploy_channel)

    assert undeploy(api, org).status_code == 204

    event = listener.next_event(seconds=5)
    current = api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()
    assert event is not None
    assert (event.org_id, event.version, event.deployment_id) == (org.org_id, None, current["deploymentId"])
    assert listener.next_event(seconds=0.5) is None
    with engine.connect() as connection:
        pending = connection.execute(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))).all()
    assert [row for row in pending if row.payload.get("org_id") == org.org_id] == []
    listener.close()


def test_undeploying_when_nothing_serves_changes_audits_and_sends_nothing(
    api: TestClient, org: OrgKeys, engine: Engine, settings: Settings
) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    never_deployed = undeploy(api, org)
    deploy(api, org, version)
    assert undeploy(api, org).status_code == 204
    listener = ChannelListener(settings.redis_url, settings.deploy_channel)

    again = undeploy(api, org)

    assert (never_deployed.status_code, again.status_code) == (204, 204)
    assert listener.next_event(seconds=1) is None
    assert [row["action"] for row in history_of(api, org)] == ["deploy", "undeploy"]
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()
    assert len([entry for entry in audit if entry["action"] == "model.undeployed"]) == 1
    listener.close()


def test_only_the_orgs_admins_can_undeploy(api: TestClient, org: OrgKeys, engine: Engine, org_id: str) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    deploy(api, org, version)
    other = create_org_with_keys(api, "x" + org_id)

    assert undeploy(api, org, org.viewer).status_code == 403
    assert undeploy(api, org, org.trainer).status_code == 403
    assert undeploy(api, org, other.admin).status_code == 404
    assert undeploy(api, org, {"Authorization": "Bearer kiln_nope"}).status_code == 401

    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()["version"] == version
    assert [row["action"] for row in history_of(api, org)] == ["deploy"]
    assert undeploy(api, org, ADMIN).status_code == 204  # the platform's operators can too


def test_deploying_after_an_undeploy_deploys_as_usual(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    first = deploy(api, org, version).json()
    undeploy(api, org)

    again = deploy(api, org, version)

    assert again.status_code == 201, again.text
    body = again.json()
    assert (body["version"], body["status"], body["versionStatus"]) == (version, "deployed", "validated")
    assert body["deploymentId"] > first["deploymentId"] + 1
    assert [(row["action"], row["previousVersion"], row["version"]) for row in history_of(api, org)] == [
        ("deploy", None, version),
        ("undeploy", version, None),
        ("deploy", None, version),
    ]
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()
    deploys = [entry["detail"] for entry in audit if entry["action"] == "model.deployed"]
    assert deploys == [{"from": None, "to": version}] * 2  # nothing served before either


def test_rollback_after_an_undeploy_returns_to_the_version_it_stopped_or_to_a_named_one(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    first, second = seed_versions(engine, org.org_id, 2)
    deploy(api, org, first)
    deploy(api, org, second)
    undeploy(api, org)

    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)

    assert back.status_code == 200, back.text
    assert (back.json()["version"], back.json()["rollbackAvailable"]) == (second, True)
    undeploy(api, org)
    named = api.post(f"/v1/orgs/{org.org_id}/rollback", json={"version": first}, headers=org.admin)
    assert named.status_code == 200 and named.json()["version"] == first
    assert [(row["action"], row["previousVersion"], row["version"]) for row in history_of(api, org)][2:] == [
        ("undeploy", second, None),
        ("rollback", None, second),
        ("undeploy", second, None),
        ("rollback", None, first),
    ]


def test_after_an_undeploy_of_a_version_rejected_since_there_is_no_rollback_but_by_name(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    """The harmful model judged again and rejected, then undeployed: `rollback {}` does not bring it back."""
    older, harmful = seed_versions(engine, org.org_id, 2)
    deploy(api, org, harmful)
    with engine.begin() as connection:  # as a worker records a judgement that rejects it
        connection.execute(update(ModelVersion).where(ModelVersion.version == harmful).values(status="rejected"))
    undeploy(api, org)

    current = api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()
    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    named = api.post(f"/v1/orgs/{org.org_id}/rollback", json={"version": older}, headers=org.admin)

    assert (current["status"], current["rollbackAvailable"]) == ("undeployed", False)
    assert back.status_code == 409 and harmful in back.json()["error"]
    assert named.status_code == 200 and named.json()["version"] == older


def test_an_undeploy_while_a_deploy_is_refused_stops_the_last_good_version_and_names_it(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    good, broken = seed_versions(engine, org.org_id, 2)
    deploy(api, org, good)
    refused = deploy(api, org, broken).json()["deploymentId"]
    with engine.begin() as connection:  # as a predictor records a version it refused
        connection.execute(update(Deployment).where(Deployment.id == refused).values(status="failed", error="NaN"))

    assert undeploy(api, org).status_code == 204

    assert history_of(api, org)[-1]["previousVersion"] == good
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()
    assert [entry["detail"] for entry in audit if entry["action"] == "model.undeployed"] == [{"from": good, "to": None}]
    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert back.json()["version"] == good


def loaded(engine: Engine, deployment_id: int) -> None:
    """Record that a predictor has loaded and warmed the deployment, as its first load of it does."""
    with engine.begin() as connection:
        connection.execute(update(Deployment).where(Deployment.id == deployment_id).values(loaded_at=datetime.now(UTC)))


def test_an_undeploy_before_any_predictor_loaded_a_deploy_stops_the_version_that_served_and_rollback_returns_to_it(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    """A deploy undeployed before any predictor has tried it (it may be broken, and about to be refused): what
    served was the version before it, so the undeploy names that one, `rollback {}` goes back to it, and the deploy
    that never served is settled as superseded rather than left `deployed` for good."""
    older, served = seed_versions(engine, org.org_id, 2)
    serving = deploy(api, org, served).json()["deploymentId"]
    loaded(engine, serving)
    deploy(api, org, older)  # say broken: no predictor has loaded or refused it when the undeploy comes

    assert undeploy(api, org).status_code == 204

    history = history_of(api, org)
    assert [(row["action"], row["version"], row["previousVersion"], row["status"]) for row in history] == [
        ("deploy", served, None, "deployed"),
        ("deploy", older, served, "superseded"),
        ("undeploy", None, served, "undeployed"),
    ]
    assert (
        history[1]["error"]
        == f"undeployed (deployment {history[2]['deploymentId']}) before any predictor had loaded it"
    )
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()
    assert [(entry["target"], entry["detail"]) for entry in audit if entry["action"] == "model.undeployed"] == [
        (served, {"from": served, "to": None})
    ]
    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()["rollbackAvailable"] is True
    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert back.status_code == 200, back.text
    assert (back.json()["version"], back.json()["servingVersion"]) == (served, served)


def test_an_undeploy_names_the_newest_deploy_a_predictor_loaded_and_else_the_one_it_stops(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    """Loaded: the deploy served, and is named. Nothing loaded since the org's last undeploy: the deploy stopped is
    all the org had, and is named (an undeploy before it is never looked past)."""
    first, second = seed_versions(engine, org.org_id, 2)
    loaded(engine, deploy(api, org, first).json()["deploymentId"])
    loaded(engine, deploy(api, org, second).json()["deploymentId"])
    undeploy(api, org)
    deploy(api, org, first)  # never loaded

    undeploy(api, org)

    assert [(row["action"], row["previousVersion"], row["status"]) for row in history_of(api, org)][2:] == [
        ("undeploy", second, "undeployed"),
        ("deploy", None, "deployed"),
        ("undeploy", first, "undeployed"),
    ]
    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert back.status_code == 200 and back.json()["version"] == first


def test_concurrent_deploys_and_undeploys_leave_one_unbroken_history(
    backend_api: TestClient, backend_engine: Engine, org_id: str
) -> None:
    api = backend_api
    org = create_org_with_keys(api, org_id)
    first, second = seed_versions(backend_engine, org_id, 2)

    def act(version: str | None) -> int:
        return int((undeploy(api, org) if version is None else deploy(api, org, version)).status_code)

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(act, [first, None, second, None] * 10))

    assert statuses == [201, 204, 201, 204] * 10
    history = api.get(f"/v1/orgs/{org_id}/deployments?limit=1000", headers=org.viewer).json()[::-1]
    links = [(later["previousVersion"], later["version"]) for later in history[1:]]
    assert links == [(earlier["version"], later["version"]) for earlier, later in pairwise(history)]
    assert all(previous != version for previous, version in links)
    assert all((row["action"] == "undeploy") == (row["version"] is None) for row in history)
    current = api.get(f"/v1/orgs/{org_id}/deployment", headers=org.viewer).json()
    assert (current["version"], current["deploymentId"]) == (history[-1]["version"], history[-1]["deploymentId"])
