"""`POST /v1/orgs/{org}/predict`: rows of named features in, scores, labels and risk levels out."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request, Response
from starlette.routing import Route

from services.predictor.inference import predictions, v1_features
from services.predictor.models import LoadedModel
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
        features = v1_features(served, await read_body(state, request))
        answers = predictions(served, served.probabilities(features), served.deployed.risk_bands)
        keep_record(state, served, answers, started)
        body = orjson.dumps({"version": served.version, "predictions": answers})
    except Exception as error:
        count_refusal(state, model, error, started)
        raise
    count_answer(state, served, len(answers), started)
    return Response(body, media_type="application/json", headers=served_by(state, served))
