"""The Open Inference Protocol (KServe / Triton "V2") over HTTP, so stock clients such as `tritonclient.http` work
unchanged, with Triton's binary tensor data extension both ways (tritonclient sends and asks for binary by default).
The messages themselves are decoded and encoded in oip.py."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from starlette.routing import Route

from services.predictor import oip
from services.predictor.inference import predictions
from services.predictor.models import LoadedModel
from services.predictor.offload import run_sized
from services.predictor.records import PredictionRecorder
from services.predictor.state import (
    PredictorState,
    authorize,
    count_answer,
    count_refusal,
    keep_record,
    model_for,
    read_body,
    served_by,
    state_of,
)
from shared.errors import NotFound

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

SERVER_NAME = "kiln-predictor"
EXTENSIONS = ["binary_tensor_data"]


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def serving_routes() -> list[Route]:
    """The infer routes as plain Starlette routes, for the app to match before every other route.

    FastAPI's per-request work for a route (solving its parameters, wrapping the endpoint) costs ~20 us, a sixth of
    a single-row infer (measured in process); infer parses its own body and path, so it needs none of it. The
    FastAPI routes of the same paths below stay for the OpenAPI document, which lists only FastAPI routes.
    """
    return [
        Route(router.prefix + "/models/{org}/infer", _serve_infer, methods=["POST"]),
        Route(router.prefix + "/models/{org}/versions/{version}/infer", _serve_infer, methods=["POST"]),
    ]


async def _serve_infer(request: Request) -> Response:
    return await _infer(request.path_params["org"], request.path_params.get("version"), request)


@router.post("/models/{org}/infer")
async def infer(org: str, request: Request) -> Response:
    return await _infer(org, None, request)


@router.post("/models/{org}/versions/{version}/infer")
async def infer_version(org: str, version: str, request: Request) -> Response:
    return await _infer(org, version, request)


@router.get("")
async def server_metadata(request: Request) -> Response:
    return _json({"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS})


@router.get("/health/live")
async def live() -> Response:
    return _json({"live": True})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """The protocol's `{"ready": true}` while ready; its 503 also has `error` and `status`, as every error body of
    Kiln does (the protocol's error body is `{"error": ...}`, and a client reading only the status is unaffected)."""
    if state_of(request).ready:
        return _json({"ready": True})
    error = "not ready: the deployed models are not loaded yet"
    return _json({"ready": False, "error": error, "status": 503}, status_code=503)


@router.get("/models/{org}")
async def model_metadata(org: str, request: Request) -> Response:
    return await _metadata_of(org, None, request)


@router.get("/models/{org}/versions/{version}")
async def version_metadata(org: str, version: str, request: Request) -> Response:
    return await _metadata_of(org, version, request)


@router.get("/models/{org}/ready")
async def model_ready(org: str, request: Request) -> Response:
    return await _ready(org, None, request)


@router.get("/models/{org}/versions/{version}/ready")
async def version_ready(org: str, version: str, request: Request) -> Response:
    return await _ready(org, version, request)


async def _metadata_of(org: str, version: str | None, request: Request) -> Response:
    state = state_of(request)
    await authorize(state, request, org)
    return _json(oip.model_metadata(org, await _served(state, org, version)))


async def _ready(org: str, version: str | None, request: Request) -> Response:
    """200 while that version serves, 404 otherwise: tritonclient's is_model_ready reads the status alone."""
    state = state_of(request)
    await authorize(state, request, org)
    model = await _served(state, org, version)
    return _json({"name": org, "version": model.version, "ready": True})


async def _infer(org: str, version: str | None, request: Request) -> Response:
    started = time.perf_counter()
    state = state_of(request)
    model: LoadedModel | None = None
    try:
        await authorize(state, request, org)
        model = served = await model_for(state, org)  # found: a refusal from here on counts under the org
        _check_version(served, org, version)
        body = await read_body(state, request)
        header_length = request.headers.get(oip.HEADER_LENGTH)
        answer = await run_sized(len(body), lambda: _answer(org, served, body, header_length, state.recorder))
        if answer.records is not None:
            keep_record(state, served, answer.records, started)
    except Exception as error:
        count_refusal(state, model, error, started)
        raise
    count_answer(state, served, answer.rows, started)
    headers = {**answer.headers, **served_by(state, served)}
    return Response(answer.content, media_type=answer.media_type, headers=headers)


@dataclass(slots=True)  # not frozen: its __init__ would cost twice as much, on every request
class _Answer:
    rows: int
    content: bytes
    media_type: str
    headers: dict[str, str]
    records: list[dict[str, Any]] | None  # each row's score, label and risk level, for an org that keeps records


def _answer(
    org: str, model: LoadedModel, body: bytes, header_length: str | None, recorder: PredictionRecorder
) -> _Answer:
    """All the work of an infer request that is not HTTP."""
    inference = oip.parse_request(body, header_length)
    features = oip.request_features(model, inference.tensors)
    probabilities = model.probabilities(features)
    records = None
    # The answers V2 sends are tensors: scores are made only for records, and only for records with room to wait.
    if model.deployed.record_predictions and recorder.takes(model.deployed.org_id, len(features)):
        records = predictions(model, probabilities, model.deployed.risk_bands)
    content, media_type, headers = oip.encode_answer(org, model, probabilities, inference)
    return _Answer(len(features), content, media_type, headers, records)


async def _served(state: PredictorState, org: str, version: str | None) -> LoadedModel:
    """The org's serving model; with a version in the path, only if that is the version being served."""
    model = await model_for(state, org)
    _check_version(model, org, version)
    return model


def _check_version(model: LoadedModel, org: str, version: str | None) -> None:
    if version is not None and version != model.version:
        raise NotFound(f"version {version!r} of model {org!r} is not served; {model.version!r} is")
