"""Organizations sharing the platform: limits at the door, idempotent submissions, slots across workers, the
queue's state, schedules fired once, data that stays on its premises, and the audit trail of every change."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, select, update

from services.api.ratelimit import WINDOW_S
from services.trainer import runs
from services.trainer.beat import fire_due_schedules
from shared.db.models import OutboxMessage, Schedule, TrainingRun
from shared.db.session import SessionFactory, make_session_factory, session_scope
from shared.db.types import utcnow
from shared.settings import Settings
from tests.integration.conftest import ADMIN, TRAINING_CSV, OrgKeys, config, create_org_with_keys, upload
from tests.support.seed import seed_versions


@pytest.fixture
def sessions(settings: Settings) -> Iterator[SessionFactory]:
    engine = create_engine(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


def set_config(api: TestClient, org: OrgKeys, **config_fields: Any) -> None:
    response = api.patch(f"/v1/orgs/{org.org_id}", json={"config": config_fields}, headers=ADMIN)
    assert response.status_code == 200, response.text


def submit(api: TestClient, org: OrgKeys, dataset_id: str, key: str | None = None, **changes: Any) -> Any:
    headers = {**org.trainer, **({"Idempotency-Key": key} if key else {})}
    return api.post(f"/v1/orgs/{org.org_id}/trainings", json=config(dataset_id, **changes), headers=headers)


def test_the_same_idempotency_key_and_body_return_the_same_run(api: TestClient, org: OrgKeys, dataset_id: str) -> None:
    first = submit(api, org, dataset_id, key="nightly-2026-11-25")
    again = submit(api, org, dataset_id, key="nightly-2026-11-25")
    assert first.status_code == again.status_code == 202
    assert again.json()["runId"] == first.json()["runId"]
    other_body = submit(api, org, dataset_id, key="nightly-2026-11-25", validationSplit=0.3)
    assert other_body.status_code == 409 and other_body.json()["field"] == "Idempotency-Key"
    assert len(api.get(f"/v1/orgs/{org.org_id}/trainings", headers=org.viewer).json()) == 1


def early_in_a_minute() -> None:
    """Wait, if need be, for a minute of the rate's count to begin: a test's submissions must all fall in one (a
    slow machine took the fourth of four into the next, which counted it afresh)."""
    left_s = WINDOW_S - time.time() % WINDOW_S
    if left_s < 30:
        time.sleep(left_s + 0.1)


def test_submissions_over_the_orgs_rate_are_refused_with_retry_after(
    api: TestClient, org: OrgKeys, dataset_id: str
) -> None:
    set_config(api, org, submissionsPerMinute=3)
    early_in_a_minute()
    answers = [submit(api, org, dataset_id) for _ in range(4)]
    assert [answer.status_code for answer in answers[:3]] == [202, 202, 202]
    refused = answers[3]
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 61
    assert "3 trainings and judgements a minute" in refused.json()["error"]


def test_judgements_count_against_the_orgs_rate_with_its_trainings(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine
) -> None:
    """A judgement keeps a worker busy as a training does: 50 of them were queued past a rate of 1 a minute."""
    set_config(api, org, submissionsPerMinute=2)
    (version,) = seed_versions(engine, org.org_id, 1)
    early_in_a_minute()
    assert submit(api, org, dataset_id).status_code == 202
    judge = f"/v1/orgs/{org.org_id}/models/{version}/validate"
    answers = [api.post(judge, headers=org.trainer) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [202, 429]
    assert "2 trainings and judgements a minute" in answers[1].json()["error"]
    assert answers[1].headers["retry-after"].isdigit()


def test_a_slot_is_taken_once_across_workers_and_freed_for_the_next_run(
    api: TestClient, org: OrgKeys, dataset_id: str, sessions: SessionFactory
) -> None:
    first, second = (submit(api, org, dataset_id).json()["runId"] for _ in range(2))
    attempt = runs.claim_run(sessions, first, worker="w1", lease_s=30)
    assert attempt is not None
    with pytest.raises(runs.NoSlot):
        runs.claim_run(sessions, second, worker="w2", lease_s=30)
    with session_scope(sessions) as session:  # the waiting run was submitted five minutes ago
        session.execute(
            update(TrainingRun).where(TrainingRun.id == second).values(created_at=utcnow() - timedelta(minutes=5))
        )
    queue = api.get(f"/v1/orgs/{org.org_id}/queue", headers=org.viewer).json()
    assert (queue["running"], queue["queued"], queue["waitingForSlot"], queue["maxConcurrentTrainings"]) == (1, 1, 1, 1)
    assert 300 <= queue["oldestWaitS"] < 330  # five minutes, and under half a minute more for this test to ask
    runs.finish(sessions, attempt, "failed", "done with it")
    with sessions() as session:
        woken = session.scalars(select(OutboxMessage).where(OutboxMessage.payload["run_id"].as_string() == second))
        assert len(woken.all()) == 2  # the submission's message, and the wake-up
        assert not session.get_one(TrainingRun, second).waiting_for_slot
    assert runs.claim_run(sessions, second, worker="w2", lease_s=30) is not None


def test_a_dead_workers_slot_is_free_once_its_lease_runs_out(
    api: TestClient, org: OrgKeys, dataset_id: str, sessions: SessionFactory
) -> None:
    first, second = (submit(api, org, dataset_id).json()["runId"] for _ in range(2))
    assert runs.claim_run(sessions, first, worker="dead", lease_s=30) is not None
    with session_scope(sessions) as session:
        session.execute(
            update(TrainingRun).where(TrainingRun.id == first).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert runs.claim_run(sessions, second, worker="alive", lease_s=30) is not None


def test_two_orgs_slots_are_their_own(api: TestClient, org: OrgKeys, dataset_id: str, sessions: SessionFactory) -> None:
    """Another org's running trainings take none of this org's slots, and this org's take none of its."""
    other = create_org_with_keys(api, org.org_id + "-other")
    other_dataset = upload(api, other, TRAINING_CSV, timestampColumn="timestamp").json()["datasetId"]
    for each in (org, other):
        set_config(api, each, maxConcurrentTrainings=2)
    others = [submit(api, other, other_dataset).json()["runId"] for _ in range(3)]
    assert runs.claim_run(sessions, others[0], worker="w1", lease_s=30) is not None
    assert runs.claim_run(sessions, others[1], worker="w2", lease_s=30) is not None
    ids = [submit(api, org, dataset_id).json()["runId"] for _ in range(3)]
    assert runs.claim_run(sessions, ids[0], worker="w3", lease_s=30) is not None
    assert runs.claim_run(sessions, ids[1], worker="w4", lease_s=30) is not None
    for org_at_its_limit, run_id in ((org, ids[2]), (other, others[2])):
        with pytest.raises(runs.NoSlot, match=f"organization {re.escape(org_at_its_limit.org_id)} has"):
            runs.claim_run(sessions, run_id, worker="w5", lease_s=30)


SCHEDULE = {"pattern": "0 2 * * 0", "timezone": "America/New_York", "enabled": True}


def test_a_schedule_shows_its_next_fire_times_and_refuses_bad_patterns(
    api: TestClient, org: OrgKeys, dataset_id: str
) -> None:
    body = {**SCHEDULE, "trainingConfig": config(dataset_id)}
    response = api.put(f"/v1/orgs/{org.org_id}/schedule", json=body, headers=org.admin)
    assert response.status_code == 200, response.text
    shown = api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).json()
    assert len(shown["nextFireTimes"]) == 5 and "first occurrence" in shown["dstPolicy"]
    for field, value in (("pattern", "every sunday"), ("timezone", "Atlantis/Capital")):
        bad = api.put(f"/v1/orgs/{org.org_id}/schedule", json={**body, field: value}, headers=org.admin)
        assert bad.status_code == 422 and bad.json()["field"] == field
    assert api.delete(f"/v1/orgs/{org.org_id}/schedule", headers=org.admin).status_code == 204
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).status_code == 404


def make_due(sessions: SessionFactory, org_id: str, minutes_ago: float) -> None:
    with session_scope(sessions) as session:
        session.execute(
            update(Schedule)
            .where(Schedule.org_id == org_id)
            .values(next_fire_at=utcnow() - timedelta(minutes=minutes_ago))
        )


def scheduled_runs(api: TestClient, org: OrgKeys) -> list[dict[str, Any]]:
    return [
        run
        for run in api.get(f"/v1/orgs/{org.org_id}/trainings", headers=org.viewer).json()
        if run["trigger"] == "schedule"
    ]


def test_two_beats_firing_at_once_queue_one_run(
    api: TestClient, org: OrgKeys, dataset_id: str, sessions: SessionFactory
) -> None:
    api.put(
        f"/v1/orgs/{org.org_id}/schedule", json={**SCHEDULE, "trainingConfig": config(dataset_id)}, headers=org.admin
    )
    make_due(sessions, org.org_id, minutes_ago=0.1)
    barrier = threading.Barrier(2)

    def beat() -> None:
        barrier.wait()
        fire_due_schedules(sessions, now=utcnow())

    beats = [threading.Thread(target=beat) for _ in range(2)]
    for thread in beats:
        thread.start()
    for thread in beats:
        thread.join()
    assert len(scheduled_runs(api, org)) == 1
    schedule = api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).json()
    assert schedule["lastFiredAt"] is not None


def test_a_fire_time_missed_while_no_beat_ran_is_skipped_and_audited(
    api: TestClient, org: OrgKeys, dataset_id: str, sessions: SessionFactory
) -> None:
    api.put(
        f"/v1/orgs/{org.org_id}/schedule", json={**SCHEDULE, "trainingConfig": config(dataset_id)}, headers=org.admin
    )
    make_due(sessions, org.org_id, minutes_ago=60)
    fire_due_schedules(sessions, now=utcnow())
    assert scheduled_runs(api, org) == []
    actions = [entry["action"] for entry in api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()]
    assert "schedule.missed" in actions


def test_an_org_whose_data_stays_home_cannot_upload_datasets(api: TestClient, org: OrgKeys) -> None:
    set_config(api, org, dataResidency="local")
    response = upload(api, org, b"a,y\n1,0\n2,1\n")
    assert response.status_code == 409 and "premises" in response.json()["error"]


def test_every_change_leaves_an_audit_row(api: TestClient, org: OrgKeys, dataset_id: str) -> None:
    run_id = submit(api, org, dataset_id).json()["runId"]
    api.post(f"/v1/orgs/{org.org_id}/trainings/{run_id}/cancel", headers=org.trainer)
    api.put(
        f"/v1/orgs/{org.org_id}/datasource",
        headers=org.admin,
        json={"url": "postgresql+psycopg2://u:secret@db/plant", "table": "readings"},
    )
    api.put(
        f"/v1/orgs/{org.org_id}/schedule", json={**SCHEDULE, "trainingConfig": config(dataset_id)}, headers=org.admin
    )
    api.delete(f"/v1/orgs/{org.org_id}/schedule", headers=org.admin)
    set_config(api, org, maxConcurrentTrainings=2)
    trail = api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()
    actions = [entry["action"] for entry in trail][::-1]
    assert actions == [
        "org.created",
        "key.created",
        "key.created",
        "key.created",
        "dataset.uploaded",
        "training.submitted",
        "training.cancelled",
        "datasource.set",
        "schedule.set",
        "schedule.deleted",
        "org.updated",
    ]
    assert all(entry["actor"] and entry["at"] for entry in trail)
    assert "secret" not in str(trail)
    assert api.get(f"/v1/orgs/{org.org_id}/audit?limit=2", headers=org.viewer).json() == trail[:2]
