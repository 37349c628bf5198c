"""The Open Inference Protocol (KServe / Triton "V2") over HTTP, so stock clients work unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from services.predictor.models import INPUT_NAME, LABEL_OUTPUT, PROBABILITIES_OUTPUT, LoadedModel
from services.predictor.state import authorize, model_for, read_body, state_of
from services.predictor.v1 import parse_json
from shared.errors import BadRequest, InvalidInput, NotFound

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

SERVER_NAME = "kiln-predictor"
NUMERIC_DATATYPES = {"FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


@router.get("")
async def server_metadata() -> Response:
    return _json({"name": SERVER_NAME, "version": "0.1.0", "extensions": []})


@router.get("/health/live")
async def live() -> Response:
    return _json({"live": True})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    is_ready = state_of(request).ready
    return _json({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{org}")
async def model_metadata(org: str, request: Request) -> Response:
    await authorize(request, org)
    return _json(_metadata(org, await model_for(request, org)))


@router.get("/models/{org}/ready")
async def model_ready(org: str, request: Request) -> Response:
    await authorize(request, org)
    model = await model_for(request, org)
    return _json({"name": org, "version": model.version, "ready": True})


@router.post("/models/{org}/infer")
async def infer(org: str, request: Request) -> Response:
    return await _infer(org, None, request)


@router.post("/models/{org}/versions/{version}/infer")
async def infer_version(org: str, version: str, request: Request) -> Response:
    return await _infer(org, version, request)


async def _infer(org: str, version: str | None, request: Request) -> Response:
    await authorize(request, org)
    payload = parse_json(await read_body(request))
    model = await model_for(request, org)
    if version is not None and version != model.version:
        raise NotFound(f"version {version} of model {org!r} is not the one being served ({model.version})")
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object with `inputs`", field="body")
    features = request_features(model, payload.get("inputs"))
    probabilities = model.probabilities(features)
    response = {
        "model_name": org,
        "model_version": model.version,
        "outputs": _outputs(model, probabilities, _requested_outputs(payload.get("outputs"))),
    }
    if "id" in payload:
        response["id"] = payload["id"]
    return _json(response)


def request_features(model: LoadedModel, inputs: Any) -> np.ndarray:
    """One `input` tensor of shape [rows, n_features], as the metadata describes it."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(f"inputs must hold exactly one tensor named {INPUT_NAME!r}", field="inputs")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise InvalidInput(f"unknown input {tensor.get('name')!r}; this model takes {INPUT_NAME!r}", field="inputs")
    datatype = tensor.get("datatype")
    if datatype not in NUMERIC_DATATYPES:
        raise InvalidInput(f"datatype {datatype!r} is not numeric; send FP32", field="inputs[0].datatype")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) for d in shape)
        or shape[0] < 1
        or shape[1] != model.n_features
    ):
        raise InvalidInput(
            f"shape must be [rows, {model.n_features}] with rows >= 1, not {shape!r}", field="inputs[0].shape"
        )
    return _tensor_data(tensor.get("data"), shape)


def _tensor_data(data: Any, shape: list[int]) -> np.ndarray:
    try:
        values = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInput("data must be numbers, flat or nested by shape", field="inputs[0].data") from None
    if values.size != shape[0] * shape[1]:
        raise InvalidInput(
            f"data holds {values.size} values; shape {shape} needs {shape[0] * shape[1]}", field="inputs[0].data"
        )
    if not np.all(np.isfinite(values)):
        raise InvalidInput("data holds NaN or infinite values", field="inputs[0].data")
    return values.reshape(shape)


def _requested_outputs(outputs: Any) -> set[str]:
    if outputs is None:
        return {LABEL_OUTPUT, PROBABILITIES_OUTPUT}
    names = {str(o.get("name")) for o in outputs if isinstance(o, dict)} if isinstance(outputs, list) else set()
    unknown = names - {LABEL_OUTPUT, PROBABILITIES_OUTPUT}
    if not names or unknown:
        raise InvalidInput(f"outputs may name {LABEL_OUTPUT!r} and {PROBABILITIES_OUTPUT!r}", field="outputs")
    return names


def _outputs(model: LoadedModel, probabilities: np.ndarray, wanted: set[str]) -> list[dict[str, Any]]:
    rows = probabilities.shape[0]
    outputs = []
    if LABEL_OUTPUT in wanted:
        labels = [model.deployed.classes[i] for i in probabilities.argmax(axis=1).tolist()]
        datatype = "INT64" if all(isinstance(c, int) and not isinstance(c, bool) for c in labels) else "BYTES"
        outputs.append({"name": LABEL_OUTPUT, "datatype": datatype, "shape": [rows], "data": labels})
    if PROBABILITIES_OUTPUT in wanted:
        outputs.append(
            {
                "name": PROBABILITIES_OUTPUT,
                "datatype": "FP32",
                "shape": list(probabilities.shape),
                "data": probabilities.ravel().tolist(),
            }
        )
    return outputs


def _metadata(org: str, model: LoadedModel) -> dict[str, Any]:
    classes = model.deployed.classes
    label_type = "INT64" if all(isinstance(c, int) and not isinstance(c, bool) for c in classes) else "BYTES"
    return {
        "name": org,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": "FP32",
                "shape": [-1, model.n_features],
                "parameters": {"features": model.deployed.feature_columns},
            }
        ],
        "outputs": [
            {"name": LABEL_OUTPUT, "datatype": label_type, "shape": [-1]},
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(classes)]},
        ],
        "parameters": {"classes": classes},
    }
