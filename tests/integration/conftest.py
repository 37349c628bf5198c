"""The api in-process (TestClient) over real PostgreSQL, Redis and S3."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from shared.settings import Settings
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@dataclass(frozen=True)
class OrgKeys:
    org_id: str
    admin: dict[str, str]
    trainer: dict[str, str]
    viewer: dict[str, str]


def create_org_with_keys(api: TestClient, org_id: str) -> OrgKeys:
    response = api.post("/v1/orgs", json={"id": org_id, "name": f"Org {org_id}"}, headers=ADMIN)
    assert response.status_code == 201, response.text
    keys = {}
    for role in ("admin", "trainer", "viewer"):
        created = api.post(f"/v1/orgs/{org_id}/keys", json={"role": role}, headers=ADMIN)
        assert created.status_code == 201, created.text
        keys[role] = {"Authorization": f"Bearer {created.json()['key']}"}
    return OrgKeys(org_id=org_id, **keys)


@pytest.fixture
def org(api: TestClient, org_id: str) -> OrgKeys:
    return create_org_with_keys(api, org_id)
