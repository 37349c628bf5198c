"""A version's artifacts, downloaded over the api from the S3 store: the model checked against its registered
sha256, the reports beside it, never the held-out rows; for the org's trainers, and audited."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import numpy as np
import onnxruntime as ort
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from shared.db.models import ModelVersion
from shared.layout import HOLDOUT_FILE, METRICS_FILE, model_key, model_prefix
from shared.storage import ObjectStore
from tests.integration.conftest import OrgKeys, create_org_with_keys
from tests.support.models import FEATURES, register_model, tiny_model


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
