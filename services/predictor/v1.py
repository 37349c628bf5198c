"""`POST /v1/orgs/{org}/predict`: rows of named features in, scores, labels and risk levels out."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response

from services.predictor.inference import DEFAULT_RISK_BANDS, predictions, rows_to_features
from services.predictor.state import authorize, model_for, read_body
from shared.errors import BadRequest

router = APIRouter(tags=["predict"])


@router.post("/v1/orgs/{org}/predict")
async def predict(org: str, request: Request) -> Response:
    await authorize(request, org)
    payload = parse_json(await read_body(request))
    model = await model_for(request, org)
    rows = payload.get("rows") if isinstance(payload, dict) else None
    features = rows_to_features(model, rows)
    answer = {
        "version": model.version,
        "predictions": predictions(model, model.probabilities(features), DEFAULT_RISK_BANDS),
    }
    return Response(orjson.dumps(answer), media_type="application/json", headers={"X-Model-Version": model.version})


def parse_json(body: bytes) -> object:
    if not body:
        raise BadRequest("the request body is empty; send JSON", field="body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"the request body is not valid JSON: {error}", field="body") from None
