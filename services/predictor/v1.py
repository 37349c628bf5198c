"""`POST /v1/orgs/{org}/predict`: rows of named features in, scores, labels and risk levels out."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from starlette.routing import Route

from services.predictor.inference import predictions, v1_features
from services.predictor.models import LoadedModel
from services.predictor.offload import run_sized
from services.predictor.state import (
    authorize,
    count_answer,
    count_refusal,
    keep_record,
    model_for,
    read_body,
    served_by,
    state_of,
)

router = APIRouter(tags=["predict"])


def serving_routes() -> list[Route]:
    """Predict as a plain Starlette route, matched first: see v2.serving_routes for why."""
    return [Route("/v1/orgs/{org}/predict", _serve_predict, methods=["POST"])]


async def _serve_predict(request: Request) -> Response:
    return await predict(request.path_params["org"], request)


@router.post("/v1/orgs/{org}/predict")
async def predict(org: str, request: Request) -> Response:
    started = time.perf_counter()
    state = state_of(request)
    model: LoadedModel | None = None
    try:
        await authorize(state, request, org)
        model = served = await model_for(state, org)
        body = await read_body(state, request)
        rows, content, records = await run_sized(len(body), lambda: _answer(served, body))
        if records is not None:
            keep_record(state, served, records, started)
    except Exception as error:
        count_refusal(state, model, error, started)
        raise
    count_answer(state, served, rows, started)
    return Response(content, media_type="application/json", headers=served_by(state, served))


def _answer(model: LoadedModel, body: bytes) -> tuple[int, bytes, list[dict[str, Any]] | None]:
    """All the work of a request that is not HTTP: the rows answered, the response's content, and the answers for
    an org that keeps records. Others' answers are dropped here: a large batch's take a while to free, which is
    better done off the event loop too."""
    answers = predictions(model, model.probabilities(v1_features(model, body)), model.deployed.risk_bands)
    content = orjson.dumps({"version": model.version, "predictions": answers})
    return len(answers), content, answers if model.deployed.record_predictions else None
