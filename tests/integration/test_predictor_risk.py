"""Risk levels as clients and prediction records read them: the org's bands applied to the probability that
something is wrong. For a binary model that is its positive class's; for a multiclass one, 1 - the probability of
the class the org names normal (`config.predictions.normalClass`), and no risk level without one."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.predictor import models
from services.predictor.inference import risk_level
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import ADMIN, OrgKeys
from tests.integration.predictor_support import becomes_ready, deploy_quietly, records_of, start_predictor
from tests.support.models import FEATURES, ai4i_row, register_model, tiny_model, tiny_multiclass_model
from tests.support.polling import eventually

HEALTHY = ai4i_row(0)  # the multiclass model reads it as "none" with a probability of 0.99
OVERLOADED = {**ai4i_row(0), "torque": 80.0, "rotational_speed": 2500.0}  # far beyond the power failure's bounds


def configure(api: TestClient, org: OrgKeys, predictions: dict[str, Any]) -> None:
    response = api.patch(f"/v1/orgs/{org.org_id}", json={"config": {"predictions": predictions}}, headers=ADMIN)
    assert response.status_code == 200, response.text


def answers(predictor: TestClient, org: OrgKeys) -> list[dict[str, Any]]:
    response = predictor.post(
        f"/v1/orgs/{org.org_id}/predict", json={"rows": [HEALTHY, OVERLOADED]}, headers=org.viewer
    )
    assert response.status_code == 200, response.text
    return list(response.json()["predictions"])


def probabilities_of(predictor: TestClient, org: OrgKeys, label: str) -> list[float]:
    """Each row's probability of one class, as V2 answers them."""
    rows = [[row[name] for name in FEATURES] for row in (HEALTHY, OVERLOADED)]
    tensor = {"name": "input", "shape": [2, len(FEATURES)], "datatype": "FP32", "data": rows}
    body = predictor.post(f"/v2/models/{org.org_id}/infer", json={"inputs": [tensor]}, headers=org.viewer).json()
    classes = predictor.get(f"/v2/models/{org.org_id}", headers=org.viewer).json()["parameters"]["classes"]
    probabilities = next(output for output in body["outputs"] if output["name"] == "probabilities")
    return [float(p) for p in probabilities["data"][classes.index(label) :: len(classes)]]


@pytest.fixture
def multiclass(org: OrgKeys, engine: Engine, store: ObjectStore) -> OrgKeys:
    model, classes = tiny_multiclass_model()
    deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, model, classes=classes))
    return org


def test_a_healthy_row_of_a_multiclass_model_is_low_risk_when_the_org_names_its_normal_class(
    api: TestClient, multiclass: OrgKeys, settings: Settings
) -> None:
    """The winning class's probability read backwards: a confident "none" (no failure) was answered "high"."""
    configure(api, multiclass, {"record": True, "normalClass": "none"})
    with start_predictor(settings) as predictor:
        assert becomes_ready(predictor)
        healthy, overloaded = answered = answers(predictor, multiclass)
        assert eventually(lambda: len(records_of(api, multiclass)) == 2)
        records = records_of(api, multiclass)[::-1]
        normal = probabilities_of(predictor, multiclass, "none")

    assert healthy["label"] == "none" and healthy["score"] > 0.9 and healthy["riskLevel"] == "low"
    assert overloaded["riskLevel"] != "low"
    assert [answer["riskLevel"] for answer in answered] == [risk_level(1 - p, (0.3, 0.7)) for p in normal]
    assert [record["riskLevel"] for record in records] == [answer["riskLevel"] for answer in answered]
    assert [record["score"] for record in records] == pytest.approx([answer["score"] for answer in answered])


@pytest.mark.parametrize("normal", [None, "healthy", 0], ids=["none named", "not a class", "of another type"])
def test_a_multiclass_model_without_its_orgs_normal_class_answers_no_risk_level_and_the_log_says_why(
    api: TestClient,
    multiclass: OrgKeys,
    settings: Settings,
    normal: str | int | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No telling a risk from the winning class: null, in the answer and in the record, rather than a guess. An
    org upgraded from before normalClass lost its risk levels with no word in the log when it named none."""
    configure(api, multiclass, {"record": True, "normalClass": normal})
    logging.getLogger(models.__name__).addHandler(caplog.handler)  # Kiln's loggers do not propagate to the root
    try:
        with start_predictor(settings) as predictor:
            assert becomes_ready(predictor)
            answered = answers(predictor, multiclass)
            assert eventually(lambda: len(records_of(api, multiclass)) == 2)
    finally:
        logging.getLogger(models.__name__).removeHandler(caplog.handler)

    assert answered[0]["label"] == "none"
    assert [answer["riskLevel"] for answer in answered] == [None, None]
    assert [record["riskLevel"] for record in records_of(api, multiclass)] == [None, None]
    why = "names no normalClass" if normal is None else "is not a class of"
    assert any(why in record.getMessage() and multiclass.org_id in record.getMessage() for record in caplog.records)


def test_a_binary_model_grades_its_positive_class_whatever_normal_class_is_named(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, tiny_model()))
    configure(api, org, {"normalClass": 1, "riskBands": [0.01, 0.02]})
    with start_predictor(settings) as predictor:
        assert becomes_ready(predictor)
        answered = answers(predictor, org)

    assert [answer["riskLevel"] for answer in answered] == [risk_level(a["score"], (0.01, 0.02)) for a in answered]
