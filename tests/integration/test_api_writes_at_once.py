"""Requests that write the same org's settings at the same moment: each answers as it would alone, and no change
one of them made is lost to another's. On PostgreSQL and on SQLite."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from services.api.routers import sync_sources
from services.sync.resync import drop_request, resync_asked
from shared.audit import record_change
from shared.db.models import SyncKey, SyncResync
from shared.sync_keys import DRAINED
from tests.integration.conftest import ADMIN, TRAINING_CSV, OrgKeys, config, create_org_with_keys, upload

AT_ONCE = 6
# Races that end well by luck now and then: each is run this many times.
ROUNDS = 5
# More requests than the api's pool has connections (5 + 10).
MORE_THAN_THE_POOL = 20


def at_once(send: Callable[[int], httpx2.Response], count: int = AT_ONCE) -> list[httpx2.Response]:
    start = threading.Barrier(count)

    def when_all_are_ready(attempt: int) -> httpx2.Response:
        start.wait()
        return send(attempt)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(when_all_are_ready, range(count)))


def statuses(responses: list[httpx2.Response]) -> list[int]:
    return [response.status_code for response in responses]


def deletes_at_once(api: TestClient, url: str, org: OrgKeys) -> list[httpx2.Response]:
    return at_once(lambda _attempt: api.delete(url, headers=org.admin))


def audited(api: TestClient, org: OrgKeys, action: str) -> list[str]:
    """The targets of the org's audit rows of `action`."""
    trail = api.get(f"/v1/orgs/{org.org_id}/audit?limit=1000", headers=org.admin).json()
    return [entry["target"] for entry in trail if entry["action"] == action]


def created_source(api: TestClient, org: OrgKeys) -> str:
    body = {"url": "postgresql://plant@db.example.org/records", "tables": [{"name": "readings", "primaryKey": "id"}]}
    created = api.post(f"/v1/orgs/{org.org_id}/sync-sources", json=body, headers=org.admin)
    assert created.status_code == 201, created.text
    return f"/v1/orgs/{org.org_id}/sync-sources/{created.json()['sourceId']}"


def test_config_patches_sent_at_once_each_keep_their_change(backend_api: TestClient, org_id: str) -> None:
    create_org_with_keys(backend_api, org_id)
    patches: list[dict[str, Any]] = [
        {"gates": {"minRecall": 0.55}},
        {"training": {"timeoutS": 901}},
        {"submissionsPerMinute": 7},
        {"gates": {"minPrecision": 0.6}},
        {"training": {"cpuS": 1801}},
        {"maxConcurrentTrainings": 3},
    ]
    answers = at_once(
        lambda attempt: backend_api.patch(f"/v1/orgs/{org_id}", json={"config": patches[attempt]}, headers=ADMIN)
    )
    assert statuses(answers) == [200] * AT_ONCE, [answer.text for answer in answers]
    stored = backend_api.get(f"/v1/orgs/{org_id}", headers=ADMIN).json()["config"]
    assert stored["gates"]["minRecall"] == 0.55 and stored["gates"]["minPrecision"] == 0.6
    assert stored["training"]["timeoutS"] == 901 and stored["training"]["cpuS"] == 1801
    assert stored["submissionsPerMinute"] == 7 and stored["maxConcurrentTrainings"] == 3


def test_an_orgs_first_datasource_and_schedule_set_at_once_are_each_set(backend_api: TestClient, org_id: str) -> None:
    org = create_org_with_keys(backend_api, org_id)
    uploaded = upload(backend_api, org, TRAINING_CSV, timestampColumn="timestamp")
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["datasetId"]
    tables = [f"readings_{attempt}" for attempt in range(AT_ONCE)]
    answers = at_once(
        lambda attempt: backend_api.put(
            f"/v1/orgs/{org_id}/datasource",
            json={"url": "postgresql://plant@db.example.org/records", "table": tables[attempt]},
            headers=org.admin,
        )
    )
    assert statuses(answers) == [200] * AT_ONCE, [answer.text for answer in answers]
    stored = backend_api.get(f"/v1/orgs/{org_id}/datasource", headers=org.admin).json()
    assert stored["table"] in tables
    patterns = [f"{attempt} 3 * * *" for attempt in range(AT_ONCE)]
    answers = at_once(
        lambda attempt: backend_api.put(
            f"/v1/orgs/{org_id}/schedule",
            json={"pattern": patterns[attempt], "trainingConfig": config(dataset_id)},
            headers=org.admin,
        )
    )
    assert statuses(answers) == [200] * AT_ONCE, [answer.text for answer in answers]
    assert backend_api.get(f"/v1/orgs/{org_id}/schedule", headers=org.admin).json()["pattern"] in patterns


def test_a_sources_first_schedule_and_resyncs_asked_at_once_are_each_taken(
    backend_api: TestClient, org_id: str
) -> None:
    org = create_org_with_keys(backend_api, org_id)
    body = {"url": "postgresql://plant@db.example.org/records", "tables": [{"name": "readings", "primaryKey": "id"}]}
    created = backend_api.post(f"/v1/orgs/{org_id}/sync-sources", json=body, headers=org.admin)
    assert created.status_code == 201, created.text
    url = f"/v1/orgs/{org_id}/sync-sources/{created.json()['sourceId']}"
    patterns = [f"{attempt} 4 * * *" for attempt in range(AT_ONCE)]
    answers = at_once(
        lambda attempt: backend_api.put(f"{url}/schedule", json={"pattern": patterns[attempt]}, headers=org.admin)
    )
    assert statuses(answers) == [200] * AT_ONCE, [answer.text for answer in answers]
    assert backend_api.get(f"{url}/schedule", headers=org.admin).json()["pattern"] in patterns
    answers = at_once(lambda _attempt: backend_api.post(f"{url}/resync", headers=org.admin))
    assert statuses(answers) == [202] * AT_ONCE, [answer.text for answer in answers]
    # No worker took the first job: it still waits, and carries out every resync asked meanwhile.
    assert len({answer.json()["jobId"] for answer in answers}) == 1


def test_url_changes_sent_at_once_each_answer_without_a_503(backend_api: TestClient, org_id: str) -> None:
    """More at once than the pool has connections: none may wait for a second connection while it holds one."""
    org = create_org_with_keys(backend_api, org_id)
    url = created_source(backend_api, org)
    urls = [f"postgresql://plant@db{attempt}.example.org/records" for attempt in range(MORE_THAN_THE_POOL)]
    answers = at_once(
        lambda attempt: backend_api.patch(url, json={"url": urls[attempt]}, headers=org.admin), MORE_THAN_THE_POOL
    )
    assert statuses(answers) == [200] * MORE_THAN_THE_POOL, [a.text for a in answers if a.status_code != 200]
    assert backend_api.get(url, headers=org.admin).json()["url"] in urls
    assert len(audited(backend_api, org, "sync.source.url.changed")) == MORE_THAN_THE_POOL


def test_a_key_revoked_by_requests_at_once_is_revoked_and_audited_once(backend_api: TestClient, org_id: str) -> None:
    """As a second revocation after the first: 204, and no second `key.revoked`."""
    org = create_org_with_keys(backend_api, org_id)
    keys_url = f"/v1/orgs/{org_id}/keys"
    victims = [
        backend_api.post(keys_url, json={"role": "viewer"}, headers=org.admin).json()["keyId"] for _ in range(ROUNDS)
    ]
    for victim in victims:
        answers = deletes_at_once(backend_api, f"{keys_url}/{victim}", org)
        assert statuses(answers) == [204] * AT_ONCE, [answer.text for answer in answers]
    assert sorted(audited(backend_api, org, "key.revoked")) == sorted(victims)


def test_a_schedule_deleted_by_requests_at_once_is_deleted_and_audited_once(
    backend_api: TestClient, org_id: str
) -> None:
    """One 204; the others answer 404, as a second deletion after the first."""
    org = create_org_with_keys(backend_api, org_id)
    uploaded = upload(backend_api, org, TRAINING_CSV, timestampColumn="timestamp")
    assert uploaded.status_code == 201, uploaded.text
    url = f"/v1/orgs/{org_id}/schedule"
    for attempt in range(ROUNDS):
        body = {"pattern": f"{attempt} 3 * * *", "trainingConfig": config(uploaded.json()["datasetId"])}
        assert backend_api.put(url, json=body, headers=org.admin).status_code == 200
        answers = deletes_at_once(backend_api, url, org)
        assert sorted(statuses(answers)) == [204] + [404] * (AT_ONCE - 1), [answer.text for answer in answers]
    assert len(audited(backend_api, org, "schedule.deleted")) == ROUNDS


def test_a_sources_schedule_deleted_by_requests_at_once_is_deleted_and_audited_once(
    backend_api: TestClient, org_id: str
) -> None:
    org = create_org_with_keys(backend_api, org_id)
    url = f"{created_source(backend_api, org)}/schedule"
    for attempt in range(ROUNDS):
        assert backend_api.put(url, json={"pattern": f"{attempt} 4 * * *"}, headers=org.admin).status_code == 200
        answers = deletes_at_once(backend_api, url, org)
        assert sorted(statuses(answers)) == [204] + [404] * (AT_ONCE - 1), [answer.text for answer in answers]
    assert len(audited(backend_api, org, "sync.schedule.deleted")) == ROUNDS


def test_a_drained_sync_key_destroyed_by_requests_at_once_is_destroyed_and_audited_once(
    backend_api: TestClient, backend_engine: Engine, org_id: str
) -> None:
    """One 204; the others answer 404 ("destroyed already"), as a second destruction after the first."""
    org = create_org_with_keys(backend_api, org_id)
    keys = [f"ek{org_id}{attempt}"[:40] for attempt in range(ROUNDS)]
    with Session(backend_engine) as session:  # drained, as a rotation leaves the keys before it
        session.add_all(SyncKey(id=key, org_id=org_id, status=DRAINED, wrapped="sealed") for key in keys)
        session.commit()
    for key in keys:
        answers = deletes_at_once(backend_api, f"/v1/orgs/{org_id}/sync-keys/{key}", org)
        assert sorted(statuses(answers)) == [204] + [404] * (AT_ONCE - 1), [answer.text for answer in answers]
    assert sorted(audited(backend_api, org, "sync.key.destroyed")) == sorted(keys)


def test_a_resync_asked_while_a_worker_applies_the_previous_one_is_taken(
    api: TestClient, org_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL: a sync worker applying the pending resync deletes its row without the org's lock. Here it
    does so in the request's transaction, once the request has renewed the row, and is let on until it either ends or
    waits for the request's commit."""
    org = create_org_with_keys(api, org_id)
    source_url = created_source(api, org)
    assert api.post(f"{source_url}/resync", headers=org.admin).status_code == 202  # pending: no worker applied it
    with Session(engine, expire_on_commit=False) as session:
        asked = select(SyncResync).where(SyncResync.source_id == source_url.rsplit("/", 1)[1])
        pending = session.scalars(asked).one()  # as the worker reads it
    worker = threading.Thread(target=applied_by_a_worker, args=(engine, pending))

    def worker_applies_it_meanwhile(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("action") == "sync.resync.requested":
            worker.start()
            while worker.is_alive() and not waiting_for_a_lock(engine):
                time.sleep(0.01)
        record_change(*args, **kwargs)

    monkeypatch.setattr(sync_sources, "record_change", worker_applies_it_meanwhile)
    again = api.post(f"{source_url}/resync", headers=org.admin)
    worker.join()
    assert again.status_code == 202, again.text
    assert resync_asked(engine, pending.source_id, "readings")  # for the job the request queued


def applied_by_a_worker(engine: Engine, asked: SyncResync) -> None:
    with Session(engine) as session, session.begin():
        drop_request(session, asked)


def waiting_for_a_lock(engine: Engine) -> bool:
    with engine.connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM sync_resyncs%'"
            )
        )
        return bool(waiting.scalar())
