"""A change is committed before the api answers: a client told 2xx can rely on the change being stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from services.api.app import create_app
from shared import schemas
from shared.db.migrate import upgrade
from shared.settings import Settings
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys

SOURCE = {"url": "sqlite:////srv/historian.db", "table": "readings"}


def test_a_change_the_database_refuses_at_commit_is_answered_503_not_200(api: TestClient, org: OrgKeys) -> None:
    sessions = api.app.state.resources.sessions  # type: ignore[attr-defined]

    def lose_the_connection(_session: Session) -> None:
        raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection unexpectedly"))

    event.listen(sessions, "before_commit", lose_the_connection)
    try:
        refused = api.put(f"/v1/orgs/{org.org_id}/datasource", json=SOURCE, headers=org.admin)
    finally:
        event.remove(sessions, "before_commit", lose_the_connection)
    assert refused.status_code == 503, refused.text
    assert "database" in refused.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/datasource", headers=org.admin).status_code == 404


def test_a_change_is_visible_to_the_next_request_once_answered(api: TestClient, org: OrgKeys) -> None:
    assert api.put(f"/v1/orgs/{org.org_id}/datasource", json=SOURCE, headers=org.admin).status_code == 200
    shown = api.get(f"/v1/orgs/{org.org_id}/datasource", headers=org.viewer)
    assert shown.status_code == 200 and shown.json()["table"] == "readings"


@pytest.fixture
def sqlite_api(settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    """The api on SQLite, which stores text PostgreSQL would refuse at the commit (a lone surrogate)."""
    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    upgrade(url)
    with TestClient(
        create_app(settings.model_copy(update={"database_url": url})), raise_server_exceptions=False
    ) as api:
        yield api


def test_a_change_left_to_the_session_is_rolled_back_when_its_answer_cannot_be_serialised(
    sqlite_api: TestClient, org_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI serialises the answer before the session dependency's commit, and a failure there reaches the
    dependency, which rolls back. (Handlers that commit themselves, for their outbox messages, make their answer
    before the commit: see the orgs' tests.)"""
    org = create_org_with_keys(sqlite_api, org_id)
    monkeypatch.setattr(schemas, "unfit_text", lambda _value, **_limits: None)  # let a lone surrogate through
    body = json.dumps({**SOURCE, "columnMap": {"TT_101": "\ud800"}}).encode()
    headers = {**org.admin, "content-type": "application/json"}

    refused = sqlite_api.put(f"/v1/orgs/{org.org_id}/datasource", content=body, headers=headers)

    assert refused.status_code == 500
    assert sqlite_api.get(f"/v1/orgs/{org.org_id}/datasource", headers=org.admin).status_code == 404
    assert [entry["action"] for entry in sqlite_api.get(f"/v1/orgs/{org.org_id}/audit", headers=ADMIN).json()] == [
        "key.created",
        "key.created",
        "key.created",
        "org.created",
    ]
