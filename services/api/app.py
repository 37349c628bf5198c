"""The api's composition root: `uvicorn --factory services.api.app:create_app`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI

from services.api.body_limits import BodyLimits
from services.api.deps import refuse_repeated_json_keys
from services.api.outbox_relay import sweep_until
from services.api.resources import Resources
from services.api.routers import (
    audit,
    datasets,
    datasource,
    deployments,
    health,
    models,
    monitoring,
    orgs,
    predictions,
    queue,
    schedule,
    sync_jobs,
    sync_keys,
    sync_sources,
    trainings,
)
from shared.http_errors import install_error_handlers, refuse_nul_in_url
from shared.logs import configure_logging
from shared.settings import Settings, settings_for


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or settings_for("api")
    configure_logging(settings.log_level)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resources = Resources.open(settings)
        app.state.resources = resources
        stop = asyncio.Event()
        sweeper = asyncio.create_task(sweep_until(stop, resources))
        try:
            yield
        finally:
            stop.set()
            await sweeper
            resources.close()

    app = FastAPI(
        title="Kiln",
        summary="Per-organization LightGBM training, validation, versioning and deployment.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(refuse_nul_in_url), Depends(refuse_repeated_json_keys)],
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimits, upload_limit=settings.max_upload_mb * 1024 * 1024)
    for module in (
        health,
        orgs,
        datasource,
        datasets,
        trainings,
        queue,
        schedule,
        models,
        deployments,
        predictions,
        sync_sources,
        sync_jobs,
        sync_keys,
        audit,
        monitoring,
    ):
        app.include_router(module.router)
    return app
