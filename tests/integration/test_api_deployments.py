"""Deploy and roll back: only validated versions, a history of pointers, and an event per change."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from shared.db.models import Deployment, OutboxMessage
from shared.settings import Settings
from tests.integration.conftest import OrgKeys
from tests.support.events import ChannelListener
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


def test_a_trainer_key_cannot_deploy(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    (version,) = seed_versions(engine, org.org_id, 1)
    response = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.trainer)
    assert response.status_code == 403
