"""A model version through the api: read, its artifacts erased, the audit of it and the keys that acted; an org's
data kept on its premises, and a version of it there."""

from __future__ import annotations

from typing import Any

import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from shared.layout import HOLDOUT_FILE, METRICS_FILE, model_prefix
from shared.queues import premises_queue
from shared.settings import Settings
from shared.storage import LocalObjectStore, ObjectStore, premises_store
from tests.integration.conftest import ADMIN, OrgKeys
from tests.support.models import register_model, tiny_model


def model_of(api: TestClient, org: OrgKeys, version: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/orgs/{org.org_id}/models/{version}", headers=org.viewer).json())


def key_id(api: TestClient, org: OrgKeys, role: str) -> str:
    keys = api.get(f"/v1/orgs/{org.org_id}/keys", headers=org.admin).json()
    return str(next(key["keyId"] for key in keys if key["role"] == role))


def erase(api: TestClient, org: OrgKeys, version: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return api.delete(f"/v1/orgs/{org.org_id}/models/{version}/artifacts", headers=headers or org.admin)


def audit_of(api: TestClient, org: OrgKeys, action: str) -> list[dict[str, Any]]:
    return [
        entry
        for entry in api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.admin).json()
        if entry["action"] == action
    ]


def premises_version(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> tuple[str, LocalObjectStore]:
    """The org, made one that keeps its data on its premises, and a version of it: its model and metrics in the
    central store, its held-out rows in the org's worker's own folder for the org's data (returned)."""
    assert (
        api.patch(f"/v1/orgs/{org.org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN).status_code
        == 200
    )
    version = register_model(engine, store, org.org_id, tiny_model(), holdout_on_premises=True)
    prefix = model_prefix(org.org_id, version)
    store.put_bytes(prefix + METRICS_FILE, b"{}")
    premises = premises_store(settings)
    premises.put_bytes(prefix + HOLDOUT_FILE, b"PAR1 the hospital's own records")
    return version, premises


def set_residency(api: TestClient, org: OrgKeys, residency: str) -> None:
    patched = api.patch(f"/v1/orgs/{org.org_id}", json={"config": {"dataResidency": residency}}, headers=ADMIN)
    assert patched.status_code == 200, patched.text


def queued_for_premises(settings: Settings, org: OrgKeys) -> int:
    """Messages waiting on the org's premises queue, which only its own workers take."""
    with redis.Redis.from_url(settings.redis_url) as broker:
        return int(broker.llen(premises_queue(org.org_id)))
