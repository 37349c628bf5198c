"""A key rotation in bounded transactions: jobs go on between its batches, and one stopped midway is finished by
the next (services/sync/rotation.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.api.routers import sync_jobs, sync_sources
from services.sync import reseal
from services.sync.context import SyncContext
from services.sync.envelope import Keyring, load_keyring
from services.sync.reseal import Batch
from services.sync.rotation import rotate_org_key
from shared.db.session import session_scope
from shared.errors import Conflict
from tests.integration.sync_support import Sync, hold_a_conflict, many_readings, open_sync

BATCH = 10  # rows per rotation transaction here: 40 records take several


def keyring_of(sync: Sync) -> Keyring:
    with session_scope(sync.context.sessions) as session:
        return load_keyring(session, sync.context.secrets, sync.org.org_id)


def key_states(sync: Sync) -> dict[str, str]:
    keys = sync.api.get(f"/v1/orgs/{sync.org.org_id}/sync-keys", headers=sync.org.admin).json()
    return {key["keyId"]: key["status"] for key in keys}


def sealed_patients(sync: Sync) -> list[str]:
    return [row[0] for row in sync.central(f"SELECT patient FROM {sync.central_table} ORDER BY id")]


def sealed_bases(sync: Sync) -> list[str]:
    query = "SELECT row FROM sync_bases WHERE source_id = :s ORDER BY record_key"
    return [row[0]["patient"] for row in sync.central(query, {"s": sync.source_id})]


def under(key_id: str, values: list[str]) -> bool:
    return bool(values) and all(value.startswith(key_id + ":") for value in values)


def test_a_rotation_by_batches_lets_a_job_seal_between_them_and_leaves_everything_under_the_new_key(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, policy="field-merge", rows=many_readings(40))
    sync.run()
    old = keyring_of(sync).active_id
    jobs: list[dict[str, Any]] = []

    def a_job_after_the_first_batch(_batch: Batch) -> None:
        if not jobs:  # new records and edits of records not re-encrypted yet: sealed, with their bases, meanwhile
            sync.local("INSERT INTO readings VALUES (41, 'pump-41', 41.0, 'Grace Hopper')")
            sync.local("UPDATE readings SET value = 99.0, patient = 'Edsger Dijkstra' WHERE id = 35")
            jobs.append(sync.run())

    summary = rotate_org_key(
        sync_context, org_id, actor="operator", batch_rows=BATCH, after_batch=a_job_after_the_first_batch
    )

    new = summary["activeKey"]
    assert [(job["status"], job["pushed"]) for job in jobs] == [("succeeded", 2)]
    assert key_states(sync) == {old: "drained", new: "active"} and summary["drainedKeys"] == [old]
    patients, bases = sealed_patients(sync), sealed_bases(sync)
    assert len(patients) == 41 and under(new, patients) and len(bases) == 41 and under(new, bases)
    keyring = keyring_of(sync)
    assert keyring.open(patients[34], column="readings.patient") == "Edsger Dijkstra"
    assert keyring.open(patients[40], column="readings.patient") == "Grace Hopper"
    sync.central(f"UPDATE {sync.central_table} SET value = value + 1")  # every record comes down again, opened
    assert sync.run()["status"] == "succeeded"
    assert sync.local("SELECT count(*) FROM readings WHERE patient = 'patient ' || id") == [(39,)]


def test_a_sync_batch_commits_while_the_rotation_is_between_its_batches(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A job's batch run from another connection while the rotation has done one batch of several: it commits
    there and then (its records are in the central copy before the rotation goes on), rather than wait for the
    rotation to end."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(40))
    sync.run()
    seen_between: list[list[tuple[Any, ...]]] = []

    def a_job_in_another_thread(_batch: Batch) -> None:
        if seen_between:
            return
        sync.local("INSERT INTO readings VALUES (41, 'pump-41', 41.0, 'Grace Hopper')")
        job = threading.Thread(target=sync.run)
        job.start()
        job.join(timeout=60)  # a bound for a broken build, which would wait for the rotation's end: not a timing
        seen_between.append(sync.central(f"SELECT count(*) FROM {sync.central_table} WHERE id = 41"))

    summary = rotate_org_key(
        sync_context, org_id, actor="operator", batch_rows=BATCH, after_batch=a_job_in_another_thread
    )

    assert seen_between == [[(1,)]]
    assert under(summary["activeKey"], sealed_patients(sync))


def test_a_rotation_stopped_after_some_batches_is_finished_by_the_next_under_the_same_key(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(40))
    sync.run()
    old = keyring_of(sync).active_id
    batches: list[Batch] = []

    def lost_after_two_batches(batch: Batch) -> None:
        batches.append(batch)
        if len(batches) == 2:
            raise RuntimeError("the worker was lost")

    with pytest.raises(RuntimeError):
        rotate_org_key(sync_context, org_id, actor="operator", batch_rows=BATCH, after_batch=lost_after_two_batches)

    keyring = keyring_of(sync)
    new = keyring.active_id
    patients = sealed_patients(sync)
    assert key_states(sync) == {old: "retired", new: "active"}
    assert sum(value.startswith(new + ":") for value in patients) == 2 * BATCH  # what was done stays done
    opened = [keyring.open(value, column="readings.patient") for value in patients]
    assert opened == [f"patient {n}" for n in range(1, 41)]  # and every value still opens

    summary = rotate_org_key(sync_context, org_id, actor="operator", batch_rows=BATCH)

    assert (summary["activeKey"], summary["drainedKeys"], summary["resumed"]) == (new, [old], True)
    assert summary["resealedValues"] == 40 - 2 * BATCH
    assert key_states(sync) == {old: "drained", new: "active"}  # no third key
    assert under(new, sealed_patients(sync))
    audited = sync.api.get(f"/v1/orgs/{org_id}/audit", headers=sync.org.admin).json()
    assert [entry["detail"] for entry in audited if entry["action"] == "sync.key.rotated"] == [summary]


def test_a_value_that_does_not_decrypt_stops_the_rotation_with_the_keys_usable_and_the_next_finishes_it(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(40))
    sync.run()
    old = keyring_of(sync).active_id
    sealed_35 = sync.central(f"SELECT patient FROM {sync.central_table} WHERE id = 35")[0][0]
    sync.central(f"UPDATE {sync.central_table} SET patient = 'Grace Hopper' WHERE id = 35")

    with pytest.raises(Conflict, match=r"a value of readings\.patient is not sealed .*rotate again to finish"):
        rotate_org_key(sync_context, org_id, actor="operator", batch_rows=BATCH)

    keyring = keyring_of(sync)
    assert key_states(sync) == {old: "retired", keyring.active_id: "active"}
    opened = [
        keyring.open(value, column="readings.patient") for value in sealed_patients(sync) if value != "Grace Hopper"
    ]
    assert opened == [f"patient {n}" for n in range(1, 41) if n != 35]
    sync.central(f"UPDATE {sync.central_table} SET patient = :v WHERE id = 35", {"v": sealed_35})

    summary = rotate_org_key(sync_context, org_id, actor="operator", batch_rows=BATCH)

    assert (summary["activeKey"], summary["drainedKeys"]) == (keyring.active_id, [old])
    assert under(keyring.active_id, sealed_patients(sync))


def test_a_value_left_under_the_old_key_where_a_batch_was_done_is_found_before_the_key_is_drained(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A job copying a value not re-encrypted yet into a record the rotation has done (a conflict's chosen version
    into its central copy): the drain looks again, and re-encrypts it before draining the old key."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(40))
    sync.run()
    old = keyring_of(sync).active_id
    under_old = sync.central(f"SELECT patient FROM {sync.central_table} WHERE id = 40")[0][0]
    copied: list[Batch] = []

    def copy_into_the_first_batch(batch: Batch) -> None:
        if not copied:
            copied.append(batch)
            sync.central(f"UPDATE {sync.central_table} SET patient = :v WHERE id = 1", {"v": under_old})

    summary = rotate_org_key(
        sync_context, org_id, actor="operator", batch_rows=BATCH, after_batch=copy_into_the_first_batch
    )

    assert copied[0].last == 10 and summary["drainedKeys"] == [old]
    assert summary["resealedValues"] == 41  # the 40 records, then the copy
    patients = sealed_patients(sync)
    assert under(summary["activeKey"], patients)
    assert keyring_of(sync).open(patients[0], column="readings.patient") == "patient 40"


def until_a_connection_waits_for_a_lock_or_ends(sync: Sync, writer: threading.Thread) -> None:
    """Until the competing writer, started in `writer`, waits for a lock in the central database (it reached the row
    this test's transaction holds), or has ended (it never waited). The deadline is a bound for a broken build, which
    would wait forever: not a timing."""
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    deadline = time.monotonic() + 60
    while writer.is_alive() and sync.central(waiting) == [(0,)]:
        assert time.monotonic() < deadline, "the competing writer neither waited nor ended"
        time.sleep(0.01)


def central_record(sync: Sync) -> tuple[float, str]:
    [(value, patient)] = sync.central(f"SELECT value, patient FROM {sync.central_table} WHERE id = 1")
    return value, keyring_of(sync).open(patient, column="readings.patient")


def test_a_rotation_reaching_a_conflict_being_decided_waits_and_the_choice_outlives_the_old_keys_destruction(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choice copies the local version into `kept` while a rotation runs: the rotation's batch of conflicts waits
    for the choice's commit, then re-encrypts `kept` too, so none is left under the key it drains."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    held = hold_a_conflict(sync)
    old = keyring_of(sync).active_id
    summaries: list[dict[str, Any]] = []
    rotation = threading.Thread(target=lambda: summaries.append(rotate_org_key(sync_context, org_id, actor="operator")))
    read_the_conflict = sync_sources.active_source

    def a_rotation_once_the_conflict_is_read(*args: Any, **kwargs: Any) -> Any:
        if rotation.ident is None:  # the choice; not the jobs queued after it, which look their source up too
            rotation.start()
            until_a_connection_waits_for_a_lock_or_ends(sync, rotation)
        return read_the_conflict(*args, **kwargs)

    monkeypatch.setattr(sync_jobs, "active_source", a_rotation_once_the_conflict_is_read)
    decided = sync_api.post(
        f"/v1/orgs/{org_id}/conflicts/{held['conflictId']}", json={"keep": "local"}, headers=sync.org.admin
    )
    rotation.join(timeout=60)

    assert decided.status_code == 200, decided.text
    assert not rotation.is_alive() and [summary["drainedKeys"] for summary in summaries] == [[old]]
    destroyed = sync_api.delete(f"/v1/orgs/{org_id}/sync-keys/{old}", headers=sync.org.admin)
    assert destroyed.status_code < 300, destroyed.text
    job = sync.run()
    assert (job["status"], job["errors"]) == ("succeeded", [])
    assert central_record(sync) == (10.0, "Local Name")
    assert sync.local("SELECT value, patient FROM readings WHERE id = 1") == [(10.0, "Local Name")]
    assert [conflict["status"] for conflict in sync.conflicts()] == ["resolved"]


def test_a_choice_made_while_the_rotation_re_encrypts_its_conflict_waits_and_survives(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rotation's batch reads the conflict, re-encrypts it and writes all three versions back: a choice made in
    between waits for that batch's commit, then reads what it wrote, so neither loses the other's write."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    held = hold_a_conflict(sync)
    answers: list[Any] = []
    choice = threading.Thread(
        target=lambda: answers.append(
            sync_api.post(
                f"/v1/orgs/{org_id}/conflicts/{held['conflictId']}", json={"keep": "local"}, headers=sync.org.admin
            )
        )
    )
    re_encrypt = reseal.Conflicts._resealed_rows

    def a_choice_once_the_batch_is_read(place: reseal.Conflicts, keyring: Keyring, rows: Any) -> Any:
        if choice.ident is None:  # the batch; not the drain's look, which reads them again
            choice.start()
            until_a_connection_waits_for_a_lock_or_ends(sync, choice)
        return re_encrypt(place, keyring, rows)

    monkeypatch.setattr(reseal.Conflicts, "_resealed_rows", a_choice_once_the_batch_is_read)
    summary = rotate_org_key(sync_context, org_id, actor="operator")
    choice.join(timeout=60)

    assert not choice.is_alive() and [answer.status_code for answer in answers] == [200]
    [chosen] = sync.conflicts()
    assert (chosen["status"], chosen["outcome"], chosen["kept"] is not None) == ("chosen", "kept-local", True)
    assert under(summary["activeKey"], [chosen["kept"]["patient"], chosen["localVersion"]["patient"]])
    job = sync.run()
    assert (job["status"], job["errors"]) == ("succeeded", [])
    assert central_record(sync) == (10.0, "Local Name")
    assert [conflict["status"] for conflict in sync.conflicts()] == ["resolved"]


def test_a_choice_left_under_a_drained_key_is_written_centrally_under_the_active_one(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """As a choice made during a rotation, before the two took turns, could be left: the job re-encrypts it as it
    writes it, so destroying the drained key afterwards loses nothing."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    held = hold_a_conflict(sync)
    old = keyring_of(sync).active_id
    decided = sync_api.post(
        f"/v1/orgs/{org_id}/conflicts/{held['conflictId']}", json={"keep": "local"}, headers=sync.org.admin
    )
    assert decided.status_code == 200, decided.text
    [kept_under_old] = sync.central("SELECT kept::text FROM sync_conflicts WHERE id = :i", {"i": held["conflictId"]})
    summary = rotate_org_key(sync_context, org_id, actor="operator")
    sync.central(
        "UPDATE sync_conflicts SET kept = CAST(:k AS jsonb) WHERE id = :i",
        {"k": kept_under_old[0], "i": held["conflictId"]},
    )

    assert sync.run()["status"] == "succeeded"

    [(patient,)] = sync.central(f"SELECT patient FROM {sync.central_table} WHERE id = 1")
    assert under(summary["activeKey"], [patient]) and summary["drainedKeys"] == [old]
    assert sync_api.delete(f"/v1/orgs/{org_id}/sync-keys/{old}", headers=sync.org.admin).status_code < 300
    assert sync.run()["status"] == "succeeded"
    assert central_record(sync) == (10.0, "Local Name")
