"""What a run makes of its target and settings, as the user sees it: the positive class of a binary model from
training to serving, the rows reported, and the config errors that fail a run with a reason naming the setting."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.predictor.app import create_app
from services.trainer.context import WorkerContext
from services.trainer.training import run_training
from shared.settings import Settings
from tests.integration.conftest import OrgKeys, run_of, submit, upload

SMALL_MODEL = {"numIterations": 20}


@pytest.fixture
def predictor(settings: Settings) -> Iterator[TestClient]:
    fast = settings.model_copy(update={"predictor_reconcile_s": 0.5, "metrics_token": SecretStr("m" * 32)})
    with TestClient(create_app(fast), raise_server_exceptions=False) as client:
        yield client


def upload_parquet(api: TestClient, org: OrgKeys, columns: dict[str, Any]) -> str:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    response = upload(api, org, buffer.getvalue(), name="data.parquet")
    assert response.status_code == 201, response.text
    return str(response.json()["datasetId"])


def failures_when_hot(rows: int = 1000) -> dict[str, Any]:
    """A feature x in [0, 1) and a label that is "failure" for the hottest fifth of the rows, else "ok"."""
    x = np.arange(rows) / rows
    return {"x": x, "y": np.where(x >= 0.8, "failure", "ok").tolist()}


def train(api: TestClient, org: OrgKeys, worker: WorkerContext, dataset: str, **changes: Any) -> dict[str, Any]:
    changes.setdefault("hyperparameters", SMALL_MODEL)
    run_id = submit(api, org, dataset, targetColumn="y", featureColumns=["x"], **changes)
    run_training(run_id, worker)
    return run_of(api, org, run_id)


def predict(predictor: TestClient, org: OrgKeys, version: str, x: float) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        response = predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [{"x": x}]}, headers=org.viewer)
        if response.headers.get("x-model-version") == version or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return dict(response.json()["predictions"][0])
        time.sleep(0.05)


def test_the_named_positive_class_is_what_score_precision_and_recall_are_about(
    api: TestClient, org: OrgKeys, worker: WorkerContext, predictor: TestClient
) -> None:
    dataset = upload_parquet(api, org, failures_when_hot())

    default = train(api, org, worker, dataset)
    named = train(api, org, worker, dataset, positiveClass="failure")

    assert default["status"] == named["status"] == "succeeded", (default["error"], named["error"])
    versions = {
        name: api.get(f"/v1/orgs/{org.org_id}/models/{run['version']}", headers=org.viewer).json()
        for name, run in (("default", default), ("named", named))
    }
    assert versions["default"]["classes"] == ["failure", "ok"]
    assert versions["named"]["classes"] == ["ok", "failure"]
    assert named["metrics"]["auc"] == pytest.approx(1.0) and named["metrics"]["recall"] == pytest.approx(1.0)
    deployed = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": named["version"]}, headers=org.admin)
    assert deployed.status_code == 201, deployed.text
    hot, cool = predict(predictor, org, named["version"], 0.95), predict(predictor, org, named["version"], 0.1)
    assert hot["label"] == "failure" and hot["score"] > 0.9 and hot["riskLevel"] == "high"
    assert cool["label"] == "ok" and cool["score"] < 0.1 and cool["riskLevel"] == "low"


def test_a_positive_class_the_target_does_not_hold_fails_the_run_naming_it(
    api: TestClient, org: OrgKeys, worker: WorkerContext
) -> None:
    run = train(api, org, worker, upload_parquet(api, org, failures_when_hot()), positiveClass="fail")

    assert run["status"] == "failed"
    assert run["error"] == "positiveClass 'fail' is not a value of the target column; its values are ['failure', 'ok']"
    assert api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json() == []


def three_classes(rows: int = 300) -> dict[str, Any]:
    return {"x": [float(i) for i in range(rows)], "y": [("a", "b", "c")[i % 3] for i in range(rows)]}


@pytest.mark.parametrize(
    ("columns", "changes", "reason"),
    [
        (
            three_classes(),
            {},
            "objective binary needs a target with 2 classes; this one has 3: use multiclass",
        ),
        (
            failures_when_hot(100),
            {"hyperparameters": {"objective": "multiclass"}},
            "objective multiclass needs a target with 3 or more classes; this one has 2: use binary, with "
            "positiveClass naming the class that counts",
        ),
        (
            {"x": [0.0, 1.0, 2.0], "y": ["ok", "failure", "ok"]},
            {"validationSplit": 0.5, "hyperparameters": {"earlyStoppingRounds": 5}},
            "earlyStoppingRounds watches 10% of the rows trained on, and 1 row cannot be split: leave "
            "earlyStoppingRounds out, or give more rows or a smaller validationSplit",
        ),
        (
            failures_when_hot(100),
            {"hyperparameters": {"baggingFraction": 1e-9, "baggingFreq": 1000}},
            "baggingFraction 1e-09 of the 80 rows trained on is less than one row: make it 1/80 or more, or leave "
            "bagging off (baggingFreq 0)",
        ),
    ],
)
def test_settings_the_data_cannot_take_fail_the_run_before_training_naming_the_setting(
    api: TestClient,
    org: OrgKeys,
    worker: WorkerContext,
    columns: dict[str, Any],
    changes: dict[str, Any],
    reason: str,
) -> None:
    run = train(api, org, worker, upload_parquet(api, org, columns), **changes)

    assert run["status"] == "failed" and run["error"] == reason
    logs = api.get(f"/v1/orgs/{org.org_id}/trainings/{run['runId']}/logs", headers=org.viewer).json()
    assert not any(line["stage"] == "training" for line in logs)


def test_with_early_stopping_the_rows_trained_on_leave_out_the_rows_it_watched(
    api: TestClient, org: OrgKeys, worker: WorkerContext
) -> None:
    hyperparameters = {"numIterations": 200, "earlyStoppingRounds": 5}
    run = train(api, org, worker, upload_parquet(api, org, failures_when_hot()), hyperparameters=hyperparameters)

    assert run["status"] == "succeeded", run["error"]
    metrics = run["metrics"]
    assert (metrics["rows"], metrics["trainRows"], metrics["earlyStoppingRows"]) == (200, 720, 80)
    assert (metrics["training"]["rows"], metrics["training"]["earlyStoppingRows"]) == (720, 80)


def test_empty_cells_of_a_text_target_in_a_csv_fail_the_run_as_missing_values(
    api: TestClient, org: OrgKeys, worker: WorkerContext
) -> None:
    rows = "".join(f"{i},{('ok', 'fail', '')[i % 3]}\n" for i in range(30))
    uploaded = upload(api, org, f"x,y\n{rows}".encode())
    assert uploaded.status_code == 201, uploaded.text

    run = train(api, org, worker, str(uploaded.json()["datasetId"]))

    assert run["status"] == "failed"
    assert run["error"] == "target column 'y' has 10 missing values (empty text counts as missing)"
