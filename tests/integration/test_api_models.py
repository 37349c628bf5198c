"""A version's artifacts, downloaded over the api from the S3 store: the model checked against its registered
sha256, the reports beside it, never the held-out rows; for the org's trainers, and audited. The versions listed in
pages, and judged again: a rejection is final, and every judgement is audited. A version's artifacts erased (from S3
or a folder store, and from an org's premises): never deployed, judged or downloaded again; never while it serves."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from deploy.local import ai4i
from services.api.app import create_app
from services.trainer import tasks as trainer_tasks
from services.trainer.context import WorkerContext
from services.trainer.erasure import erase_on_premises
from services.trainer.training import run_training
from shared.db.models import Deployment, ModelVersion, OutboxMessage
from shared.errors import NotOnPremises, TransientError
from shared.layout import (
    HOLDOUT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    NATIVE_MODEL_FILE,
    TRAINING_CONFIG_FILE,
    VALIDATION_FILE,
    model_key,
    model_prefix,
)
from shared.outbox import KIND_ERASE_TASK
from shared.queues import ERASE_TASK, premises_queue, send_erase_task
from shared.settings import Settings
from shared.storage import ObjectStore, open_object_store, premises_store
from tests.integration.conftest import (
    ADMIN,
    API_CONNECTIONS,
    OrgKeys,
    create_org_with_keys,
    held_at_the_store,
    run_of,
    submit,
    upload_table,
)
from tests.integration.model_versions_support import (
    audit_of,
    erase,
    key_id,
    model_of,
    premises_version,
    queued_for_premises,
    set_residency,
)
from tests.support.judgements import judge_queued, queued_judgement
from tests.support.models import FEATURES, register_judgeable, register_model, tiny_model
from tests.support.proxy import FreezableLink
from tests.support.seed import seed_version, seed_versions


def test_the_model_and_its_reports_download_and_the_held_out_rows_do_not(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore
) -> None:
    model = tiny_model()
    version = register_model(engine, store, org.org_id, model)
    store.put_bytes(model_prefix(org.org_id, version) + METRICS_FILE, b'{"auc": 0.97}')
    store.put_bytes(model_prefix(org.org_id, version) + HOLDOUT_FILE, b"PAR1 the org's own records")
    base = f"/v1/orgs/{org.org_id}/models/{version}/artifacts"

    listed = api.get(base, headers=org.trainer)
    downloaded = api.get(f"{base}/model.onnx", headers=org.trainer)
    metrics = api.get(f"{base}/metrics.json", headers=org.trainer)

    sha256 = hashlib.sha256(model).hexdigest()
    assert listed.status_code == 200
    assert listed.json() == [
        {"name": "model.onnx", "path": f"{base}/model.onnx", "sha256": sha256},
        {"name": "metrics.json", "path": f"{base}/metrics.json", "sha256": None},
    ]
    assert downloaded.status_code == 200 and downloaded.content == model
    assert downloaded.headers["x-checksum-sha256"] == sha256
    assert downloaded.headers["content-disposition"] == f'attachment; filename="{version}-model.onnx"'
    session = ort.InferenceSession(downloaded.content, providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((1, len(FEATURES)), np.float32)})[1].shape == (1, 2)
    assert metrics.json() == {"auc": 0.97}
    held_out = api.get(f"{base}/{HOLDOUT_FILE}", headers=org.trainer)
    assert held_out.status_code == 404 and held_out.json()["field"] == "name"
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.admin).json()
    downloads = [entry["detail"]["artifact"] for entry in audit if entry["action"] == "model.downloaded"]
    assert sorted(downloads) == ["metrics.json", "model.onnx"]


def test_a_model_whose_stored_bytes_changed_is_not_handed_out(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore
) -> None:
    version = register_model(engine, store, org.org_id, tiny_model())
    store.put_bytes(model_key(org.org_id, version), tiny_model(seed=1))

    response = api.get(f"/v1/orgs/{org.org_id}/models/{version}/artifacts/model.onnx", headers=org.trainer)

    assert response.status_code == 500
    assert "does not match the recorded" in response.json()["error"]


def test_artifacts_are_for_the_orgs_trainers_and_a_missing_model_is_named(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, org_id: str
) -> None:
    version = register_model(engine, store, org.org_id, tiny_model())
    store.delete(model_key(org.org_id, version))  # as a model over the size gate was never stored
    url = f"/v1/orgs/{org.org_id}/models/{version}/artifacts/model.onnx"
    other = create_org_with_keys(api, "x" + org_id)

    assert api.get(url, headers=org.viewer).status_code == 403
    assert api.get(url, headers=other.admin).status_code == 404
    missing = api.get(url, headers=org.trainer)
    assert missing.status_code == 404
    assert "a model over the size gate is never stored" in missing.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/models/{version}/artifacts", headers=org.trainer).json() == []


@pytest.mark.parametrize(("artifacts", "read"), [("artifacts", "list"), (f"artifacts/{METRICS_FILE}", "get_bytes")])
def test_artifacts_listed_or_downloaded_from_a_slow_object_store_leave_other_orgs_requests_a_database_connection(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    org_id: str,
    monkeypatch: pytest.MonkeyPatch,
    artifacts: str,
    read: str,
) -> None:
    version = register_model(engine, store, org.org_id, tiny_model())
    store.put_bytes(model_prefix(org.org_id, version) + METRICS_FILE, b'{"auc": 0.97}')
    url = f"/v1/orgs/{org.org_id}/models/{version}/{artifacts}"
    other = create_org_with_keys(api, "x" + org_id)

    with held_at_the_store(api, monkeypatch, read, lambda: api.get(url, headers=org.trainer)) as answers:
        meanwhile = api.get(f"/v1/orgs/{other.org_id}", headers=other.viewer)

    assert meanwhile.status_code == 200, meanwhile.text
    assert [answer.result().status_code for answer in answers] == [200] * API_CONNECTIONS


@pytest.mark.parametrize("erased", ["after its bytes were read", "before its bytes were read"])
def test_a_download_whose_version_is_erased_while_its_bytes_are_read_is_refused(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, monkeypatch: pytest.MonkeyPatch, erased: str
) -> None:
    """The download holds no database connection while the store answers; before, the erasure leaves no bytes."""
    version = register_model(engine, store, org.org_id, tiny_model())
    served: ObjectStore = api.app.state.resources.store  # type: ignore[attr-defined]
    get_bytes = served.get_bytes

    def erased_meanwhile(key: str) -> bytes:
        if erased.startswith("before"):
            assert erase(api, org, version).status_code == 200
            return get_bytes(key)
        data = get_bytes(key)
        assert erase(api, org, version).status_code == 200
        return data

    monkeypatch.setattr(served, "get_bytes", erased_meanwhile)
    response = api.get(f"/v1/orgs/{org.org_id}/models/{version}/artifacts/{MODEL_FILE}", headers=org.trainer)

    assert response.status_code == 410, response.text
    assert "was erased" in response.json()["error"]
    assert audit_of(api, org, "model.downloaded") == []


def test_a_version_shows_when_it_was_last_validated(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore
) -> None:
    version = register_model(engine, store, org.org_id, tiny_model())
    url = f"/v1/orgs/{org.org_id}/models/{version}"
    before = api.get(url, headers=org.viewer).json()
    judged_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with Session(engine) as session, session.begin():
        session.execute(update(ModelVersion).where(ModelVersion.version == version).values(validated_at=judged_at))

    after = api.get(url, headers=org.viewer).json()

    assert before["validatedAt"] is None
    assert datetime.fromisoformat(after["validatedAt"]) == judged_at
    assert api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json()[0]["validatedAt"] == after["validatedAt"]
    assert "validatedAt" in api.get("/openapi.json").json()["components"]["schemas"]["ModelOut"]["properties"]


def set_gates(api: TestClient, org: OrgKeys, gates: dict[str, float]) -> None:
    response = api.patch(f"/v1/orgs/{org.org_id}", json={"config": {"gates": gates}}, headers=ADMIN)
    assert response.status_code == 200, response.text


def validate_again(api: TestClient, engine: Engine, worker: WorkerContext, org: OrgKeys, version: str) -> str:
    """`POST .../validate`, then the judgement it queued, run as the org's worker runs it."""
    accepted = api.post(f"/v1/orgs/{org.org_id}/models/{version}/validate", headers=org.trainer)
    assert accepted.status_code == 202, accepted.text
    return judge_queued(engine, worker, org.org_id, version)


def test_a_rejected_version_stays_rejected_when_judged_again_under_relaxed_gates(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, worker: WorkerContext
) -> None:
    """The reviewer's case: rejected for precision and recall, the gates relaxed, judged again: every gate is
    reported (and passes), but the version stays rejected and a deploy is refused naming the gates it failed."""
    strict = {"minPrecision": 0.9, "minRecall": 0.9}
    set_gates(api, org, strict)
    version = register_judgeable(engine, store, org.org_id, strict)
    assert model_of(api, org, version)["validation"]["failed"] == ["precision", "recall"]
    set_gates(api, org, {"minPrecision": 0.1, "minRecall": 0.1})

    accepted = api.post(f"/v1/orgs/{org.org_id}/models/{version}/validate", headers=org.trainer)
    judged = judge_queued(engine, worker, org.org_id, version)

    assert judged == "rejected"
    assert accepted.status_code == 202
    assert accepted.json()["versionStatus"] == "rejected"
    assert "precision, recall" in accepted.json()["note"] and "stays rejected" in accepted.json()["note"]
    model = model_of(api, org, version)
    report = model["validation"]
    assert model["status"] == "rejected"
    assert report["passed"] is True and report["failed"] == []
    assert [gate["name"] for gate in report["gates"]] == [
        "accuracy",
        "precision",
        "recall",
        "model_size_mb",
        "onnx_health",
        "parity",
    ]
    assert all({"value", "threshold", "passed"} <= gate.keys() and gate["passed"] for gate in report["gates"])
    assert report["rejection"]["failed"] == ["precision", "recall"]
    assert "final" in report["rejection"]["note"]
    deploy = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
    assert deploy.status_code == 409
    assert deploy.json()["failedGates"] == ["precision", "recall"]
    assert "precision, recall" in deploy.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).status_code == 404


def test_a_version_rejected_under_stricter_gates_is_not_brought_back_by_relaxing_them(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, worker: WorkerContext
) -> None:
    lenient = {"minRecall": 0.1}
    set_gates(api, org, lenient)
    version = register_judgeable(engine, store, org.org_id, lenient)
    assert model_of(api, org, version)["status"] == "validated"

    set_gates(api, org, {"minAccuracy": 0.999})
    assert validate_again(api, engine, worker, org, version) == "rejected"
    rejected = model_of(api, org, version)["validation"]
    set_gates(api, org, {"minAccuracy": 0.5})
    again = validate_again(api, engine, worker, org, version)

    assert rejected["failed"] == ["accuracy"] and rejected["rejection"]["failed"] == ["accuracy"]
    assert again == "rejected"
    model = model_of(api, org, version)
    assert model["status"] == "rejected" and model["validation"]["passed"] is True
    assert model["validation"]["rejection"] == rejected["rejection"]  # the gates and the time it was rejected
    deploy = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
    assert deploy.status_code == 409 and deploy.json()["failedGates"] == ["accuracy"]


def test_every_judgement_is_audited_with_the_key_that_asked_and_its_outcome(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, worker: WorkerContext
) -> None:
    lenient = {"minRecall": 0.1}
    set_gates(api, org, lenient)
    version = register_judgeable(engine, store, org.org_id, lenient)
    validate_again(api, engine, worker, org, version)  # passes again: no change
    set_gates(api, org, {"minRecall": 0.9})
    validate_again(api, engine, worker, org, version)  # fails: rejected
    set_gates(api, org, lenient)
    validate_again(api, engine, worker, org, version)  # passes, and stays rejected

    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.admin).json()[::-1]
    rows = [entry for entry in audit if entry["action"].startswith("model.validation.")]
    trainer = key_id(api, org, "trainer")
    assert {(row["actor"], row["target"]) for row in rows} == {(trainer, version)}
    assert [(row["action"], row["detail"]) for row in rows] == [
        ("model.validation.requested", {"status": "validated"}),
        ("model.validation.judged", {"from": "validated", "to": "validated", "passed": True, "failed": []}),
        ("model.validation.requested", {"status": "validated"}),
        ("model.validation.judged", {"from": "validated", "to": "rejected", "passed": False, "failed": ["recall"]}),
        ("model.validation.requested", {"status": "rejected"}),
        ("model.validation.judged", {"from": "rejected", "to": "rejected", "passed": True, "failed": []}),
    ]


def test_a_judgement_that_cannot_be_made_is_audited_and_changes_nothing(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, worker: WorkerContext
) -> None:
    version = register_judgeable(engine, store, org.org_id, {"minRecall": 0.1})
    store.delete(model_prefix(org.org_id, version) + HOLDOUT_FILE)

    with pytest.raises(Exception, match="holdout"):
        validate_again(api, engine, worker, org, version)

    assert model_of(api, org, version)["status"] == "validated"
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.admin).json()
    errored = [entry for entry in audit if entry["action"] == "model.validation.errored"]
    assert [(entry["actor"], entry["target"]) for entry in errored] == [(key_id(api, org, "trainer"), version)]
    assert "holdout" in errored[0]["detail"]["error"]


@pytest.fixture
def store_out_of_reach(settings: Settings) -> Iterator[WorkerContext]:
    """A worker whose object store stopped answering after it started: its connections are refused."""
    host, port = settings.s3_endpoint.rsplit(":", 1)
    link = FreezableLink((host, int(port)))
    context = WorkerContext.open(settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{link.port}"}))
    link.close()
    yield context
    context.close()


def test_a_judgement_that_meets_the_store_out_of_reach_is_tried_again_then_errors(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    store_out_of_reach: WorkerContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = register_judgeable(engine, store, org.org_id, {"minRecall": 0.1})
    assert api.post(f"/v1/orgs/{org.org_id}/models/{version}/validate", headers=org.trainer).status_code == 202
    monkeypatch.setattr(trainer_tasks, "worker_context", lambda: store_out_of_reach)

    outcome = trainer_tasks.validate.apply(args=queued_judgement(engine, org.org_id, version))

    assert outcome.state == "FAILURE" and isinstance(outcome.result, TransientError)
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.admin).json()[::-1]
    judgements = [entry["action"] for entry in audit if entry["action"].startswith("model.validation.")]
    assert judgements == [
        "model.validation.requested",
        "model.validation.retrying",
        "model.validation.retrying",
        "model.validation.errored",
    ]
    assert model_of(api, org, version)["status"] == "validated"


def test_a_judgement_that_met_the_store_out_of_reach_judges_once_it_is_back(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    worker: WorkerContext,
    store_out_of_reach: WorkerContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_gates(api, org, {"minRecall": 0.1})
    version = register_judgeable(engine, store, org.org_id, {"minRecall": 0.1})
    set_gates(api, org, {"minRecall": 0.9})
    assert api.post(f"/v1/orgs/{org.org_id}/models/{version}/validate", headers=org.trainer).status_code == 202
    contexts = iter([store_out_of_reach, worker])
    monkeypatch.setattr(trainer_tasks, "worker_context", lambda: next(contexts))

    outcome = trainer_tasks.validate.apply(args=queued_judgement(engine, org.org_id, version))

    assert (outcome.state, outcome.result) == ("SUCCESS", "rejected")
    [retrying] = audit_of(api, org, "model.validation.retrying")
    assert "unreachable" in retrying["detail"]["error"]
    assert model_of(api, org, version)["status"] == "rejected"


def test_versions_come_in_pages_newest_first(api: TestClient, org: OrgKeys, engine: Engine) -> None:
    oldest, older, newer = seed_versions(engine, org.org_id, 3)
    rejected = seed_version(engine, org.org_id, passed=False, created_at=datetime.now(UTC) + timedelta(minutes=1))
    url = f"/v1/orgs/{org.org_id}/models"

    def versions(**params: str | int) -> list[str]:
        response = api.get(url, params=params, headers=org.viewer)
        assert response.status_code == 200, response.text
        return [model["version"] for model in response.json()]

    assert versions() == [rejected, newer, older, oldest]
    assert versions(limit=1) == [rejected]
    assert versions(limit=2, before=rejected) == [newer, older]
    assert versions(limit=2, before=older) == [oldest]
    assert versions(status="validated", limit=2) == [newer, older]
    assert versions(status="rejected") == [rejected]
    assert api.get(url, params={"limit": 0}, headers=org.viewer).status_code == 422
    assert api.get(url, params={"limit": 1001}, headers=org.viewer).status_code == 422
    assert api.get(url, params={"status": "deployed"}, headers=org.viewer).status_code == 422
    unknown = api.get(url, params={"before": "v2024-01-15T10-30-00-000Z_a1b2c3d4"}, headers=org.viewer)
    assert unknown.status_code == 404 and unknown.json()["field"] == "before"


ARTIFACTS = [HOLDOUT_FILE, METRICS_FILE, MODEL_FILE, NATIVE_MODEL_FILE, TRAINING_CONFIG_FILE, VALIDATION_FILE]


def stored_version(engine: Engine, store: ObjectStore, org_id: str) -> str:
    """A validated version with every artifact a run stores, the held-out rows among them."""
    version = register_judgeable(engine, store, org_id, {"minRecall": 0.1})
    prefix = model_prefix(org_id, version)
    for name in (METRICS_FILE, TRAINING_CONFIG_FILE, VALIDATION_FILE):
        store.put_bytes(prefix + name, b"{}")
    assert store.list(prefix) == [prefix + name for name in ARTIFACTS]
    return version


@pytest.fixture(params=["s3", "folder"])
def any_store(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path
) -> Iterator[tuple[TestClient, ObjectStore]]:
    """The api on S3 (SeaweedFS) or on a folder store, and that store."""
    if request.param == "folder":
        settings = settings.model_copy(update={"object_store": f"file://{tmp_path / 'objects'}"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        yield api, open_object_store(settings)


def test_erasing_a_version_removes_every_artifact_and_it_is_never_deployed_judged_or_downloaded_again(
    any_store: tuple[TestClient, ObjectStore], org_id: str, engine: Engine
) -> None:
    api, store = any_store
    org = create_org_with_keys(api, org_id)
    version, serving = stored_version(engine, store, org.org_id), stored_version(engine, store, org.org_id)
    assert (
        api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": serving}, headers=org.admin).status_code == 201
    )
    before = model_of(api, org, version)
    base = f"/v1/orgs/{org.org_id}/models/{version}"

    erased = erase(api, org, version)

    assert erased.status_code == 200, erased.text
    assert store.list(model_prefix(org.org_id, version)) == []
    body = erased.json()
    assert body["removed"] == ARTIFACTS and body["status"] == "erased" and body["premises"] is None
    assert before["holdoutOnPremises"] is False
    model = model_of(api, org, version)
    assert model["status"] == "erased" and model["erasedAt"] == body["erasedAt"]
    assert (model["metrics"], model["validation"], model["sha256"]) == (
        before["metrics"],
        before["validation"],
        before["sha256"],
    )
    deploy = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
    rollback = api.post(f"/v1/orgs/{org.org_id}/rollback", json={"version": version}, headers=org.admin)
    for refused in (deploy, rollback):
        assert refused.status_code == 409, refused.text
        assert refused.json()["field"] == "version"
        assert f"version {version} was erased at" in refused.json()["error"]
    validate = api.post(f"{base}/validate", headers=org.trainer)
    assert validate.status_code == 409 and "was erased" in validate.json()["error"]
    for path in ("artifacts", f"artifacts/{MODEL_FILE}", f"artifacts/{METRICS_FILE}"):
        gone = api.get(f"{base}/{path}", headers=org.trainer)
        assert gone.status_code == 410, (path, gone.text)
        assert "erased" in gone.json()["error"]
    assert [
        m["version"] for m in api.get(f"/v1/orgs/{org.org_id}/models?status=erased", headers=org.viewer).json()
    ] == [version]
    [entry] = audit_of(api, org, "model.erased")
    assert (entry["actor"], entry["target"]) == (key_id(api, org, "admin"), version)
    assert entry["detail"] == {
        "from": "validated",
        "sha256": before["sha256"],
        "prefix": model_prefix(org.org_id, version),
        "premises": False,
    }
    again = erase(api, org, version)  # finishes what a store outage cut short; changes nothing else
    assert again.status_code == 200 and again.json()["removed"] == []
    assert again.json()["erasedAt"] == body["erasedAt"] and len(audit_of(api, org, "model.erased")) == 1


def test_a_rejected_version_is_erased_too(api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore) -> None:
    """Its held-out rows are kept like any version's."""
    version = register_judgeable(engine, store, org.org_id, {"minRecall": 0.9})
    assert model_of(api, org, version)["status"] == "rejected"

    assert erase(api, org, version).status_code == 200

    assert store.list(model_prefix(org.org_id, version)) == []
    assert audit_of(api, org, "model.erased")[0]["detail"]["from"] == "rejected"


def test_erasing_the_serving_version_is_refused_and_removes_nothing(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore
) -> None:
    version = stored_version(engine, store, org.org_id)
    assert (
        api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin).status_code == 201
    )

    refused = erase(api, org, version)

    assert refused.status_code == 409, refused.text
    assert "is deployed" in refused.json()["error"] and "undeploy" in refused.json()["error"]
    assert store.list(model_prefix(org.org_id, version)) == [model_prefix(org.org_id, version) + n for n in ARTIFACTS]
    assert model_of(api, org, version)["status"] == "validated"
    assert audit_of(api, org, "model.erased") == []
    assert api.delete(f"/v1/orgs/{org.org_id}/deployment", headers=org.admin).status_code == 204
    assert erase(api, org, version).status_code == 200
    assert store.list(model_prefix(org.org_id, version)) == []
    rollback = api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert rollback.status_code == 409 and f"version {version}" in rollback.json()["error"]
    assert "erased since" in rollback.json()["error"]


def test_the_version_serving_until_a_new_deployment_loads_is_not_erased(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore
) -> None:
    """Predictors serve the old version until the new one has loaded, and again if they refuse the new one."""
    old, new = stored_version(engine, store, org.org_id), stored_version(engine, store, org.org_id)
    for version in (old, new):
        deployed = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
        assert deployed.status_code == 201

    refused = erase(api, org, old)

    assert refused.status_code == 409, refused.text
    assert "still serves" in refused.json()["error"]
    assert store.list(model_prefix(org.org_id, old)) != []
    with Session(engine) as session, session.begin():  # as a predictor records its first load of the new one
        session.execute(update(Deployment).where(Deployment.version == new).values(loaded_at=datetime.now(UTC)))
    assert erase(api, org, old).status_code == 200
    assert store.list(model_prefix(org.org_id, old)) == []
    assert api.get(f"/v1/orgs/{org.org_id}/deployment", headers=org.viewer).json()["rollbackAvailable"] is False


def test_the_version_serving_while_two_newer_deployments_wait_to_load_is_not_erased(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore
) -> None:
    """Predictors serve the last version they loaded however many deployments since wait to load: erasing it let
    them serve a version that could never come back."""
    served, waiting, newest = (stored_version(engine, store, org.org_id) for _ in range(3))
    for version in (served, waiting, newest):
        deployed = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
        assert deployed.status_code == 201
        if version == served:  # as a predictor records its first load
            with Session(engine) as session, session.begin():
                session.execute(
                    update(Deployment).where(Deployment.version == served).values(loaded_at=datetime.now(UTC))
                )

    refused = erase(api, org, served)

    assert refused.status_code == 409, refused.text
    assert f"still serves organization {org.org_id} until deployment" in refused.json()["error"]
    assert f"of version {newest} has loaded" in refused.json()["error"]
    assert store.list(model_prefix(org.org_id, served)) != []
    assert erase(api, org, waiting).status_code == 200  # superseded before any predictor loaded it


def test_a_version_is_erased_by_the_orgs_admins_only(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, org_id: str
) -> None:
    version = stored_version(engine, store, org.org_id)
    other = create_org_with_keys(api, "x" + org_id)

    assert erase(api, org, version, org.viewer).status_code == 403
    assert erase(api, org, version, org.trainer).status_code == 403
    assert erase(api, org, version, other.admin).status_code == 404
    intruding = api.delete(f"/v1/orgs/{other.org_id}/models/{version}/artifacts", headers=other.admin)
    assert intruding.status_code == 404
    assert len(store.list(model_prefix(org.org_id, version))) == len(ARTIFACTS)
    assert erase(api, org, version, ADMIN).status_code == 200


def test_a_judgement_asked_for_before_an_erasure_judges_nothing_and_says_so(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, worker: WorkerContext
) -> None:
    version = stored_version(engine, store, org.org_id)
    assert api.post(f"/v1/orgs/{org.org_id}/models/{version}/validate", headers=org.trainer).status_code == 202
    assert erase(api, org, version).status_code == 200

    assert judge_queued(engine, worker, org.org_id, version) == "erased"

    assert model_of(api, org, version)["status"] == "erased"
    [errored] = audit_of(api, org, "model.validation.errored")
    assert "was erased" in errored["detail"]["error"]


class _Sent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any], str]] = []

    def send_task(self, name: str, args: list[Any], queue: str) -> object:
        self.calls.append((name, args, queue))
        return None


def test_an_org_keeping_its_data_on_its_premises_has_its_held_out_rows_erased_there_by_its_own_worker(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, own_worker: WorkerContext, settings: Settings
) -> None:
    """The api cannot reach the premises folder (it is on the org's own worker): it erases the central artifacts
    and queues the rest on the org's premises queue, which only the org's own workers consume. (The same through a
    real worker process: test_premises_worker.py.)"""
    version, premises = premises_version(api, org, engine, store, settings)
    prefix = model_prefix(org.org_id, version)

    erased = erase(api, org, version)

    assert erased.status_code == 202, erased.text
    assert erased.json()["removed"] == [METRICS_FILE, MODEL_FILE] and erased.json()["premises"] == "queued"
    assert store.list(prefix) == []
    with Session(engine) as session:
        payloads = session.scalars(select(OutboxMessage.payload).where(OutboxMessage.kind == KIND_ERASE_TASK)).all()
    payload = next(p for p in payloads if p["org_id"] == org.org_id)
    sent = _Sent()
    send_erase_task(sent, payload)
    [(name, args, queue)] = sent.calls
    assert (name, queue) == (ERASE_TASK, premises_queue(org.org_id))

    queued_org, queued_version, actor = args
    assert erase_on_premises(queued_org, queued_version, own_worker, actor=actor) == [prefix + HOLDOUT_FILE]

    assert premises.list(prefix) == [] and not (settings.data_dir / "premises" / prefix).exists()
    [entry] = audit_of(api, org, "model.erased.premises")
    assert (entry["actor"], entry["target"], entry["detail"]) == (
        key_id(api, org, "admin"),
        version,
        {"removed": [HOLDOUT_FILE]},
    )
    assert audit_of(api, org, "model.erased")[0]["detail"]["premises"] is True


def test_the_premises_erasure_leaves_a_version_that_was_not_erased_alone(
    org: OrgKeys, engine: Engine, store: ObjectStore, own_worker: WorkerContext, settings: Settings
) -> None:
    version = register_model(engine, store, org.org_id, tiny_model(), holdout_on_premises=True)
    premises = premises_store(settings)
    premises.put_bytes(model_prefix(org.org_id, version) + HOLDOUT_FILE, b"rows")

    assert erase_on_premises(org.org_id, version, own_worker, actor="someone") == []

    assert premises.exists(model_prefix(org.org_id, version) + HOLDOUT_FILE)


@pytest.fixture
def own_worker(settings: Settings, org: OrgKeys) -> Iterator[WorkerContext]:
    """The org's own worker (KILN_WORKER_ORGS), the one on its premises, in-process."""
    context = WorkerContext.open(settings.model_copy(update={"worker_orgs": org.org_id}))
    yield context
    context.close()


def test_a_version_trained_on_the_premises_has_its_held_out_rows_erased_there_after_the_org_moved_to_central(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, own_worker: WorkerContext, settings: Settings
) -> None:
    """The rows stay where the run wrote them when the org changes its residency: the erasure follows them."""
    version, premises = premises_version(api, org, engine, store, settings)
    prefix = model_prefix(org.org_id, version)
    set_residency(api, org, "central")
    assert api.get(f"/v1/orgs/{org.org_id}/models/{version}", headers=org.viewer).json()["holdoutOnPremises"] is True

    erased = erase(api, org, version)

    assert erased.status_code == 202, erased.text
    assert (erased.json()["removed"], erased.json()["premises"]) == ([METRICS_FILE, MODEL_FILE], "queued")
    assert audit_of(api, org, "model.erased")[0]["detail"]["premises"] is True
    assert queued_for_premises(settings, org) == 1
    assert premises.exists(prefix + HOLDOUT_FILE)  # until the org's own worker takes the message
    assert erase_on_premises(org.org_id, version, own_worker, actor="a") == [prefix + HOLDOUT_FILE]
    assert premises.list(prefix) == []
    [entry] = audit_of(api, org, "model.erased.premises")
    assert entry["detail"] == {"removed": [HOLDOUT_FILE]}


def test_a_run_claimed_while_the_org_kept_its_data_home_leaves_its_rows_there_until_its_own_worker_erases_them(
    api: TestClient, org: OrgKeys, engine: Engine, own_worker: WorkerContext, settings: Settings, tmp_path: Path
) -> None:
    """A real run: the org's residency as the run was claimed decides where its held-out rows go, and its version
    keeps that, whatever the org says by the time the version is erased."""
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(5_000, seed=3), tmp_path))
    set_residency(api, org, "local")
    assert run_training(run_id, own_worker) in {"succeeded", "rejected"}
    version = run_of(api, org, run_id)["version"]
    prefix = model_prefix(org.org_id, version)
    premises = premises_store(settings)
    assert premises.list(prefix) == [prefix + HOLDOUT_FILE]
    set_residency(api, org, "central")

    erased = erase(api, org, version)

    assert erased.status_code == 202, erased.text
    assert HOLDOUT_FILE not in erased.json()["removed"] and erased.json()["premises"] == "queued"
    assert erase_on_premises(org.org_id, version, own_worker, actor="a") == [prefix + HOLDOUT_FILE]
    assert premises.list(prefix) == []


def test_a_premises_erasure_queued_before_the_org_moved_to_central_still_removes_the_rows_and_says_so(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, own_worker: WorkerContext, settings: Settings
) -> None:
    version, premises = premises_version(api, org, engine, store, settings)
    prefix = model_prefix(org.org_id, version)
    assert erase(api, org, version).status_code == 202
    set_residency(api, org, "central")  # before the org's worker took the message

    removed = erase_on_premises(org.org_id, version, own_worker, actor=key_id(api, org, "admin"))

    assert removed == [prefix + HOLDOUT_FILE]
    assert premises.list(prefix) == []
    [entry] = audit_of(api, org, "model.erased.premises")
    assert entry["detail"] == {"removed": [HOLDOUT_FILE]}


def test_a_worker_not_on_the_orgs_premises_never_confirms_its_held_out_rows_are_gone(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, worker: WorkerContext, settings: Settings
) -> None:
    """Once the org keeps its data centrally, the central workers take its training queue: one of them, handed the
    premises erasure, finds nothing in its own folder, which says nothing of the org's premises."""
    version, premises = premises_version(api, org, engine, store, settings)
    assert erase(api, org, version).status_code == 202
    set_residency(api, org, "central")

    with pytest.raises(NotOnPremises):
        erase_on_premises(org.org_id, version, worker, actor="a")

    assert premises.exists(model_prefix(org.org_id, version) + HOLDOUT_FILE)
    assert audit_of(api, org, "model.erased.premises") == []


def test_a_version_trained_centrally_has_its_held_out_rows_erased_centrally_after_the_org_moved_to_its_premises(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    """Its rows were written beside the model: the api removes them at once, and queues nothing for a premises
    that never held them."""
    version = stored_version(engine, store, org.org_id)
    set_residency(api, org, "local")

    erased = erase(api, org, version)

    assert erased.status_code == 200, erased.text
    assert (erased.json()["removed"], erased.json()["premises"]) == (ARTIFACTS, None)
    assert store.list(model_prefix(org.org_id, version)) == []
    assert audit_of(api, org, "model.erased")[0]["detail"]["premises"] is False
    assert queued_for_premises(settings, org) == 0
    with Session(engine) as session:
        kinds = session.scalars(select(OutboxMessage.payload).where(OutboxMessage.kind == KIND_ERASE_TASK)).all()
    assert not [payload for payload in kinds if payload["org_id"] == org.org_id]


def test_an_erasure_the_object_store_cuts_short_leaves_the_version_erased_and_a_second_one_finishes_it(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = stored_version(engine, store, org.org_id)
    served: ObjectStore = api.app.state.resources.store  # type: ignore[attr-defined]

    def unreachable(prefix: str) -> list[str]:
        raise TransientError("the object store at s3 is unreachable: connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(served, "delete_prefix", unreachable)
        cut_short = erase(api, org, version)

    assert cut_short.status_code == 503, cut_short.text
    assert "is erased" in cut_short.json()["error"] and "DELETE it again to finish" in cut_short.json()["error"]
    assert model_of(api, org, version)["status"] == "erased"  # nothing deploys or hands it out meanwhile
    deploy = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin)
    assert deploy.status_code == 409
    assert len(store.list(model_prefix(org.org_id, version))) == len(ARTIFACTS)
    finished = erase(api, org, version)
    assert finished.status_code == 200 and finished.json()["removed"] == ARTIFACTS
    assert store.list(model_prefix(org.org_id, version)) == []
    assert len(audit_of(api, org, "model.erased")) == 1
