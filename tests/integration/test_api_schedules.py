"""Training and sync schedules: a pattern or timezone that cannot be scheduled is a 422 naming it, and nothing
is stored; the beats fire them alike."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text, update

import services.sync.beat as sync_beat
import services.trainer.beat as trainer_beat
from services.api.routers import schedule as schedule_router
from services.api.routers import sync_sources as sync_router
from services.sync.beat import fire_due_sync_schedules
from services.trainer.beat import fire_due_schedules
from shared.db.models import Schedule, SyncJob, SyncSchedule, TrainingRun
from shared.db.session import make_session_factory, session_scope
from shared.db.types import utcnow
from shared.schedules import next_fire_times
from tests.integration.conftest import TRAINING_CSV, OrgKeys, config, create_org_with_keys, upload
from tests.support.polling import eventually, start_until_it_waits_for_a_lock

SOURCE: dict[str, Any] = {"url": "sqlite:////srv/plant.db", "tables": [{"name": "readings", "primaryKey": "id"}]}
NEVER_FIRES = ["0 0 31 2 *", "0 0 30 2 *", "15 3 31 4,6,9,11 *"]
SUNDAY_TWO = datetime(2026, 12, 6, 2, 0, tzinfo=UTC)  # a Sunday, when `0 2 * * 0` fires in UTC


def put_training_schedule(api: TestClient, org: OrgKeys, dataset_id: str, **schedule: Any) -> Any:
    body = {"trainingConfig": config(dataset_id), **schedule}
    return api.put(f"/v1/orgs/{org.org_id}/schedule", json=body, headers=org.admin)


def sync_source(api: TestClient, org: OrgKeys, url: str = "sqlite:////srv/plant.db") -> str:
    created = api.post(f"/v1/orgs/{org.org_id}/sync-sources", json={**SOURCE, "url": url}, headers=org.admin)
    assert created.status_code == 201, created.text
    return str(created.json()["sourceId"])


@pytest.mark.parametrize("pattern", NEVER_FIRES)
@pytest.mark.parametrize("enabled", [True, False])
def test_a_training_pattern_that_never_fires_is_refused_and_not_stored(
    api: TestClient, org: OrgKeys, dataset_id: str, pattern: str, enabled: bool
) -> None:
    response = put_training_schedule(api, org, dataset_id, pattern=pattern, enabled=enabled)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "pattern"
    assert "never fires" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).status_code == 404


@pytest.mark.parametrize("pattern", NEVER_FIRES)
def test_a_sync_pattern_that_never_fires_is_refused_and_not_stored(api: TestClient, org: OrgKeys, pattern: str) -> None:
    source_id = sync_source(api, org)
    url = f"/v1/orgs/{org.org_id}/sync-sources/{source_id}/schedule"
    response = api.put(url, json={"pattern": pattern}, headers=org.admin)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "pattern"
    assert "never fires" in response.json()["error"]
    assert api.get(url, headers=org.viewer).status_code == 404


@pytest.mark.parametrize("pattern", ["R R * * *", "0 2 * * R"])
def test_a_random_pattern_is_refused_and_not_stored(
    api: TestClient, org: OrgKeys, dataset_id: str, pattern: str
) -> None:
    """croniter reads R as a time drawn anew at each reading: each look at the schedule would show other times."""
    response = put_training_schedule(api, org, dataset_id, pattern=pattern)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "pattern"
    assert "random" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).status_code == 404
    url = f"/v1/orgs/{org.org_id}/sync-sources/{sync_source(api, org)}/schedule"
    assert api.put(url, json={"pattern": pattern}, headers=org.admin).status_code == 422
    assert api.get(url, headers=org.viewer).status_code == 404


def test_a_pattern_with_a_value_outside_its_field_is_refused_naming_the_field_and_not_stored(
    api: TestClient, org: OrgKeys, dataset_id: str
) -> None:
    """It was called "not a 5-field cron pattern", which sent users counting five fields that were there."""
    response = put_training_schedule(api, org, dataset_id, pattern="61 * * * *")
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "pattern"
    assert response.json()["error"] == "pattern '61 * * * *': minute 61 is outside 0-59"
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).status_code == 404
    url = f"/v1/orgs/{org.org_id}/sync-sources/{sync_source(api, org)}/schedule"
    response = api.put(url, json={"pattern": "0 2-25 * * *"}, headers=org.admin)
    assert (response.status_code, response.json()["error"]) == (422, "pattern '0 2-25 * * *': hour 25 is outside 0-23")


def test_a_pattern_that_fires_only_in_leap_years_is_kept(api: TestClient, org: OrgKeys, dataset_id: str) -> None:
    response = put_training_schedule(api, org, dataset_id, pattern="0 0 29 2 *")
    assert response.status_code == 200, response.text
    assert [fire[4:10] for fire in response.json()["nextFireTimes"]] == ["-02-29"] * 5


# Each fires hourly; PostgreSQL keeps at most 100 characters of a pattern and 64 of a timezone.
TOO_LONG = [
    ({"pattern": "0" * 97 + " * * * *"}, "pattern", "at most 100 characters"),
    ({"pattern": "0 * * * *", "timezone": "Etc/" + "U" * 61}, "timezone", "at most 64 characters"),
]


@pytest.mark.parametrize("timezone", ["localtime", "posixrules", "right/UTC", "posix/Europe/Paris"])
def test_a_timezone_naming_a_file_of_the_hosts_zoneinfo_folder_not_an_iana_zone_is_refused_and_not_stored(
    api: TestClient, org: OrgKeys, dataset_id: str, timezone: str
) -> None:
    """ZoneInfo reads them, but they mean what the host says (`localtime` is its own setting): the api showed one
    time and beat, on another host, fired at another."""
    schedule = {"pattern": "0 2 * * 0", "timezone": timezone}
    training = put_training_schedule(api, org, dataset_id, **schedule)
    sync_url = f"/v1/orgs/{org.org_id}/sync-sources/{sync_source(api, org)}/schedule"
    sync = api.put(sync_url, json=schedule, headers=org.admin)
    for response, url in [(training, f"/v1/orgs/{org.org_id}/schedule"), (sync, sync_url)]:
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "timezone" and "IANA" in response.json()["error"]
        assert api.get(url, headers=org.viewer).status_code == 404


@pytest.mark.parametrize(("schedule", "field", "words"), TOO_LONG)
def test_a_training_schedule_longer_than_its_columns_is_refused_and_not_stored(
    api: TestClient, org: OrgKeys, dataset_id: str, schedule: dict[str, str], field: str, words: str
) -> None:
    response = put_training_schedule(api, org, dataset_id, **schedule)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert words in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).status_code == 404


@pytest.mark.parametrize(("schedule", "field", "words"), TOO_LONG)
def test_a_sync_schedule_longer_than_its_columns_is_refused_and_not_stored(
    api: TestClient, org: OrgKeys, schedule: dict[str, str], field: str, words: str
) -> None:
    url = f"/v1/orgs/{org.org_id}/sync-sources/{sync_source(api, org)}/schedule"
    response = api.put(url, json=schedule, headers=org.admin)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert words in response.json()["error"]
    assert api.get(url, headers=org.viewer).status_code == 404


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"positiveClass": 10**20}, "trainingConfig.positiveClass", "64-bit integer"),
        ({"positiveClass": -(2**63) - 1}, "trainingConfig.positiveClass", "64-bit integer"),
        ({"positiveClass": "f" * 201}, "trainingConfig.positiveClass", "at most 200 characters"),
        ({"targetColumn": "t" * 201}, "trainingConfig.targetColumn", "at most 200 characters"),
        ({"dataRange": {"startDate": 0, "endDate": "2024-01-01"}}, "trainingConfig.dataRange.startDate", "ISO 8601"),
        # Checked against the dataset rather than by the schema: named inside the config all the same.
        ({"targetColumn": "nope"}, "trainingConfig.targetColumn", "is not a column of dataset"),
        ({"featureColumns": ["nope"]}, "trainingConfig.featureColumns", "featureColumns not in dataset"),
    ],
)
def test_a_schedule_whose_config_a_submission_refuses_is_refused_and_not_stored(
    api: TestClient, org: OrgKeys, dataset_id: str, changes: dict[str, Any], field: str, words: str
) -> None:
    """A schedule's runs are submissions too: its config is checked as a POST's is."""
    body = {"pattern": "0 2 * * 0", "trainingConfig": config(dataset_id, **changes)}
    response = api.put(f"/v1/orgs/{org.org_id}/schedule", json=body, headers=org.admin)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert words in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).status_code == 404


def make_sync_schedule_due(engine: Engine, source_id: str, *, minutes_ago: float) -> None:
    with session_scope(make_session_factory(engine)) as session:
        session.execute(
            update(SyncSchedule)
            .where(SyncSchedule.source_id == source_id)
            .values(next_fire_at=utcnow() - timedelta(minutes=minutes_ago))
        )


def test_a_sync_fire_missed_while_no_sync_beat_ran_is_skipped_and_audited_like_a_training_one(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync beat back after most of a day starts no day-old job; it takes up the schedule at its next fire time."""
    source_id = sync_source(api, org)
    set_sync_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(hours=1), source_id, pattern="0 2 * * *")
    sessions = make_session_factory(engine)
    fire_due_sync_schedules(sessions, now=SUNDAY_TWO + timedelta(hours=23))
    assert api.get(f"/v1/orgs/{org.org_id}/sync-jobs", headers=org.viewer).json() == []
    [missed] = audited(api, org, "sync.schedule.missed")
    assert missed["detail"] == {
        "sourceId": source_id,
        "missed": 1,
        "firstMissedAt": SUNDAY_TWO.isoformat(),
        "lastMissedAt": SUNDAY_TWO.isoformat(),
        "firedAt": None,
    }
    fire_due_sync_schedules(sessions, now=SUNDAY_TWO + timedelta(days=1, seconds=6))  # the next 02:00
    assert [job["trigger"] for job in api.get(f"/v1/orgs/{org.org_id}/sync-jobs", headers=org.viewer).json()] == [
        "schedule"
    ]


def audited(api: TestClient, org: OrgKeys, action: str) -> list[dict[str, Any]]:
    return [
        entry
        for entry in api.get(f"/v1/orgs/{org.org_id}/audit", headers=org.viewer).json()
        if entry["action"] == action
    ]


def scheduled_runs(api: TestClient, org: OrgKeys) -> list[str]:
    runs = api.get(f"/v1/orgs/{org.org_id}/trainings", headers=org.viewer).json()
    return [run["runId"] for run in runs if run["trigger"] == "schedule"]


def break_and_make_due(engine: Engine, org: OrgKeys, **stored: Any) -> None:
    """A schedule stored before a rule it now breaks (or edited in the database): the api would refuse it today."""
    with session_scope(make_session_factory(engine)) as session:
        session.execute(
            update(Schedule)
            .where(Schedule.org_id == org.org_id)
            .values(next_fire_at=utcnow() - timedelta(minutes=0.1), **stored)
        )


@pytest.fixture
def other_org(api: TestClient, org_id: str) -> OrgKeys:
    return create_org_with_keys(api, org_id + "-other")


@pytest.mark.parametrize(
    ("stored", "words", "still_enabled"),
    [
        ({"training_config": {"targetColumn": "failed"}}, "featureColumns", True),
        ({"pattern": "every sunday"}, "every sunday", False),
    ],
    ids=["config", "pattern"],
)
def test_a_stored_schedule_that_no_longer_validates_fails_alone_recorded_and_moved_on(
    api: TestClient,
    org: OrgKeys,
    other_org: OrgKeys,
    dataset_id: str,
    engine: Engine,
    stored: dict[str, Any],
    words: str,
    still_enabled: bool,
) -> None:
    """Every due schedule used to fire in one transaction: one that raised rolled back every org's, at every tick."""
    assert put_training_schedule(api, org, dataset_id, pattern="0 2 * * *").status_code == 200
    other_dataset = upload(api, other_org, TRAINING_CSV).json()["datasetId"]
    assert put_training_schedule(api, other_org, other_dataset, pattern="0 2 * * *").status_code == 200
    break_and_make_due(engine, org, **stored)
    break_and_make_due(engine, other_org)
    fire_due_schedules(make_session_factory(engine), now=utcnow())
    assert len(scheduled_runs(api, other_org)) == 1
    assert scheduled_runs(api, org) == []
    [failed] = audited(api, org, "schedule.failed")
    assert words in failed["detail"]["error"] and failed["detail"]["enabled"] is still_enabled
    shown = api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).json()
    assert shown["enabled"] is still_enabled
    if still_enabled:  # its next fire time comes round as usual: it fails again then, and is recorded again
        assert shown["nextFireTimes"][0] > utcnow().isoformat()
    fire_due_schedules(make_session_factory(engine), now=utcnow())  # the next tick: recorded once, nothing more fired
    assert len(audited(api, org, "schedule.failed")) == 1 and len(scheduled_runs(api, other_org)) == 1


def test_a_stored_sync_schedule_that_no_longer_validates_fails_alone_and_is_disabled(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    broken, sound = sync_source(api, org, "sqlite:////srv/line-1.db"), sync_source(api, org, "sqlite:////srv/line-2.db")
    for source_id in (broken, sound):
        url = f"/v1/orgs/{org.org_id}/sync-sources/{source_id}/schedule"
        assert api.put(url, json={"pattern": "*/15 * * * *"}, headers=org.admin).status_code == 200
    with session_scope(make_session_factory(engine)) as session:
        session.execute(update(SyncSchedule).where(SyncSchedule.source_id == broken).values(pattern="*/15 * *"))
    for source_id in (broken, sound):
        make_sync_schedule_due(engine, source_id, minutes_ago=0.1)
    assert len(fire_due_sync_schedules(make_session_factory(engine), now=utcnow())) == 1
    jobs = api.get(f"/v1/orgs/{org.org_id}/sync-jobs", headers=org.viewer).json()
    assert [job["sourceId"] for job in jobs] == [sound]
    [failed] = audited(api, org, "sync.schedule.failed")
    assert failed["detail"]["sourceId"] == broken and "5-field" in failed["detail"]["error"]
    shown = api.get(f"/v1/orgs/{org.org_id}/sync-sources/{broken}/schedule", headers=org.viewer).json()
    assert shown["enabled"] is False


def test_a_backward_range_is_refused_naming_the_pattern_and_not_stored(
    api: TestClient, org: OrgKeys, dataset_id: str
) -> None:
    response = put_training_schedule(api, org, dataset_id, pattern="1-0 * * * *")
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "pattern" and "runs backwards" in response.json()["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).status_code == 404
    url = f"/v1/orgs/{org.org_id}/sync-sources/{sync_source(api, org)}/schedule"
    response = api.put(url, json={"pattern": "0 22-2 * * *"}, headers=org.admin)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "pattern" and "write 22-23,0-2" in response.json()["error"]
    assert api.get(url, headers=org.viewer).status_code == 404


def test_a_schedule_stored_with_a_backward_range_is_shown_then_disabled_at_its_next_fire_not_fired_every_minute(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine
) -> None:
    assert put_training_schedule(api, org, dataset_id, pattern="0 2 * * *").status_code == 200
    with session_scope(make_session_factory(engine)) as session:  # stored before such ranges were refused
        session.execute(update(Schedule).where(Schedule.org_id == org.org_id).values(pattern="1-0 * * * *"))
    shown = api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer)
    assert shown.status_code == 200 and shown.json()["nextFireTimes"] == []
    break_and_make_due(engine, org)
    fire_due_schedules(make_session_factory(engine), now=utcnow())
    assert scheduled_runs(api, org) == []
    [failed] = audited(api, org, "schedule.failed")
    assert "runs backwards" in failed["detail"]["error"] and failed["detail"]["enabled"] is False
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).json()["enabled"] is False


def test_a_schedule_set_again_by_an_api_whose_clock_is_behind_beats_does_not_fire_twice(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set with a clock reading a second before a fire beat has just done, the schedule once stored that fire again."""
    assert put_training_schedule(api, org, dataset_id, pattern="* * * * *", timezone="UTC").status_code == 200
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        due = session.get_one(Schedule, org.org_id).next_fire_at
    assert due is not None
    assert len(fire_due_schedules(sessions, now=due + timedelta(seconds=1))) == 1
    monkeypatch.setattr(schedule_router, "utcnow", lambda: due - timedelta(seconds=1))
    assert put_training_schedule(api, org, dataset_id, pattern="* * * * *", timezone="UTC").status_code == 200
    monkeypatch.undo()

    shown = api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).json()
    assert fire_due_schedules(sessions, now=due + timedelta(seconds=6)) == []
    assert shown["lastFiredAt"] is not None and shown["nextFireTimes"][0] > shown["lastFiredAt"]


def test_a_schedule_set_while_its_dataset_is_erased_is_refused_or_the_erasure_is(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine
) -> None:
    """Both wait on the org's lock: the one that goes second sees what the first did, so no schedule is left
    naming an erased dataset (each week's run would fail)."""
    answers: dict[str, int] = {}

    def erase() -> None:
        answers["erase"] = api.delete(f"/v1/orgs/{org.org_id}/datasets/{dataset_id}", headers=org.trainer).status_code

    def schedule() -> None:
        answers["schedule"] = put_training_schedule(api, org, dataset_id, pattern="0 2 * * 1").status_code

    with engine.connect() as holder, holder.begin() as held:
        holder.execute(text("SELECT 1 FROM organizations WHERE id = :org FOR NO KEY UPDATE"), {"org": org.org_id})
        first, second = threading.Thread(target=erase), threading.Thread(target=schedule)
        first.start()
        wait_for_lock_waiters(engine, 1)
        second.start()
        wait_for_lock_waiters(engine, 2)
        held.rollback()
    first.join(30)
    second.join(30)

    assert answers == {"erase": 200, "schedule": 409}, answers
    assert api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).status_code == 404


def wait_for_lock_waiters(engine: Engine, count: int) -> None:
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )

    def waiting() -> bool:
        with engine.connect() as connection:
            return int(connection.scalar(query) or 0) >= count

    assert eventually(waiting), f"fewer than {count} requests wait for the org's lock"


def test_a_schedule_whose_datasource_no_longer_fits_its_config_fails_its_fire_recorded_and_queues_nothing(
    api: TestClient, org: OrgKeys, engine: Engine
) -> None:
    """Checked by its schema alone, it queued a run a POST refuses (dataRange without a timestampColumn) at every
    fire, each failing when it started."""
    datasource = {"url": "postgresql://plant@db.example:5432/plant", "table": "readings", "timestampColumn": "ts"}
    assert api.put(f"/v1/orgs/{org.org_id}/datasource", json=datasource, headers=org.admin).status_code == 200
    ranged = {"startDate": "2024-01-01T00:00:00Z", "endDate": "2024-02-01T00:00:00Z"}
    body = {"pattern": "0 2 * * 1", "trainingConfig": config("", datasetId=None, dataRange=ranged)}
    assert api.put(f"/v1/orgs/{org.org_id}/schedule", json=body, headers=org.admin).status_code == 200
    without_stamps = {key: value for key, value in datasource.items() if key != "timestampColumn"}
    assert api.put(f"/v1/orgs/{org.org_id}/datasource", json=without_stamps, headers=org.admin).status_code == 200
    break_and_make_due(engine, org)

    fire_due_schedules(make_session_factory(engine), now=utcnow())

    assert scheduled_runs(api, org) == []
    [failed] = audited(api, org, "schedule.failed")
    assert "dataRange needs the datasource's timestampColumn" in failed["detail"]["error"]


def fire_while_deleting(
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,
    queueing: tuple[Any, str],
    fire: Callable[[], object],
    delete: Callable[[], httpx2.Response],
) -> int:
    """`fire` the due schedules; as the beat queues a fire's work (at the call of `queueing`, a beat module and its
    queueing function's name), `delete` the schedule from another thread, let on until it answers or waits for a
    lock. The DELETE's status."""
    module, name = queueing
    queue = getattr(module, name)
    deleted: list[int] = []
    deleting = threading.Thread(target=lambda: deleted.append(delete().status_code))

    def delete_while_queueing(*args: Any) -> Any:
        start_until_it_waits_for_a_lock(deleting, engine.url)
        return queue(*args)

    monkeypatch.setattr(module, name, delete_while_queueing)
    fire()
    deleting.join()
    [status] = deleted
    return status


def set_training_schedule_at(
    api: TestClient, org: OrgKeys, monkeypatch: pytest.MonkeyPatch, at: datetime, **body: Any
) -> None:
    monkeypatch.setattr(schedule_router, "utcnow", lambda: at)
    response = api.put(f"/v1/orgs/{org.org_id}/schedule", json=body, headers=org.admin)
    monkeypatch.undo()
    assert response.status_code == 200, response.text


def set_sync_schedule_at(
    api: TestClient, org: OrgKeys, monkeypatch: pytest.MonkeyPatch, at: datetime, source_id: str, **body: Any
) -> dict[str, Any]:
    """The schedule as the PUT at `at` answers it."""
    monkeypatch.setattr(sync_router, "utcnow", lambda: at)
    url = f"/v1/orgs/{org.org_id}/sync-sources/{source_id}/schedule"
    response = api.put(url, json=body, headers=org.admin)
    monkeypatch.undo()
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_schedule_set_again_just_after_its_due_moment_before_beats_tick_still_fires_it_with_the_new_config(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set again two seconds after 02:00, before beat's next tick, the schedule moved on to next Sunday: that week's
    run never happened."""
    weekly = {"pattern": "0 2 * * 0", "timezone": "UTC"}
    set_training_schedule_at(
        api, org, monkeypatch, SUNDAY_TWO - timedelta(days=1), **weekly, trainingConfig=config(dataset_id)
    )
    changed = config(dataset_id, validationSplit=0.5)
    set_training_schedule_at(api, org, monkeypatch, SUNDAY_TWO + timedelta(seconds=2), **weekly, trainingConfig=changed)

    fire_due_schedules(make_session_factory(engine), now=SUNDAY_TWO + timedelta(seconds=4))

    runs = api.get(f"/v1/orgs/{org.org_id}/trainings", headers=org.viewer).json()
    assert [(run["trigger"], run["config"]["validationSplit"]) for run in runs] == [("schedule", 0.5)]


def test_a_due_fire_the_new_pattern_does_not_fire_at_is_dropped_by_setting_the_schedule(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_training_schedule_at(
        api, org, monkeypatch, SUNDAY_TWO - timedelta(days=1), pattern="0 2 * * 0", trainingConfig=config(dataset_id)
    )
    set_training_schedule_at(
        api, org, monkeypatch, SUNDAY_TWO + timedelta(seconds=2), pattern="0 3 * * 0", trainingConfig=config(dataset_id)
    )

    fire_due_schedules(make_session_factory(engine), now=SUNDAY_TWO + timedelta(seconds=4))
    assert scheduled_runs(api, org) == []
    with session_scope(make_session_factory(engine)) as session:
        assert session.get_one(Schedule, org.org_id).next_fire_at == SUNDAY_TWO + timedelta(hours=1)


def test_a_sync_schedule_set_again_just_after_its_due_moment_before_the_beats_tick_still_fires_it(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    source_id = sync_source(api, org)
    for at in (SUNDAY_TWO - timedelta(minutes=5), SUNDAY_TWO + timedelta(seconds=2)):
        set_sync_schedule_at(api, org, monkeypatch, at, source_id, pattern="*/15 * * * *")

    fire_due_sync_schedules(make_session_factory(engine), now=SUNDAY_TWO + timedelta(seconds=4))
    assert [job["trigger"] for job in api.get(f"/v1/orgs/{org.org_id}/sync-jobs", headers=org.viewer).json()] == [
        "schedule"
    ]


def test_a_beat_back_within_grace_of_a_fire_fires_it_and_audits_the_one_missed_before(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beat down from 29 November to 13 December 02:03: the 6 December fire is a week old, the 13 December one
    three minutes late. Beat judged the schedule by its oldest due time alone and skipped both."""
    weekly = {"pattern": "0 2 * * 0", "timezone": "UTC", "trainingConfig": config(dataset_id)}
    set_training_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(days=7), **weekly)
    back = SUNDAY_TWO + timedelta(days=7, minutes=3)

    fire_due_schedules(make_session_factory(engine), now=back)

    assert len(scheduled_runs(api, org)) == 1
    [missed] = audited(api, org, "schedule.missed")
    assert missed["detail"] == {
        "missed": 1,
        "firstMissedAt": SUNDAY_TWO.isoformat(),
        "lastMissedAt": SUNDAY_TWO.isoformat(),
        "firedAt": (SUNDAY_TWO + timedelta(days=7)).isoformat(),
    }
    shown = api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).json()
    assert shown["lastFiredAt"].startswith("2026-12-13T02:00")


@pytest.mark.parametrize(
    ("pattern", "down", "missed", "fired_at"),
    [
        ("*/15 * * * *", timedelta(minutes=20), 1, SUNDAY_TWO + timedelta(minutes=15)),  # 02:00 missed, 02:15 late
        ("* * * * *", timedelta(minutes=3), 3, SUNDAY_TWO + timedelta(minutes=3)),  # 02:00-02:02 superseded
    ],
    ids=["missed", "superseded"],
)
def test_a_sync_beat_back_fires_the_last_fire_due_within_grace_once_and_audits_those_before_it(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    pattern: str,
    down: timedelta,
    missed: int,
    fired_at: datetime,
) -> None:
    """A sync beat restarted for 20 minutes (a deploy) skipped the 02:15 fire, 5 minutes late, with the 02:00 one:
    the source went 30 minutes unsynced. Fires late within GRACE but followed by a later one are that one."""
    source_id = sync_source(api, org)
    set_sync_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(minutes=1), source_id, pattern=pattern)

    fire_due_sync_schedules(make_session_factory(engine), now=SUNDAY_TWO + down)

    assert len(api.get(f"/v1/orgs/{org.org_id}/sync-jobs", headers=org.viewer).json()) == 1
    [row] = audited(api, org, "sync.schedule.missed")
    assert (row["detail"]["missed"], row["detail"]["firstMissedAt"], row["detail"]["firedAt"]) == (
        missed,
        SUNDAY_TWO.isoformat(),
        fired_at.isoformat(),
    )


def test_an_every_15_minutes_sync_keeps_firing_every_15_minutes_through_the_fall_back_hour(
    api: TestClient, org: OrgKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paris falls back on 25 October 2026 at 01:00 UTC (03:00 CEST to 02:00 CET): the schedule fired at 00:45 UTC,
    then at 02:00 UTC, 75 minutes without a sync. cron runs such patterns through the repeated hour."""
    before = datetime(2026, 10, 25, 0, 40, tzinfo=UTC)
    shown = set_sync_schedule_at(
        api, org, monkeypatch, before, sync_source(api, org), pattern="*/15 * * * *", timezone="Europe/Paris"
    )
    assert shown["nextFireTimes"] == [
        f"2026-10-25T{time}:00Z" for time in ("00:45", "01:00", "01:15", "01:30", "01:45")
    ]


def test_a_schedule_set_is_audited_with_the_training_config_it_runs(
    api: TestClient, org: OrgKeys, dataset_id: str
) -> None:
    """Repointed at another config, the schedule left two identical `schedule.set` rows: pattern, timezone, enabled."""
    for split in (0.2, 0.5):
        body = {"pattern": "0 2 * * 0", "trainingConfig": config(dataset_id, validationSplit=split)}
        assert api.put(f"/v1/orgs/{org.org_id}/schedule", json=body, headers=org.admin).status_code == 200
    rows = audited(api, org, "schedule.set")
    assert sorted((row["detail"]["pattern"], row["detail"]["trainingConfig"]["validationSplit"]) for row in rows) == [
        ("0 2 * * 0", 0.2),
        ("0 2 * * 0", 0.5),
    ]
    assert all(row["detail"]["trainingConfig"]["datasetId"] == dataset_id for row in rows)


def test_a_fire_queues_no_run_while_the_run_the_schedule_queued_before_waits_and_does_once_it_runs(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the workers down, or runs longer than the schedule's period, each fire queued one more run: they piled
    up, to train on the same data one after the other."""
    weekly = {"pattern": "0 2 * * 0", "timezone": "UTC", "trainingConfig": config(dataset_id)}
    set_training_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(days=1), **weekly)
    sessions = make_session_factory(engine)
    fire_due_schedules(sessions, now=SUNDAY_TWO + timedelta(seconds=4))
    [waiting] = scheduled_runs(api, org)

    fire_due_schedules(sessions, now=SUNDAY_TWO + timedelta(days=7, seconds=4))  # the run has not started

    assert scheduled_runs(api, org) == [waiting]
    [skipped] = audited(api, org, "schedule.skipped")
    assert (skipped["target"], skipped["actor"]) == (waiting, "schedule")
    with session_scope(sessions) as session:  # a worker starts it
        session.execute(update(TrainingRun).where(TrainingRun.id == waiting).values(status="running"))
    fire_due_schedules(sessions, now=SUNDAY_TWO + timedelta(days=14, seconds=4))
    assert len(scheduled_runs(api, org)) == 2 and len(audited(api, org, "schedule.skipped")) == 1


def test_a_schedule_deleted_and_set_again_by_an_api_whose_clock_is_behind_beats_does_not_fire_its_last_fire_again(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting the schedule forgot its last fire: set again from a clock a second behind beat's, it stored the fire
    beat had just done, and beat queued a second run for it."""
    weekly = {"pattern": "0 2 * * 0", "timezone": "UTC", "trainingConfig": config(dataset_id)}
    set_training_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(days=1), **weekly)
    sessions = make_session_factory(engine)
    fire_due_schedules(sessions, now=SUNDAY_TWO + timedelta(seconds=1))
    [fired] = scheduled_runs(api, org)
    with session_scope(sessions) as session:  # a worker starts it, so a second fire would queue another
        session.execute(update(TrainingRun).where(TrainingRun.id == fired).values(status="running"))
    assert api.delete(f"/v1/orgs/{org.org_id}/schedule", headers=org.admin).status_code == 204

    set_training_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(seconds=1), **weekly)
    fire_due_schedules(sessions, now=SUNDAY_TWO + timedelta(seconds=6))

    assert scheduled_runs(api, org) == [fired]
    shown = api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer).json()
    assert shown["nextFireTimes"][0] == (SUNDAY_TWO + timedelta(days=7)).isoformat().replace("+00:00", "Z")


def test_a_schedule_deleted_while_beat_fires_it_keeps_that_fire_so_one_set_again_does_not_fire_it_again(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DELETE waits for the fire under way, and the last fire it keeps is that one, not the one before."""
    weekly = {"pattern": "0 2 * * 0", "timezone": "UTC", "trainingConfig": config(dataset_id)}
    set_training_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(days=1), **weekly)
    sessions = make_session_factory(engine)
    deleted = fire_while_deleting(
        monkeypatch,
        engine,
        (trainer_beat, "_queue_run"),
        lambda: fire_due_schedules(sessions, now=SUNDAY_TWO + timedelta(seconds=1)),
        lambda: api.delete(f"/v1/orgs/{org.org_id}/schedule", headers=org.admin),
    )
    [fired] = scheduled_runs(api, org)
    with session_scope(sessions) as session:  # a worker starts it, so a second fire would queue another
        session.execute(update(TrainingRun).where(TrainingRun.id == fired).values(status="running"))

    set_training_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(seconds=1), **weekly)
    fire_due_schedules(sessions, now=SUNDAY_TWO + timedelta(seconds=6))

    assert deleted == 204
    assert scheduled_runs(api, org) == [fired]


def test_a_beat_back_after_a_month_fires_an_every_minute_schedules_latest_fire_and_audits_the_others_in_one_row(
    api: TestClient, org: OrgKeys, dataset_id: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beat counts the month's 43,000 fires rather than walking each one: the row says as many, and which."""
    every_minute = {"pattern": "* * * * *", "timezone": "UTC", "trainingConfig": config(dataset_id)}
    set_training_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(seconds=30), **every_minute)
    back = SUNDAY_TWO + timedelta(days=30, minutes=3, seconds=20)

    fire_due_schedules(make_session_factory(engine), now=back)

    assert len(scheduled_runs(api, org)) == 1
    [missed] = audited(api, org, "schedule.missed")
    assert missed["detail"] == {
        "missed": 30 * 24 * 60 + 3,  # 02:00 on 6 December to 02:02 on 5 January
        "firstMissedAt": SUNDAY_TWO.isoformat(),
        "lastMissedAt": (SUNDAY_TWO + timedelta(days=30, minutes=2)).isoformat(),
        "firedAt": (SUNDAY_TWO + timedelta(days=30, minutes=3)).isoformat(),
    }


def read_training_schedule_at(api: TestClient, org: OrgKeys, monkeypatch: pytest.MonkeyPatch, at: datetime) -> Any:
    monkeypatch.setattr(schedule_router, "utcnow", lambda: at)
    response = api.get(f"/v1/orgs/{org.org_id}/schedule", headers=org.viewer)
    monkeypatch.undo()
    assert response.status_code == 200, response.text
    return response.json()


def iso(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("pattern", "down", "due", "missed"),
    [
        ("0 2 * * 0", timedelta(minutes=3), SUNDAY_TWO, 0),  # beat down over the fire, back within GRACE
        ("*/15 * * * *", timedelta(minutes=20), SUNDAY_TWO + timedelta(minutes=15), 1),  # 02:00 missed, 02:15 late
        ("0 2 * * 0", timedelta(hours=1), None, 1),  # missed by more than GRACE: beat skips it
    ],
    ids=["due", "due-after-a-missed-one", "missed"],
)
def test_a_schedule_read_while_beat_is_down_shows_the_overdue_fire_and_the_missed_ones_beat_then_fires_and_skips(
    api: TestClient,
    org: OrgKeys,
    dataset_id: str,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    pattern: str,
    down: timedelta,
    due: datetime | None,
    missed: int,
) -> None:
    """The schedule showed only the fire times to come: the fire beat was to make at its next tick, past already,
    was hidden behind them, as if it would never happen."""
    schedule = {"pattern": pattern, "timezone": "UTC", "trainingConfig": config(dataset_id)}
    set_training_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(minutes=1), **schedule)
    now = SUNDAY_TWO + down

    shown = read_training_schedule_at(api, org, monkeypatch, now)

    assert (shown["dueFireAt"], shown["missedFires"]) == (due and iso(due), missed)
    upcoming = next_fire_times(pattern, "UTC", after=now, count=5)
    assert shown["nextFireTimes"] == [iso(fire) for fire in ([due] if due else []) + upcoming][:5]
    fire_due_schedules(make_session_factory(engine), now=now)  # beat's tick does as the schedule showed
    assert len(scheduled_runs(api, org)) == (1 if due else 0)
    assert [row["detail"]["missed"] for row in audited(api, org, "schedule.missed")] == ([missed] if missed else [])


def scheduled_sync_jobs(api: TestClient, org: OrgKeys) -> list[str]:
    jobs = api.get(f"/v1/orgs/{org.org_id}/sync-jobs", headers=org.viewer).json()
    return [job["jobId"] for job in jobs if job["trigger"] == "schedule"]


def test_a_sync_schedule_deleted_and_set_again_by_an_api_whose_clock_is_behind_beats_does_not_fire_its_last_fire_again(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting a source's schedule forgot its last fire: set again from a clock a second behind the sync beat's, it
    stored the fire the beat had just done, and the beat queued a second job for it."""
    source_id = sync_source(api, org)
    weekly = {"pattern": "0 2 * * 0", "timezone": "UTC"}
    set_sync_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(days=1), source_id, **weekly)
    sessions = make_session_factory(engine)
    fire_due_sync_schedules(sessions, now=SUNDAY_TWO + timedelta(seconds=1))
    [fired] = scheduled_sync_jobs(api, org)
    with session_scope(sessions) as session:  # a sync worker starts it, so a second fire would queue another
        session.execute(update(SyncJob).where(SyncJob.id == fired).values(status="running"))
    url = f"/v1/orgs/{org.org_id}/sync-sources/{source_id}/schedule"
    assert api.delete(url, headers=org.admin).status_code == 204

    set_again = set_sync_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(seconds=1), source_id, **weekly)
    fire_due_sync_schedules(sessions, now=SUNDAY_TWO + timedelta(seconds=6))

    assert scheduled_sync_jobs(api, org) == [fired]
    assert set_again["lastFiredAt"] == iso(SUNDAY_TWO)
    shown = api.get(url, headers=org.viewer).json()
    assert shown["nextFireTimes"][0] == iso(SUNDAY_TWO + timedelta(days=7))


def test_a_sync_schedule_deleted_while_its_beat_fires_it_keeps_that_fire_so_one_set_again_does_not_fire_it_again(
    api: TestClient, org: OrgKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DELETE waits for the fire under way, and the last fire it keeps on the source is that one."""
    source_id = sync_source(api, org)
    weekly = {"pattern": "0 2 * * 0", "timezone": "UTC"}
    set_sync_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(days=1), source_id, **weekly)
    sessions = make_session_factory(engine)
    url = f"/v1/orgs/{org.org_id}/sync-sources/{source_id}/schedule"
    deleted = fire_while_deleting(
        monkeypatch,
        engine,
        (sync_beat, "_queue_job"),
        lambda: fire_due_sync_schedules(sessions, now=SUNDAY_TWO + timedelta(seconds=1)),
        lambda: api.delete(url, headers=org.admin),
    )
    [fired] = scheduled_sync_jobs(api, org)
    with session_scope(sessions) as session:  # a sync worker starts it, so a second fire would queue another
        session.execute(update(SyncJob).where(SyncJob.id == fired).values(status="running"))

    set_sync_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(seconds=1), source_id, **weekly)
    fire_due_sync_schedules(sessions, now=SUNDAY_TWO + timedelta(seconds=6))

    assert deleted == 204
    assert scheduled_sync_jobs(api, org) == [fired]


def read_sync_schedule_at(
    api: TestClient, org: OrgKeys, monkeypatch: pytest.MonkeyPatch, at: datetime, source_id: str
) -> Any:
    monkeypatch.setattr(sync_router, "utcnow", lambda: at)
    response = api.get(f"/v1/orgs/{org.org_id}/sync-sources/{source_id}/schedule", headers=org.viewer)
    monkeypatch.undo()
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    ("pattern", "down", "due", "missed"),
    [
        ("0 2 * * 0", timedelta(minutes=3), SUNDAY_TWO, 0),  # the sync beat down over the fire, back within GRACE
        ("*/15 * * * *", timedelta(minutes=20), SUNDAY_TWO + timedelta(minutes=15), 1),  # 02:00 missed, 02:15 late
        ("0 2 * * 0", timedelta(hours=1), None, 1),  # missed by more than GRACE: the sync beat skips it
    ],
    ids=["due", "due-after-a-missed-one", "missed"],
)
def test_a_sync_schedule_read_while_its_beat_is_down_shows_the_overdue_fire_and_the_missed_ones_it_then_fires_and_skips(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    pattern: str,
    down: timedelta,
    due: datetime | None,
    missed: int,
) -> None:
    """A source's schedule showed only the fire times to come: the fire the sync beat was to make at its next tick,
    past already, was hidden behind them, as if the source would go unsynced until the next one."""
    source_id = sync_source(api, org)
    set_sync_schedule_at(api, org, monkeypatch, SUNDAY_TWO - timedelta(minutes=1), source_id, pattern=pattern)
    now = SUNDAY_TWO + down

    shown = read_sync_schedule_at(api, org, monkeypatch, now, source_id)

    assert (shown["dueFireAt"], shown["missedFires"]) == (due and iso(due), missed)
    upcoming = next_fire_times(pattern, "UTC", after=now, count=5)
    assert shown["nextFireTimes"] == [iso(fire) for fire in ([due] if due else []) + upcoming][:5]
    fire_due_sync_schedules(make_session_factory(engine), now=now)  # the sync beat's tick does as the schedule showed
    assert len(scheduled_sync_jobs(api, org)) == (1 if due else 0)
    assert [row["detail"]["missed"] for row in audited(api, org, "sync.schedule.missed")] == (
        [missed] if missed else []
    )
