"""An org's own PostgreSQL (a training data source, a sync store, a store backed up) that stops answering, its
machine still acknowledging every packet: a forwarder between the worker and the real server is frozen, or traps each
connection at one step. Each call that meets it is run with an outer timeout, so that a wait without end fails the
test rather than hanging it."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from deploy.local import ai4i
from services.sync.backup import backup_store
from services.sync.context import SyncContext
from services.sync.jobs import run_job
from services.sync.pair import Tally
from services.trainer.context import WorkerContext
from services.trainer.training import run_training
from shared.db.answers import PROBE_S
from shared.db.session import Answers, make_engine
from shared.errors import InvalidInput, TransientError
from shared.settings import Settings
from shared.store_access import StoreRules
from tests.integration.conftest import OrgKeys, run_of, submit
from tests.integration.frozen_database_support import OUTER_TIMEOUT_S, TIMEOUT_S
from tests.integration.plant_database_support import write_scada_table
from tests.integration.postgres_sync_support import READINGS, TWO_READINGS, open_postgres_sync
from tests.integration.sync_support import Sync, error_of
from tests.support.polling import eventually
from tests.support.proxy import FreezableLink, freezable_link_to
from tests.support.servers import fresh_postgres_database

# What psycopg2 sends for each chunk a server-side cursor reads: the extraction's waits after its query.
CHUNK_FETCH = b"FETCH FORWARD"
# What a user is promised for a cancel of a running run.
CANCEL_WITHIN_S = 5.0


@pytest.fixture
def org_database() -> Iterator[tuple[FreezableLink, str]]:
    """A fresh database of the org's, and its URL through a freezable link."""
    with fresh_postgres_database() as url, freezable_link_to(url) as (link, linked):
        yield link, linked


def submit_reading(api: TestClient, org: OrgKeys, url: str) -> str:
    """A run of the org's, its datasource a table of readings in the database at `url`."""
    write_scada_table(url, ai4i.generate(200, seed=3, start=datetime(2024, 1, 1, tzinfo=UTC), interval=timedelta(1)))
    column_map = {f"TAG_{name.upper()}": name for name in ai4i.FEATURES} | {"failure": ai4i.TARGET}
    body = {"url": url, "table": "readings", "columnMap": column_map}
    assert api.put(f"/v1/orgs/{org.org_id}/datasource", headers=org.admin, json=body).status_code == 200
    return submit(api, org, None)


def test_a_run_whose_data_source_stops_answering_mid_extraction_is_retried_then_fails_saying_so(
    api: TestClient, org: OrgKeys, settings: Settings, org_database: tuple[FreezableLink, str]
) -> None:
    link, url = org_database
    run_id = submit_reading(api, org, url)
    # Each attempt connects, checks the table and declares its cursor, then waits for its first chunk for ever.
    link.trap(CHUNK_FETCH)
    worker = WorkerContext.open(settings.model_copy(update={"database_timeout_s": TIMEOUT_S}))
    try:
        outcomes = [link.outcome_within(OUTER_TIMEOUT_S, lambda: run_training(run_id, worker)) for _ in range(3)]
    finally:
        worker.close()

    assert outcomes == ["retrying", "retrying", "failed"]  # the worker is free again after each
    run = run_of(api, org, run_id)
    assert (run["status"], run["attempts"]) == ("failed", 3)
    assert "gave up after 3 attempts" in run["error"]
    assert "the data source did not answer within 3 s" in run["error"]  # the bound: TIMEOUT_S + ANSWER_GRACE_S


def test_a_run_cancelled_while_its_data_source_does_not_answer_ends_cancelled_within_seconds(
    api: TestClient, org: OrgKeys, settings: Settings, org_database: tuple[FreezableLink, str]
) -> None:
    """A cancel of a running run is honoured within 5 s, even while its extraction waits on a data source that
    stopped answering: it is not held until the wait's bound (KILN_DATABASE_TIMEOUT_S, 15 s, and 2 s more)."""
    link, url = org_database
    run_id = submit_reading(api, org, url)
    link.trap(CHUNK_FETCH)
    worker = WorkerContext.open(settings)
    with ThreadPoolExecutor(max_workers=1) as attempts:
        try:
            outcome = attempts.submit(run_training, run_id, worker)
            assert eventually(lambda: run_of(api, org, run_id)["progress"]["stage"] == "extracting", seconds=30)
            cancel = api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer)
            assert cancel.status_code == 202, cancel.text
            status = eventually(lambda: run_of(api, org, run_id)["status"] == "cancelled", seconds=CANCEL_WITHIN_S)
        finally:
            link.close()  # ends any wait on the source still going on
            ended = outcome.result(timeout=OUTER_TIMEOUT_S)
            worker.close()

    run = run_of(api, org, run_id)
    assert status and ended == "cancelled", (ended, run["status"], run["error"])
    assert (run["attempts"], run["error"]) == (1, "cancelled on request")


def test_a_sync_job_whose_postgresql_store_stops_answering_mid_job_is_retried_instead_of_hanging(
    sync_api: TestClient, central_settings: Settings, org_id: str, org_database: tuple[FreezableLink, str]
) -> None:
    link, url = org_database
    context = SyncContext.open(central_settings.model_copy(update={"database_timeout_s": TIMEOUT_S}))
    try:
        sync: Sync = open_postgres_sync(sync_api, context, org_id, url, "last-writer-wins", READINGS, TWO_READINGS)
        job_id = sync.submit()

        def freeze(_tally: Tally) -> None:
            link.freeze()

        outcome = link.outcome_within(OUTER_TIMEOUT_S, lambda: run_job(context, job_id, after_batch=freeze))
    finally:
        context.close()

    assert isinstance(outcome, TransientError), outcome  # the sync worker retries it
    job = sync.job(job_id)
    assert job["status"] == "retrying"
    # Its connection's next wait is cut (the pool's ping, or a statement), and a new connection times out connecting.
    assert error_of(job).startswith("a store was unreachable, retrying: ")


def test_a_long_statement_of_a_sync_store_whose_server_answers_runs_past_the_bound() -> None:
    with fresh_postgres_database() as url:
        engine = make_engine(url, timeout_s=TIMEOUT_S, answers=Answers.WHILE_SERVER_ANSWERS)
        try:
            with engine.connect() as connection:
                connection.execute(text(f"SELECT pg_sleep({TIMEOUT_S + PROBE_S + 1})"))
                assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
        finally:
            engine.dispose()


def test_a_backup_of_a_store_that_does_not_answer_fails_saying_why(
    sync_context: SyncContext, org_id: str, org_database: tuple[FreezableLink, str]
) -> None:
    link, url = org_database
    rules = StoreRules.for_sync(sync_context.settings.model_copy(update={"database_timeout_s": TIMEOUT_S}), org_id)
    link.freeze()

    outcome = link.outcome_within(
        OUTER_TIMEOUT_S, lambda: backup_store(sync_context.store, sync_context.secrets, rules=rules, source=url)
    )

    assert isinstance(outcome, InvalidInput), outcome
    assert outcome.message.startswith("pg_dump failed: ") and "timeout expired" in outcome.message
