"""A central PostgreSQL that stops answering, its machine still acknowledging every packet (a stopped server, a stuck
link): a forwarder between a service and the real server is frozen. Each call that meets it is run with an outer
timeout, so that a wait without end fails the test rather than hanging it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from deploy.local import ai4i
from services.api.app import create_app
from services.predictor.app import create_app as create_predictor
from services.predictor.auth import KeyCache
from services.predictor.outage import DatabaseOutage
from services.predictor.state import PredictorState
from services.trainer.context import WorkerContext
from services.trainer.training import run_training
from shared.db.session import (
    ANSWER_GRACE_S,
    CONNECT_TIMEOUT_S,
    check_answers,
    make_central_engine,
    make_session_factory,
)
from shared.errors import Unavailable
from shared.keys import KEY_PREFIX, PLATFORM_ADMIN
from shared.queues import TRAIN_TASK
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import ADMIN, OrgKeys, run_of, submit, upload_table
from tests.integration.frozen_database_support import OUTER_TIMEOUT_S, TIMEOUT_S
from tests.integration.predictor_support import becomes_ready, deploy, deploy_quietly
from tests.support.models import ai4i_row, register_model, tiny_model
from tests.support.polling import eventually
from tests.support.proxy import FreezableLink, freezable_link_to
from tests.support.servers import free_port, wait_for_http
from tests.support.workers import celery_worker

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def through_link(settings: Settings) -> Iterator[tuple[FreezableLink, Settings]]:
    """`settings` reaching the central database through a freezable link, with a short bound on waits."""
    with freezable_link_to(settings.database_url) as (link, url):
        yield link, settings.model_copy(update={"database_url": url, "database_timeout_s": TIMEOUT_S})


def select_one(engine: Engine) -> object:
    with engine.connect() as connection:
        return connection.execute(text("SELECT 1")).scalar()


def test_a_statement_through_a_frozen_link_fails_within_the_bound_and_the_engine_recovers_once_it_thaws(
    settings: Settings,
) -> None:
    with through_link(settings) as (link, linked):
        engine = make_central_engine(linked, bound_answers=True)
        try:
            with engine.connect() as connection:
                link.freeze()
                error = link.outcome_within(OUTER_TIMEOUT_S, lambda: connection.execute(text("SELECT 1")))
            assert isinstance(error, OperationalError)
            assert f"did not answer within {TIMEOUT_S + ANSWER_GRACE_S:g} s" in str(error)

            # A new checkout: the pool's ping is cut off too, and a new connection times out connecting.
            assert isinstance(link.outcome_within(OUTER_TIMEOUT_S, lambda: select_one(engine)), OperationalError)

            link.thaw()
            assert select_one(engine) == 1
        finally:
            engine.dispose()


def test_a_run_whose_statement_to_kilns_database_gets_no_answer_is_retried_saying_so_in_one_line(
    api: TestClient, org: OrgKeys, settings: Settings, tmp_path: Path
) -> None:
    """A failover or a blip of the link to Kiln's own database is no fault of the run: it is retried like an org's
    database out of reach, and its error names the fault without SQL or a traceback."""
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(2_000, seed=1), tmp_path))
    with through_link(settings) as (link, linked):
        # The attempt's read of its dataset's row (the statement with the run's id bound) never gets an answer.
        link.trap(b"datasets.id \nWHERE training_runs.id = 'run_")
        worker = WorkerContext.open(linked)
        try:
            outcome = link.outcome_within(OUTER_TIMEOUT_S, lambda: run_training(run_id, worker))
        finally:
            worker.close()

    run = run_of(api, org, run_id)
    assert (outcome, run["status"], run["attempts"]) == ("retrying", "queued", 1), run["error"]
    bound_s = TIMEOUT_S + ANSWER_GRACE_S
    assert run["error"] == f"attempt 1: Kiln's database failed: the database did not answer within {bound_s:g} s"


def test_a_run_whose_worker_finds_kilns_database_not_answering_is_trained_once_it_answers(
    api: TestClient, org: OrgKeys, settings: Settings, tmp_path: Path
) -> None:
    """The worker takes the run's message and cannot claim the run: dropped then, the message would leave the run
    queued for good, as the database says it is."""
    dataset_id = upload_table(api, org, ai4i.generate(20_000, seed=1), tmp_path)
    log = tmp_path / "worker.log"
    with through_link(settings) as (link, linked), celery_worker("services.trainer.celery_app", linked, log):
        link.freeze()
        run_id = submit(api, org, dataset_id)
        assert eventually(lambda: f"{TRAIN_TASK}[" in log.read_text() and "OperationalError" in log.read_text(), 60)
        link.thaw()
        run = eventually(lambda: finished(run_of(api, org, run_id)), 120)

    assert run is not None, run_of(api, org, run_id)
    assert (run["status"], run["attempts"]) == ("succeeded", 1)


def finished(run: dict[str, Any]) -> dict[str, Any] | None:
    return run if run["status"] not in ("queued", "running") else None


def test_the_server_cancels_a_long_statement_of_a_bounded_engine_and_a_worker_engine_lets_it_run(
    settings: Settings,
) -> None:
    bounded = make_central_engine(settings.model_copy(update={"database_timeout_s": TIMEOUT_S}), bound_answers=True)
    worker = make_central_engine(settings.model_copy(update={"database_timeout_s": TIMEOUT_S}), bound_answers=False)
    long_statement = text(f"SELECT pg_sleep({TIMEOUT_S + 0.5})")
    try:
        with bounded.connect() as connection:
            with pytest.raises(OperationalError, match="statement timeout"):
                connection.execute(long_statement)
            connection.rollback()
            assert connection.execute(text("SELECT 1")).scalar() == 1  # a cancel leaves the connection usable
        with worker.connect() as connection:
            connection.execute(long_statement)
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
            parameters = connection.connection.dbapi_connection.get_dsn_parameters()  # type: ignore[union-attr]
        assert (parameters["keepalives"], parameters["tcp_user_timeout"]) == ("1", str(round(TIMEOUT_S * 1000)))
    finally:
        bounded.dispose()
        worker.dispose()


def test_the_api_answers_503_while_its_database_link_is_frozen_and_200_once_it_thaws(
    settings: Settings, org: OrgKeys
) -> None:
    with through_link(settings) as (link, linked), TestClient(create_app(linked)) as api:
        path = f"/v1/orgs/{org.org_id}"
        assert api.get(path, headers=ADMIN).status_code == 200
        link.freeze()

        frozen = link.outcome_within(OUTER_TIMEOUT_S, lambda: api.get(path, headers=ADMIN))
        assert not isinstance(frozen, Exception), frozen
        assert (frozen.status_code, frozen.headers["retry-after"]) == (503, "1")
        assert frozen.json() == {"error": "the database is unavailable, try again", "status": 503}

        link.thaw()
        assert eventually(lambda: api.get(path, headers=ADMIN).status_code == 200, seconds=OUTER_TIMEOUT_S)


@contextmanager
def predictor_process(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """The predictor as it runs in production, a process of its own under uvicorn; yields its base URL."""
    port = free_port()
    env = {**os.environ, **settings.as_env()}
    command = [sys.executable, "-m", "uvicorn", "--factory", "services.predictor.app:create_app", "--port", str(port)]
    with (tmp_path / "predictor.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for_http(f"{base}/v2/health/live", process)
            yield base
            assert process.poll() is None, (tmp_path / "predictor.log").read_text()
        finally:
            process.terminate()
            process.wait(timeout=30)


def answered_version(base: str, org: OrgKeys) -> str | None:
    response = httpx.post(
        f"{base}/v1/orgs/{org.org_id}/predict",
        json={"rows": [ai4i_row()]},
        headers=org.viewer,
        timeout=OUTER_TIMEOUT_S,
    )
    return response.headers.get("x-model-version") if response.status_code == 200 else None


def test_a_predictor_serves_its_model_while_its_database_link_is_frozen_and_follows_a_deploy_made_meanwhile(
    api: TestClient, org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings, tmp_path: Path
) -> None:
    old = register_model(engine, store, org.org_id, tiny_model(seed=1))
    new = register_model(engine, store, org.org_id, tiny_model(seed=2))
    deploy(api, org, old)
    # Keys are looked up again every second, so that the outage outlasts what the predictor remembers of them.
    tuned = {"predictor_reconcile_s": 0.5, "predictor_key_cache_s": 1.0}
    with through_link(settings.model_copy(update=tuned)) as (link, linked), predictor_process(linked, tmp_path) as base:
        assert eventually(lambda: answered_version(base, org) == old, seconds=OUTER_TIMEOUT_S)
        # A request loads its org's model by itself; readiness waits for the first reconcile of every org, which in
        # a database full of earlier tests' orgs can still be loading them when the link freezes.
        assert eventually(lambda: httpx.get(f"{base}/v2/health/ready").status_code == 200, seconds=OUTER_TIMEOUT_S)
        link.freeze()

        # Through several reconciles, key lookups and the deploy event's sync, each cut off in turn.
        deploy(api, org, new)
        answered: list[str | Exception | None] = []
        until = time.monotonic() + 2 * (TIMEOUT_S + ANSWER_GRACE_S + CONNECT_TIMEOUT_S)
        while time.monotonic() < until or len(answered) < 3:
            answered.append(link.outcome_within(OUTER_TIMEOUT_S, lambda: answered_version(base, org)))
            time.sleep(0.5)
        assert answered == [old] * len(answered)
        ready = link.outcome_within(
            OUTER_TIMEOUT_S, lambda: httpx.get(f"{base}/v2/health/ready", timeout=OUTER_TIMEOUT_S)
        )
        assert isinstance(ready, httpx.Response) and ready.status_code == 200

        link.thaw()
        assert eventually(lambda: answered_version(base, org) == new, seconds=OUTER_TIMEOUT_S)


def test_a_flood_of_made_up_keys_does_not_make_a_predictor_forget_the_keys_it_checked(
    settings: Settings, org: OrgKeys
) -> None:
    """Made-up keys are anyone's to send, each answered 401 and remembered as such: once they filled the cache they
    emptied it, keys of real callers with them, and those got 503 as soon as the database froze."""
    token = org.viewer["Authorization"].removeprefix("Bearer ")
    with through_link(settings) as (link, linked):
        engine = make_central_engine(linked, bound_answers=True)
        outage = DatabaseOutage(partial(check_answers, engine), longest_s=30)
        # ttl 0: every call asks the database, as each does once its entry ends
        keys = KeyCache(
            make_session_factory(engine), settings.admin_token.get_secret_value(), 0.0, outage=outage, max_entries=10
        )
        try:
            assert keys.lookup(token) is not None
            assert [keys.lookup(f"made-up-{n}") for n in range(25)] == [None] * 25
            link.freeze()
            answer = link.outcome_within(OUTER_TIMEOUT_S, lambda: keys.lookup(token))
            assert not isinstance(answer, Exception), answer
            assert answer is not None and answer.org_id == org.org_id
        finally:
            outage.close()
            link.thaw()
            engine.dispose()


def test_through_an_outage_only_the_first_key_lookup_waits_on_the_database_and_lookups_reach_it_once_it_is_back(
    settings: Settings, org: OrgKeys
) -> None:
    """Each key waited out the database's bound in turn, once a period: through an outage nearly every caller had a
    request stall for seconds, again and again. Then one request a period still waited it out."""
    ttl_s = 1.0
    tokens = [headers["Authorization"].removeprefix("Bearer ") for headers in (org.admin, org.trainer, org.viewer)]
    with through_link(settings) as (link, linked):
        engine = make_central_engine(linked, bound_answers=True)
        factory = make_session_factory(engine)
        tries: list[float] = []

        def sessions() -> Session:
            tries.append(time.monotonic())
            return factory()

        outage = DatabaseOutage(partial(check_answers, engine), longest_s=30, probe_every_s=0.2)
        keys = KeyCache(sessions, settings.admin_token.get_secret_value(), ttl_s, outage=outage)
        try:
            principals = [keys.lookup(token) for token in tokens]
            link.freeze()
            assert link.outcome_within(OUTER_TIMEOUT_S, lambda: keys.lookup(tokens[0])) == principals[0]
            assert [keys.lookup(token) for token in tokens[1:]] == principals[1:]
            with pytest.raises(Unavailable, match="the database is unavailable"):
                keys.lookup(KEY_PREFIX + "never-checked")
            assert keys.lookup(settings.admin_token.get_secret_value()) == PLATFORM_ADMIN  # no key of the table's
            assert keys.lookup("no-key-has-this-shape") is None

            time.sleep(2 * ttl_s)  # the keys' entries have ended, and still no lookup waits on the database
            started = time.monotonic()
            assert [keys.lookup(token) for token in tokens] == principals
            assert time.monotonic() - started < TIMEOUT_S
            assert len(tries) == 4  # three before the outage, one in it

            link.thaw()
            never_checked = org.viewer["Authorization"].removeprefix("Bearer ")
            keys = KeyCache(sessions, settings.admin_token.get_secret_value(), ttl_s, outage=outage)
            assert eventually(lambda: not_unavailable(lambda: keys.lookup(never_checked)), seconds=OUTER_TIMEOUT_S)
            assert keys.lookup(never_checked) == principals[2]
        finally:
            outage.close()
            link.thaw()
            engine.dispose()


def not_unavailable(call: Callable[[], object]) -> bool:
    try:
        call()
    except Unavailable:
        return False
    return True


def test_through_an_outage_requests_for_an_org_not_loaded_answer_503_only_the_first_waits_and_they_load_once_it_ends(
    org: OrgKeys, engine: Engine, store: ObjectStore, settings: Settings
) -> None:
    """Each such request held a thread for the database's whole bound: a few dozen of them took every thread a
    worker process has, and requests for the orgs it had loaded queued behind them."""
    tuned = settings.model_copy(update={"predictor_reconcile_s": 600.0, "predictor_key_cache_s": 30.0})
    with through_link(tuned) as (link, linked), TestClient(create_predictor(linked)) as predictor:
        assert becomes_ready(predictor)
        state: PredictorState = predictor.app.state.predictor  # type: ignore[attr-defined]
        factory, tries = state.synchronizer.sessions, []

        def sessions() -> Session:
            tries.append(time.monotonic())
            return factory()

        state.synchronizer.sessions = sessions  # type: ignore[assignment]
        path, row = f"/v1/orgs/{org.org_id}/predict", {"rows": [ai4i_row()]}
        assert predictor.post(path, json=row, headers=org.viewer).status_code == 404  # nothing deployed; key checked
        deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, tiny_model(seed=1)))
        link.freeze()

        first = link.outcome_within(OUTER_TIMEOUT_S, lambda: predictor.post(path, json=row, headers=org.viewer))
        assert not isinstance(first, Exception) and first.status_code == 503
        answers = [predictor.post(path, json=row, headers=org.viewer) for _ in range(3)]
        assert [(a.status_code, a.json()["error"]) for a in answers] == [
            (503, "the database is unavailable, try again")
        ] * 3
        assert len(tries) == 2  # the 404's lookup, and the first request in the outage

        link.thaw()
        # Well within the key cache's 30 s, which used to be how long requests went without a database come back.
        served = eventually(lambda: predictor.post(path, json=row, headers=org.viewer).status_code == 200, seconds=20)
        assert served
