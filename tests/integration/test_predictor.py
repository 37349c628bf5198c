"""The predictor in-process over real PostgreSQL, Redis and S3: serving, swapping, healing, refusing."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine

from services.predictor.app import create_app
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys
from tests.integration.predictor_support import becomes_ready, deploy_quietly, served_version
from tests.support.metrics import parse_samples, sample
from tests.support.models import FEATURES, ai4i_row, register_model, tiny_model
from tests.support.polling import eventually
from tests.support.threaded_server import serving_in_thread

METRICS_TOKEN = "kiln-metrics-for-prometheus"
SCRAPER = {"Authorization": f"Bearer {METRICS_TOKEN}"}


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "predictor_reconcile_s": 0.5,
            "predictor_max_body_mb": 0.5,
            "metrics_token": SecretStr(METRICS_TOKEN),
        }
    )


@pytest.fixture
def predictor(fast: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(fast), raise_server_exceptions=False) as client:
        yield client


def test_a_deployed_version_serves_both_protocols(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, predictor: TestClient
) -> None:
    version = register_model(engine, store, org.org_id, tiny_model())
    assert (
        api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": version}, headers=org.admin).status_code == 201
    )
    assert eventually(lambda: served_version(predictor, org) == version)
    rows = [ai4i_row(i) for i in range(3)]
    answer = predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": rows}, headers=org.viewer)
    assert answer.status_code == 200
    assert answer.json()["version"] == version and answer.headers["x-model-version"] == version
    predictions = answer.json()["predictions"]
    assert len(predictions) == 3 and all(0 <= p["score"] <= 1 and p["label"] in (0, 1) for p in predictions)
    assert {p["riskLevel"] for p in predictions} <= {"low", "medium", "high"}
    tensor = {
        "name": "input",
        "shape": [3, len(FEATURES)],
        "datatype": "FP32",
        "data": [[row[f] for f in FEATURES] for row in rows],
    }
    v2 = predictor.post(f"/v2/models/{org.org_id}/infer", json={"id": "r1", "inputs": [tensor]}, headers=org.viewer)
    assert v2.status_code == 200
    body = v2.json()
    assert body["model_version"] == version and body["id"] == "r1"
    probabilities = next(o for o in body["outputs"] if o["name"] == "probabilities")
    assert probabilities["shape"] == [3, 2]
    assert probabilities["data"][1::2] == pytest.approx([p["score"] for p in predictions], abs=1e-6)


def test_a_new_deploy_swaps_the_model_without_a_restart(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, predictor: TestClient
) -> None:
    first = register_model(engine, store, org.org_id, tiny_model(seed=1))
    second = register_model(engine, store, org.org_id, tiny_model(seed=2))
    api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": first}, headers=org.admin)
    assert eventually(lambda: served_version(predictor, org) == first)
    api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": second}, headers=org.admin)
    assert eventually(lambda: served_version(predictor, org) == second)
    api.post(f"/v1/orgs/{org.org_id}/rollback", json={}, headers=org.admin)
    assert eventually(lambda: served_version(predictor, org) == first)


def test_a_deploy_whose_event_was_lost_is_served_after_the_reconcile(
    org: OrgKeys, engine: Engine, store: ObjectStore, predictor: TestClient
) -> None:
    first = register_model(engine, store, org.org_id, tiny_model(seed=1))
    second = register_model(engine, store, org.org_id, tiny_model(seed=2))
    deploy_quietly(engine, org.org_id, first)
    assert eventually(lambda: served_version(predictor, org) == first)
    deploy_quietly(engine, org.org_id, second)
    assert eventually(lambda: served_version(predictor, org) == second, seconds=5)


def test_a_model_whose_bytes_changed_is_refused_and_the_old_one_keeps_serving(
    org: OrgKeys, engine: Engine, store: ObjectStore, predictor: TestClient
) -> None:
    good = register_model(engine, store, org.org_id, tiny_model(seed=1))
    tampered = register_model(engine, store, org.org_id, tiny_model(seed=2))
    store.put_bytes(f"orgs/{org.org_id}/models/{tampered}/model.onnx", tiny_model(seed=3))
    deploy_quietly(engine, org.org_id, good)
    assert eventually(lambda: served_version(predictor, org) == good)
    assert becomes_ready(predictor)
    deploy_quietly(engine, org.org_id, tampered)
    time.sleep(1.5)  # three reconcile passes
    assert served_version(predictor, org) == good
    assert predictor.get("/v2/health/ready").status_code == 200


@pytest.fixture
def serving(org: OrgKeys, engine: Engine, store: ObjectStore, predictor: TestClient) -> OrgKeys:
    deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, tiny_model()))
    assert eventually(lambda: served_version(predictor, org) is not None)
    return org


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"rows": []}, 422, "rows"),
        ({"rows": [{"torque": 40.0}]}, 422, "rows[0]"),
        ({"rows": [{**ai4i_row(), "humidity": 0.3}]}, 422, "rows[0]"),
        ({"rows": [{**ai4i_row(), "torque": "high"}]}, 422, "rows[0].torque"),
        ({"rows": [{**ai4i_row(), "torque": None}]}, 422, "rows[0].torque"),
        ({"records": []}, 422, "rows"),
    ],
)
def test_bad_rows_are_refused_naming_the_field(
    serving: OrgKeys, predictor: TestClient, body: dict[str, Any], status: int, field: str
) -> None:
    response = predictor.post(f"/v1/orgs/{serving.org_id}/predict", json=body, headers=serving.viewer)
    assert response.status_code == status
    assert response.json()["field"] == field
    assert served_version(predictor, serving) is not None


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (True, "true"),
        (None, "null"),
        ("high", '"high"'),
        ({"k": 1}, '{"k":1}'),
        (json.loads("[" * 300 + "1" + "]" * 300), "[[[[[[[...]]]]]]]"),  # past what orjson writes
    ],
    ids=["true", "null", "text", "object", "nested-300-deep"],
)
def test_a_value_that_is_no_number_is_named_as_the_client_wrote_it(
    serving: OrgKeys, predictor: TestClient, value: Any, written: str
) -> None:
    """The message said `not True`, `not None`, `not 'high'`: Python's words, not the client's JSON."""
    body = {"rows": [{**ai4i_row(), "torque": value}]}

    response = predictor.post(f"/v1/orgs/{serving.org_id}/predict", json=body, headers=serving.viewer)

    assert response.json()["error"] == f"rows[0].torque must be a number, not {written}"


def row_text(row: dict[str, float], *members: str) -> str:
    """A row as JSON text, with `"name": value` members appended as given: a repeated key, say."""
    return "{" + ", ".join([*(f'"{name}": {value}' for name, value in row.items()), *members]) + "}"


def rows_text(rows: list[str], *members: str) -> str:
    """A V1 body as JSON text, its rows given as text, with members after `rows` as given."""
    return "{" + ", ".join(['"rows": [' + ", ".join(rows) + "]", *members]) + "}"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (rows_text([row_text(ai4i_row(0)), row_text(ai4i_row(1), '"torque": 99')]), "rows[1].torque"),
        (rows_text([row_text(ai4i_row(0), '"tool_wear"  :\n 7')]), "rows[0].tool_wear"),
        (rows_text([row_text(ai4i_row(0))], f'"rows": [{row_text(ai4i_row(1))}]'), "rows"),
        (rows_text([row_text(ai4i_row(0))], '"meta": {"at": "12:00", "at": "13:00"}'), "meta.at"),
    ],
)
def test_a_key_given_twice_is_refused_naming_it(serving: OrgKeys, predictor: TestClient, text: str, field: str) -> None:
    """JSON parsers keep the last of a repeated key: the row would be scored with a value the client may not mean.
    V2 refuses an input given twice; V1 refuses a feature given twice."""
    response = predictor.post(f"/v1/orgs/{serving.org_id}/predict", content=text, headers=serving.viewer)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and "more than once" in response.json()["error"]


def test_colons_in_strings_and_feature_names_are_no_repeated_keys(
    org: OrgKeys, engine: Engine, store: ObjectStore, predictor: TestClient
) -> None:
    """The check for repeated keys counts colons: those inside strings must not make it refuse a good body."""
    named = [f"plc:{name}" for name in FEATURES]
    deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, tiny_model(), feature_columns=named))
    row = {f"plc:{name}": value for name, value in ai4i_row().items()}
    body = {"rows": [row, row], "meta": {"sent": "2026-11-26T12:00:00Z", "by": {"line": "a:1"}}}
    assert eventually(
        lambda: predictor.post(f"/v1/orgs/{org.org_id}/predict", json=body, headers=org.viewer).status_code == 200
    )
    repeated = rows_text([row_text(row, '"plc:torque": 1')])
    response = predictor.post(f"/v1/orgs/{org.org_id}/predict", content=repeated, headers=org.viewer)
    assert (response.status_code, response.json()["field"]) == (422, "rows[0].plc:torque")
    # An escaped colon is one colon fewer in the body: with a key repeated, the count came out even.
    escaped = repeated.replace('"plc:air_temperature"', '"plc\\u003aair_temperature"')
    assert escaped != repeated
    response = predictor.post(f"/v1/orgs/{org.org_id}/predict", content=escaped, headers=org.viewer)
    assert (response.status_code, response.json()["field"]) == (422, "rows[0].plc:torque")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/orgs/a%00b/predict"), ("POST", "/v2/models/a%00b/infer"), ("GET", "/v2/models/a%00b")],
)
def test_an_org_holding_a_nul_is_refused_for_the_admin_too(predictor: TestClient, method: str, path: str) -> None:
    """PostgreSQL refuses to compare text holding a NUL: the admin token, which reaches any org, got a 500."""
    response = predictor.request(method, path, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "org"


def tensor_text(*members: str) -> str:
    """A V2 body as JSON text: one `input` tensor of one row, with members appended to the tensor as given."""
    data = json.dumps([ai4i_row()[name] for name in FEATURES])
    tensor = f'"name": "input", "shape": [1, {len(FEATURES)}], "datatype": "FP32", "data": {data}'
    return '{"inputs": [{' + ", ".join([tensor, *members]) + "}]"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (tensor_text(f'"data": {json.dumps([0.0] * len(FEATURES))}') + "}", "inputs[0].data"),
        (tensor_text('"shape" : [1, 6]') + "}", "inputs[0].shape"),
        (tensor_text() + ', "inputs": []}', "inputs"),
        (
            tensor_text() + ', "parameters": {"binary_data_output": false, "binary_data_output": true}}',
            "parameters.binary_data_output",
        ),
    ],
)
def test_a_v2_key_given_twice_is_refused_naming_it(
    serving: OrgKeys, predictor: TestClient, text: str, field: str
) -> None:
    """As V1: the tensor would be read with the last of its repeated members, which the client may not mean."""
    response = predictor.post(f"/v2/models/{serving.org_id}/infer", content=text, headers=serving.viewer)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and "more than once" in response.json()["error"]


def test_a_v2_request_with_colons_in_its_strings_is_answered(serving: OrgKeys, predictor: TestClient) -> None:
    text = tensor_text('"parameters": {"note": "line:4"}') + ', "id": "req:2026-11-26T12:00:00Z"}'
    response = predictor.post(f"/v2/models/{serving.org_id}/infer", content=text, headers=serving.viewer)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "req:2026-11-26T12:00:00Z"


@pytest.mark.parametrize("value", [1e300, -1e300, 3.5e38])
def test_a_value_beyond_fp32_is_refused_by_both_protocols(
    serving: OrgKeys, predictor: TestClient, value: float
) -> None:
    """The model runs on FP32, where these become ±Inf: both protocols refuse them rather than score an infinity."""
    rows = [ai4i_row(), {**ai4i_row(1), "torque": value}]
    v1 = predictor.post(f"/v1/orgs/{serving.org_id}/predict", json={"rows": rows}, headers=serving.viewer)
    assert v1.status_code == 422, v1.text
    assert v1.json()["field"] == "rows[1].torque" and "FP32" in v1.json()["error"]
    data = [[row[name] for name in FEATURES] for row in rows]
    tensor = {"name": "input", "shape": [2, len(FEATURES)], "datatype": "FP64", "data": data}
    v2 = predictor.post(f"/v2/models/{serving.org_id}/infer", json={"inputs": [tensor]}, headers=serving.viewer)
    assert v2.status_code == 422 and v2.json()["field"] == "inputs[0].data"
    assert served_version(predictor, serving) is not None


@pytest.mark.parametrize(
    ("tensor", "field"),
    [
        ({"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}, "inputs[0].shape"),
        ({"name": "input", "shape": [1, 6], "datatype": "BYTES", "data": ["a"] * 6}, "inputs[0].datatype"),
        ({"name": "input", "shape": [2, 6], "datatype": "FP32", "data": [1.0] * 6}, "inputs[0].data"),
        ({"name": "features", "shape": [1, 6], "datatype": "FP32", "data": [1.0] * 6}, "inputs"),
        ({"name": "input", "shape": [0, 6], "datatype": "FP32", "data": []}, "inputs[0].shape"),
    ],
)
def test_bad_tensors_are_refused_naming_the_field(
    serving: OrgKeys, predictor: TestClient, tensor: dict[str, Any], field: str
) -> None:
    response = predictor.post(f"/v2/models/{serving.org_id}/infer", json={"inputs": [tensor]}, headers=serving.viewer)
    assert response.status_code == 422
    assert response.json()["field"] == field


@pytest.mark.parametrize("member", ["datatype", "shape"])
def test_a_tensor_without_its_datatype_or_shape_is_told_it_is_required(
    serving: OrgKeys, predictor: TestClient, member: str
) -> None:
    """The message said `inputs[0].datatype None is not numeric`: Python's None, for a member the client left out."""
    tensor = {"name": "input", "shape": [1, 6], "datatype": "FP32", "data": [1.0] * 6}
    del tensor[member]
    response = predictor.post(f"/v2/models/{serving.org_id}/infer", json={"inputs": [tensor]}, headers=serving.viewer)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == f"inputs[0].{member}"
    assert response.json()["error"] == f"inputs[0].{member} is required"


def test_a_body_that_is_not_json_or_too_large_is_refused(serving: OrgKeys, predictor: TestClient) -> None:
    url = f"/v1/orgs/{serving.org_id}/predict"
    garbage = predictor.post(url, content=b"{rows:", headers=serving.viewer)
    assert garbage.status_code == 400 and garbage.json()["field"] == "body"
    huge = predictor.post(url, json={"rows": [ai4i_row()] * 10_000}, headers=serving.viewer)
    assert huge.status_code == 413 and huge.json()["field"] == "body"
    assert served_version(predictor, serving) is not None


@pytest.mark.parametrize("path", ["/v1/orgs/{org}/predict", "/v2/models/{org}/infer"])
def test_a_compressed_body_is_refused_naming_content_encoding_by_both_protocols(
    serving: OrgKeys, predictor: TestClient, path: str
) -> None:
    """V1 read gzip's bytes as JSON, and said the body was not valid JSON."""
    body = gzip.compress(json.dumps({"rows": [ai4i_row()]}).encode())
    headers = {**serving.viewer, "content-type": "application/json", "content-encoding": "gzip"}
    response = predictor.post(path.format(org=serving.org_id), content=body, headers=headers)
    assert response.status_code == 415
    assert response.json() == {
        "error": "Content-Encoding 'gzip' is not supported; send the body uncompressed",
        "field": "Content-Encoding",
        "status": 415,
    }


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("NaN", "NaN as the value of 'torque' (line 1 column 22)"),
        ("-Infinity", "-Infinity as the value of 'torque'"),
        ("[1, Infinity]", "Infinity in the value of 'torque' (line 1 column 26)"),  # among numbers in a list
    ],
)
def test_nan_or_infinity_written_by_pythons_json_is_refused_naming_its_key(
    serving: OrgKeys, predictor: TestClient, value: str, named: str
) -> None:
    """json.dumps writes a float NaN so; orjson's own words gave only a character offset."""
    body = b'{"rows": [{"torque": ' + value.encode() + b"}]}"
    response = predictor.post(f"/v1/orgs/{serving.org_id}/predict", content=body, headers=serving.viewer)
    assert response.status_code == 400
    assert response.json()["field"] == "body"
    assert response.json()["error"].startswith(f"the request body is not valid JSON: {named}")
    assert response.json()["error"].endswith("is no JSON number, and each feature must be a finite number")


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" + "0" * 400])
def test_a_number_past_even_fp64_is_refused_naming_its_key_and_fp32s_range(
    serving: OrgKeys, predictor: TestClient, number: str
) -> None:
    """1e39 is refused naming its field as beyond FP32's range; 1e400, past what the JSON parser reads, gave only the
    parser's words and a character offset."""
    row = row_text({name: value for name, value in ai4i_row().items() if name != "torque"}, f'"torque": {number}')
    v1 = predictor.post(f"/v1/orgs/{serving.org_id}/predict", content=rows_text([row]), headers=serving.viewer)
    data = "[[" + ", ".join(["1.5"] * (len(FEATURES) - 1) + [number]) + "]]"
    tensor = '{"name": "input", "shape": [1, 6], "datatype": "FP64", "data": ' + data + "}"
    v2 = predictor.post(
        f"/v2/models/{serving.org_id}/infer", content='{"inputs": [' + tensor + "]}", headers=serving.viewer
    )
    for response, key in ((v1, "as the value of 'torque'"), (v2, "in the value of 'data'")):
        assert (response.status_code, response.json()["field"]) == (400, "body"), response.text
        assert response.json()["error"].startswith(f"the request body holds {number[:20]}"), response.text
        assert key in response.json()["error"] and "beyond FP32's range (±3.4e38)" in response.json()["error"]


def test_a_nan_after_text_that_is_not_ascii_is_named_all_the_same(serving: OrgKeys, predictor: TestClient) -> None:
    """orjson counts characters, not the body's bytes: the key was looked for in the wrong place."""
    body = '{"note": "température", "rows": [{"torque": NaN}]}'.encode()
    response = predictor.post(f"/v1/orgs/{serving.org_id}/predict", content=body, headers=serving.viewer)
    assert response.json()["error"].startswith("the request body is not valid JSON: NaN as the value of 'torque'")


def test_keys_are_checked_and_other_orgs_are_not_found(
    api: TestClient, serving: OrgKeys, predictor: TestClient, org_id: str
) -> None:
    url = f"/v1/orgs/{serving.org_id}/predict"
    assert predictor.post(url, json={"rows": [ai4i_row()]}).status_code == 401
    assert (
        predictor.post(url, json={"rows": [ai4i_row()]}, headers={"Authorization": "Bearer kiln_nope"}).status_code
        == 401
    )
    intruder = create_org_with_keys(api, "x" + org_id)
    for method, path in [
        ("POST", url),
        ("GET", f"/v2/models/{serving.org_id}"),
        ("GET", f"/v2/models/{serving.org_id}/ready"),
        ("POST", f"/v2/models/{serving.org_id}/infer"),
    ]:
        assert predictor.request(method, path, json={}, headers=intruder.viewer).status_code == 404, path


CHALLENGE = 'Bearer realm="kiln"'
INVALID_KEY = 'Bearer realm="kiln", error="invalid_token"'


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/orgs/{org}/predict"),
        ("POST", "/v2/models/{org}/infer"),
        ("GET", "/v2/models/{org}"),
        ("GET", "/metrics"),
    ],
)
def test_every_401_names_the_bearer_scheme_and_an_invalid_token_when_a_key_was_sent(
    serving: OrgKeys, predictor: TestClient, method: str, path: str
) -> None:
    """RFC 9110 §15.5.2: a 401 carries WWW-Authenticate; RFC 6750 §3: invalid_token for a key sent but not valid."""
    url = path.format(org=serving.org_id)
    for headers, challenge in [
        ({}, CHALLENGE),
        ({"Authorization": "Basic a2lsbjpraWxu"}, CHALLENGE),
        ({"Authorization": "Bearer kiln_nope"}, INVALID_KEY),
        ({"Authorization": "Bearer nope"}, INVALID_KEY),
    ]:
        response = predictor.request(method, url, json={}, headers=headers)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == challenge, headers


def test_an_org_with_nothing_deployed_is_not_found(org: OrgKeys, predictor: TestClient) -> None:
    response = predictor.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row()]}, headers=org.viewer)
    assert response.status_code == 404
    assert "no deployed version" in response.json()["error"]


def test_model_metadata_names_the_features(serving: OrgKeys, predictor: TestClient) -> None:
    metadata = predictor.get(f"/v2/models/{serving.org_id}", headers=serving.viewer).json()
    assert metadata["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 6], "parameters": {"features": FEATURES}}
    ]
    assert [o["name"] for o in metadata["outputs"]] == ["label", "probabilities"]


def test_metrics_count_each_orgs_answers_rows_and_refusals_for_the_admin_only(
    serving: OrgKeys, predictor: TestClient
) -> None:
    version = served_version(predictor, serving)
    before = parse_samples(predictor.get("/metrics", headers=ADMIN).text)
    for rows in (1, 2, 5):
        assert predictor.post(
            f"/v1/orgs/{serving.org_id}/predict", json={"rows": [ai4i_row()] * rows}, headers=serving.viewer
        ).is_success
    tensor = {"name": "input", "shape": [2, len(FEATURES)], "datatype": "FP32", "data": [1.0] * 2 * len(FEATURES)}
    assert predictor.post(f"/v2/models/{serving.org_id}/infer", json={"inputs": [tensor]}, headers=serving.viewer)
    assert predictor.post(f"/v1/orgs/{serving.org_id}/predict", json={"rows": []}, headers=serving.viewer).is_error
    assert predictor.post("/v1/orgs/made-up-org/predict", json={"rows": [ai4i_row()]}, headers=ADMIN).is_error

    scraped = predictor.get("/metrics", headers=ADMIN)
    after = parse_samples(scraped.text)

    assert scraped.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    mine = {"org": serving.org_id, "version": str(version)}
    assert grew("kiln_inference_requests_total", **mine, outcome="success") == 4
    assert grew("kiln_inference_rows_total", **mine) == 10
    assert grew("kiln_inference_requests_total", **mine, outcome="refused") == 1
    assert grew("kiln_inference_request_duration_seconds_count", org=serving.org_id) == 4
    assert grew("kiln_inference_requests_total", org="", version="", outcome="refused") == 1
    assert not any(("org", "made-up-org") in labels for _name, labels in after)
    assert predictor.get("/metrics").status_code == 401
    assert predictor.get("/metrics", headers=serving.admin).status_code == 403


def test_a_v2_infer_for_a_version_not_served_is_counted_under_its_org(serving: OrgKeys, predictor: TestClient) -> None:
    version = served_version(predictor, serving)
    before = parse_samples(predictor.get("/metrics", headers=ADMIN).text)
    tensor = {"name": "input", "shape": [1, len(FEATURES)], "datatype": "FP32", "data": [1.0] * len(FEATURES)}

    wrong = predictor.post(
        f"/v2/models/{serving.org_id}/versions/v-old/infer", json={"inputs": [tensor]}, headers=serving.viewer
    )
    after = parse_samples(predictor.get("/metrics", headers=ADMIN).text)

    def grew(**labels: str) -> float:
        return sample(after, "kiln_inference_requests_total", **labels) - sample(
            before, "kiln_inference_requests_total", **labels
        )

    assert wrong.status_code == 404 and "is not served" in wrong.json()["error"]
    assert grew(org=serving.org_id, version=str(version), outcome="refused") == 1
    assert grew(org="", version="", outcome="refused") == 0


def hang_up_mid_body(address: str, org: OrgKeys) -> None:
    """Send a predict request's headers and the start of its body, then close the connection."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            (
                f"POST /v1/orgs/{org.org_id}/predict HTTP/1.1\r\nHost: predictor\r\n"
                f"Authorization: {org.viewer['Authorization']}\r\n"
                'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"rows": ['
            ).encode()
        )
        time.sleep(0.2)  # the predictor has started reading the body


def test_a_client_that_hangs_up_mid_body_is_counted_as_disconnected_not_as_a_failure_nor_logged_as_one(
    serving: OrgKeys, fast: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with serving_in_thread(create_app(fast)) as address, httpx.Client(base_url=f"http://{address}") as client:
        body = {"rows": [ai4i_row()]}
        assert eventually(
            lambda: client.post(f"/v1/orgs/{serving.org_id}/predict", json=body, headers=serving.viewer).is_success
        )
        version = client.post(f"/v1/orgs/{serving.org_id}/predict", json=body, headers=serving.viewer).headers[
            "x-model-version"
        ]
        before = parse_samples(client.get("/metrics", headers=ADMIN).text)
        for _ in range(3):
            hang_up_mid_body(address, serving)

        def disconnected() -> float:
            after = parse_samples(client.get("/metrics", headers=ADMIN).text)
            return sample(
                after, "kiln_inference_requests_total", org=serving.org_id, version=version, outcome="disconnected"
            )

        assert eventually(lambda: disconnected() == 3)
        after = parse_samples(client.get("/metrics", headers=ADMIN).text)

    failures = {
        labels: value - before.get((name, labels), 0.0)
        for (name, labels), value in after.items()
        if name == "kiln_inference_requests_total" and ("outcome", "failure") in labels
    }
    assert not any(failures.values()), failures
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


def test_a_predictor_whose_metrics_folder_has_gone_still_answers_metrics_and_shuts_down_whole(
    serving: OrgKeys, fast: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "metrics"
    with TestClient(create_app(fast.model_copy(update={"predictor_metrics_dir": folder}))) as predictor:
        state = predictor.app.state.predictor  # type: ignore[attr-defined]
        assert eventually(lambda: served_version(predictor, serving) is not None)
        version = served_version(predictor, serving)
        shutil.rmtree(folder)

        scraped = predictor.get("/metrics", headers=ADMIN)

        assert scraped.status_code == 200
        mine = {"org": serving.org_id, "version": str(version), "outcome": "success"}
        assert sample(parse_samples(scraped.text), "kiln_inference_requests_total", **mine) >= 1
    assert not state.listener.is_alive() and not state.recorder.is_alive()


def test_the_metrics_token_reads_metrics_and_nothing_else(serving: OrgKeys, predictor: TestClient) -> None:
    scraped = predictor.get("/metrics", headers=SCRAPER)

    assert scraped.status_code == 200 and "kiln_inference_requests_total" in scraped.text
    predict = predictor.post(f"/v1/orgs/{serving.org_id}/predict", json={"rows": [ai4i_row()]}, headers=SCRAPER)
    assert predict.status_code == 401
    assert predictor.get(f"/v2/models/{serving.org_id}", headers=SCRAPER).status_code == 401


def test_the_frameworks_own_refusals_answer_in_kilns_error_format(predictor: TestClient, serving: OrgKeys) -> None:
    unknown = predictor.get("/v2/nothing-here", headers=serving.viewer)
    wrong_method = predictor.delete(f"/v2/models/{serving.org_id}/infer", headers=serving.viewer)

    assert (unknown.status_code, unknown.json()) == (404, {"error": "Not Found", "status": 404})
    assert wrong_method.status_code == 405 and wrong_method.json()["status"] == 405
    assert "POST" in wrong_method.headers["allow"]
