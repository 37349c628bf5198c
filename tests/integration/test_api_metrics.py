"""The api's /metrics on real PostgreSQL: the platform's state by org and status, for Prometheus's own token."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session

from deploy.local import ai4i
from services.api.app import create_app
from shared.db.models import OutboxMessage
from shared.db.types import utcnow
from shared.settings import Settings
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys, submit, upload_table
from tests.support.metrics import parse_samples, sample
from tests.support.seed import seed_versions

METRICS_TOKEN = "kiln-metrics-for-prometheus"
SCRAPER = {"Authorization": f"Bearer {METRICS_TOKEN}"}


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    scraped = settings.model_copy(update={"metrics_token": SecretStr(METRICS_TOKEN)})
    with TestClient(create_app(scraped), raise_server_exceptions=False) as client:
        yield client


def test_runs_versions_deployments_and_the_outbox_are_counted_by_org_and_status(
    api: TestClient, engine: Engine, org_id: str, tmp_path: Path
) -> None:
    org = create_org_with_keys(api, org_id)
    submit(api, org, upload_table(api, org, ai4i.generate(500, seed=1), tmp_path))
    versions = seed_versions(engine, org_id, 2)
    assert api.post(f"/v1/orgs/{org_id}/deployments", json={"version": versions[1]}, headers=org.admin).is_success
    stuck = OutboxMessage(kind="kind-no-relay-sends", payload={}, created_at=utcnow() - timedelta(hours=1))
    # One that can never be sent, failing for two hours: it is counted as failing, not as a relay that stopped.
    failing = OutboxMessage(
        kind="kind-no-relay-sends", payload={}, created_at=utcnow() - timedelta(hours=2), failed_sends=50
    )
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.add_all([stuck, failing])  # stuck: as a message whose relay stopped an hour ago

    try:
        scraped = api.get("/metrics", headers=SCRAPER)
    finally:
        with Session(engine) as session, session.begin():
            session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_([stuck.id, failing.id])))

    assert scraped.status_code == 200
    samples = parse_samples(scraped.text)
    assert sample(samples, "kiln_training_runs", org=org_id, status="queued") == 1
    assert sample(samples, "kiln_model_versions", org=org_id, status="validated") == 2
    assert sample(samples, "kiln_deployments", org=org_id, status="deployed") == 1
    assert sample(samples, "kiln_outbox_unsent") >= 2
    assert 3600 <= sample(samples, "kiln_outbox_oldest_unsent_seconds") < 7200
    assert sample(samples, "kiln_outbox_failing") >= 1


def test_metrics_are_for_the_metrics_token_or_the_admin_and_the_metrics_token_opens_nothing_else(
    api: TestClient, org: OrgKeys
) -> None:
    assert api.get("/metrics", headers=ADMIN).status_code == 200
    assert api.get("/metrics").status_code == 401
    assert api.get("/metrics", headers=org.admin).status_code == 403
    assert api.get(f"/v1/orgs/{org.org_id}/trainings", headers=SCRAPER).status_code == 401
    assert api.post("/v1/orgs", json={"id": "by-the-scraper", "name": "no"}, headers=SCRAPER).status_code == 401
