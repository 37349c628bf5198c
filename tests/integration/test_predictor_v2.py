"""The Open Inference Protocol as the stock `tritonclient.http` client speaks it, unchanged, against the predictor
under a real uvicorn over real PostgreSQL, Redis and S3."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from sqlalchemy import Engine
from tritonclient.utils import InferenceServerException

from services.predictor.app import create_app
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import OrgKeys
from tests.integration.predictor_support import deploy_quietly
from tests.support.models import FEATURES, ai4i_row, register_model, tiny_model
from tests.support.polling import eventually
from tests.support.threaded_server import serving_in_thread

ROWS = [ai4i_row(i) for i in range(5)]


@pytest.fixture
def address(settings: Settings) -> Iterator[str]:
    with serving_in_thread(create_app(settings.model_copy(update={"predictor_reconcile_s": 0.5}))) as address:
        yield address


@pytest.fixture
def client(address: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=address) as client:
        yield client


@dataclass(frozen=True)
class Served:
    org: OrgKeys
    version: str

    @property
    def name(self) -> str:
        return self.org.org_id

    def auth(self) -> dict[str, str]:
        """A fresh dict per call: tritonclient adds Inference-Header-Content-Length to the headers it is given."""
        return dict(self.org.viewer)


@pytest.fixture
def served(org: OrgKeys, engine: Engine, store: ObjectStore, client: triton.InferenceServerClient) -> Served:
    version = register_model(engine, store, org.org_id, tiny_model())
    deploy_quietly(engine, org.org_id, version)
    assert eventually(lambda: client.is_model_ready(org.org_id, version, headers=dict(org.viewer)))
    return Served(org, version)


def v1_predictions(address: str, served: Served) -> list[dict[str, object]]:
    answer = httpx.post(
        f"http://{address}/v1/orgs/{served.name}/predict", json={"rows": ROWS}, headers=served.auth(), timeout=10
    )
    assert answer.status_code == 200, answer.text
    return list(answer.json()["predictions"])


def matrix_input(binary: bool = True) -> triton.InferInput:
    matrix = np.array([[row[name] for name in FEATURES] for row in ROWS], dtype=np.float32)
    return triton.InferInput("input", list(matrix.shape), "FP32").set_data_from_numpy(matrix, binary_data=binary)


def assert_same_as_v1(result: triton.InferResult, address: str, served: Served) -> None:
    """Probabilities equal to the last bit: both protocols run the same FP32 rows through the same session."""
    expected = v1_predictions(address, served)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(ROWS), 2)
    np.testing.assert_array_equal(probabilities[:, 1], np.array([p["score"] for p in expected], dtype=np.float32))
    assert result.as_numpy("label").tolist() == [p["label"] for p in expected]
    assert result.get_response()["model_version"] == served.version


def test_server_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert eventually(client.is_server_ready)
    metadata = client.get_server_metadata()
    assert metadata["name"] == "kiln-predictor" and metadata["version"]
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_names_inputs_outputs_and_version(served: Served, client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata(served.name, headers=served.auth())
    assert metadata == client.get_model_metadata(served.name, served.version, headers=served.auth())
    assert metadata["name"] == served.name and metadata["versions"] == [served.version]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, len(FEATURES)], "parameters": {"features": FEATURES}}
    ]
    assert metadata["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ]


def test_model_readiness_follows_the_served_version(
    served: Served, engine: Engine, store: ObjectStore, client: triton.InferenceServerClient
) -> None:
    assert client.is_model_ready(served.name, headers=served.auth())
    assert client.is_model_ready(served.name, served.version, headers=served.auth())
    assert not client.is_model_ready(served.name, "v-none", headers=served.auth())
    assert not client.is_model_ready(served.name)  # no key
    newer = register_model(engine, store, served.name, tiny_model(seed=1))
    deploy_quietly(engine, served.name, newer)
    assert eventually(lambda: client.is_model_ready(served.name, newer, headers=served.auth()))
    assert not client.is_model_ready(served.name, served.version, headers=served.auth())


def test_binary_infer_gives_what_v1_gives(served: Served, client: triton.InferenceServerClient, address: str) -> None:
    result = client.infer(served.name, [matrix_input()], request_id="r-1", headers=served.auth())
    assert result.get_response()["id"] == "r-1"
    assert all("binary_data_size" in output["parameters"] for output in result.get_response()["outputs"])
    assert_same_as_v1(result, address, served)


def test_json_infer_gives_what_v1_gives(served: Served, client: triton.InferenceServerClient, address: str) -> None:
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("label", "probabilities")]
    result = client.infer(served.name, [matrix_input(binary=False)], outputs=outputs, headers=served.auth())
    assert all("data" in output for output in result.get_response()["outputs"])
    assert_same_as_v1(result, address, served)


def test_one_tensor_per_feature_in_any_numeric_type(
    served: Served, client: triton.InferenceServerClient, address: str
) -> None:
    inputs = []
    for index, name in enumerate(FEATURES):
        column = np.array([[row[name]] for row in ROWS], dtype=np.float64 if index % 2 else np.float32)
        datatype = "FP64" if index % 2 else "FP32"
        inputs.append(triton.InferInput(name, [len(ROWS), 1], datatype).set_data_from_numpy(column, index < 3))
    result = client.infer(served.name, inputs[::-1], headers=served.auth())
    assert_same_as_v1(result, address, served)


def test_infer_for_a_version_answers_only_for_the_served_one(
    served: Served, client: triton.InferenceServerClient, address: str
) -> None:
    result = client.infer(served.name, [matrix_input()], model_version=served.version, headers=served.auth())
    assert_same_as_v1(result, address, served)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(served.name, [matrix_input()], model_version="v-none", headers=served.auth())
    assert refused.value.status() == "404"
    assert "v-none" in refused.value.message() and served.version in refused.value.message()


def test_a_refusal_reaches_the_client_with_its_reason(served: Served, client: triton.InferenceServerClient) -> None:
    values = np.zeros((2, len(FEATURES)), dtype=np.float32)
    values[1, 3] = np.nan
    nan_input = triton.InferInput("input", list(values.shape), "FP32").set_data_from_numpy(values)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(served.name, [nan_input], headers=served.auth())
    assert refused.value.status() == "422" and "NaN" in refused.value.message()
    with pytest.raises(InferenceServerException) as unauthorized:
        client.infer(served.name, [matrix_input()])
    assert unauthorized.value.status() == "401"
    assert client.infer(served.name, [matrix_input()], headers=served.auth()).as_numpy("label") is not None


def test_classes_beyond_int64_come_back_as_uint64_labels(
    org: OrgKeys, engine: Engine, store: ObjectStore, client: triton.InferenceServerClient, address: str
) -> None:
    """Unsigned classes of 2^63 and more, as a uint64 target trains to, fit no INT64 label; V2 answers UINT64."""
    classes = [3, 2**63 + 5]
    version = register_model(engine, store, org.org_id, tiny_model(), classes=classes)
    deploy_quietly(engine, org.org_id, version)
    served = Served(org, version)
    assert eventually(lambda: client.is_model_ready(org.org_id, version, headers=served.auth()))
    metadata = client.get_model_metadata(served.name, headers=served.auth())
    assert metadata["outputs"][0] == {"name": "label", "datatype": "UINT64", "shape": [-1]}
    for binary in (True, False):
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")]
        result = client.infer(served.name, [matrix_input()], outputs=outputs, headers=served.auth())
        assert result.as_numpy("label").dtype == np.uint64
        assert_same_as_v1(result, address, served)
    assert {p["label"] for p in v1_predictions(address, served)} <= set(classes)


@pytest.mark.parametrize(
    ("classes", "datatype", "dtype"), [([False, True], "BOOL", np.bool_), ([0.0, 1.5], "FP64", np.float64)]
)
def test_boolean_and_float_classes_come_back_as_bool_and_fp64_labels(
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    client: triton.InferenceServerClient,
    address: str,
    classes: list[object],
    datatype: str,
    dtype: type,
) -> None:
    """As text (b'False', b'0.0'), every label of a boolean target would read True to `astype(bool)`; then a model
    with the integer classes equal to them in Python (0 == False == 0.0) still answers INT64."""
    version = register_model(engine, store, org.org_id, tiny_model(), classes=classes)
    deploy_quietly(engine, org.org_id, version)
    served = Served(org, version)
    assert eventually(lambda: client.is_model_ready(org.org_id, version, headers=served.auth()))
    metadata = client.get_model_metadata(served.name, headers=served.auth())
    assert metadata["outputs"][0] == {"name": "label", "datatype": datatype, "shape": [-1]}
    for binary in (True, False):
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")]
        result = client.infer(served.name, [matrix_input()], outputs=outputs, headers=served.auth())
        assert result.as_numpy("label").dtype == dtype
        assert_same_as_v1(result, address, served)
    integers = register_model(engine, store, org.org_id, tiny_model(), classes=[0, 1])
    deploy_quietly(engine, org.org_id, integers)
    assert eventually(lambda: client.is_model_ready(org.org_id, integers, headers=served.auth()))
    assert client.get_model_metadata(served.name, headers=served.auth())["outputs"][0]["datatype"] == "INT64"


def test_a_feature_named_input_still_takes_one_tensor_per_feature(
    org: OrgKeys, engine: Engine, store: ObjectStore, client: triton.InferenceServerClient, address: str
) -> None:
    """`input` is also the matrix's name: a model with a feature of that name takes both forms the README promises."""
    features = ["input", *FEATURES[1:]]
    version = register_model(engine, store, org.org_id, tiny_model(), feature_columns=features)
    deploy_quietly(engine, org.org_id, version)
    served = Served(org, version)
    assert eventually(lambda: client.is_model_ready(org.org_id, version, headers=served.auth()))
    rows = [dict(zip(features, row.values(), strict=True)) for row in ROWS]
    answer = httpx.post(f"http://{address}/v1/orgs/{org.org_id}/predict", json={"rows": rows}, headers=served.auth())
    expected = np.array([p["score"] for p in answer.json()["predictions"]], dtype=np.float32)
    per_feature = [
        triton.InferInput(name, [len(ROWS)], "FP32").set_data_from_numpy(
            np.array([row[name] for row in rows], dtype=np.float32)
        )
        for name in features
    ]
    for inputs in (per_feature, per_feature[::-1], [matrix_input()]):
        result = client.infer(served.name, inputs, headers=served.auth())
        np.testing.assert_array_equal(result.as_numpy("probabilities")[:, 1], expected)
