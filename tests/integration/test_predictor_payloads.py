"""Infer payloads, good and bad, on the predictor in-process over real PostgreSQL, Redis and S3: a bad one is refused
with a 4xx whose JSON names the problem and the field, never a 5xx, and the next valid request still succeeds.
Named cases first, then hypothesis properties over arbitrary payloads and mutations of valid ones."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from tritonclient.http import InferResult

from services.predictor.app import create_app
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import OrgKeys
from tests.integration.predictor_support import deploy_quietly
from tests.support.models import FEATURES, ai4i_row, register_model, tiny_model
from tests.support.polling import eventually

HEADER_LENGTH = "Inference-Header-Content-Length"
INDEX = re.compile(r"\[\d+\]")
RAW = "__raw__"  # where a draft keeps a binary input's bytes, next to the JSON that describes them
MAX_BODY_MB = 0.5
AI4I = np.array([[row[name] for name in FEATURES] for row in (ai4i_row(i) for i in range(4))], dtype=np.float32)
# The served org and client are only read by the examples (nothing a request sends changes what is served), so one
# function-scoped pair can be shared by all of a test's examples.
PROPERTY = hypothesis_settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def predictor(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"predictor_max_body_mb": MAX_BODY_MB}))) as client:
        yield client


@dataclass(frozen=True)
class Served:
    predictor: TestClient
    org: OrgKeys

    @property
    def url(self) -> str:
        return f"/v2/models/{self.org.org_id}/infer"

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> httpx2.Response:
        return self.predictor.post(self.url, content=body, headers={**self.org.viewer, **(headers or {})})

    def predict(self, body: bytes) -> httpx2.Response:
        """The same org over V1."""
        return self.predictor.post(f"/v1/orgs/{self.org.org_id}/predict", content=body, headers=self.org.viewer)


@pytest.fixture
def served(org: OrgKeys, engine: Engine, store: ObjectStore, predictor: TestClient) -> Served:
    deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, tiny_model()))
    served = Served(predictor, org)
    assert eventually(lambda: served.post(valid_body()).status_code == 200)
    return served


def valid_body(rows: int = 2) -> bytes:
    tensor = {"name": "input", "shape": [rows, len(FEATURES)], "datatype": "FP32", "data": AI4I[:rows].tolist()}
    return orjson.dumps({"inputs": [tensor]})


def assert_refused(response: httpx2.Response) -> None:
    """A refusal: a 4xx whose JSON error names the problem and the field."""
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["field"], str) and body["field"], body
    # the spread of cases, for --hypothesis-show-statistics
    event(f"{response.status_code} {re.sub(INDEX, '[i]', body['field'])}")


def assert_answered_cleanly(response: httpx2.Response) -> None:
    """For a request that may or may not be valid: refused as assert_refused says, or a 200 tritonclient can read
    whose outputs hold a prediction for each of the same one or more rows."""
    if response.status_code != 200:
        assert_refused(response)
        return
    event("200")
    result = read(response)
    outputs = result.get_response()["outputs"]
    rows = [result.as_numpy(output["name"]).shape[0] for output in outputs]
    assert outputs and rows == [output["shape"][0] for output in outputs] and len(set(rows)) == 1 and rows[0] >= 1


def assert_still_serving(served: Served) -> None:
    assert served.post(valid_body()).status_code == 200


# Drafts: infer requests as data, so that tests can break them in chosen or arbitrary ways before encoding them


@dataclass
class Draft:
    header: Any
    length_change: int = 0
    length_text: str | None = None
    splice: tuple[int, bytes] | None = None  # bytes inserted into the JSON text at a position
    extra_headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> tuple[bytes, dict[str, str]]:
        """The body (JSON, then each binary input's bytes in input order) and the headers it needs."""
        header = copy.deepcopy(self.header)
        inputs = header.get("inputs") if isinstance(header, dict) else None
        tensors = [t for t in inputs if isinstance(t, dict)] if isinstance(inputs, list) else []
        blobs = [bytes(tensor.pop(RAW)) for tensor in tensors if RAW in tensor]
        text = orjson.dumps(header)
        if self.splice is not None:
            position, inserted = self.splice
            text = text[:position] + inserted + text[position:]
        headers = dict(self.extra_headers)
        if blobs or self.length_text is not None or self.length_change:
            headers[HEADER_LENGTH] = self.length_text or str(len(text) + self.length_change)
        return text + b"".join(blobs), headers


def tensor(name: str, values: np.ndarray, *, binary: bool, nested: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "shape": list(values.shape), "datatype": "FP32"}
    if binary:
        spec["parameters"] = {"binary_data_size": values.nbytes}
        spec[RAW] = bytearray(values.astype("<f4").tobytes())
    else:
        spec["data"] = values.tolist() if nested else values.ravel().tolist()
    return spec


def draft_of(values: np.ndarray, *, binary: bool = False, per_feature: bool = False, nested: bool = True) -> Draft:
    if per_feature:
        columns = [tensor(name, values[:, i], binary=binary, nested=nested) for i, name in enumerate(FEATURES)]
        return Draft({"inputs": columns})
    return Draft({"inputs": [tensor("input", values, binary=binary, nested=nested)]})


def valid_draft(rows: int = 2, **form: bool) -> Draft:
    return draft_of(AI4I[:rows], **form)


def changed(draft: Draft, change: Callable[[Draft], object]) -> Draft:
    change(draft)
    return draft


def set_input(index: int, **changes: Any) -> Callable[[Draft], None]:
    return lambda draft: draft.header["inputs"][index].update(changes)


def copy_input(index: int, **changes: Any) -> Callable[[Draft], None]:
    return lambda draft: draft.header["inputs"].append({**copy.deepcopy(draft.header["inputs"][index]), **changes})


def binary_value(value: float, position: int) -> Callable[[Draft], None]:
    def change(draft: Draft) -> None:
        draft.header["inputs"][0][RAW][position * 4 : position * 4 + 4] = np.float32(value).tobytes()

    return change


REFUSALS: list[tuple[str, Draft, int, str]] = [
    ("not JSON", Draft(valid_draft().header, splice=(0, b"{")), 400, "body"),
    ("JSON array", Draft([1, 2]), 400, "body"),
    ("no inputs", Draft({"outputs": []}), 422, "inputs"),
    ("input not an object", Draft({"inputs": [7]}), 422, "inputs[0]"),
    ("wrong columns", changed(valid_draft(), set_input(0, shape=[2, 5], data=[1.0] * 10)), 422, "inputs[0].shape"),
    (
        "three dimensions",
        changed(valid_draft(), set_input(0, shape=[2, 6, 1], data=[1.0] * 12)),
        422,
        "inputs[0].shape",
    ),
    ("negative dimension", changed(valid_draft(), set_input(0, shape=[-1, 6])), 422, "inputs[0].shape"),
    ("BYTES", changed(valid_draft(), set_input(0, datatype="BYTES")), 422, "inputs[0].datatype"),
    ("BOOL", changed(valid_draft(), set_input(0, datatype="BOOL")), 422, "inputs[0].datatype"),
    ("BF16", changed(valid_draft(binary=True), set_input(0, datatype="BF16")), 422, "inputs[0].datatype"),
    ("size against shape", changed(valid_draft(), set_input(0, shape=[3, 6])), 422, "inputs[0].data"),
    ("strings", changed(valid_draft(1), set_input(0, data=["1"] * 6)), 422, "inputs[0].data"),
    ("ragged", changed(valid_draft(), set_input(0, data=[[1.0] * 6, [1.0] * 5])), 422, "inputs[0].data"),
    ("nested deeper than shape", changed(valid_draft(), set_input(0, data=[[[1.0] * 6]] * 2)), 422, "inputs[0].data"),
    ("nested across the shape", changed(valid_draft(), set_input(0, data=[[1.0] * 4] * 3)), 422, "inputs[0].data"),
    ("INT32 fractions", changed(valid_draft(), set_input(0, datatype="INT32")), 422, "inputs[0].data"),
    ("INT8 overflow", changed(valid_draft(1), set_input(0, datatype="INT8", data=[1000] * 6)), 422, "inputs[0].data"),
    (
        "FP16 overflow",
        changed(valid_draft(1), set_input(0, datatype="FP16", data=[0, 300, 310, 1500, 40, 1e6])),
        422,
        "inputs[0].data",
    ),
    (
        "a boolean among integers",
        changed(valid_draft(1), set_input(0, data=[True, 1, 2, 3, 4, 5])),
        422,
        "inputs[0].data",
    ),
    (
        "a boolean among nested floats",
        changed(valid_draft(2), set_input(0, data=[[0.5] * 6, [0.5, 0.5, False, 0.5, 0.5, 0.5]])),
        422,
        "inputs[0].data",
    ),
    ("beyond FP32", changed(valid_draft(1), set_input(0, datatype="FP64", data=[1e39] * 6)), 422, "inputs[0].data"),
    ("NaN", changed(valid_draft(binary=True), binary_value(float("nan"), 3)), 422, "inputs[0].data"),
    ("+Inf", changed(valid_draft(binary=True), binary_value(float("inf"), 0)), 422, "inputs[0].data"),
    ("-Inf", changed(valid_draft(binary=True), binary_value(float("-inf"), 11)), 422, "inputs[0].data"),
    ("empty batch", valid_draft(0), 422, "inputs[0].shape"),
    ("empty batch per feature", valid_draft(0, per_feature=True), 422, "inputs[0].shape"),
    (
        "a dimension beside 0 past any batch",
        changed(valid_draft(0), set_input(0, shape=[0, 2**62])),
        422,
        "inputs[0].shape",
    ),
    ("rows of nothing past any batch", changed(valid_draft(0), set_input(0, shape=[2**62, 0])), 422, "inputs[0].shape"),
    (
        "a feature's rows past any batch",
        changed(valid_draft(0, per_feature=True), set_input(0, shape=[2**62])),
        422,
        "inputs[0].shape",
    ),
    (
        "missing feature",
        changed(valid_draft(per_feature=True), lambda d: d.header["inputs"].pop(4)),
        422,
        "inputs.torque",
    ),
    ("unknown feature", changed(valid_draft(per_feature=True), copy_input(0, name="humidity")), 422, "inputs[6].name"),
    ("no known name", changed(valid_draft(), set_input(0, name="features")), 422, "inputs"),
    ("matrix and a feature", changed(valid_draft(), copy_input(0, name="torque")), 422, "inputs[1].name"),
    ("a feature twice", changed(valid_draft(per_feature=True), copy_input(0)), 422, "inputs[6].name"),
    (
        "rows differ",
        changed(valid_draft(per_feature=True), set_input(2, shape=[1], data=[1.0])),
        422,
        "inputs[2].shape",
    ),
    ("data and binary", changed(valid_draft(binary=True), set_input(0, data=[0.0] * 12)), 422, "inputs[0].data"),
    (
        "binary cut short",
        changed(valid_draft(binary=True), lambda d: d.header["inputs"][0][RAW].__delitem__(slice(-5, None))),
        400,
        "inputs[0].parameters.binary_data_size",
    ),
    (
        "bytes after the tensors",
        changed(valid_draft(binary=True), lambda d: d.header["inputs"][0][RAW].extend(b"\0\0\0\0")),
        400,
        "body",
    ),
    (
        "binary size against shape",
        changed(valid_draft(binary=True), set_input(0, shape=[1, 6])),
        422,
        "inputs[0].parameters.binary_data_size",
    ),
    ("header length not a number", Draft(valid_draft().header, length_text="twelve"), 400, HEADER_LENGTH),
    ("header length -0", Draft(valid_draft().header, length_text="-0"), 400, HEADER_LENGTH),
    ("header length past the body", Draft(valid_draft(binary=True).header, length_change=10**6), 400, HEADER_LENGTH),
    ("header length short", Draft(valid_draft(binary=True).header, length_change=-3), 400, "body"),
    (
        "shared memory",
        changed(valid_draft(), set_input(0, parameters={"shared_memory_region": "r"})),
        422,
        "inputs[0].parameters.shared_memory_region",
    ),
    ("unknown output", Draft({**valid_draft().header, "outputs": [{"name": "score"}]}), 422, "outputs[0].name"),
    (
        "classification",
        Draft({**valid_draft().header, "outputs": [{"name": "label", "parameters": {"classification": 2}}]}),
        422,
        "outputs[0].parameters.classification",
    ),
    (
        "binary_data not a flag",
        Draft({**valid_draft().header, "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]}),
        422,
        "outputs[0].parameters.binary_data",
    ),
    (
        "binary_data_output not a flag",
        Draft({**valid_draft().header, "parameters": {"binary_data_output": 1}}),
        422,
        "parameters.binary_data_output",
    ),
    ("id not a string", Draft({**valid_draft().header, "id": 42}), 422, "id"),
    ("compressed", Draft(valid_draft().header, extra_headers={"Content-Encoding": "gzip"}), 415, "Content-Encoding"),
]


def test_each_bad_request_is_refused_naming_the_field(served: Served) -> None:
    """All cases against one served org (setting one up costs more than the cases), each followed by a valid
    request; the mismatches are reported together."""
    mismatches = {}
    for name, draft, status, named in REFUSALS:
        response = served.post(*draft.encode())
        if (response.status_code, response.json().get("field")) != (status, named):
            mismatches[name] = (response.status_code, response.text)
        assert_still_serving(served)
    assert mismatches == {}


@pytest.mark.parametrize("binary", [AI4I[:2].tobytes(), b"xx"], ids=["not UTF-8", "UTF-8"])
def test_binary_data_without_the_header_length_is_refused_naming_that_header(served: Served, binary: bytes) -> None:
    """Without it the whole body is JSON: the binary bytes after the JSON header read as broken JSON (or text that
    is not UTF-8), which told the client nothing of the header it left out."""
    body, headers = valid_draft(binary=True).encode()
    del headers[HEADER_LENGTH]
    response = served.post(body[: -AI4I[:2].nbytes] + binary, headers)
    assert (response.status_code, response.json()["field"]) == (400, HEADER_LENGTH), response.text
    assert HEADER_LENGTH in response.json()["error"] and "binary" in response.json()["error"]
    assert_still_serving(served)


def test_a_body_over_the_limit_is_refused(served: Served) -> None:
    rows = int(MAX_BODY_MB * 1024 * 1024 / (4 * len(FEATURES))) + 1
    response = served.post(*draft_of(np.ones((rows, len(FEATURES)), np.float32), binary=True).encode())
    assert response.status_code == 413 and "MB" in response.json()["error"]
    assert response.json()["field"] == "body"
    assert_still_serving(served)


@pytest.mark.parametrize("length", ["abc", "1e3", "0x10"])
def test_a_content_length_that_is_no_byte_count_is_no_server_error(served: Served, length: str) -> None:
    """The body's own bytes count against the limit instead (uvicorn refuses such a header before the app)."""
    response = served.post(valid_body(1), {"Content-Length": length})
    assert response.status_code == 200, response.text
    assert_still_serving(served)


def test_every_input_form_gives_the_same_answer(served: Served) -> None:
    reference = served.post(valid_body(3)).json()
    expected = next(o for o in reference["outputs"] if o["name"] == "probabilities")["data"]
    for form in ({"binary": True}, {"per_feature": True}, {"binary": True, "per_feature": True}, {"nested": False}):
        response = served.post(*valid_draft(3, **form).encode())
        assert response.status_code == 200, (form, response.text)
        probabilities = read(response).as_numpy("probabilities")
        np.testing.assert_array_equal(probabilities.ravel(), np.array(expected, np.float32), err_msg=str(form))


# Properties

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # the range JSON encoders (orjson here) can write
    | st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN or Infinity; binary inputs carry those
    | st.text(max_size=6)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
NUMBERS = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([True, None, "1.5", 1e39, -1e39])
)
TENSOR_FIELDS = {
    "name": st.sampled_from([*FEATURES, "input", "label", ""]) | JSON_VALUES,
    "shape": st.lists(st.integers(-2, 8), max_size=3) | JSON_VALUES,
    "datatype": st.sampled_from(["FP32", "FP64", "FP16", "INT8", "INT64", "UINT64", "BOOL", "BYTES", "BF16", "fp32"])
    | JSON_VALUES,
    "data": st.lists(NUMBERS, max_size=24) | JSON_VALUES,
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-4, 64)}) | JSON_VALUES,
}
OUTPUT_SPECS = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["label", "probabilities", "score"]) | JSON_VALUES,
            "parameters": st.fixed_dictionaries(
                {}, optional={"binary_data": st.booleans() | JSON_VALUES, "classification": st.integers(0, 3)}
            )
            | JSON_VALUES,
        },
    ),
    max_size=3,
)
REQUEST_FIELDS = {
    "inputs": st.lists(st.fixed_dictionaries({}, optional=TENSOR_FIELDS), max_size=7) | JSON_VALUES,
    "outputs": OUTPUT_SPECS | JSON_VALUES,
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": st.booleans() | JSON_VALUES}) | JSON_VALUES,
    "id": st.text(max_size=4) | JSON_VALUES,
}


@st.composite
def valid_drafts(draw: st.DrawFn, binary: bool | None = None) -> Draft:
    """A valid request in any form; `binary` chooses JSON (False) or binary (True) tensors rather than either."""
    rows = draw(st.integers(1, 4))
    cells = draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=rows * len(FEATURES), max_size=rows * len(FEATURES)))
    values = np.array(cells, dtype=np.float32).reshape(rows, len(FEATURES))
    form = {key: draw(st.booleans()) for key in ("per_feature", "nested")}
    form["binary"] = draw(st.booleans()) if binary is None else binary
    draft = draft_of(values, **form)
    draft.header["outputs"] = draw(st.none() | st.sampled_from([[{"name": "label"}], [{"name": "probabilities"}]]))
    if draw(st.booleans()):
        draft.header["parameters"] = {"binary_data_output": draw(st.booleans())}
    return draft


def read(response: httpx2.Response) -> InferResult:
    """The response as tritonclient reads it: a check on the binary framing as much as on the values."""
    length = response.headers.get(HEADER_LENGTH)
    return InferResult.from_response_body(response.content, header_length=int(length) if length else None)


def some_input(draft: Draft, data: st.DataObject) -> dict[str, Any] | None:
    inputs = draft.header.get("inputs") if isinstance(draft.header, dict) else None
    candidates = [t for t in inputs if isinstance(t, dict)] if isinstance(inputs, list) else []
    return data.draw(st.sampled_from(candidates)) if candidates else None


def replace_input_field(draft: Draft, data: st.DataObject) -> None:
    if (spec := some_input(draft, data)) is not None:
        key = data.draw(st.sampled_from(sorted(TENSOR_FIELDS)))
        spec[key] = data.draw(TENSOR_FIELDS[key])


def drop_input_field(draft: Draft, data: st.DataObject) -> None:
    if (spec := some_input(draft, data)) is not None:
        spec.pop(data.draw(st.sampled_from([*TENSOR_FIELDS, RAW])), None)


def drop_or_repeat_input(draft: Draft, data: st.DataObject) -> None:
    inputs = draft.header.get("inputs") if isinstance(draft.header, dict) else None
    if isinstance(inputs, list) and inputs:
        index = data.draw(st.integers(0, len(inputs) - 1))
        if data.draw(st.booleans()):
            inputs.pop(index)
        else:
            inputs.insert(data.draw(st.integers(0, len(inputs))), copy.deepcopy(inputs[index]))


def poke_value(draft: Draft, data: st.DataObject) -> None:
    """One value made NaN, ±Inf, huge or not a number, in the JSON data or in the binary bytes."""
    spec = some_input(draft, data)
    if spec is not None and isinstance(spec.get(RAW), bytearray) and len(spec[RAW]) >= 4:
        at = 4 * data.draw(st.integers(0, len(spec[RAW]) // 4 - 1))
        special = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 3.4e38, -0.0]))
        spec[RAW][at : at + 4] = np.float32(special).tobytes()
    elif spec is not None and isinstance(spec.get("data"), list) and spec["data"]:
        values, index = some_value(spec["data"], data)
        values[index] = data.draw(NUMBERS)


def some_value(values: list[Any], data: st.DataObject) -> tuple[list[Any], int]:
    """A leaf of nested lists, as the list that holds it and its index there."""
    index = data.draw(st.integers(0, len(values) - 1))
    while isinstance(values[index], list) and values[index]:
        values, index = values[index], data.draw(st.integers(0, len(values[index]) - 1))
    return values, index


def resize_binary(draft: Draft, data: st.DataObject) -> None:
    spec = some_input(draft, data)
    if spec is not None and isinstance(spec.get(RAW), bytearray):
        if data.draw(st.booleans()):
            del spec[RAW][data.draw(st.integers(0, len(spec[RAW]))) :]
        else:
            spec[RAW].extend(data.draw(st.binary(min_size=1, max_size=9)))


def skew_header_length(draft: Draft, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        draft.length_change = data.draw(st.integers(-6, 6))
    else:
        draft.length_text = data.draw(st.text(alphabet="0123456789+-_ x.", min_size=1, max_size=6))


def splice_text(draft: Draft, data: st.DataObject) -> None:
    inserted = data.draw(st.sampled_from([b"NaN", b"Infinity", b"-", b"]", b"{", b",", b"\xff", b"\x00"]))
    draft.splice = (data.draw(st.integers(0, 80)), inserted)


def replace_request_field(draft: Draft, data: st.DataObject) -> None:
    if isinstance(draft.header, dict):
        key = data.draw(st.sampled_from(sorted(REQUEST_FIELDS)))
        draft.header[key] = data.draw(REQUEST_FIELDS[key])


MUTATIONS = [
    replace_input_field,
    drop_input_field,
    drop_or_repeat_input,
    poke_value,
    resize_binary,
    skew_header_length,
    splice_text,
    replace_request_field,
]


@PROPERTY
@given(draft=valid_drafts())
def test_a_valid_request_in_any_form_succeeds(served: Served, draft: Draft) -> None:
    response = served.post(*draft.encode())
    assert response.status_code == 200, response.text
    probabilities = read(response).as_numpy("probabilities")
    assert probabilities is None or (np.isfinite(probabilities).all() and probabilities.shape[1] == 2)


@PROPERTY
@given(draft=valid_drafts(), data=st.data())
def test_a_broken_valid_request_is_answered_cleanly(served: Served, draft: Draft, data: st.DataObject) -> None:
    """A mutation may leave the request valid (a repeated input dropped, a value poked to another number): the answer
    is a 4xx naming the problem, or a 200 with a prediction per row."""
    for mutate in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        mutate(draft, data)
    assert_answered_cleanly(served.post(*draft.encode()))
    assert_still_serving(served)


@PROPERTY
@given(payload=JSON_VALUES)
def test_an_arbitrary_json_value_is_refused(served: Served, payload: Any) -> None:
    """Never a request: its objects' keys are at most 6 characters, and a tensor needs a `datatype`."""
    assert_refused(served.post(orjson.dumps(payload)))
    assert_still_serving(served)


@PROPERTY
@given(payload=st.fixed_dictionaries({}, optional=REQUEST_FIELDS))
def test_a_request_of_arbitrary_fields_is_answered_cleanly(served: Served, payload: Any) -> None:
    """Its fields may happen to make a valid request; without inputs it never does."""
    response = served.post(orjson.dumps(payload))
    if "inputs" in payload:
        assert_answered_cleanly(response)
    else:
        assert_refused(response)
    assert_still_serving(served)


@PROPERTY
@given(
    body=st.binary(max_size=200),
    length=st.none() | st.integers(-2, 250).map(str) | st.text(alphabet="0123456789+-_ x.", max_size=6),
)
def test_arbitrary_bytes_are_refused(served: Served, body: bytes, length: str | None) -> None:
    assert_refused(served.post(body, {HEADER_LENGTH: length} if length is not None else None))
    assert_still_serving(served)


@PROPERTY
@given(draft=valid_drafts(binary=False), data=st.data())
def test_a_boolean_among_the_numbers_is_refused(served: Served, draft: Draft, data: st.DataObject) -> None:
    """numpy reads true as 1 among numbers: it must be refused as an all-boolean list is, and as V1 refuses it."""
    position = data.draw(st.integers(0, len(draft.header["inputs"]) - 1))
    values, index = some_value(draft.header["inputs"][position]["data"], data)
    values[index] = data.draw(st.booleans())

    response = served.post(*draft.encode())

    assert (response.status_code, response.json().get("field")) == (422, f"inputs[{position}].data"), response.text


FP16_EDGES = st.sampled_from([65504.0, 65519.0, 65520.0, -65520.0, 1e6, -1e6, 6e-8])


@PROPERTY
@given(cells=st.lists(st.floats(-7e4, 7e4) | st.integers(-70_000, 70_000) | FP16_EDGES, min_size=6, max_size=6))
def test_fp16_data_is_refused_exactly_when_fp16_cannot_hold_it(served: Served, cells: list[float]) -> None:
    """As for FP32: a number that FP16 would make ±Inf is refused rather than scored as something it is not."""
    tensor = {"name": "input", "shape": [1, len(FEATURES)], "datatype": "FP16", "data": cells}
    with np.errstate(over="ignore"):
        held = bool(np.isfinite(np.asarray(cells, dtype=np.float64).astype(np.float16)).all())

    response = served.post(orjson.dumps({"inputs": [tensor]}))

    if held:
        assert response.status_code == 200, response.text
    else:
        assert (response.status_code, response.json().get("field")) == (422, "inputs[0].data"), response.text
        assert "FP16 (±65504)" in response.json()["error"]


INTEGER_EDGES = st.sampled_from([-(2**63), -129, -1, 0, 127, 128, 255, 256, 2**63 - 1, 2**63, 2**64 - 1])


@PROPERTY
@given(
    datatype=st.sampled_from(["INT8", "UINT8", "INT64", "UINT64"]),
    cells=st.lists(st.integers(-(2**63), 2**64 - 1) | INTEGER_EDGES, min_size=6, max_size=6),
)
def test_whole_numbers_are_taken_exactly_when_their_integer_datatype_holds_them(
    served: Served, datatype: str, cells: list[int]
) -> None:
    """numpy reads an integer past INT64's range beside smaller ones as a float: UINT64 data holding 2^63 or more
    was refused as "not whole numbers within the range of UINT64"."""
    limits = np.iinfo(np.dtype(datatype.lower()))
    tensor = {"name": "input", "shape": [1, len(FEATURES)], "datatype": datatype, "data": cells}

    response = served.post(orjson.dumps({"inputs": [tensor]}))

    if all(limits.min <= cell <= limits.max for cell in cells):
        assert response.status_code == 200, response.text
    else:
        assert (response.status_code, response.json().get("field")) == (422, "inputs[0].data"), response.text
        assert f"within the range of {datatype}" in response.json()["error"]


# V1 bodies written as text, where a key can be given twice (JSON parsers keep the last one)

Member = tuple[str, str]  # a key and its value, as JSON text


@st.composite
def members_of(
    draw: st.DrawFn, members: list[Member], value_of: Callable[[str], st.SearchStrategy[str]]
) -> list[Member]:
    """The members in any order, one key maybe given a second time with a value of its own."""
    chosen = list(draw(st.permutations(members)))
    if draw(st.booleans()):
        name = draw(st.sampled_from([name for name, _ in members]))
        chosen.insert(draw(st.integers(0, len(chosen))), (name, draw(value_of(name))))
    return chosen


def first_repeated(members: list[Member]) -> str | None:
    names = [name for name, _ in members]
    return next((name for index, name in enumerate(names) if name in names[:index]), None)


@st.composite
def v1_texts(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A V1 body as text, keys maybe repeated in the rows or the body, maybe colons in strings; with the field its
    refusal must name, or None for a body to answer."""
    spacing = draw(st.sampled_from(["", " ", "\n\t "]))
    number = st.floats(-1e4, 1e4).map(repr)

    def text_of(members: list[Member]) -> str:
        return (
            "{" + ",".join(f"{orjson.dumps(name).decode()}{spacing}:{spacing}{value}" for name, value in members) + "}"
        )

    rows = [
        draw(members_of([(name, draw(number)) for name in FEATURES], lambda _: number))
        for _ in range(draw(st.integers(1, 3)))
    ]
    rows_value = "[" + ",".join(text_of(row) for row in rows) + "]"
    note = st.text(alphabet='ab:{}",\\', max_size=8).map(lambda text: orjson.dumps(text).decode())
    body = [("rows", rows_value), *([("note", draw(note))] if draw(st.booleans()) else [])]
    # A second `rows` holds the same rows, so that the body is refused for the repeated key and nothing else.
    body = draw(members_of(body, lambda name: st.just(rows_value) if name == "rows" else note))
    repeated = first_repeated(body)
    if repeated is None:
        in_rows = ((index, first_repeated(row)) for index, row in enumerate(rows))
        repeated = next((f"rows[{index}].{name}" for index, name in in_rows if name is not None), None)
    return text_of(body).encode(), repeated


@PROPERTY
@given(body=v1_texts())
def test_v1_refuses_a_key_given_twice_and_only_that(served: Served, body: tuple[bytes, str | None]) -> None:
    text, repeated = body

    response = served.predict(text)

    if repeated is None:
        assert response.status_code == 200, response.text
    else:
        assert (response.status_code, response.json().get("field")) == (422, repeated), response.text
