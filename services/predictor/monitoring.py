"""`GET /metrics`: the predictor's serving metrics (metrics.py) in Prometheus's text format, for the platform admin
(scrape with `authorization: {credentials: <KILN_ADMIN_TOKEN>}`): they name every org served."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from services.predictor.state import principal_of, state_of
from shared.errors import Forbidden, Unauthorized

router = APIRouter(tags=["monitoring"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    principal = await principal_of(state, request)
    if principal is None:
        raise Unauthorized("the key is not valid", field="Authorization")
    if not principal.is_platform_admin:
        raise Forbidden("metrics are for the platform admin's token", field="Authorization")
    # The format Prometheus asks for in Accept (OpenMetrics, or the text format of the version it reads).
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(state.metrics.registry()), headers={"Content-Type": content_type})
