"""What a predictor process holds, and the two steps every request takes: who is calling, which model answers."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from fastapi import Request
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from services.predictor.auth import KeyCache, bearer_token, check_org
from services.predictor.deployments import Synchronizer
from services.predictor.listener import DeployListener
from services.predictor.models import LoadedModel, ModelSlots
from shared.db.session import make_engine, make_session_factory
from shared.errors import NotFound, PayloadTooLarge
from shared.settings import Settings
from shared.storage import open_object_store


@dataclass
class PredictorState:
    settings: Settings
    engine: Engine
    slots: ModelSlots
    synchronizer: Synchronizer
    keys: KeyCache
    listener: DeployListener

    @classmethod
    def open(cls, settings: Settings) -> PredictorState:
        engine = make_engine(settings.resolved_database_url)
        sessions = make_session_factory(engine)
        slots = ModelSlots()
        synchronizer = Synchronizer(sessions, open_object_store(settings), slots)
        listener = DeployListener(
            redis.Redis.from_url(settings.redis_url),
            settings.deploy_channel,
            synchronizer,
            settings.predictor_reconcile_s,
        )
        keys = KeyCache(sessions, settings.admin_token.get_secret_value(), settings.predictor_key_cache_s)
        return cls(
            settings=settings, engine=engine, slots=slots, synchronizer=synchronizer, keys=keys, listener=listener
        )

    def close(self) -> None:
        self.listener.stop()
        self.engine.dispose()

    @property
    def ready(self) -> bool:
        return self.synchronizer.synced_once.is_set()


def state_of(request: Request) -> PredictorState:
    state: PredictorState = request.app.state.predictor
    return state


async def authorize(request: Request, org_id: str) -> None:
    state = state_of(request)
    token = bearer_token(request.headers.get("authorization"))
    hit, principal = state.keys.cached(token)
    if not hit:
        principal = await run_in_threadpool(state.keys.lookup, token)
    check_org(principal, org_id)


async def model_for(request: Request, org_id: str) -> LoadedModel:
    """The org's serving model; an org not loaded yet is loaded now, from its deployment row."""
    state = state_of(request)
    model = state.slots.get(org_id)
    if model is None:
        await run_in_threadpool(state.synchronizer.sync_org, org_id)
        model = state.slots.get(org_id)
    if model is None:
        raise NotFound(f"model {org_id!r} not found: the organization has no deployed version")
    return model


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes KILN_PREDICTOR_MAX_BODY_MB, before it is all in memory."""
    limit_mb = state_of(request).settings.predictor_max_body_mb
    limit = int(limit_mb * 1024 * 1024)
    if int(request.headers.get("content-length") or 0) > limit:
        raise PayloadTooLarge(f"the request body is over {limit_mb} MB")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit_mb} MB")
        parts.append(chunk)
    return b"".join(parts)
