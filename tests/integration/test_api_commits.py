"""A change is committed before the api answers: a client told 2xx can rely on the change being stored."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tests.integration.conftest import OrgKeys

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
