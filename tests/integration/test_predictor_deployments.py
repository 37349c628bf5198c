"""What an operator relies on when deploying: broken versions are refused while the old one keeps serving, many
orgs share a process within a memory budget, and orgs that ask for it get a record of every answer."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from services.predictor import deployments, models
from services.predictor.app import create_app
from services.predictor.records import PredictionRecorder
from shared.db.models import Prediction
from shared.db.session import SessionFactory, make_session_factory
from shared.layout import model_key
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys
from tests.integration.predictor_support import (
    becomes_ready,
    current_deployment,
    deploy,
    deploy_quietly,
    records_of,
    served_version,
    start_predictor,
)
from tests.support.models import FEATURES, ai4i_row, model_reading_a_file, nan_model, register_model, tiny_model
from tests.support.polling import eventually
from tests.support.threaded_server import serving_in_thread


def tampered(engine: Engine, store: ObjectStore, org_id: str) -> str:
    version = register_model(engine, store, org_id, tiny_model(seed=2))
    store.put_bytes(model_key(org_id, version), tiny_model(seed=3))
    return version


BROKEN: dict[str, Callable[[Engine, ObjectStore, str], str]] = {
    "corrupt ONNX": lambda engine, store, org_id: register_model(engine, store, org_id, b"\x08\x07 not a model"),
    "wrong input signature": lambda engine, store, org_id: register_model(
        engine, store, org_id, tiny_model(n_features=5)
    ),
    "sha256 mismatch": tampered,
    "NaN on warm-up": lambda engine, store, org_id: register_model(engine, store, org_id, nan_model()),
    "external data": lambda engine, store, org_id: register_model(engine, store, org_id, model_reading_a_file()),
}
REASONS = {
    "corrupt ONNX": "InvalidProtobuf|INVALID_PROTOBUF|Failed to load",
    "wrong input signature": "expected one input",
    "sha256 mismatch": "does not match the recorded",
    "NaN on warm-up": "warm-up gave",
    "external data": r"keeps tensor data in files outside it \('secret_key'\), which Kiln does not load",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_candidate_is_refused_the_old_version_serves_on_and_the_deployment_reads_failed(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, kind: str
) -> None:
    good = register_model(engine, store, org.org_id, tiny_model(seed=1))
    broken = BROKEN[kind](engine, store, org.org_id)
    with start_predictor(settings) as predictor:
        api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": good}, headers=org.admin)
        assert eventually(lambda: served_version(predictor, org) == good)
        assert becomes_ready(predictor)
        assert (
            api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": broken}, headers=org.admin).status_code
            == 201
        )
        assert eventually(lambda: current_deployment(api, org)["status"] == "failed")
        current = current_deployment(api, org)
        assert current["version"] == broken
        assert re.search(REASONS[kind], current["error"]), current["error"]
        for _ in range(20):
            assert served_version(predictor, org) == good
            assert predictor.get("/v2/health/ready").status_code == 200
        history = api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json()
        assert [(row["version"], row["status"]) for row in history] == [(broken, "failed"), (good, "deployed")]


def refuse(api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, kind: str) -> str:
    """Deploy a broken candidate and wait until a predictor has refused it."""
    broken = BROKEN[kind](engine, store, org.org_id)
    deploy(api, org, broken)
    assert eventually(lambda: current_deployment(api, org)["status"] == "failed")
    return broken


def test_while_deploys_are_refused_every_worker_serves_the_last_good_one_at_start_and_after_eviction(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, org_id: str
) -> None:
    other = create_org_with_keys(api, "x" + org_id)
    deploy_quietly(engine, other.org_id, register_model(engine, store, other.org_id, tiny_model(seed=2)))
    good = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, good)
    # Room for one org's model: a request for the other org unloads it.
    with start_predictor(settings, predictor_memory_mb=1.5) as predictor:
        assert eventually(lambda: served_version(predictor, org) == good)
        broken = [refuse(api, org, engine, store, kind) for kind in ("corrupt ONNX", "NaN on warm-up")]
        assert served_version(predictor, other) is not None
        assert served_version(predictor, org) == good
        with start_predictor(settings) as restarted:  # a worker that starts after the refusals
            assert becomes_ready(restarted)
            assert served_version(restarted, org) == good
    history = api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json()
    assert [(row["version"], row["status"]) for row in history] == [
        (broken[1], "failed"),
        (broken[0], "failed"),
        (good, "deployed"),
    ]


def risk_level(predictor: TestClient, org: OrgKeys) -> str | None:
    response = predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row()]}, headers=org.viewer)
    return str(response.json()["predictions"][0]["riskLevel"]) if response.status_code == 200 else None


def test_while_a_deploy_is_refused_changes_to_the_orgs_prediction_settings_apply_at_once(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    recording = {"predictions": {"record": True, "riskBands": [0.98, 0.99]}}
    assert api.patch(f"/v1/orgs/{org.org_id}", json={"config": recording}, headers=ADMIN).status_code == 200
    deploy(api, org, register_model(engine, store, org.org_id, tiny_model(seed=1)))
    # No reconcile during the test: the settings must arrive with the org's change event.
    with start_predictor(settings, predictor_reconcile_s=600) as predictor:
        assert eventually(lambda: risk_level(predictor, org) == "low")
        refuse(api, org, engine, store, "corrupt ONNX")
        private = {"predictions": {"record": False, "riskBands": [0.000001, 0.000002]}}
        assert api.patch(f"/v1/orgs/{org.org_id}", json={"config": private}, headers=ADMIN).status_code == 200
        # Both settings travel together: once the new bands answer, records have stopped.
        assert eventually(lambda: risk_level(predictor, org) == "high")
        time.sleep(0.5)  # the records of answers before the change are written
        kept = len(records_of(api, org))
        for _ in range(5):
            assert risk_level(predictor, org) == "high"
        time.sleep(0.5)  # two record flushes
    assert kept > 0 and len(records_of(api, org)) == kept


def test_fifty_orgs_share_one_process_within_its_memory_budget(
    api: TestClient, engine: Engine, store: ObjectStore, settings: Settings, org_id: str
) -> None:
    orgs = [create_org_with_keys(api, f"{org_id}-{i:02d}") for i in range(50)]
    for i, org in enumerate(orgs):
        deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, tiny_model(seed=i % 4)))
    with start_predictor(settings, predictor_memory_mb=10) as predictor:
        assert becomes_ready(predictor)
        state = predictor.app.state.predictor  # type: ignore[attr-defined]
        for _ in range(2):
            for org in orgs:
                assert served_version(predictor, org) is not None
                assert len(state.cache.versions()) <= 10
        assert state.cache.used_mb() <= 10


def test_more_orgs_at_once_than_the_budget_holds_are_all_answered(
    api: TestClient, engine: Engine, store: ObjectStore, settings: Settings, org_id: str
) -> None:
    """An org's model loaded for a request serves that request, even if other orgs' loads evict it at once."""
    orgs = [create_org_with_keys(api, f"{org_id}-{i:02d}") for i in range(20)]
    for i, org in enumerate(orgs):
        deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, tiny_model(seed=i % 4)))

    def answers(address: str, first: int) -> list[int]:
        """One client's 15 requests, each to the next org."""
        turn = [orgs[(first + i) % len(orgs)] for i in range(15)]
        with httpx.Client(base_url=f"http://{address}", timeout=60) as client:
            body = {"rows": [ai4i_row()]}
            return [
                client.post(f"/v1/orgs/{org.org_id}/predict", json=body, headers=org.viewer).status_code for org in turn
            ]

    tuned = settings.model_copy(update={"predictor_memory_mb": 5})
    with serving_in_thread(create_app(tuned)) as address, ThreadPoolExecutor(max_workers=20) as pool:
        statuses = [status for batch in pool.map(lambda first: answers(address, first), range(20)) for status in batch]

    assert len(statuses) == 300
    assert [status for status in statuses if status != 200] == []


def test_an_org_that_keeps_records_can_read_every_answer(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    config = {"predictions": {"record": True, "riskBands": [0.01, 0.02]}}
    assert api.patch(f"/v1/orgs/{org.org_id}", json={"config": config}, headers=ADMIN).status_code == 200
    version = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy_quietly(engine, org.org_id, version)
    rows = [ai4i_row(i) for i in range(5)]
    with start_predictor(settings) as predictor:
        assert eventually(lambda: served_version(predictor, org) == version)
        answer = predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": rows}, headers=org.viewer).json()
        assert eventually(lambda: len(records_of(api, org)) >= 6)
    records = records_of(api, org)
    assert len(records) == 6 and {record["version"] for record in records} == {version}
    newest = records[:5][::-1]
    assert [r["score"] for r in newest] == pytest.approx([p["score"] for p in answer["predictions"]])
    assert [r["riskLevel"] for r in newest] == [p["riskLevel"] for p in answer["predictions"]]
    expected = [
        "low" if p["score"] < 0.01 else "medium" if p["score"] < 0.02 else "high" for p in answer["predictions"]
    ]
    assert [p["riskLevel"] for p in answer["predictions"]] == expected
    assert all(record["latencyMs"] > 0 for record in records)
    page = api.get(f"/v1/orgs/{org.org_id}/predictions?limit=2&before={records[1]['id']}", headers=org.viewer).json()
    assert [record["id"] for record in page] == [records[2]["id"], records[3]["id"]]


def test_a_record_the_database_refuses_is_dropped_and_counted_and_holds_back_no_other(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    """A class from the data longer than the label column: retried as it was, its batch held back every record
    after it, for good."""
    recorder = PredictionRecorder(make_session_factory(engine), flush_s=60)  # flushed here, never started
    answer = {"score": 0.9, "label": "failure", "riskLevel": "high"}
    for label in ("failure", "x" * 300, "ok"):
        recorder.add(org_id=org.org_id, version="v1", answers=[{**answer, "label": label}] * 2, latency_ms=1.0)

    assert (recorder.flush(), recorder.dropped) == (4, 2)
    assert sorted(record["label"] for record in records_of(api, org)) == ["failure", "failure", "ok", "ok"]
    assert recorder.flush() == 0


def test_records_waiting_for_the_database_are_capped_by_rows_not_requests(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    """Capped by requests, 50,000 of 1000 rows waited through an outage: ~11 GB before the first was dropped."""
    recorder = PredictionRecorder(make_session_factory(engine), flush_s=60, max_waiting_rows=1000)
    answer = {"score": 0.9, "label": "failure", "riskLevel": "high"}
    for _ in range(3):
        recorder.add(org_id=org.org_id, version="v1", answers=[answer] * 400, latency_ms=1.0)

    assert (recorder.flush(), recorder.dropped) == (800, 400)
    recorder.add(org_id=org.org_id, version="v1", answers=[answer] * 1000, latency_ms=1.0)
    assert (recorder.flush(), recorder.dropped) == (1000, 400)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).where(Prediction.org_id == org.org_id)) == 1800


def test_an_org_that_keeps_no_records_leaves_none(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, tiny_model(seed=1)))
    with start_predictor(settings) as predictor:
        assert eventually(lambda: served_version(predictor, org) is not None)
        time.sleep(0.5)
    assert records_of(api, org) == []


def test_a_change_of_the_orgs_record_config_reaches_the_predictor_before_its_reconcile(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    version = register_model(engine, store, org.org_id, tiny_model(seed=1))
    # Through the api, whose event goes out now: none is left in the outbox for its sweep to send later.
    assert api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin).is_success
    with start_predictor(settings, predictor_reconcile_s=600) as predictor:
        assert eventually(lambda: served_version(predictor, org) is not None)
        config = {"predictions": {"record": True}}
        assert api.patch(f"/v1/orgs/{org.org_id}", json={"config": config}, headers=ADMIN).status_code == 200

        def recorded() -> bool:
            predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row(0)]}, headers=org.viewer)
            return bool(records_of(api, org))

        assert eventually(recorded)


def undeploy(api: TestClient, org: OrgKeys) -> None:
    response = api.delete(f"/v1/orgs/{org.org_id}/deployment", headers=org.admin)
    assert response.status_code == 204, response.text


def refusals(predictor: TestClient, org: OrgKeys) -> dict[str, tuple[int, str]]:
    """What V1 predict, V2 infer and the V2 model endpoints answer the org: status and error."""
    tensor = {"name": "input", "shape": [1, len(FEATURES)], "datatype": "FP32", "data": [[1.0] * len(FEATURES)]}
    answers = {
        "predict": predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row()]}, headers=org.viewer),
        "infer": predictor.post(f"/v2/models/{org.org_id}/infer", json={"inputs": [tensor]}, headers=org.viewer),
        "ready": predictor.get(f"/v2/models/{org.org_id}/ready", headers=org.viewer),
        "metadata": predictor.get(f"/v2/models/{org.org_id}", headers=org.viewer),
    }
    return {name: (answer.status_code, answer.json().get("error", "")) for name, answer in answers.items()}


def undeployed(predictor: TestClient, org: OrgKeys) -> bool:
    answers = refusals(predictor, org)
    return all(status == 404 and "was undeployed" in error for status, error in answers.values())


def comes_to_serve(replica: TestClient, org: OrgKeys, version: str) -> bool:
    return bool(eventually(lambda: served_version(replica, org) == version))


def comes_to_stop(replica: TestClient, org: OrgKeys) -> bool:
    return bool(eventually(lambda: undeployed(replica, org), seconds=5))


def test_an_undeploy_stops_serving_on_a_replica_that_got_the_event_and_on_one_that_missed_it(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    version = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, version)
    # One replica hears events and never reconciles during the test; the other hears none (another channel) and
    # reconciles every 0.5 s, as a replica that was disconnected when the event went out.
    with (
        start_predictor(settings, predictor_reconcile_s=600) as listening,
        start_predictor(settings, deploy_channel=settings.deploy_channel + ":missed") as deaf,
    ):
        for replica in (listening, deaf):
            assert comes_to_serve(replica, org, version)
            assert becomes_ready(replica)

        undeploy(api, org)

        assert comes_to_stop(listening, org), refusals(listening, org)
        assert comes_to_stop(deaf, org), refusals(deaf, org)
        for replica in (listening, deaf):
            assert replica.app.state.predictor.cache.peek(org.org_id) is None  # type: ignore[attr-defined]
            assert replica.get("/v2/health/ready").status_code == 200
        time.sleep(1)  # two more reconciles of the deaf replica: nothing loads the org's last version again
        assert undeployed(listening, org) and undeployed(deaf, org)


def test_an_undeployed_orgs_last_version_is_not_loaded_again_by_a_request_or_a_worker_started_since(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, org_id: str
) -> None:
    other = create_org_with_keys(api, "x" + org_id)
    deploy(api, other, register_model(engine, store, other.org_id, tiny_model(seed=2)))
    version = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, version)
    # Room for one org's model, no events and no reconcile: the org's next request, after the other org's unloaded
    # its model, loads it from its deployment row, which is all the replica learns of the undeploy.
    quiet = {"predictor_memory_mb": 1.5, "predictor_reconcile_s": 600, "deploy_channel": "kiln-test:nothing"}
    with start_predictor(settings, **quiet) as predictor:
        assert eventually(lambda: served_version(predictor, org) == version)
        assert served_version(predictor, other) is not None
        assert predictor.app.state.predictor.cache.peek(org.org_id) is None  # type: ignore[attr-defined]

        undeploy(api, org)

        assert undeployed(predictor, org), refusals(predictor, org)
        assert served_version(predictor, other) is not None
    with start_predictor(settings) as started:  # a worker that starts after the undeploy
        assert becomes_ready(started)
        assert undeployed(started, org), refusals(started, org)
        assert served_version(started, other) is not None


def test_deploying_or_rolling_back_after_an_undeploy_serves_again_on_every_replica(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    first = register_model(engine, store, org.org_id, tiny_model(seed=1))
    second = register_model(engine, store, org.org_id, tiny_model(seed=2))
    deploy(api, org, first)
    with (
        start_predictor(settings, predictor_reconcile_s=600) as listening,
        start_predictor(settings, deploy_channel=settings.deploy_channel + ":missed") as deaf,
    ):
        replicas = (listening, deaf)
        for replica in replicas:
            assert comes_to_serve(replica, org, first)
        undeploy(api, org)
        assert all(comes_to_stop(replica, org) for replica in replicas)

        deploy(api, org, first)  # the very version undeployed
        for replica in replicas:
            assert comes_to_serve(replica, org, first)

        deploy(api, org, second)
        for replica in replicas:  # it served: an undeploy before any predictor loads a deploy names the one before
            assert comes_to_serve(replica, org, second)
        undeploy(api, org)
        assert all(comes_to_stop(replica, org) for replica in replicas)
        back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
        assert back.status_code == 200 and back.json()["version"] == second
        for replica in replicas:
            assert comes_to_serve(replica, org, second)
            answer = replica.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row()]}, headers=org.viewer)
            assert int(answer.headers["x-deployment-id"]) == back.json()["deploymentId"]


def test_a_broken_deploy_after_an_undeploy_brings_back_nothing_from_before_it(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    """The org's last good deployment is the undeploy: a refused deploy does not revive the version it stopped."""
    good = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, good)
    with start_predictor(settings) as predictor:
        assert eventually(lambda: served_version(predictor, org) == good)
        assert becomes_ready(predictor)
        undeploy(api, org)
        assert eventually(lambda: undeployed(predictor, org))
        refuse(api, org, engine, store, "corrupt ONNX")
        time.sleep(1)  # two reconciles
        assert undeployed(predictor, org), refusals(predictor, org)
        assert predictor.get("/v2/health/ready").status_code == 200


def test_an_undeploy_before_any_predictor_tried_a_broken_deploy_names_and_rolls_back_to_the_version_that_served(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    """A broken version is deployed and undeployed while no predictor runs (or before any has reacted): it never
    served, is never refused, and `rollback {}` must not go to it, or the org would end up serving nothing."""
    good = register_model(engine, store, org.org_id, tiny_model(seed=1))
    broken = BROKEN["corrupt ONNX"](engine, store, org.org_id)
    deploy(api, org, good)
    with start_predictor(settings) as predictor:
        assert eventually(lambda: served_version(predictor, org) == good)
    deploy(api, org, broken)
    undeploy(api, org)

    history = api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json()
    assert [(row["action"], row["version"], row["previousVersion"], row["status"]) for row in history] == [
        ("undeploy", None, good, "undeployed"),
        ("deploy", broken, good, "superseded"),
        ("deploy", good, None, "deployed"),
    ]
    assert current_deployment(api, org)["rollbackAvailable"] is True
    back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert back.status_code == 200 and back.json()["version"] == good
    with start_predictor(settings) as predictor:
        assert eventually(lambda: served_version(predictor, org) == good)
        time.sleep(1)  # two reconciles: the version rolled back to is not refused
        assert served_version(predictor, org) == good
    current = current_deployment(api, org)
    assert (current["status"], current["servingVersion"]) == ("deployed", good)


def serving_deployment(predictor: TestClient, org: OrgKeys) -> int | None:
    response = predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row()]}, headers=org.viewer)
    return int(response.headers["x-deployment-id"]) if response.status_code == 200 else None


def test_a_rollback_to_the_version_still_loaded_is_recorded_as_loaded_so_no_worker_refuses_it_later(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    """The predictor that refused the broken deploy still holds the good version: the rollback serves at once, with
    no load, and must be known to have served like any deployment that loaded."""
    good = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, good)
    with start_predictor(settings) as predictor:
        assert eventually(lambda: served_version(predictor, org) == good)
        broken = refuse(api, org, engine, store, "corrupt ONNX")
        back = api.post(f"/v1/orgs/{org.org_id}/rollback", json={"version": good}, headers=org.admin)
        assert back.status_code == 200, back.text
        rollback_id = back.json()["deploymentId"]
        assert eventually(lambda: serving_deployment(predictor, org) == rollback_id)
    store.put_bytes(model_key(org.org_id, good), tiny_model(seed=3))  # its file changes since (a bad restore, say)
    with start_predictor(settings) as restarted:  # a worker that must load it again, from a file no longer its own
        assert becomes_ready(restarted)
        answer = restarted.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row()]}, headers=org.viewer)
    assert answer.status_code == 503 and "does not match the recorded" in answer.json()["error"]
    undeploy(api, org)
    history = api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json()
    assert [(row["action"], row["version"], row["previousVersion"], row["status"]) for row in history] == [
        ("undeploy", None, good, "undeployed"),
        ("rollback", good, broken, "deployed"),
        ("deploy", broken, good, "failed"),
        ("deploy", good, None, "deployed"),
    ]


def test_a_reconcile_read_before_a_deploy_never_brings_the_older_deployment_back_after_the_newer_was_evicted(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    settings: Settings,
    org_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within one process versions only go forward, whatever a reconcile read before the deploy and whatever the
    memory budget unloaded meanwhile."""
    leaving, *others = [create_org_with_keys(api, prefix + org_id) for prefix in ("b", "c", "d")]
    deploy_quietly(engine, leaving.org_id, register_model(engine, store, leaving.org_id, tiny_model(seed=3)))
    deploy(api, org, register_model(engine, store, org.org_id, tiny_model(seed=1)))
    second = register_model(engine, store, org.org_id, tiny_model(seed=2))
    # Room for two orgs' models, the two deployed last (whatever earlier tests left deployed); reconciles only when
    # the test runs one.
    with start_predictor(settings, predictor_memory_mb=2.5, predictor_reconcile_s=600) as predictor:
        state = predictor.app.state.predictor  # type: ignore[attr-defined]
        assert becomes_ready(predictor)
        first_id = serving_deployment(predictor, org)
        undeploy(api, leaving)  # room for one more model when the reconcile starts, so that it loads the org
        assert eventually(lambda: undeployed(predictor, leaving))
        for seed, other in enumerate(others, start=4):
            deploy_quietly(engine, other.org_id, register_model(engine, store, other.org_id, tiny_model(seed=seed)))
        read, go_on = threading.Event(), threading.Event()
        read_deployments = deployments.read_deployments

        def read_then_wait(sessions: SessionFactory, org_id: str | None = None) -> list[Any]:
            """A reconcile's read of every org returns, and its follows start, only once the test says so."""
            wanted = read_deployments(sessions, org_id)
            if org_id is None:
                read.set()
                go_on.wait(30)
            return wanted

        monkeypatch.setattr(deployments, "read_deployments", read_then_wait)
        reconcile = threading.Thread(target=state.synchronizer.sync_all)
        reconcile.start()
        assert read.wait(10)

        deploy(api, org, second)  # its event loads it
        assert eventually(lambda: serving_deployment(predictor, org) not in (None, first_id))
        newer_id = serving_deployment(predictor, org)
        for other in others:  # the org, now the least recently used, is unloaded
            assert serving_deployment(predictor, other) is not None
        assert state.cache.peek(org.org_id) is None
        go_on.set()
        reconcile.join(10)

        assert [serving_deployment(predictor, org) for _ in range(5)] == [newer_id] * 5


def test_a_deployment_one_replica_has_loaded_is_not_refused_by_another(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    """A replica that failed to read the file (changed under it, say) cannot make the database step back from a
    deployment another replica serves: that one would then serve what the database no longer names."""
    good = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, good)
    with start_predictor(settings) as predictor:
        assert eventually(lambda: served_version(predictor, org) == good)
    loaded = current_deployment(api, org)

    deployments.record_refusal(make_session_factory(engine), loaded["deploymentId"], "sha256 mismatch")

    assert current_deployment(api, org)["status"] == "deployed"


def test_a_deployment_another_replica_refused_while_this_one_loaded_it_is_not_served(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loading takes time; a replica that refused the same deployment meanwhile wins, and this one serves the org's
    last good deployment, as every replica then does."""
    good = register_model(engine, store, org.org_id, tiny_model(seed=1))
    deploy(api, org, good)
    second = register_model(engine, store, org.org_id, tiny_model(seed=2))

    def refused_elsewhere_meanwhile(store: ObjectStore, deployed: Any) -> Any:
        model = models.load_model(store, deployed)
        if deployed.version == second:
            deployments.record_refusal(make_session_factory(engine), deployed.deployment_id, "corrupt ONNX")
        return model

    monkeypatch.setattr(deployments, "load_model", refused_elsewhere_meanwhile)
    with start_predictor(settings) as predictor:
        assert eventually(lambda: served_version(predictor, org) == good)
        deploy(api, org, second)
        assert eventually(lambda: current_deployment(api, org)["status"] == "failed")
        answers = [served_version(predictor, org) for _ in range(5)]

    assert answers == [good] * 5
