"""A request that checks a row and then acts on it, and a change of that row sent while it acts: the change waits
for the request, or the request sees it. Never both answered as if the other had not happened: a run queued on a
dataset the erasure had already answered for, a judgement of artifacts already gone, a sync job an org keeping its
data local should have been refused. On PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from services.api.routers import models, sync_jobs, trainings
from shared.db.models import SyncConflict
from tests.integration.conftest import ADMIN, OrgKeys, config
from tests.support.polling import start_until_it_waits_for_a_lock
from tests.support.seed import seed_versions

SOURCE = {"url": "postgresql://plant@db.example.org/records", "tables": [{"name": "readings", "primaryKey": "id"}]}


def change_while_acting(
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,
    after_the_checks: tuple[Any, str],
    request: Callable[[], httpx2.Response],
    change: Callable[[], httpx2.Response],
) -> tuple[int, int, bool]:
    """Send `request`; once its checks are done (at the call of `after_the_checks`, a module and a function name
    there), send `change` from another thread and let it run until it answers or waits for a lock. The request's
    status, the change's, and whether the change had answered before the request acted on its checks."""
    answered: dict[str, Any] = {}
    changing = threading.Thread(target=lambda: answered.update(change=change().status_code))
    module, name = after_the_checks
    act = getattr(module, name)

    def change_then_act(*args: Any, **kwargs: Any) -> Any:
        if changing.ident is None:
            start_until_it_waits_for_a_lock(changing, engine.url)
            answered["first"] = not changing.is_alive()
        return act(*args, **kwargs)

    monkeypatch.setattr(module, name, change_then_act)
    status = request().status_code
    changing.join()
    return status, answered["change"], answered["first"]


def test_a_dataset_erased_while_a_training_of_it_is_submitted_is_erased_after_the_run_is_queued(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered = change_while_acting(
        monkeypatch,
        engine,
        (trainings, "queue_run"),
        lambda: api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer),
        lambda: api.delete(f"/v1/orgs/{org.org_id}/datasets/{dataset_id}", headers=org.trainer),
    )

    assert answered == (202, 200, False)


def test_a_version_erased_while_its_judgement_is_asked_is_erased_after_the_judgement_is_queued(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    [version] = seed_versions(engine, org.org_id, 1)
    answered = change_while_acting(
        monkeypatch,
        engine,
        (models, "take_submission"),
        lambda: api.post(f"/v1/orgs/{org.org_id}/models/{version}/validate", headers=org.trainer),
        lambda: api.delete(f"/v1/orgs/{org.org_id}/models/{version}/artifacts", headers=org.admin),
    )

    assert answered == (202, 200, False)


@pytest.mark.parametrize("change", ["residency", "deletion"])
def test_an_org_turning_local_or_a_source_deleted_while_a_sync_job_is_submitted_waits_for_the_job(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    created = api.post(f"/v1/orgs/{org.org_id}/sync-sources", json=SOURCE, headers=org.admin)
    source_id = created.json()["sourceId"]
    changes = {
        "residency": lambda: api.patch(
            f"/v1/orgs/{org.org_id}", json={"config": {"dataResidency": "local"}}, headers=ADMIN
        ),
        "deletion": lambda: api.delete(f"/v1/orgs/{org.org_id}/sync-sources/{source_id}", headers=org.admin),
    }
    answered = change_while_acting(
        monkeypatch,
        engine,
        (sync_jobs, "queue_sync_job"),
        lambda: api.post(f"/v1/orgs/{org.org_id}/sync-jobs", json={"sourceId": source_id}, headers=org.trainer),
        changes[change],
    )

    assert answered == (202, {"residency": 200, "deletion": 202}[change], False)


def test_a_source_deleted_while_one_of_its_conflicts_is_decided_waits_for_the_decision(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    source_id = api.post(f"/v1/orgs/{org.org_id}/sync-sources", json=SOURCE, headers=org.admin).json()["sourceId"]
    with Session(engine) as session, session.begin():
        conflict = SyncConflict(
            org_id=org.org_id,
            source_id=source_id,
            table_name="readings",
            record_key="1",
            policy="manual",
            status="open",
            outcome="held",
            local_version={"id": 1, "value": 1.0},
            central_version={"id": 1, "value": 2.0},
        )
        session.add(conflict)
        session.flush()
        conflict_id = conflict.id

    answered = change_while_acting(
        monkeypatch,
        engine,
        (sync_jobs, "queue_sync_job"),
        lambda: api.post(f"/v1/orgs/{org.org_id}/conflicts/{conflict_id}", json={"keep": "central"}, headers=org.admin),
        lambda: api.delete(f"/v1/orgs/{org.org_id}/sync-sources/{source_id}", headers=org.admin),
    )

    assert answered == (200, 202, False)
