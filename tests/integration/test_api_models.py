"""A version's artifacts, downloaded over the api from the S3 store: the model checked against its registered
sha256, the reports beside it, never the held-out rows; for the org's trainers, and audited. The versions listed in
pages, and judged again: a rejection is final, and every judgement is audited."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from services.trainer.context import WorkerContext
from shared.db.models import ModelVersion
from shared.layout import HOLDOUT_FILE, METRICS_FILE, model_key, model_prefix
from shared.storage import ObjectStore
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys
from tests.support.judgements import judge_queued
from tests.support.models import FEATURES, register_judgeable, register_model, tiny_model
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


def model_of(api: TestClient, org: OrgKeys, version: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/orgs/{org.org_id}/models/{version}", headers=org.viewer).json())


def key_id(api: TestClient, org: OrgKeys, role: str) -> str:
    keys = api.get(f"/v1/orgs/{org.org_id}/keys", headers=org.admin).json()
    return str(next(key["keyId"] for key in keys if key["role"] == role))


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
