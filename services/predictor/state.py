"""What a predictor process holds, and the two steps every request takes: who is calling, which model answers."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis
from fastapi import Request
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from services.predictor.auth import KeyCache, check_org
from services.predictor.deployments import LOAD_RETRY_S, Synchronizer
from services.predictor.listener import DeployListener
from services.predictor.metrics import DISCONNECTED, FAILURE, REFUSED, SUCCESS, ServingMetrics
from services.predictor.models import LoadedModel, ModelCache
from services.predictor.outage import DatabaseOutage
from services.predictor.records import PredictionRecorder
from shared.db.session import check_answers, make_central_engine, make_session_factory
from shared.errors import KilnError, NotFound, PayloadTooLarge, TransientError, UnsupportedEncoding
from shared.http_errors import refuse_nul_in_url
from shared.keys import Principal, bearer_token
from shared.settings import Settings
from shared.storage import open_object_store


@dataclass
class PredictorState:
    settings: Settings
    engine: Engine
    cache: ModelCache
    synchronizer: Synchronizer
    keys: KeyCache
    outage: DatabaseOutage
    listener: DeployListener
    recorder: PredictionRecorder
    metrics: ServingMetrics
    replica: str = field(default_factory=lambda: _replica())

    @classmethod
    def open(cls, settings: Settings) -> PredictorState:
        engine = make_central_engine(settings, bound_answers=True)
        sessions = make_session_factory(engine)
        cache = ModelCache(settings.predictor_memory_mb)
        synchronizer = Synchronizer(
            sessions, open_object_store(settings), cache, load_wait_s=settings.predictor_load_wait_s
        )
        listener = DeployListener(
            redis.Redis.from_url(settings.redis_url),
            settings.deploy_channel,
            synchronizer,
            settings.predictor_reconcile_s,
        )
        # A database that answers the probe but fails the requests' own statements is tried by requests once per
        # period that a key is trusted from memory, not once a second.
        outage = DatabaseOutage(partial(check_answers, engine), longest_s=settings.predictor_key_cache_s)
        keys = KeyCache(
            sessions, settings.admin_token.get_secret_value(), settings.predictor_key_cache_s, outage=outage
        )
        recorder = PredictionRecorder(sessions, settings.predictor_record_flush_s)
        metrics = ServingMetrics(
            settings.predictor_metrics_dir, _replica(), settings.predictor_metrics_flush_s, cache, recorder
        )
        return cls(
            settings=settings,
            engine=engine,
            cache=cache,
            synchronizer=synchronizer,
            keys=keys,
            outage=outage,
            listener=listener,
            recorder=recorder,
            metrics=metrics,
        )

    def start(self) -> None:
        """Called in the event loop, which the metrics' flushing runs in."""
        self.listener.start()
        self.recorder.start()
        self.metrics.start()

    def close(self) -> None:
        self.outage.close()
        self.listener.stop()
        self.recorder.stop()
        self.engine.dispose()

    @property
    def ready(self) -> bool:
        return self.synchronizer.synced_once.is_set()

    async def load_on_request(self, org_id: str) -> LoadedModel | None:
        """An org not loaded yet, loaded for its request (or the load under way awaited), without holding a thread:
        a 503 once that takes over KILN_PREDICTOR_LOAD_WAIT_S, and DatabaseUnavailable at once while the database is
        out of reach."""
        follow = self.synchronizer.follows.under_way_or_new(org_id, partial(self._follow_for_request, org_id))
        waiting = asyncio.wrap_future(follow)
        waiting.add_done_callback(_outcome_taken)
        done, _ = await asyncio.wait({waiting}, timeout=self.settings.predictor_load_wait_s)
        if not done:
            raise TransientError(
                f"the model of {org_id!r} is still loading, try again", headers={"Retry-After": str(LOAD_RETRY_S)}
            )
        return waiting.result()

    def _follow_for_request(self, org_id: str) -> LoadedModel | None:
        with self.outage.attempt():
            return self.synchronizer.sync_org(org_id)


def _outcome_taken(waiting: asyncio.Future[LoadedModel | None]) -> None:
    """Marks the outcome seen: a request that stopped waiting leaves it to the follow, which has said it."""
    if not waiting.cancelled():
        waiting.exception()


def _replica() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def state_of(request: Request) -> PredictorState:
    state: PredictorState = request.app.state.predictor
    return state


async def authorize(state: PredictorState, request: Request, org_id: str) -> None:
    check_org(await principal_of(state, request), org_id)
    refuse_nul_in_url(request)  # the admin token reaches the database with any org


async def principal_of(state: PredictorState, request: Request) -> Principal | None:
    """Who the request's bearer key belongs to; None for a key that is not valid."""
    token = bearer_token(request.headers.get("authorization"))
    hit, principal = state.keys.cached(token)
    if not hit:
        principal = await run_in_threadpool(state.keys.lookup, token)
    return principal


async def model_for(state: PredictorState, org_id: str) -> LoadedModel:
    """The org's serving model; an org not loaded yet is loaded now, from its deployment row (which, once the org
    was undeployed, names nothing to load)."""
    model = state.cache.get(org_id)
    if model is None:
        model = await state.load_on_request(org_id)
    if model is None:
        undeployed = state.cache.undeployed(org_id)
        if undeployed is not None:
            raise NotFound(
                f"model {org_id!r} not found: the organization's model was undeployed (deployment {undeployed}); "
                "nothing serves it until a version is deployed again"
            )
        raise NotFound(f"model {org_id!r} not found: the organization has no deployed version")
    return model


async def read_body(state: PredictorState, request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes KILN_PREDICTOR_MAX_BODY_MB, before it is all in memory; or
    with 415 if it is compressed: decompressing would let a small body grow past that bound (tritonclient compresses
    only when asked to), and read as it came it would be refused as broken JSON, which it is not."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedEncoding(
            f"Content-Encoding {encoding!r} is not supported; send the body uncompressed", field="Content-Encoding"
        )
    limit_mb = state.settings.predictor_max_body_mb
    limit = int(limit_mb * 1024 * 1024)
    declared = request.headers.get("content-length", "")
    # Not a byte count (uvicorn refuses such a request itself; another server may pass it on): the body read counts.
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is over {limit_mb} MB", field="body")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit_mb} MB", field="body")
        parts.append(chunk)
    return b"".join(parts)


def keep_record(state: PredictorState, model: LoadedModel, answers: list[dict[str, Any]], started: float) -> None:
    """Queue the answers for the org's prediction records, if it keeps them; costs the request one append."""
    if model.deployed.record_predictions:
        latency_ms = (time.perf_counter() - started) * 1000
        state.recorder.add(org_id=model.deployed.org_id, version=model.version, answers=answers, latency_ms=latency_ms)


def count_answer(state: PredictorState, model: LoadedModel, rows: int, started: float) -> None:
    state.metrics.count(model.deployed.org_id, model.version, SUCCESS, rows, time.perf_counter() - started)


def count_refusal(state: PredictorState, model: LoadedModel | None, error: Exception, started: float) -> None:
    """A request that ended in an error: refused (4xx), failed (5xx), or left by its client. Counted under its org
    only once its model was found, so that made-up org names in URLs cannot add series."""
    org, version = (model.deployed.org_id, model.version) if model is not None else ("", "")
    state.metrics.count(org, version, _outcome(error), 0, time.perf_counter() - started)


def _outcome(error: Exception) -> str:
    if isinstance(error, ClientDisconnect):  # the client's doing, not the predictor's: no failure to alert on
        return DISCONNECTED
    return REFUSED if isinstance(error, KilnError) and error.status < 500 else FAILURE


def served_by(state: PredictorState, model: LoadedModel) -> dict[str, str]:
    """Response headers naming what answered: the version, the deployment that put it there, and the replica."""
    return {
        "X-Model-Version": model.version,
        "X-Deployment-Id": str(model.deployed.deployment_id),
        "X-Replica": state.replica,
    }
