"""Liveness and readiness."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.api.deps import ResourcesDep
from services.api.resources import Resources
from shared.db.session import check_answers

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(resources: ResourcesDep) -> JSONResponse:
    """Ready when the database, Redis and the object store all answer; the body names any that does not."""
    checks = {name: _probe(resources, name) for name in ("database", "redis", "objectStore")}
    unavailable = [name for name, result in checks.items() if result != "ok"]
    if not unavailable:
        return JSONResponse({"ready": True, "checks": checks})
    # A 503 is an error like any other: its body has `error` and `status` too, as every error body of Kiln does.
    error = f"not ready: {', '.join(unavailable)} unavailable"
    return JSONResponse({"ready": False, "checks": checks, "error": error, "status": 503}, status_code=503)


def _probe(resources: Resources, name: str) -> str:
    try:
        if name == "database":
            check_answers(resources.engine)
        elif name == "redis":
            resources.redis.ping()
        else:
            resources.store.check()
    except Exception as error:
        # The error names hosts, ports and users: the log has it, not the answer to a caller with no key.
        log.warning("readiness: the %s does not answer", name, exc_info=True)
        return f"unavailable: {type(error).__name__}"
    return "ok"
