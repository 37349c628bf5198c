"""Organizations and keys: who may create them, what is shown once, what is stored."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from shared.db.models import ApiKey
from shared.keys import hash_key
from tests.integration.conftest import ADMIN, OrgKeys


def test_admin_token_creates_an_org_and_a_second_create_is_a_conflict(api: TestClient, org_id: str) -> None:
    created = api.post("/v1/orgs", json={"id": org_id, "name": "Acme Plant"}, headers=ADMIN)
    assert created.status_code == 201
    assert created.json()["id"] == org_id and created.json()["name"] == "Acme Plant"
    again = api.post("/v1/orgs", json={"id": org_id, "name": "Acme Plant"}, headers=ADMIN)
    assert again.status_code == 409
    assert again.json()["field"] == "id"


def test_org_ids_that_cannot_name_a_queue_are_refused(api: TestClient) -> None:
    response = api.post("/v1/orgs", json={"id": "Bad Org!", "name": "x"}, headers=ADMIN)
    assert response.status_code == 422
    assert response.json()["field"] == "id"


def test_creating_an_org_needs_the_admin_token(api: TestClient, org: OrgKeys, org_id: str) -> None:
    missing = api.post("/v1/orgs", json={"id": "other-" + org_id, "name": "x"})
    assert missing.status_code == 401
    org_key = api.post("/v1/orgs", json={"id": "other-" + org_id, "name": "x"}, headers=org.admin)
    assert org_key.status_code == 403


def test_a_key_is_shown_once_and_stored_only_as_its_digest(api: TestClient, org: OrgKeys, settings) -> None:  # type: ignore[no-untyped-def]
    response = api.post(f"/v1/orgs/{org.org_id}/keys", json={"role": "viewer"}, headers=org.admin)
    assert response.status_code == 201
    body = response.json()
    assert body["role"] == "viewer" and body["key"].startswith("kiln_")
    engine = create_engine(settings.database_url)
    with engine.connect() as connection:
        stored = connection.execute(select(ApiKey.key_hash).where(ApiKey.id == body["keyId"])).scalar_one()
    engine.dispose()
    assert stored == hash_key(body["key"]) and body["key"] not in stored


def test_a_viewer_key_cannot_create_keys(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/keys", json={"role": "admin"}, headers=org.viewer)
    assert response.status_code == 403
    assert "admin" in response.json()["error"]


def test_an_unknown_role_is_refused_naming_the_field(api: TestClient, org: OrgKeys) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/keys", json={"role": "owner"}, headers=org.admin)
    assert response.status_code == 422
    assert response.json()["field"] == "role"
