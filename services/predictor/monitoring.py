"""`GET /metrics`: the predictor's serving metrics (metrics.py) in Prometheus's text format. They name every org
served, so they are for KILN_METRICS_TOKEN, a token that reads them and nothing else (give Prometheus that one,
not the admin token), or for the platform admin."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from services.predictor.state import PredictorState, principal_of, state_of
from shared.errors import Forbidden, InvalidKey
from shared.keys import bearer_token, is_metrics_token

router = APIRouter(tags=["monitoring"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    if not _is_metrics_token(state, request):
        principal = await principal_of(state, request)
        if principal is None:
            raise InvalidKey()
        if not principal.is_platform_admin:
            raise Forbidden("metrics are for KILN_METRICS_TOKEN or the platform admin's token", field="Authorization")
    # The format Prometheus asks for in Accept (OpenMetrics, or the text format of the version it reads).
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(state.metrics.registry()), headers={"Content-Type": content_type})


def _is_metrics_token(state: PredictorState, request: Request) -> bool:
    token = bearer_token(request.headers.get("authorization"))
    return is_metrics_token(token, state.settings.metrics_token.get_secret_value())
