"""A predictor when deploys, undeploys and its event link race what it is doing: it ends where the database says,
without serving what an undeploy stepped back from, and without an event to tell it."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any
from unittest.mock import ANY
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from services.api import registry
from services.predictor import deployments, models
from services.predictor.state import PredictorState
from shared.db.models import Deployment
from shared.db.session import SessionFactory, make_session_factory, session_scope
from shared.db.types import utcnow
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import OrgKeys, create_org_with_keys
from tests.integration.predictor_support import (
    becomes_ready,
    current_deployment,
    deploy,
    served_version,
    start_predictor,
)
from tests.support.models import register_model, tiny_model
from tests.support.polling import eventually

CORRUPT_ONNX = b"\x08\x07 not a model"


def undeploy_with_its_event_lost(engine: Engine, org_id: str) -> None:
    """An undeploy as the api writes it, its event never heard (Redis pub/sub is at-most-once)."""
    with session_scope(make_session_factory(engine)) as session:
        undeployed = registry.record_undeployment(session, org_id=org_id, actor="test")
        assert undeployed is not None
        undeployed[1].published_at = utcnow()


@contextmanager
def loading_held(monkeypatch: pytest.MonkeyPatch, version: str) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Loads of `version` stop, once read from the store, until released: (loading, release)."""
    loading, release = threading.Event(), threading.Event()
    load_model = models.load_model

    def held_load(store: ObjectStore, deployed: Any) -> Any:
        if deployed.version == version:
            loading.set()
            release.wait(30)
        return load_model(store, deployed)

    monkeypatch.setattr(deployments, "load_model", held_load)
    try:
        yield loading, release
    finally:
        release.set()


def state_of(predictor: TestClient) -> PredictorState:
    return predictor.app.state.predictor  # type: ignore[attr-defined,no-any-return]


def history_of(api: TestClient, org: OrgKeys, version: str) -> dict[str, Any]:
    [row] = [
        row
        for row in api.get(f"/v1/orgs/{org.org_id}/deployments", headers=org.viewer).json()
        if row["version"] == version
    ]
    return dict(row)


def test_a_deployment_an_undeploy_supersedes_while_it_loads_never_serves_even_with_the_undeploys_event_lost(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The undeploy answered 204 saying the deployment never served and no predictor tries it now: the load that
    was under way finds it so, installs nothing, and the predictor reads the table again, which says undeployed."""
    first = register_model(engine, store, org.org_id, tiny_model(seed=1))
    second = register_model(engine, store, org.org_id, tiny_model(seed=2))
    deploy(api, org, first)
    with (
        loading_held(monkeypatch, second) as (loading, release),
        start_predictor(settings, predictor_reconcile_s=600) as predictor,
    ):
        assert eventually(lambda: served_version(predictor, org) == first)
        deploy(api, org, second)
        assert loading.wait(10)
        undeploy_with_its_event_lost(engine, org.org_id)
        assert history_of(api, org, second)["status"] == "superseded"
        release.set()

        assert eventually(lambda: served_version(predictor, org) is None)
        assert [served_version(predictor, org) for _ in range(3)] == [None, None, None]
        assert state_of(predictor).cache.undeployed(org.org_id) is not None
        assert history_of(api, org, second)["status"] == "superseded"
        with engine.connect() as connection:
            loaded = connection.scalar(select(Deployment.loaded_at).where(Deployment.version == second))
        assert loaded is None


def test_a_broken_deployment_an_undeploy_supersedes_while_it_loads_stays_superseded_in_the_history(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = register_model(engine, store, org.org_id, tiny_model(seed=1))
    broken = register_model(engine, store, org.org_id, CORRUPT_ONNX)
    deploy(api, org, first)
    with (
        loading_held(monkeypatch, broken) as (loading, release),
        start_predictor(settings, predictor_reconcile_s=600) as predictor,
    ):
        assert eventually(lambda: served_version(predictor, org) == first)
        deploy(api, org, broken)
        assert loading.wait(10)
        assert api.delete(f"/v1/orgs/{org.org_id}/deployment", headers=org.admin).status_code == 204
        superseded = history_of(api, org, broken)
        release.set()

        assert eventually(lambda: served_version(predictor, org) is None)
        state_of(predictor).synchronizer.follows.after_now(org.org_id).result(timeout=10)  # after the load
        assert history_of(api, org, broken) == superseded
        assert superseded["status"] == "superseded"


def test_a_replica_that_hears_no_events_goes_from_a_refused_deployment_to_the_last_good_one_in_one_reconcile(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    """It serves v1; v2 and then a broken v3 are deployed while it hears nothing. Its reconcile refuses v3, and
    then serves v2, the org's last good deployment, rather than v1 until the next reconcile."""
    first = register_model(engine, store, org.org_id, tiny_model(seed=1))
    second = register_model(engine, store, org.org_id, tiny_model(seed=2))
    broken = register_model(engine, store, org.org_id, CORRUPT_ONNX)
    deploy(api, org, first)
    deaf = {"deploy_channel": f"{settings.deploy_channel}:never-published", "predictor_reconcile_s": 600}
    with start_predictor(settings, **deaf) as predictor:
        assert becomes_ready(predictor) and served_version(predictor, org) == first
        deploy(api, org, second)
        deploy(api, org, broken)

        state_of(predictor).synchronizer.sync_all()

        assert eventually(lambda: served_version(predictor, org) == second, seconds=10)
        assert current_deployment(api, org)["servingVersion"] == second


@pytest.fixture
def redis_user_without_subscribe(settings: Settings) -> Iterator[tuple[str, redis.Redis]]:
    """A Redis user that may do anything but SUBSCRIBE (an ACL left so by mistake), and the admin's client."""
    name = f"kiln-test-{os.getpid()}-{secrets.token_hex(3)}"
    admin = redis.Redis.from_url(settings.redis_url)
    admin.acl_setuser(
        name,
        reset=True,
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        channels=["*"],
        categories=["+@all"],
        commands=["-subscribe"],
    )
    try:
        yield name, admin
    finally:
        admin.acl_deluser(name)
        admin.close()


def test_a_predictor_refused_its_subscription_keeps_reconciling_and_follows_deploys_once_it_is_allowed(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    settings: Settings,
    redis_user_without_subscribe: tuple[str, redis.Redis],
) -> None:
    """Redis answering the SUBSCRIBE with an error, not a lost connection, ended the thread that follows events and
    runs the reconciles: the predictor stayed ready and never followed a deploy again, Redis put right or not."""
    name, admin = redis_user_without_subscribe
    first = register_model(engine, store, org.org_id, tiny_model(seed=1))
    second = register_model(engine, store, org.org_id, tiny_model(seed=2))
    third = register_model(engine, store, org.org_id, tiny_model(seed=3))
    deploy(api, org, first)
    as_the_user = urlsplit(settings.redis_url)._replace(netloc=f"{name}:secret@{urlsplit(settings.redis_url).netloc}")
    refused = settings.model_copy(update={"redis_url": urlunsplit(as_the_user)})
    with start_predictor(refused, predictor_reconcile_s=600) as predictor:
        assert becomes_ready(predictor) and served_version(predictor, org) == first
        deploy(api, org, second)
        assert eventually(lambda: served_version(predictor, org) == second, seconds=10)  # by its reconciles

        [(_, others)] = admin.pubsub_numsub(settings.deploy_channel)
        admin.acl_setuser(name, enabled=True, commands=["+subscribe"])
        assert eventually(lambda: admin.pubsub_numsub(settings.deploy_channel) == [(ANY, others + 1)])
        deploy(api, org, third)  # with its reconciles 600 s apart again, the event alone can bring it

        assert eventually(lambda: served_version(predictor, org) == third, seconds=10)
        assert state_of(predictor).listener.is_alive()


def test_a_request_waiting_for_an_undeploy_a_reconcile_read_before_a_deploy_gets_the_deployed_model(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    settings: Settings,
    org_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reconcile read the org undeployed; a deploy was then installed, and evicted by another org's model. The
    org's request, waiting for the reconcile's (stale) undeploy to run, got 404 "no deployed version"."""
    other = create_org_with_keys(api, f"{org_id}-other")
    deploy(api, other, register_model(engine, store, other.org_id, tiny_model(seed=9)))
    first = register_model(engine, store, org.org_id, tiny_model(seed=1))
    second = register_model(engine, store, org.org_id, tiny_model(seed=2))
    deploy(api, org, first)
    with start_predictor(settings, predictor_memory_mb=1.5, predictor_reconcile_s=600) as predictor:
        state = state_of(predictor)
        assert becomes_ready(predictor) and served_version(predictor, org) == first
        assert api.delete(f"/v1/orgs/{org.org_id}/deployment", headers=org.admin).status_code == 204
        assert eventually(lambda: state.cache.undeployed(org.org_id) is not None)
        read, go_on = threading.Event(), threading.Event()
        read_deployments = deployments.read_deployments

        def reconcile_waits_once_it_has_read(sessions: SessionFactory, org_id: str | None = None) -> Any:
            wanted = read_deployments(sessions, org_id)
            if org_id is None:
                read.set()
                go_on.wait(30)
            return wanted

        monkeypatch.setattr(deployments, "read_deployments", reconcile_waits_once_it_has_read)
        reconcile = threading.Thread(target=state.synchronizer.sync_all)
        reconcile.start()
        assert read.wait(10)
        deploy(api, org, second)
        assert eventually(lambda: served_version(predictor, org) == second)
        assert served_version(predictor, other) is not None and state.cache.peek(org.org_id) is None  # evicted
        undeploying, release = threading.Event(), threading.Event()
        undeploy_from_cache = models.ModelCache.undeploy

        def undeploy_held(cache: models.ModelCache, org_id: str, deployment_id: int) -> bool:
            undeploying.set()
            release.wait(10)
            return undeploy_from_cache(cache, org_id, deployment_id)

        monkeypatch.setattr(models.ModelCache, "undeploy", undeploy_held)
        waiting = threading.Event()
        under_way_or_new = state.synchronizer.follows.under_way_or_new

        def request_waits(org_id: str, job: Any) -> Any:
            follow = under_way_or_new(org_id, job)
            waiting.set()
            return follow

        monkeypatch.setattr(state.synchronizer.follows, "under_way_or_new", request_waits)
        go_on.set()
        assert undeploying.wait(10)
        with ThreadPoolExecutor(max_workers=1) as pool:
            asking = pool.submit(served_version, predictor, org)
            assert waiting.wait(10)
            release.set()
            assert asking.result(timeout=10) == second
        reconcile.join(10)


def test_a_reconcile_starts_no_follow_for_an_org_that_stands_undeployed_already(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each reconcile started a thread for every undeployed org, every interval, to find nothing to do."""
    deploy(api, org, register_model(engine, store, org.org_id, tiny_model(seed=1)))
    with start_predictor(settings, predictor_reconcile_s=600) as predictor:
        state = state_of(predictor)
        assert becomes_ready(predictor)
        assert api.delete(f"/v1/orgs/{org.org_id}/deployment", headers=org.admin).status_code == 204
        assert eventually(lambda: state.cache.undeployed(org.org_id) is not None)
        started: list[str] = []
        after_now = state.synchronizer.follows.after_now

        def counted(org_id: str, *job: Any) -> Any:
            started.append(org_id)
            return after_now(org_id, *job)

        monkeypatch.setattr(state.synchronizer.follows, "after_now", counted)
        state.synchronizer.sync_all()

        assert org.org_id not in started
