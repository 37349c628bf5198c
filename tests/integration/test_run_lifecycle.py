"""A run's row through its attempts: claimed once, fenced, handed back when its worker dies, cancelled on request."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, event, text, update

from services.trainer import heartbeat as heartbeat_module
from services.trainer import reaper, runs
from services.trainer.heartbeat import Heartbeat
from shared.cancellation import request_cancel
from shared.db.migrate import upgrade
from shared.db.models import Dataset, Organization, OutboxMessage, TrainingRun
from shared.db.session import SessionFactory, make_central_engine, make_engine, make_session_factory, session_scope
from shared.db.types import utcnow
from shared.org_lock import lock_org
from shared.queues import train_queue
from shared.schemas import TrainingConfig
from shared.settings import Settings
from shared.submissions import queue_run
from tests.integration.conftest import OrgKeys, config
from tests.support.polling import eventually, waiting_for_a_lock
from tests.support.proxy import freezable_link_to
from tests.support.servers import free_port


@pytest.fixture
def sessions(settings: Settings) -> Iterator[SessionFactory]:
    engine = create_engine(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def run_id(api: TestClient, org: OrgKeys, dataset_id: str) -> str:
    response = api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer)
    return str(response.json()["runId"])


def run_of(api: TestClient, org: OrgKeys, run_id: str) -> dict[str, Any]:
    return dict(api.get(f"/v1/orgs/{org.org_id}/trainings/{run_id}", headers=org.viewer).json())


def expire_lease(sessions: SessionFactory, run_id: str) -> None:
    with session_scope(sessions) as session:
        session.execute(
            update(TrainingRun).where(TrainingRun.id == run_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def end_run(sessions: SessionFactory, run_id: str) -> None:
    with session_scope(sessions) as session:
        session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id)
            .values(status="failed", lease_expires_at=None, finished_at=utcnow())
        )


def test_a_run_is_claimed_once(sessions: SessionFactory, run_id: str) -> None:
    first = runs.claim_run(sessions, run_id, worker="w1", lease_s=30)
    assert first is not None and (first.number, first.token) == (1, 1)
    assert runs.claim_run(sessions, run_id, worker="w2", lease_s=30) is None


def test_an_attempt_whose_lease_was_taken_over_can_write_nothing(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, run_id: str
) -> None:
    stale = runs.claim_run(sessions, run_id, worker="w1", lease_s=30)
    assert stale is not None
    expire_lease(sessions, run_id)
    assert runs.reap_expired(sessions, max_attempts=3, retry_backoff_s=0)
    fresh = runs.claim_run(sessions, run_id, worker="w2", lease_s=30)
    assert fresh is not None and fresh.token == stale.token + 1 and fresh.number == 2
    for write in (
        lambda: runs.set_progress(sessions, stale, "training", 50),
        lambda: runs.finish(sessions, stale, "failed", "stale"),
        lambda: runs.renew_lease(sessions, stale, lease_s=30),
    ):
        with pytest.raises(runs.LeaseLost):
            write()
    assert run_of(api, org, run_id)["status"] == "running"


def test_a_run_whose_worker_was_lost_is_queued_again_after_the_retry_backoff(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, run_id: str
) -> None:
    """Its message went out at once, each time: a script that took its worker down spent its attempts back to back."""
    delays = []
    for attempt in (1, 2):
        assert runs.claim_run(sessions, run_id, worker=f"w{attempt}", lease_s=30) is not None
        expire_lease(sessions, run_id)
        (message_id,) = runs.reap_expired(sessions, max_attempts=3, retry_backoff_s=5)
        with session_scope(sessions) as session:
            message = session.get_one(OutboxMessage, message_id)
            assert message.next_send_at is not None
            delays.append((message.next_send_at - utcnow()).total_seconds())

    assert 4 < delays[0] <= 5 and 9 < delays[1] <= 10
    run = run_of(api, org, run_id)
    assert run["status"] == "queued" and run["error"].endswith("; retrying in 10 s")


def test_a_run_revoked_in_flower_is_cancelled_and_audited_as_flowers_cancel(
    api: TestClient, org: OrgKeys, settings: Settings, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled by a revoke, a run left no audit row, though every other cancel does."""
    monkeypatch.setattr(reaper, "build_settings", lambda: settings)

    reaper.cancel_revoked(run_id)  # what the worker's task_revoked handler calls
    reaper.cancel_revoked(run_id)  # a second revoke, of a run ended already

    assert run_of(api, org, run_id)["status"] == "cancelled"
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.admin).json()
    cancels = [(row["actor"], row["target"], row["detail"]) for row in audit if row["action"] == "training.cancelled"]
    assert cancels == [("flower", run_id, {"reason": "revoked by an operator in Flower"})]


def test_a_running_run_cancelled_over_the_api_then_revoked_in_flower_is_audited_once(
    api: TestClient,
    org: OrgKeys,
    settings: Settings,
    sessions: SessionFactory,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reaper, "build_settings", lambda: settings)
    assert runs.claim_run(sessions, run_id, worker="w1", lease_s=30) is not None
    assert api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer).status_code == 202

    reaper.cancel_revoked(run_id)  # the run still running, its worker yet to stop it

    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.admin).json()
    assert [row["actor"] != "flower" for row in audit if row["action"] == "training.cancelled"] == [True]


def test_a_claim_whose_run_was_taken_over_before_it_read_its_attempt_keeps_its_own_token(
    settings: Settings, sessions: SessionFactory, run_id: str
) -> None:
    """The claim committed; before it read its attempt back, its lease ran out and another worker took the run. It
    read the other claim's number and token, and the two attempts could then both write the run."""
    slow_engine = create_engine(settings.database_url)
    taken_over: list[runs.Attempt | None] = []

    @event.listens_for(slow_engine, "before_cursor_execute")
    def taken_over_before_the_read_back(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("SELECT training_runs") and not taken_over and claimed_once():
            expire_lease(sessions, run_id)
            assert runs.reap_expired(sessions, max_attempts=3, retry_backoff_s=0)
            taken_over.append(runs.claim_run(sessions, run_id, worker="w2", lease_s=30))

    def claimed_once() -> bool:
        with sessions() as session:
            return session.get_one(TrainingRun, run_id).status == "running"

    try:
        first = runs.claim_run(make_session_factory(slow_engine), run_id, worker="w1", lease_s=30)
    finally:
        slow_engine.dispose()

    [second] = taken_over
    assert first is not None and second is not None
    assert (first.number, first.token, second.number, second.token) == (1, 1, 2, 2)
    with pytest.raises(runs.LeaseLost):
        runs.renew_lease(sessions, first, lease_s=30)


def test_an_attempt_whose_lease_ran_out_cannot_renew_it_once_its_slot_went_to_another_run(
    api: TestClient, org: OrgKeys, dataset_id: str, sessions: SessionFactory
) -> None:
    """A worker stalled past its lease, not yet swept: the org's one slot counted free and another run claimed it.
    When the stalled worker wakes, its renewal and every write of its attempt are refused: one run holds the slot."""
    first, second = (
        api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer).json()["runId"]
        for _ in range(2)
    )
    stalled = runs.claim_run(sessions, first, worker="w1", lease_s=30)
    assert stalled is not None
    expire_lease(sessions, first)
    assert runs.claim_run(sessions, second, worker="w2", lease_s=30) is not None
    for write in (
        lambda: runs.renew_lease(sessions, stalled, lease_s=30),
        lambda: runs.cancel_requested(sessions, stalled),
        lambda: runs.set_progress(sessions, stalled, "training", 50),
        lambda: runs.requeue(sessions, stalled, "a transient fault", countdown_s=5),
        lambda: runs.finish(sessions, stalled, "failed", "stale"),
    ):
        with pytest.raises(runs.LeaseLost):
            write()
    with sessions() as session:
        assert runs.running_count(session, org.org_id) == 1
    assert run_of(api, org, first)["progress"] == {"stage": "starting", "percent": 0}
    assert len(runs.reap_expired(sessions, max_attempts=3, retry_backoff_s=0)) == 1
    assert [run_of(api, org, run_id)["status"] for run_id in (first, second)] == ["queued", "running"]
    queue = api.get(f"/v1/orgs/{org.org_id}/queue", headers=org.viewer).json()
    assert (queue["running"], queue["maxConcurrentTrainings"]) == (1, 1)


def test_an_attempt_cut_off_from_the_database_for_its_lease_stops_logging_one_traceback(
    sessions: SessionFactory, run_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Past its lease another worker may have taken the run over: two scripts of one run would run at once. Each
    failed look logged a whole traceback, one a second for as long as an outage lasted."""
    attempt = runs.claim_run(sessions, run_id, worker="w1", lease_s=2)
    assert attempt is not None
    unreachable = make_session_factory(
        create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/kiln", pool_pre_ping=False)
    )

    logging.getLogger(heartbeat_module.__name__).addHandler(caplog.handler)  # Kiln's loggers do not propagate
    try:
        with Heartbeat(unreachable, attempt, lease_s=2) as heartbeat:
            lost = heartbeat.lost.wait(timeout=30)
    finally:
        logging.getLogger(heartbeat_module.__name__).removeHandler(caplog.handler)
        end_run(sessions, run_id)  # as a sweep would: no later test's sweep may find it expired

    assert lost and not heartbeat.cancelled.is_set()
    # Each record once: the handler hears it directly, and again through the root where logging propagates.
    logged = {id(record): record for record in caplog.records if "lease renewal failed" in record.getMessage()}
    tracebacks = [bool(record.exc_info) for record in logged.values()]
    assert len(tracebacks) >= 2 and tracebacks.count(True) == 1


def lease_of(sessions: SessionFactory, run_id: str) -> object:
    with sessions() as session:
        return session.get_one(TrainingRun, run_id).lease_expires_at


def test_an_attempt_whose_database_stops_answering_stops_once_its_lease_has_passed(
    settings: Settings, sessions: SessionFactory, run_id: str
) -> None:
    """A database that takes the heartbeat's statements and never answers (a frozen server, a partition that still
    acknowledges): however long a look would wait for its answer, the attempt stops once the lease has passed by its
    own clock, since by then a sweep may have handed the run to another worker."""
    lease_s = 3.0
    attempt = runs.claim_run(sessions, run_id, worker="w1", lease_s=lease_s)
    assert attempt is not None
    claimed = lease_of(sessions, run_id)
    with freezable_link_to(settings.database_url) as (link, url):
        # Each look on the heartbeat's connection would wait a minute for its answer: many leases.
        silent = make_central_engine(
            settings.model_copy(update={"database_url": url, "database_timeout_s": 60.0}), bound_answers=True
        )
        try:
            with Heartbeat(make_session_factory(silent), attempt, lease_s=lease_s) as heartbeat:
                assert eventually(lambda: lease_of(sessions, run_id) != claimed)  # its connection is open, renewing
                link.freeze()
                lost = heartbeat.lost.wait(timeout=lease_s + 15)
                link.thaw()
        finally:
            silent.dispose()
            end_run(sessions, run_id)  # as a sweep would: no later test's sweep may find it expired

    assert lost and heartbeat.should_stop() and not heartbeat.cancelled.is_set()


def test_a_lost_worker_hands_the_run_back_until_the_attempts_run_out(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, run_id: str
) -> None:
    for attempt in (1, 2):
        assert runs.claim_run(sessions, run_id, worker=f"w{attempt}", lease_s=30) is not None
        expire_lease(sessions, run_id)
        assert len(runs.reap_expired(sessions, max_attempts=3, retry_backoff_s=0)) == 1
        run = run_of(api, org, run_id)
        assert run["status"] == "queued" and f"attempt {attempt} stopped renewing" in run["error"]
    assert runs.claim_run(sessions, run_id, worker="w3", lease_s=30) is not None
    expire_lease(sessions, run_id)
    assert runs.reap_expired(sessions, max_attempts=3, retry_backoff_s=0) == []
    run = run_of(api, org, run_id)
    assert run["status"] == "failed" and run["attempts"] == 3 and "gave up after 3 attempts" in run["error"]


def test_a_live_lease_is_not_reaped(sessions: SessionFactory, run_id: str) -> None:
    assert runs.claim_run(sessions, run_id, worker="w1", lease_s=30) is not None
    assert runs.reap_expired(sessions, max_attempts=3, retry_backoff_s=0) == []


def test_cancelling_a_queued_run_means_it_never_starts(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, run_id: str
) -> None:
    response = api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer)
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert runs.claim_run(sessions, run_id, worker="w1", lease_s=30) is None
    again = api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]


def test_a_cancel_that_meets_the_run_ending_says_how_it_ended(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, settings: Settings, run_id: str
) -> None:
    """The run succeeds after the cancel read it running, before the cancel's update gets its row."""
    assert runs.claim_run(sessions, run_id, worker="w1", lease_s=30) is not None
    ending = create_engine(settings.database_url)
    with ThreadPoolExecutor(max_workers=1) as pool, ending.begin() as connection:
        connection.execute(text("SELECT 1 FROM training_runs WHERE id = :id FOR UPDATE"), {"id": run_id})
        cancelling = pool.submit(api.post, f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer)
        while not waiting_for_a_row_lock(ending):
            time.sleep(0.05)
        connection.execute(text("UPDATE training_runs SET status = 'succeeded' WHERE id = :id"), {"id": run_id})
    ending.dispose()

    response = cancelling.result(timeout=30)
    assert (response.status_code, response.json()["error"]) == (409, f"run {run_id} is already succeeded")


def test_a_run_cancelled_while_queued_says_so_in_its_log(api: TestClient, org: OrgKeys, run_id: str) -> None:
    """Every run keeps a training log, a run that never started too: its one line is the cancel."""
    assert api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer).status_code == 202
    lines = api.get(f"/v1/orgs/{org.org_id}/trainings/{run_id}/logs", headers=org.viewer).json()
    assert [(line["level"], line["stage"], line["message"]) for line in lines] == [
        ("info", "cancelled", "cancelled before it started")
    ]


def test_cancelling_a_running_run_asks_its_worker_to_stop(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, run_id: str
) -> None:
    attempt = runs.claim_run(sessions, run_id, worker="w1", lease_s=30)
    assert attempt is not None
    response = api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer)
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancelRequested"] is True
    assert runs.renew_lease(sessions, attempt, lease_s=30) is True


def test_a_dead_workers_run_that_was_asked_to_cancel_ends_cancelled(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, run_id: str
) -> None:
    assert runs.claim_run(sessions, run_id, worker="w1", lease_s=30) is not None
    api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer)
    expire_lease(sessions, run_id)
    assert runs.reap_expired(sessions, max_attempts=3, retry_backoff_s=0) == []
    assert run_of(api, org, run_id)["status"] == "cancelled"


def test_a_queued_run_left_flagged_to_cancel_ends_cancelled_when_claimed_or_swept(
    api: TestClient, org: OrgKeys, dataset_id: str, sessions: SessionFactory
) -> None:
    """No worker claims a queued run asked to cancel: left so (as a cancel racing the sweep once left it), it
    would read queued for good."""
    claimed, swept = (
        api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id), headers=org.trainer).json()["runId"]
        for _ in range(2)
    )
    with session_scope(sessions) as session:
        session.execute(update(TrainingRun).where(TrainingRun.id.in_([claimed, swept])).values(cancel_requested=True))
    assert runs.claim_run(sessions, claimed, worker="w1", lease_s=30) is None
    assert runs.reap_expired(sessions, max_attempts=3, retry_backoff_s=0) == []
    for run_id in (claimed, swept):
        assert run_of(api, org, run_id)["status"] == "cancelled"
        lines = api.get(f"/v1/orgs/{org.org_id}/trainings/{run_id}/logs", headers=org.viewer).json()
        assert [line["message"] for line in lines] == ["cancelled before it started"]


@pytest.mark.parametrize("end", ["register", "fail", "retry"])
def test_a_lease_renewed_while_the_attempt_ends_waits_for_the_end_and_never_undoes_it(
    sessions: SessionFactory, settings: Settings, org: OrgKeys, run_id: str, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """The heartbeat renews the lease (the org's row, then the run's) while the attempt's end has written the run's
    row and is about to wake the org's waiting runs: the renewal waits, the end lands. Were the end to take the
    org's lock after the run's row, the two would wait for each other and PostgreSQL would fail one of them, here
    the end, which waited first: a trained and judged version thrown away."""
    attempt = runs.claim_run(sessions, run_id, worker="w1", lease_s=30)
    assert attempt is not None
    version = "v2024-01-15T10-30-00-000Z_a1b2c3d4"
    trained = runs.TrainedVersion(
        version=version,
        sha256="0" * 64,
        size_bytes=1,
        artifact_prefix=f"orgs/{org.org_id}/models/{version}/",
        feature_columns=["temperature"],
        target_column="failed",
        classes=[0, 1],
        metrics={},
        validation={"passed": True, "failed": []},
    )
    endings: dict[str, Callable[[], object]] = {
        "register": lambda: runs.register_version(sessions, attempt, trained),
        "fail": lambda: runs.finish(sessions, attempt, "failed", "the script crashed"),
        "retry": lambda: runs.requeue(sessions, attempt, "the data source is out of reach", countdown_s=5),
    }
    ending_holds_the_run, go_on_ending, renewal_holds_the_org, go_on_renewing = (threading.Event() for _ in range(4))
    wake_waiting, write_fenced = runs.wake_waiting, runs._write_fenced

    def ending_pauses(session: Any, org_id: str) -> list[int]:
        if threading.current_thread().name == "ending":
            ending_holds_the_run.set()
            go_on_ending.wait(10)
        return wake_waiting(session, org_id)

    def renewal_pauses(session: Any, attempt: runs.Attempt, **values: Any) -> None:
        if threading.current_thread().name == "renewal":
            renewal_holds_the_org.set()
            go_on_renewing.wait(10)
        write_fenced(session, attempt, **values)

    monkeypatch.setattr(runs, "wake_waiting", ending_pauses)
    monkeypatch.setattr(runs, "_write_fenced", renewal_pauses)
    outcome: dict[str, object] = {}

    def outcome_of(name: str, step: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                outcome[name] = step()
            except Exception as error:
                outcome[name] = error

        return run

    ending = threading.Thread(target=outcome_of("end", endings[end]), name="ending")
    renewal = threading.Thread(
        target=outcome_of("renewal", lambda: runs.renew_lease(sessions, attempt, lease_s=30)), name="renewal"
    )
    ending.start()
    assert ending_holds_the_run.wait(10)
    renewal.start()
    assert eventually(lambda: renewal_holds_the_org.is_set() or waiting_for_a_lock(settings.database_url))
    go_on_ending.set()
    assert eventually(lambda: not ending.is_alive() or waiting_for_a_lock(settings.database_url))
    go_on_renewing.set()
    ending.join(30)
    renewal.join(30)

    assert not isinstance(outcome["end"], Exception), outcome
    assert isinstance(outcome["renewal"], runs.LeaseLost)
    with sessions() as session:
        run = session.get_one(TrainingRun, run_id)
        assert run.status == {"register": "succeeded", "fail": "failed", "retry": "queued"}[end]


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'kiln.db'}"
        upgrade(url)
        return url
    return str(request.getfixturevalue("settings").database_url)


def waiting_for_a_row_lock(engine: Engine, statement: str = "UPDATE training_runs%") -> bool:
    with engine.connect() as connection:
        return bool(
            connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE :statement"
                ),
                {"statement": statement},
            )
        )


def test_a_cancel_that_lands_while_the_sweep_hands_the_run_back_ends_the_run_cancelled(
    database_url: str, org_id: str
) -> None:
    """The cancel commits after the sweep read the lost run and before it wrote it (on PostgreSQL the cancel waits
    for the sweep's row lock). Its 202 holds: the run ends cancelled, and the message the sweep sent starts
    nothing."""
    sweeper_engine, api_engine = make_engine(database_url), make_engine(database_url)
    sweeper, api = make_session_factory(sweeper_engine), make_session_factory(api_engine)
    try:
        [run_id] = queue_runs(api, org_id, 1)
        assert runs.claim_run(api, run_id, worker="w1", lease_s=30) is not None
        expire_lease(api, run_id)
        answers: list[str | None] = []

        def cancel() -> None:
            with session_scope(api) as session:
                answers.append(request_cancel(session, run_id))

        cancelling = threading.Thread(target=cancel)

        @event.listens_for(sweeper_engine, "before_cursor_execute")
        def cancel_lands_now(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.startswith("UPDATE training_runs") and not cancelling.is_alive() and not answers:
                cancelling.start()
                deadline = time.monotonic() + 10
                while cancelling.is_alive() and not (
                    database_url.startswith("postgresql") and waiting_for_a_row_lock(api_engine)
                ):
                    assert time.monotonic() < deadline, "the cancel neither ended nor waited for the row"
                    time.sleep(0.01)

        runs.reap_expired(sweeper, max_attempts=3, retry_backoff_s=0)
        cancelling.join(timeout=10)
        assert answers and answers[0] in ("running", "cancelled")  # POST .../cancel answers 202
        assert runs.claim_run(api, run_id, worker="w2", lease_s=30) is None
        with api() as session:
            run = session.get_one(TrainingRun, run_id)
            assert (run.status, run.cancel_requested) == ("cancelled", True)
    finally:
        sweeper_engine.dispose()
        api_engine.dispose()


def test_the_log_keeps_every_line_in_order(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, run_id: str
) -> None:
    attempt = runs.claim_run(sessions, run_id, worker="w1", lease_s=30)
    assert attempt is not None
    runs.log(sessions, attempt, "started", "attempt 1 on w1")
    runs.finish(sessions, attempt, "failed", "the data source is gone")
    lines = api.get(f"/v1/orgs/{org.org_id}/trainings/{run_id}/logs", headers=org.viewer).json()
    assert [(line["stage"], line["level"], line["message"]) for line in lines] == [
        ("started", "info", "attempt 1 on w1"),
        ("failed", "error", "the data source is gone"),
    ]


def test_the_log_is_read_in_pages_oldest_first(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, run_id: str
) -> None:
    attempt = runs.claim_run(sessions, run_id, worker="w1", lease_s=30)
    assert attempt is not None
    for line in range(5):
        runs.log(sessions, attempt, "training", f"line {line}")
    url = f"/v1/orgs/{org.org_id}/trainings/{run_id}/logs"
    pages = [api.get(url, params={"limit": 2}, headers=org.viewer).json()]
    while pages[-1]:
        pages.append(api.get(url, params={"limit": 2, "after": pages[-1][-1]["id"]}, headers=org.viewer).json())
    assert [[line["message"] for line in page] for page in pages] == [
        ["line 0", "line 1"],
        ["line 2", "line 3"],
        ["line 4"],
        [],
    ]


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[Callable[[], SessionFactory]]:
    """The embedded stack's database: a SQLite file, each worker with an engine of its own."""
    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    upgrade(url)
    engines: list[Engine] = []

    def worker_sessions() -> SessionFactory:
        engines.append(make_engine(url))
        return make_session_factory(engines[-1])

    yield worker_sessions
    for engine in engines:
        engine.dispose()


def queue_runs(sessions: SessionFactory, org_id: str, count: int) -> list[str]:
    with session_scope(sessions) as session:
        session.add(Organization(id=org_id, name=org_id, config={"maxConcurrentTrainings": 1}))
        session.flush()
        dataset = Dataset(
            id=f"ds_{org_id}",
            org_id=org_id,
            object_key="k",
            filename="f",
            row_count=1,
            columns=[],
            size_bytes=1,
            sha256="-",
        )
        session.add(dataset)
        session.flush()
        config = TrainingConfig(dataset_id=dataset.id, target_column="failed", feature_columns=["temperature"])
        return [
            queue_run(session, org_id=org_id, config=config, dataset_id=dataset.id, actor="test", trigger="api")[0].id
            for _ in range(count)
        ]


def claim_together(workers: list[SessionFactory], run_ids: list[str]) -> list[runs.Attempt]:
    """Each worker claims one of the runs, all at the same moment; the attempts of those that got one."""
    start = threading.Barrier(len(workers))

    def claim(sessions: SessionFactory, run_id: str) -> runs.Attempt | None:
        start.wait()
        try:
            return runs.claim_run(sessions, run_id, worker="w", lease_s=30)
        except runs.NoSlot:
            return None

    with ThreadPoolExecutor(len(workers)) as pool:
        return [attempt for attempt in pool.map(claim, workers, run_ids) if attempt is not None]


def test_workers_on_sqlite_claim_no_more_runs_than_the_orgs_limit(
    sqlite_sessions: Callable[[], SessionFactory], org_id: str
) -> None:
    """SQLite ignores FOR UPDATE: each claim must take the database's write lock before it counts the org's runs."""
    workers = [sqlite_sessions() for _ in range(4)]
    for trial in range(10):
        claimed = claim_together(workers, queue_runs(workers[0], f"{org_id}-{trial}", len(workers)))
        assert len(claimed) == 1, f"trial {trial}: {len(claimed)} runs of an org with a limit of 1 claimed"


def test_a_message_delivered_twice_whose_second_claim_waited_for_the_first_leaves_the_run_claimed_once(
    settings: Settings, org_id: str
) -> None:
    """PostgreSQL: the second claim read the run queued, then waited for the org's lock while the first claimed it.
    It takes no attempt, and the run, running, is not marked as waiting for a slot (the org's one slot is its own)."""
    first_engine, second_engine = make_engine(settings.database_url), make_engine(settings.database_url)
    first, second = make_session_factory(first_engine), make_session_factory(second_engine)
    try:
        [run_id] = queue_runs(first, org_id, 1)
        outcome: list[runs.Attempt | str | None] = []

        def claim_again() -> None:
            try:
                outcome.append(runs.claim_run(second, run_id, worker="w2", lease_s=30))
            except runs.NoSlot:
                outcome.append("no slot")

        waiting = threading.Thread(target=claim_again)
        with session_scope(first) as session:
            lock_org(session, org_id)  # the first claim holds the org's lock...
            waiting.start()
            deadline = time.monotonic() + 10
            while not waiting_for_a_row_lock(first_engine, "UPDATE organizations%"):  # ...the second has read the run
                assert time.monotonic() < deadline, "the second claim never waited for the org's lock"
                time.sleep(0.01)
            lease = utcnow() + timedelta(seconds=30)
            session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == run_id)
                .values(status="running", worker="w1", lease_expires_at=lease)
            )
        waiting.join(timeout=10)
        assert outcome == [None]
        with first() as session:
            run = session.get_one(TrainingRun, run_id)
            assert (run.status, run.worker, run.waiting_for_slot) == ("running", "w1", False)
    finally:
        first_engine.dispose()
        second_engine.dispose()


def backdate_message(sessions: SessionFactory, run_id: str, by: timedelta) -> None:
    with session_scope(sessions) as session:
        session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(message_queued_at=utcnow() - by))


def test_a_run_still_queued_long_after_its_message_has_it_queued_again_once_a_while(
    api: TestClient, org: OrgKeys, sessions: SessionFactory, settings: Settings, run_id: str
) -> None:
    """Redis restarted without its append-only file: the run's message was gone, nothing sent it again, and the run
    stayed queued for good, even across a restart of the whole stack."""
    broker = redis.Redis.from_url(settings.redis_url)
    broker.delete(train_queue(org.org_id))  # as a Redis restarted empty leaves it
    backdate_message(sessions, run_id, timedelta(hours=2))

    requeued = runs.requeue_lost(sessions, after=timedelta(hours=1))
    again = runs.requeue_lost(sessions, after=timedelta(hours=1))

    with sessions() as session:
        messages = [session.get_one(OutboxMessage, message_id).payload for message_id in requeued]
    assert messages == [{"run_id": run_id, "org_id": org.org_id}] and again == []
    audit = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.admin).json()
    assert [row["target"] for row in audit if row["action"] == "training.requeued"] == [run_id]
    assert run_of(api, org, run_id)["status"] == "queued"


def test_a_run_waiting_for_a_slot_or_out_its_retry_s_backoff_is_not_queued_again(
    sessions: SessionFactory, run_id: str
) -> None:
    """One waiting for a slot has no message by design; a retry's message is queued when its backoff ends."""
    backdate_message(sessions, run_id, timedelta(hours=2))
    with session_scope(sessions) as session:
        session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(waiting_for_slot=True))
    waiting = runs.requeue_lost(sessions, after=timedelta(hours=1))
    attempt = runs.claim_run(sessions, run_id, worker="w1", lease_s=30)
    assert attempt is not None
    runs.requeue(sessions, attempt, "the object store is unreachable", countdown_s=7200)

    assert waiting == [] and runs.requeue_lost(sessions, after=timedelta(hours=1)) == []


def test_a_run_queued_again_before_waits_as_long_again_before_the_next_copy(
    sessions: SessionFactory, run_id: str
) -> None:
    """An org whose own workers were offline for a weekend got a copy of each queued run's message, and an audit
    row, every visibility timeout: the waits now double."""

    def queued(created_ago: timedelta, message_ago: timedelta) -> None:
        now = utcnow()
        with session_scope(sessions) as session:
            session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == run_id)
                .values(created_at=now - created_ago, message_queued_at=now - message_ago)
            )

    queued(timedelta(hours=3), timedelta(hours=1.2))  # it had waited 1.8 h before its last copy
    early = runs.requeue_lost(sessions, after=timedelta(hours=1))
    queued(timedelta(hours=3), timedelta(hours=1.9))  # it had waited 1.1 h, and has waited 1.9 h since
    due = runs.requeue_lost(sessions, after=timedelta(hours=1))

    assert early == [] and len(due) == 1
