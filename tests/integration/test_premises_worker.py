"""An org's own trainer worker, a real process (`celery -A services.trainer.celery_app worker` with
KILN_WORKER_ORGS) on real Redis, doing the premises half of a version's erasure asked over HTTP: the held-out rows
kept in its folder removed and the removal audited; the same message delivered again removes nothing more, and the
worker carries on; an erasure queued before the org moved its data to the central store is still done there."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from deploy.local.processes import tail
from services.api.resources import Resources
from shared.db.models import OutboxMessage
from shared.layout import HOLDOUT_FILE, model_prefix
from shared.outbox import KIND_ERASE_TASK, relay
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import OrgKeys
from tests.integration.model_versions_support import audit_of, erase, key_id, model_of, premises_version, set_residency
from tests.support.workers import celery_worker


@pytest.fixture
def premises_worker(settings: Settings, org: OrgKeys, tmp_path: Path) -> Iterator[Path]:
    """The org's own worker, for it alone (as a hospital runs one); yields its log."""
    log = tmp_path / "premises-worker.log"
    with celery_worker("services.trainer.celery_app", settings, log, orgs=org.org_id):
        yield log


def confirmations(api: TestClient, org: OrgKeys, count: int, worker_log: Path) -> list[dict[str, Any]]:
    """The worker's `model.erased.premises` audit rows, oldest first, once there are `count` of them."""
    deadline = time.monotonic() + 30
    while len(entries := audit_of(api, org, "model.erased.premises")) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(entries) == count, f"{len(entries)} of {count} within 30 s\n{tail(worker_log)}"
    return sorted(entries, key=lambda entry: int(entry["id"]))


def send_again(api: TestClient, engine: Engine, org: OrgKeys) -> None:
    """Send the org's erasure message a second time, as the api's outbox sweep does after an api died between
    sending it and marking it sent: the worker is handed the same task twice."""
    with engine.begin() as connection:
        messages = connection.execute(
            select(OutboxMessage.id, OutboxMessage.payload).where(OutboxMessage.kind == KIND_ERASE_TASK)
        )
        [message_id] = [id_ for id_, payload in messages if payload["org_id"] == org.org_id]
        connection.execute(update(OutboxMessage).where(OutboxMessage.id == message_id).values(published_at=None))
    resources: Resources = api.app.state.resources  # type: ignore[attr-defined]
    assert relay(resources.sessions, resources.outbox_senders(), ids=[message_id]) == 1


def test_the_orgs_own_worker_removes_the_held_out_rows_on_its_premises_when_an_erasure_is_asked_over_http(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, premises_worker: Path
) -> None:
    version, premises = premises_version(api, org, engine, store, settings)
    prefix = model_prefix(org.org_id, version)

    erased = erase(api, org, version)
    [done] = confirmations(api, org, 1, premises_worker)

    assert erased.status_code == 202, erased.text
    assert (erased.json()["status"], erased.json()["premises"]) == ("erased", "queued")
    assert premises.list(prefix) == [] and not (settings.data_dir / "premises" / prefix).exists()
    assert (done["actor"], done["target"], done["detail"]) == (
        key_id(api, org, "admin"),
        version,
        {"removed": [HOLDOUT_FILE]},
    )
    assert model_of(api, org, version)["status"] == "erased"
    assert api.get(f"/v1/orgs/{org.org_id}/models/{version}/artifacts", headers=org.trainer).status_code == 410


def test_an_erasure_delivered_twice_removes_the_rows_once_and_the_worker_carries_on(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, premises_worker: Path
) -> None:
    version, premises = premises_version(api, org, engine, store, settings)
    assert erase(api, org, version).status_code == 202
    confirmations(api, org, 1, premises_worker)

    send_again(api, engine, org)
    asked_again = erase(api, org, version)  # the next message on the queue: handled only by a worker still there
    first, duplicate, again = confirmations(api, org, 3, premises_worker)

    assert first["detail"] == {"removed": [HOLDOUT_FILE]}
    assert duplicate["detail"] == again["detail"] == {"removed": []}
    assert {entry["actor"] for entry in (first, duplicate, again)} == {key_id(api, org, "admin")}
    assert (asked_again.status_code, asked_again.json()["removed"]) == (202, [])
    assert premises.list(model_prefix(org.org_id, version)) == []
    assert len(audit_of(api, org, "model.erased")) == 1
    assert model_of(api, org, version)["status"] == "erased"


def test_an_erasure_queued_before_the_org_moved_to_central_is_done_by_its_own_worker_when_it_starts(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, tmp_path: Path
) -> None:
    """The org's own worker was down when the erasure was asked for, and the org keeps its data centrally by the
    time it is back: the message waited for it, and it removes the rows the run left on its premises."""
    version, premises = premises_version(api, org, engine, store, settings)
    assert erase(api, org, version).status_code == 202
    set_residency(api, org, "central")
    log = tmp_path / "premises-worker.log"

    with celery_worker("services.trainer.celery_app", settings, log, orgs=org.org_id):
        [done] = confirmations(api, org, 1, log)

    assert done["detail"] == {"removed": [HOLDOUT_FILE]}
    assert premises.list(model_prefix(org.org_id, version)) == []
