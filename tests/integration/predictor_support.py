"""Deployments and a predictor in-process, for the predictor tests: a version deployed through the api, or quietly
as if pub/sub lost the event; a predictor started, ready, and what it serves, deploys and records."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.api import registry
from services.predictor.app import create_app
from shared.db.session import make_session_factory, session_scope
from shared.db.types import utcnow
from shared.settings import Settings
from tests.integration.conftest import OrgKeys
from tests.support.models import ai4i_row
from tests.support.polling import eventually


def deploy_quietly(engine: Engine, org_id: str, version: str) -> None:
    """Write a deployment the way the api does, its event sent as far as the outbox knows but heard by no one: as if
    pub/sub lost it. (Left pending, the event would be sent later by any api's outbox sweep: into the deploy channel
    of whichever test runs one next.)"""
    with session_scope(make_session_factory(engine)) as session:
        _, event = registry.record_deployment(session, org_id=org_id, version=version, action="deploy", actor="test")
        if event is not None:
            event.published_at = utcnow()


def becomes_ready(predictor: TestClient) -> bool:
    return bool(eventually(lambda: predictor.get("/v2/health/ready").status_code == 200))


def served_version(predictor: TestClient, org: OrgKeys) -> str | None:
    response = predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row()]}, headers=org.viewer)
    return response.headers.get("x-model-version") if response.status_code == 200 else None


def start_predictor(settings: Settings, **changes: object) -> TestClient:
    tuned = settings.model_copy(update={"predictor_reconcile_s": 0.5, "predictor_record_flush_s": 0.2, **changes})
    return TestClient(create_app(tuned), raise_server_exceptions=False)


def current_deployment(api: TestClient, org: OrgKeys) -> dict[str, Any]:
    return dict(api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json())


def records_of(api: TestClient, org: OrgKeys) -> list[dict[str, Any]]:
    return list(api.get(f"/v1/orgs/{org.org_id}/predictions", headers=org.viewer).json())


def deploy(api: TestClient, org: OrgKeys, version: str) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
    assert response.status_code == 201, response.text
