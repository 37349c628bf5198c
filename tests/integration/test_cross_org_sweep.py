"""Every org-scoped route, called with another org's key or with another org's ids, answers 404."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from shared.db.models import SyncConflict, SyncKey
from shared.settings import Settings
from tests.integration.conftest import OrgKeys, create_org_with_keys, upload
from tests.integration.dataset_support import CSV
from tests.support.seed import seed_versions

BODIES: dict[str, dict[str, Any]] = {
    "POST /v1/orgs/{org}/keys": {"role": "viewer"},
    "POST /v1/orgs/{org}/trainings": {"targetColumn": "failed", "featureColumns": ["temperature"]},
    "POST /v1/orgs/{org}/deployments": {"version": "{version}"},
    "POST /v1/orgs/{org}/rollback": {},
    "POST /v1/orgs/{org}/sync-sources": {
        "url": "sqlite:////tmp/plant.db",
        "tables": [{"name": "t", "primaryKey": "id"}],
    },
    "PATCH /v1/orgs/{org}/sync-sources/{source_id}": {"url": "sqlite:////tmp/plant-moved.db"},
    "POST /v1/orgs/{org}/sync-jobs": {"sourceId": "{source_id}"},
    "PUT /v1/orgs/{org}/sync-sources/{source_id}/schedule": {"pattern": "0 * * * *"},
    "POST /v1/orgs/{org}/conflicts/{conflictId}": {"keep": "local"},
}


def org_routes(api: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) under an org, as the OpenAPI document publishes them."""
    paths = api.get("/openapi.json").json()["paths"]
    return sorted((method.upper(), path) for path, item in paths.items() if "{org}" in path for method in item)


@pytest.fixture
def victim(api: TestClient, org_id: str, settings: Settings) -> tuple[OrgKeys, dict[str, str]]:
    """An org with one of everything: a dataset, a queued run, a deployed version (and its model artifact's name),
    an api key, a sync source, job and conflict."""
    org = create_org_with_keys(api, org_id)
    dataset_id = upload(api, org, CSV, timestampColumn="timestamp").json()["datasetId"]
    run = api.post(
        f"/v1/orgs/{org_id}/trainings",
        json={"datasetId": dataset_id, "targetColumn": "failed", "featureColumns": ["temperature"]},
        headers=org.trainer,
    ).json()
    engine = create_engine(settings.database_url)
    first, second = seed_versions(engine, org_id, 2)
    engine.dispose()
    assert api.post(f"/v1/orgs/{org_id}/deployments", json={"version": second}, headers=org.admin).status_code == 201
    sync_ids = _sync_ids(api, org, settings)
    api_key_id = api.get(f"/v1/orgs/{org_id}/keys", headers=org.admin).json()[0]["keyId"]
    ids = {
        "dataset_id": dataset_id,
        "run_id": run["runId"],
        "version": first,
        "name": "model.onnx",
        "api_key_id": api_key_id,
        **sync_ids,
    }
    return org, ids


def _sync_ids(api: TestClient, org: OrgKeys, settings: Settings) -> dict[str, str]:
    """A sync source with a schedule, a queued job, a conflict held for review and a drained key."""
    body = BODIES["POST /v1/orgs/{org}/sync-sources"]
    source_id = api.post(f"/v1/orgs/{org.org_id}/sync-sources", json=body, headers=org.admin).json()["sourceId"]
    schedule = {"pattern": "0 * * * *"}
    api.put(f"/v1/orgs/{org.org_id}/sync-sources/{source_id}/schedule", json=schedule, headers=org.admin)
    job = api.post(f"/v1/orgs/{org.org_id}/sync-jobs", json={"sourceId": source_id}, headers=org.trainer).json()
    engine = create_engine(settings.database_url)
    with Session(engine) as session, session.begin():
        conflict = SyncConflict(
            org_id=org.org_id,
            source_id=source_id,
            table_name="t",
            record_key="1",
            policy="manual",
            status="open",
            outcome="held",
            local_version={"id": 1},
            central_version={"id": 1},
        )
        session.add(conflict)
        # Drained: the one state an admin of its own org may destroy.
        key_id = "ek" + org.org_id[-10:]
        session.add(SyncKey(id=key_id, org_id=org.org_id, status="drained", wrapped="unused"))
        session.flush()
        conflict_id = str(conflict.id)
    engine.dispose()
    return {
        "source_id": source_id,
        "job_id": job["jobId"],
        "conflictId": conflict_id,
        "key_id": "ek" + org.org_id[-10:],
    }


def call(api: TestClient, method: str, path: str, org: str, ids: dict[str, str], headers: dict[str, str]) -> int:
    url = re.sub(r"\{(\w+)\}", lambda m: org if m.group(1) == "org" else ids[m.group(1)], path)
    body = BODIES.get(f"{method} {path}")
    if body is not None:
        body = {k: v.format(**ids) if isinstance(v, str) else v for k, v in body.items()}
    if path.endswith("/datasets") and method == "POST":
        return api.post(url, files={"file": ("d.csv", CSV)}, headers=headers).status_code
    return api.request(method, url, json=body, headers=headers).status_code


def served_org_routes(api: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) the app serves with an {org} in its path, published in the OpenAPI document or not. HEAD
    is left out: it is answered wherever GET is."""
    routes = iter_route_contexts(api.app.routes)  # type: ignore[attr-defined]
    org_scoped = [route for route in routes if "org" in getattr(route, "param_convertors", {})]
    return sorted((method, str(route.path)) for route in org_scoped for method in (route.methods or set()) - {"HEAD"})


def test_the_sweep_covers_every_org_route(api: TestClient) -> None:
    assert org_routes(api) == served_org_routes(api)


def test_another_orgs_key_gets_404_on_every_route(
    api: TestClient, victim: tuple[OrgKeys, dict[str, str]], org_id: str
) -> None:
    org, ids = victim
    intruder = create_org_with_keys(api, "x" + org_id)
    answers = {
        (method, path): call(api, method, path, org.org_id, ids, intruder.admin) for method, path in org_routes(api)
    }
    assert {route: status for route, status in answers.items() if status != 404} == {}


def test_another_orgs_ids_are_404_under_ones_own_org(
    api: TestClient, victim: tuple[OrgKeys, dict[str, str]], org_id: str
) -> None:
    _org, ids = victim
    intruder = create_org_with_keys(api, "x" + org_id)
    named = r"\{(dataset_id|run_id|version|api_key_id|source_id|job_id|conflictId|key_id)\}"
    routes_with_ids = [(m, p) for m, p in org_routes(api) if re.search(named, p)]
    routes_with_ids += [("POST", "/v1/orgs/{org}/deployments"), ("POST", "/v1/orgs/{org}/sync-jobs")]
    answers = {(m, p): call(api, m, p, intruder.org_id, ids, intruder.admin) for m, p in routes_with_ids}
    assert {route: status for route, status in answers.items() if status != 404} == {}
