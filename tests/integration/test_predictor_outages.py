"""What a client of the predictor sees while something it depends on is out: the database or the object store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import httpx2
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.predictor.app import create_app
from services.predictor.deployments import LOAD_RETRY_S
from shared.db.session import CONNECT_TIMEOUT_S, POOL_TIMEOUT_S
from shared.keys import new_key
from shared.layout import model_key
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys
from tests.integration.predictor_support import (
    becomes_ready,
    current_deployment,
    deploy,
    deploy_quietly,
    served_version,
    start_predictor,
)
from tests.support.models import ai4i_row, register_model, tiny_model
from tests.support.polling import eventually
from tests.support.proxy import FreezableLink
from tests.support.servers import silent_server
from tests.support.threaded_server import serving_in_thread


def history(api: TestClient, org: OrgKeys) -> list[tuple[str, str]]:
    rows = api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json()
    return [(row["version"], row["status"]) for row in rows]


def predict(predictor: TestClient, org: OrgKeys) -> httpx2.Response:
    return predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row()]}, headers=org.viewer)


@contextmanager
def store_hanging_on(settings: Settings, key: str) -> Iterator[Settings]:
    """Settings whose S3 server, reached through a link, never answers a request for `key` and answers the rest."""
    host, port = settings.s3_endpoint.rsplit(":", 1)
    link = FreezableLink((host, int(port)))
    link.trap(key.encode())
    try:
        yield settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{link.port}", "predictor_load_wait_s": 3.0})
    finally:
        link.close()  # which ends the read that hangs


def test_while_one_orgs_model_read_hangs_the_predictor_gets_ready_and_follows_the_other_orgs_deploys(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, org_id: str
) -> None:
    other = create_org_with_keys(api, "x" + org_id)
    hanging = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy_quietly(engine, org.org_id, hanging)
    first = register_model(engine, store, other.org_id, tiny_model(seed=2))
    deploy_quietly(engine, other.org_id, first)
    with store_hanging_on(settings, model_key(org.org_id, hanging)) as hangs, start_predictor(hangs) as predictor:
        assert becomes_ready(predictor)
        assert served_version(predictor, other) == first
        # Loaded already, so only the deploy event or a reconcile can bring the new version in.
        second = register_model(engine, store, other.org_id, tiny_model(seed=3))
        deploy(api, other, second)
        assert eventually(lambda: served_version(predictor, other) == second)

        waiting = predict(predictor, org)
    assert waiting.status_code == 503, waiting.text
    assert waiting.json()["error"] == f"the model of {org.org_id!r} is still loading, try again"
    assert waiting.headers["retry-after"] == str(LOAD_RETRY_S)


def test_readiness_while_the_deployed_models_load_is_a_503_in_kilns_error_format_and_the_protocols_200_after(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    hanging = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy_quietly(engine, org.org_id, hanging)
    with store_hanging_on(settings, model_key(org.org_id, hanging)) as hangs, start_predictor(hangs) as predictor:
        loading = predictor.get("/v2/health/ready")
        assert becomes_ready(predictor)
        ready = predictor.get("/v2/health/ready")

    assert loading.status_code == 503, loading.text
    assert loading.json() == {
        "ready": False,
        "error": "not ready: the deployed models are not loaded yet",
        "status": 503,
    }
    assert ready.json() == {"ready": True}


def test_requests_waiting_on_a_model_read_that_hangs_hold_no_thread_another_orgs_new_key_is_answered_meanwhile(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, org_id: str
) -> None:
    other = create_org_with_keys(api, "x" + org_id)
    hanging = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, hanging)
    deploy(api, other, register_model(engine, store, other.org_id, tiny_model(seed=2)))

    def ask(address: str, keys: OrgKeys) -> httpx.Response:
        url = f"http://{address}/v1/orgs/{keys.org_id}/predict"
        return httpx.post(url, json={"rows": [ai4i_row()]}, headers=keys.viewer, timeout=20)

    with store_hanging_on(settings, model_key(org.org_id, hanging)) as hangs:
        tuned = hangs.model_copy(update={"predictor_load_wait_s": 8.0})
        # More requests waiting on the hanging org than a worker process has threads (40).
        with serving_in_thread(create_app(tuned)) as predictor, ThreadPoolExecutor(max_workers=50) as pool:
            waiting = [pool.submit(ask, predictor, org) for _ in range(48)]
            time.sleep(1)  # for them to arrive
            # The other org's model is not loaded, nor its key checked, in this process: both are done now.
            answered = ask(predictor, other)
            still_waiting = sum(not request.done() for request in waiting)
            answers = [request.result() for request in waiting]

    assert answered.status_code == 200, answered.text
    assert still_waiting == 48
    assert {(answer.status_code, answer.json()["error"]) for answer in answers} == {
        (503, f"the model of {org.org_id!r} is still loading, try again")
    }


def test_a_deployment_that_served_answers_503_while_the_store_has_lost_its_file_and_serves_once_it_is_back(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, org_id: str
) -> None:
    other = create_org_with_keys(api, "x" + org_id)
    deploy_quietly(engine, other.org_id, register_model(engine, store, other.org_id, tiny_model(seed=2)))
    version = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, version)
    key = model_key(org.org_id, version)
    # Room for one org's model: a request for the other org unloads it.
    with start_predictor(settings, predictor_memory_mb=1.5) as predictor:
        assert eventually(lambda: served_version(predictor, org) == version)
        model_file = store.get_bytes(key)
        store.delete(key)
        assert served_version(predictor, other) is not None

        during = predict(predictor, org)
        assert during.status_code == 503, during.text
        assert during.headers["retry-after"] == str(LOAD_RETRY_S)
        assert f"no object at {key}" in during.json()["error"]
        assert predictor.get("/v2/health/ready").status_code == 200
        assert current_deployment(api, org)["status"] == "deployed"

        store.put_bytes(key, model_file)
        assert eventually(lambda: served_version(predictor, org) == version)
    assert history(api, org) == [(version, "deployed")]


def test_a_new_candidate_the_store_cannot_give_is_tried_again_not_refused(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    old = register_model(engine, store, org.org_id, tiny_model(seed=1))
    new = register_model(engine, store, org.org_id, tiny_model(seed=2))
    key = model_key(org.org_id, new)
    model_file = store.get_bytes(key)
    store.delete(key)
    deploy(api, org, old)
    with start_predictor(settings) as predictor:
        assert eventually(lambda: served_version(predictor, org) == old)
        deploy(api, org, new)
        time.sleep(1.5)  # the deploy event and a few reconciles have found no object
        assert served_version(predictor, org) == old
        assert current_deployment(api, org)["status"] == "deployed"

        store.put_bytes(key, model_file)
        assert eventually(lambda: served_version(predictor, org) == new)
    assert history(api, org) == [(new, "deployed"), (old, "deployed")]


def test_a_worker_started_after_a_served_versions_file_changed_answers_503_and_refuses_nothing(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    """Whether a deployment has loaded is known to every process, not only to those that loaded it."""
    version = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, version)
    with start_predictor(settings) as first:
        assert eventually(lambda: served_version(first, org) == version)
    store.put_bytes(model_key(org.org_id, version), tiny_model(seed=3))
    with start_predictor(settings) as restarted:
        assert becomes_ready(restarted)
        answer = predict(restarted, org)
    assert answer.status_code == 503 and "does not match the recorded" in answer.json()["error"]
    assert history(api, org) == [(version, "deployed")]


def test_a_database_that_never_answers_costs_a_bounded_wait_then_a_503_with_retry_after(
    settings: Settings, org_id: str
) -> None:
    unknown_key = {"Authorization": f"Bearer {new_key()}"}

    def ask(address: str, index: int) -> httpx.Response:
        """An unknown key (its lookup needs the database) or the admin for an org not loaded (so is its model)."""
        url = f"http://{address}/v1/orgs/{org_id}/predict"
        return httpx.post(url, json={"rows": [ai4i_row()]}, headers=unknown_key if index % 2 else ADMIN, timeout=120)

    with silent_server() as database:
        hung = settings.model_copy(update={"database_url": f"postgresql+psycopg2://kiln@{database}/kiln"})
        # More requests at once than the pool has connections: some wait for one, and that wait is bounded too.
        with serving_in_thread(create_app(hung)) as predictor, ThreadPoolExecutor(max_workers=20) as pool:
            started = time.monotonic()
            answers = list(pool.map(lambda index: ask(predictor, index), range(20)))
            waited = time.monotonic() - started

    assert [answer.status_code for answer in answers] == [503] * 20
    assert all(answer.headers["retry-after"] == "1" for answer in answers)
    assert {answer.json()["error"] for answer in answers} == {"the database is unavailable, try again"}
    assert waited < CONNECT_TIMEOUT_S + POOL_TIMEOUT_S + 5  # hung, it took 30 s: until the server hung up
