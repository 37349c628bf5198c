"""Both sides edit the same record between two syncs: each policy's outcome, the loser kept, both sides converged."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

import services.sync.conflicts as conflicts
import services.sync.retention as retention
import services.sync.transfer as transfer
from services.sync.beat import orgs_to_purge
from services.sync.context import SyncContext
from services.sync.envelope import hold_active_key, load_keyring
from services.sync.hlc import Stamp
from services.sync.jobs import run_job
from services.sync.pair import Tally
from services.sync.retention import purge_expired
from services.sync.rotation import BATCH_ROWS, rotate_org_key
from shared.db.models import Prediction
from shared.db.session import session_scope
from shared.db.types import utcnow
from shared.source_lock import one_job_per_source
from shared.sync_keys import destroy_key
from tests.integration.conftest import ADMIN, OrgKeys, create_org_with_keys
from tests.integration.sync_support import (
    LOCAL_ONLY,
    TWO_READINGS,
    Sync,
    a_job_cut_off_before_its_pull_is_acknowledged,
    allow_connections,
    central_copies,
    choose,
    hold_a_conflict,
    make_local_store,
    many_readings,
    open_down_only_vitals,
    open_sync,
    open_table_sync,
    register,
)
from tests.support.polling import wait_until


def edit_both(sync: Sync, *, local: str, central: str) -> None:
    """The local edit first, the central one a moment later."""
    sync.local(f"UPDATE readings SET {local} WHERE id = 1")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET {central} WHERE id = 1")


def both_sides(sync: Sync) -> tuple[Any, Any]:
    local = sync.local("SELECT device, value, patient FROM readings WHERE id = 1")[0]
    sync.run()  # whatever the first run left to send down
    central = sync.local("SELECT device, value, patient FROM readings WHERE id = 1")[0]
    return local, central


def test_last_writer_wins_keeps_the_later_edit_and_the_loser(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "last-writer-wins")
    sync.run()
    edit_both(sync, local="value = 10.0", central="value = 99.0")

    job = sync.run()

    assert job["conflicts"] == 1
    assert sync.local("SELECT value FROM readings WHERE id = 1") == [(99.0,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 1") == [(99.0,)]
    [conflict] = sync.conflicts()
    assert (conflict["outcome"], conflict["localVersion"]["value"]) == ("central-won", 10.0)
    assert "sync.conflict" in sync.audit_actions()


def test_last_writer_wins_keeps_a_later_central_edit_over_a_local_one_split_across_batches(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Record 1 edited locally in the first batch and again in the second, the central edit the latest of all. The
    first batch found the central edit later; the second was stamped past the central record's stamp and won."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "last-writer-wins")
    sync.run()
    more = [(n,) for n in range(100, 100 + sync.context.settings.sync_batch_size)]
    with sqlite3.connect(sync.local_path) as local:
        local.execute("UPDATE readings SET value = 10.0 WHERE id = 1")
        local.executemany("INSERT INTO readings VALUES (?, 'pump', 0.0, NULL)", more)
        local.execute("UPDATE readings SET value = 11.0 WHERE id = 1")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")

    sync.run()
    sync.run()

    assert sync.local("SELECT value FROM readings WHERE id = 1") == [(99.0,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 1") == [(99.0,)]
    assert {(c["outcome"], c["localVersion"]["value"]) for c in sync.conflicts()} == {("central-won", 11.0)}


def test_last_writer_wins_keeps_a_later_central_edit_over_a_local_one_made_between_the_push_and_the_pull(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "last-writer-wins")
    sync.run()
    edit_both(sync, local="value = 10.0", central="value = 99.0")
    batches: list[Tally] = []

    def edit_both_after_the_push(tally: Tally) -> None:
        if not batches:
            batches.append(tally)
            edit_both(sync, local="value = 20.0", central="value = 30.0")

    assert run_job(sync.context, sync.submit(), after_batch=edit_both_after_the_push) == "succeeded"
    sync.run()

    assert sync.local("SELECT value FROM readings WHERE id = 1") == [(30.0,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 1") == [(30.0,)]
    outcomes = sorted(
        (c["outcome"], c["localVersion"]["value"], c["centralVersion"]["value"]) for c in sync.conflicts()
    )
    assert outcomes == [("central-won", 10.0, 99.0), ("central-won", 20.0, 30.0)]


def test_a_one_way_tables_receiving_side_is_a_copy_its_own_edits_overwritten(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """As the README says of `direction`: a central edit of an `up` table is written over by the next local change of
    the record, later or not, with no conflict."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "last-writer-wins", direction="up")
    sync.run()
    edit_both(sync, local="value = 10.0", central="value = 99.0")

    job = sync.run()

    assert (job["pushed"], job["conflicts"]) == (1, 0)
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 1") == [(10.0,)]
    assert sync.conflicts() == []


@pytest.fixture
def local_clock_an_hour_fast(tmp_path: Path) -> Iterator[None]:
    """Every connection to the local store reads a clock one hour ahead, as on a machine whose clock runs fast."""

    def fast_julianday(_value: str) -> float:
        return (time.time() + 3600) / 86400 + 2440587.5

    def skew(connection: Any, _record: Any) -> None:
        if isinstance(connection, sqlite3.Connection) and str(tmp_path) in _database_of(connection):
            connection.create_function("julianday", 1, fast_julianday)

    event.listen(Engine, "connect", skew)
    yield
    event.remove(Engine, "connect", skew)


def _database_of(connection: sqlite3.Connection) -> str:
    return str(connection.execute("PRAGMA database_list").fetchone()[2])


def test_a_local_clock_an_hour_fast_does_not_win_by_that_alone(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, local_clock_an_hour_fast: None
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "last-writer-wins")
    sync.run()
    with sqlite3.connect(sync.local_path) as connection:
        connection.create_function("julianday", 1, lambda _v: (time.time() + 3600) / 86400 + 2440587.5)
        connection.execute("UPDATE readings SET value = 10.0 WHERE id = 1")  # stamped an hour ahead
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")

    sync.run()

    assert sync.local("SELECT value FROM readings WHERE id = 1") == [(99.0,)]
    assert [c["outcome"] for c in sync.conflicts()] == ["central-won"]


def test_field_merge_keeps_both_sides_changes_to_different_fields(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "field-merge")
    sync.run()
    edit_both(sync, local="patient = 'Ada King'", central="device = 'pump-9'")

    sync.run()
    sync.run()

    assert sync.local("SELECT device, value, patient FROM readings WHERE id = 1") == [("pump-9", 1.0, "Ada King")]
    assert sync.central(f"SELECT device FROM {sync.central_table} WHERE id = 1") == [("pump-9",)]
    [conflict] = sync.conflicts()
    assert conflict["outcome"] == "merged"


def test_field_merge_takes_a_sqlite_numeric_read_back_at_another_scale_as_unchanged(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A SQLite file gives back 12.5 for the 12.50 its central NUMERIC(10,2) copy (and so the base) keeps. Compared
    as text, the local field looked changed, and the central change to it was dropped as overlapping."""
    sync = open_table_sync(
        sync_api,
        sync_context,
        org_id,
        tmp_path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, amount NUMERIC(10, 2))",
        "INSERT INTO t VALUES (1, 'a', 12.5)",
        policy="field-merge",
    )
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET amount = 12.50 WHERE id = 1")
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET amount = 13.00 WHERE id = 1")
    time.sleep(0.05)
    sync.local("UPDATE t SET name = 'b' WHERE id = 1")

    sync.run()
    sync.run()

    assert sync.local("SELECT id, name, amount FROM t") == [(1, "b", 13)]
    assert sync.central(f"SELECT id, name, amount FROM {sync.central_table}") == [(1, "b", Decimal("13.00"))]
    [conflict] = sync.conflicts()
    assert conflict["outcome"] == "merged"


def edit_patient_locally_after_the_first_batch(sync: Sync, job_id: str) -> None:
    """The plant's application edits the record right after the job's push merged it centrally, before its pull."""
    batches: list[Tally] = []

    def edit_after_the_push(tally: Tally) -> None:
        if not batches:
            batches.append(tally)
            sync.local("UPDATE readings SET patient = 'Ada King' WHERE id = 1")

    assert run_job(sync.context, job_id, after_batch=edit_after_the_push) == "succeeded"


def cut_off_after_the_first_batch_then_edit_patient_locally(sync: Sync, job_id: str) -> None:
    """The job is cut off from the central store after its push, the application edits the record, the job is
    retried."""
    database = make_url(sync.central_url).database
    batches: list[Tally] = []

    def cut_after_the_push(tally: Tally) -> None:
        if not batches:
            batches.append(tally)
            allow_connections(database, allowed=False)

    try:
        assert run_job(sync.context, job_id, after_batch=cut_after_the_push) == "running"
    finally:
        allow_connections(database, allowed=True)
    sync.local("UPDATE readings SET patient = 'Ada King' WHERE id = 1")
    assert run_job(sync.context, job_id) == "succeeded"


@pytest.mark.parametrize(
    "edit_between_push_and_pull",
    [edit_patient_locally_after_the_first_batch, cut_off_after_the_first_batch_then_edit_patient_locally],
    ids=["during-the-job", "job-cut-off-and-retried"],
)
def test_field_merge_keeps_central_changes_when_a_local_edit_lands_between_the_push_and_the_pull(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    tmp_path: Path,
    edit_between_push_and_pull: Callable[[Sync, str], None],
) -> None:
    """The push merges centrally, but the local store holds its own version until the pull brings the merge down:
    a local edit in between must not send the central side's changes back as local ones."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "field-merge")
    sync.run()
    # device changed centrally only; value changed on both sides, the later central edit wins it.
    edit_both(sync, local="value = 10.0", central="device = 'pump-9', value = 99.0")

    edit_between_push_and_pull(sync, sync.submit())
    sync.run()

    expected = [("pump-9", 99.0, "Ada King")]
    assert sync.local("SELECT device, value, patient FROM readings WHERE id = 1") == expected
    with session_scope(sync_context.sessions) as session:
        keyring = load_keyring(session, sync_context.secrets, org_id)
    central = sync.central(f"SELECT device, value, patient FROM {sync.central_table} WHERE id = 1")
    assert [(device, value, keyring.open(sealed, column="readings.patient")) for device, value, sealed in central] == (
        expected
    )
    assert [conflict["outcome"] for conflict in sync.conflicts()] == ["merged", "merged"]


@pytest.mark.parametrize("policy", ["last-writer-wins", "field-merge", "manual"])
def test_a_local_edit_after_a_pull_whose_acknowledgement_was_cut_off_goes_up_with_no_conflict(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
) -> None:
    """The local store committed the pull, the central store lost the connection before acknowledging it: the
    application's edit of the record it brought down is made against the central version, not in conflict with it."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, policy)
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 2")

    job_id = a_job_cut_off_before_its_pull_is_acknowledged(sync, monkeypatch)
    assert sync.local("SELECT value FROM readings WHERE id = 2") == [(20.0,)]
    sync.local("UPDATE readings SET value = 2.5 WHERE id = 2")

    assert run_job(sync_context, job_id) == "succeeded"  # the worker's retry
    sync.run()

    assert sync.local("SELECT value FROM readings WHERE id = 2") == [(2.5,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 2") == [(2.5,)]
    assert sync.conflicts() == []


def test_manual_holds_the_conflict_for_review_until_someone_decides(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    sync.run()
    edit_both(sync, local="value = 10.0", central="value = 99.0")

    sync.run()
    sync.run()
    held = sync.conflicts("open")

    assert [c["recordKey"] for c in held] == ["1"]
    assert sync.local("SELECT value FROM readings WHERE id = 1") == [(10.0,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 1") == [(99.0,)]

    decided = sync_api.post(
        f"/v1/orgs/{org_id}/conflicts/{held[0]['conflictId']}", json={"keep": "local"}, headers=sync.org.admin
    )
    assert decided.status_code == 200, decided.text
    sync.run()

    assert sync.local("SELECT value FROM readings WHERE id = 1") == [(10.0,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 1") == [(10.0,)]
    assert sync.conflicts("open") == []
    again = sync_api.post(
        f"/v1/orgs/{org_id}/conflicts/{held[0]['conflictId']}", json={"keep": "central"}, headers=sync.org.admin
    )
    assert again.status_code == 409


def test_the_review_queue_pages_back_by_id_through_every_open_conflict_newest_first(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """It showed the newest 500 and no more: a page holds `limit` conflicts, and `before` a page's last id reads on."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual", rows=many_readings(5))
    sync.run()
    sync.local("UPDATE readings SET value = value + 1000")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET value = value + 2000")
    sync.run()
    newest_first = [conflict["conflictId"] for conflict in sync.conflicts("open")]
    choose(sync, newest_first[0], "local")  # chosen: out of the queue

    def open_page(**query: int) -> list[int]:
        response = sync_api.get(
            f"/v1/orgs/{org_id}/conflicts", params={"status": "open", **query}, headers=sync.org.viewer
        )
        assert response.status_code == 200, response.text
        return [conflict["conflictId"] for conflict in response.json()]

    first = open_page(limit=2)
    second = open_page(limit=2, before=first[-1])

    assert (len(newest_first), first, second) == (5, newest_first[1:3], newest_first[3:5])
    assert open_page(limit=2, before=second[-1]) == []
    for refused in ({"limit": 0}, {"limit": 1001}, {"before": 0}):
        response = sync_api.get(f"/v1/orgs/{org_id}/conflicts", params=refused, headers=sync.org.viewer)
        assert response.status_code == 422, (refused, response.text)


def test_manual_keeping_local_then_editing_it_again_sends_the_edit_up_without_a_new_conflict(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The local store holds the version kept: logged to go down, it made the next local edit a conflict again."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    held = hold_a_conflict(sync)
    choose(sync, held["conflictId"], "local")
    sync.local("UPDATE readings SET value = 11.0 WHERE id = 1")

    sync.run()
    sync.run()

    assert sync.local("SELECT value FROM readings WHERE id = 1") == [(11.0,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 1") == [(11.0,)]
    assert [(c["status"], c["outcome"]) for c in sync.conflicts()] == [("resolved", "kept-local")]


def test_manual_keeping_central_keeps_the_central_edits_made_while_the_conflict_was_held(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    sync.run()
    edit_both(sync, local="value = 10.0", central="value = 99.0")
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET device = 'pump-9' WHERE id = 1")
    sync.run()
    [held] = sync.conflicts("open")
    assert (held["centralVersion"]["device"], held["centralVersion"]["value"]) == ("pump-9", 99.0)

    choose(sync, held["conflictId"], "central")
    sync.run()

    assert sync.local("SELECT device, value FROM readings WHERE id = 1") == [("pump-9", 99.0)]
    assert sync.central(f"SELECT device, value FROM {sync.central_table} WHERE id = 1") == [("pump-9", 99.0)]
    [resolved] = sync.conflicts()
    assert (resolved["status"], resolved["localVersion"]["value"]) == ("resolved", 10.0)


def test_manual_reopens_a_conflict_whose_central_record_changed_after_the_choice_of_local(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The reviewer never saw that central edit: it joins the conflict, which waits for a new choice."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    sync.run()
    edit_both(sync, local="value = 10.0", central="value = 99.0")
    sync.run()
    [held] = sync.conflicts("open")
    choose(sync, held["conflictId"], "local")
    sync.central(f"UPDATE {sync.central_table} SET device = 'pump-9' WHERE id = 1")

    sync.run()

    [reopened] = sync.conflicts("open")
    assert reopened["conflictId"] == held["conflictId"] and reopened["centralVersion"]["device"] == "pump-9"
    assert sync.local("SELECT device, value FROM readings WHERE id = 1") == [("pump-1", 10.0)]
    assert sync.central(f"SELECT device, value FROM {sync.central_table} WHERE id = 1") == [("pump-9", 99.0)]
    assert "sync.conflict.reopened" in sync.audit_actions()

    choose(sync, held["conflictId"], "local")
    sync.run()

    assert sync.local("SELECT device, value FROM readings WHERE id = 1") == [("pump-1", 10.0)]
    assert sync.central(f"SELECT device, value FROM {sync.central_table} WHERE id = 1") == [("pump-1", 10.0)]
    [resolved] = sync.conflicts()
    assert (resolved["status"], resolved["centralVersion"]["device"]) == ("resolved", "pump-9")


def choose_as_a_batch_reads_the_conflicts(
    monkeypatch: pytest.MonkeyPatch, sync: Sync, conflict_id: int, keep: str
) -> threading.Thread:
    """The reviewer's choice, made from another thread once a batch has read the held conflicts: let on until it is
    made, or waits for a lock the batch holds."""
    original = conflicts.held_conflicts
    choosing = threading.Thread(target=choose, args=(sync, conflict_id, keep))

    def then_the_reviewer_chooses(*args: Any, **kwargs: Any) -> Any:
        held = original(*args, **kwargs)
        if held and choosing.ident is None:
            choosing.start()
            wait_until(lambda: not choosing.is_alive() or waiting_for_locks(sync) > 0)
        return held

    monkeypatch.setattr(transfer, "held_conflicts", then_the_reviewer_chooses)
    return choosing


def test_manual_a_choice_of_local_made_while_a_push_brings_a_newer_local_edit_keeps_that_edit(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choice waits for the batch, and is made from the version the batch wrote: the edit is neither lost
    centrally nor undone by the choice."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    held = hold_a_conflict(sync)
    sync.local("UPDATE readings SET value = 12.0 WHERE id = 1")
    choosing = choose_as_a_batch_reads_the_conflicts(monkeypatch, sync, held["conflictId"], "local")

    sync.run()
    choosing.join(timeout=30)
    monkeypatch.undo()
    sync.run()

    assert sync.local("SELECT value FROM readings WHERE id = 1") == [(12.0,)]
    assert sync.central(f"SELECT value FROM {sync.central_table} WHERE id = 1") == [(12.0,)]
    [resolved] = sync.conflicts()
    assert (resolved["status"], resolved["outcome"], resolved["localVersion"]["value"]) == (
        "resolved",
        "kept-local",
        12.0,
    )


def test_manual_a_central_edit_pulled_while_local_is_chosen_opens_the_conflict_again(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer chose without seeing that edit, which the choice would write over."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    held = hold_a_conflict(sync)
    sync.central(f"UPDATE {sync.central_table} SET device = 'pump-9' WHERE id = 1")
    choosing = choose_as_a_batch_reads_the_conflicts(monkeypatch, sync, held["conflictId"], "local")

    sync.run()
    choosing.join(timeout=30)
    monkeypatch.undo()
    sync.run()

    [reopened] = sync.conflicts("open")
    assert (reopened["conflictId"], reopened["centralVersion"]["device"]) == (held["conflictId"], "pump-9")
    assert sync.central(f"SELECT device FROM {sync.central_table} WHERE id = 1") == [("pump-9",)]
    assert sync.local("SELECT device, value FROM readings WHERE id = 1") == [("pump-1", 10.0)]
    assert "sync.conflict.reopened" in sync.audit_actions()


def test_a_down_only_tables_refusal_is_settled_by_keeping_central_and_never_by_keeping_local(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Its local version was withheld, so there is none to keep. Keeping central tries the central record again;
    a central correction made while it waits joins the conflict, and keeping central then brings it down."""
    sync = open_down_only_vitals(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"INSERT INTO {sync.central_table} (id, diagnosis, temperature) VALUES (1, 'central', 99.0)")
    sync.run()
    [held] = sync.conflicts("open")

    keep_local = sync_api.post(
        f"/v1/orgs/{org_id}/conflicts/{held['conflictId']}", json={"keep": "local"}, headers=sync.org.admin
    )
    assert keep_local.status_code == 409 and "withheld" in keep_local.json()["error"], keep_local.text
    choose(sync, held["conflictId"], "central")
    assert sync.run()["conflicts"] == 1  # refused again: a new conflict waits
    [again] = sync.conflicts("open")
    assert again["conflictId"] != held["conflictId"]
    sync.central(f"UPDATE {sync.central_table} SET temperature = 38.5 WHERE id = 1")
    sync.run()
    [joined] = sync.conflicts("open")
    assert (joined["conflictId"], joined["centralVersion"]["temperature"]) == (again["conflictId"], 38.5)
    assert sync.local("SELECT diagnosis, temperature FROM vitals WHERE id = 1") == [(f"{LOCAL_ONLY}-AAA", 37.0)]

    choose(sync, joined["conflictId"], "central")
    sync.run()

    assert sync.conflicts("open") == []
    assert sync.local("SELECT diagnosis, temperature FROM vitals WHERE id = 1") == [("central", 38.5)]
    assert sync.central(f"SELECT diagnosis, temperature FROM {sync.central_table}") == [("central", 38.5)]
    assert LOCAL_ONLY not in central_copies(sync)


def test_append_only_refuses_updates_on_either_side_and_keeps_them(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "append-only")
    sync.run()
    sync.local("UPDATE readings SET value = 10.0 WHERE id = 1")
    sync.central(f"UPDATE {sync.central_table} SET value = 77.0 WHERE id = 2")
    sync.local("INSERT INTO readings VALUES (3, 'pump-3', 3.0, 'Grace Hopper')")

    sync.run()
    sync.run()

    assert sync.local("SELECT id, value FROM readings ORDER BY id") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert sync.central(f"SELECT id, value FROM {sync.central_table} ORDER BY id") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    refused = {c["recordKey"]: c for c in sync.conflicts()}
    assert {key: c["outcome"] for key, c in refused.items()} == {"1": "update-refused", "2": "update-refused"}
    assert refused["1"]["localVersion"]["value"] == 10.0
    assert refused["2"]["centralVersion"]["value"] == 77.0


@pytest.mark.parametrize(
    ("local_edit", "central_edit", "outcome", "refused"),
    [
        (
            "UPDATE readings SET value = 10.0 WHERE id = 1",
            "UPDATE {t} SET value = 99.0 WHERE id = 1",
            "update-refused",
            (10.0, 99.0),
        ),
        (
            "DELETE FROM readings WHERE id = 1",
            "UPDATE {t} SET value = 99.0 WHERE id = 1",
            "delete-refused",
            (None, 99.0),
        ),
        (
            "UPDATE readings SET value = 10.0 WHERE id = 1",
            "DELETE FROM {t} WHERE id = 1",
            "delete-refused",
            (10.0, None),
        ),
        ("DELETE FROM readings WHERE id = 1", "DELETE FROM {t} WHERE id = 1", "delete-refused", (None, None)),
        (
            None,
            "DELETE FROM {t} WHERE id = 1; INSERT INTO {t} (id, device, value) VALUES (1, 'pump-5', 5.0)",
            "update-refused",
            (1.0, 5.0),
        ),
    ],
    ids=["update-update", "delete-update", "update-delete", "delete-delete", "central-delete-reinsert"],
)
def test_append_only_restores_the_first_version_when_both_sides_change_a_record(
    sync_api: TestClient,
    sync_context: SyncContext,
    org_id: str,
    tmp_path: Path,
    local_edit: str | None,
    central_edit: str,
    outcome: str,
    refused: tuple[float | None, float | None],
) -> None:
    """Neither change stands: both sides go back to the version first synced, kept as the conflict's choice, and
    the refused versions are kept in the conflict record."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "append-only")
    sync.run()
    if local_edit is not None:
        sync.local(local_edit)
    time.sleep(0.05)
    for statement in central_edit.format(t=sync.central_table).split("; "):
        sync.central(statement)

    sync.run()
    sync.run()

    first = [(1, "pump-1", 1.0, "Ada Lovelace"), (2, "pump-2", 2.0, "Alan Turing")]
    assert sync.local("SELECT id, device, value, patient FROM readings ORDER BY id") == first
    assert sync.central(f"SELECT id, device, value FROM {sync.central_table} ORDER BY id") == [row[:3] for row in first]
    [conflict] = sync.conflicts()
    assert (conflict["recordKey"], conflict["outcome"], conflict["kept"]["value"]) == ("1", outcome, 1.0)
    versions = (conflict["localVersion"], conflict["centralVersion"])
    assert tuple(None if v.get("_kiln_deleted") else v["value"] for v in versions) == refused


def test_a_replayed_pull_takes_central_inserts_for_inserts_under_append_only(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "append-only")
    sync.run()
    sync.central(f"INSERT INTO {sync.central_table} (id, device, value) VALUES (3, 'pump-3', 3.0)")
    sync.run()
    # As if the job had died after the local commit and before the acknowledgement: the batch comes again.
    sync.central(
        "UPDATE sync_watermarks SET seq = 0 WHERE source_id = :s AND direction = 'down'", {"s": sync.source_id}
    )

    replayed = sync.run()

    assert (replayed["pulled"], replayed["conflicts"]) == (1, 0)
    assert sync.local("SELECT id, value FROM readings ORDER BY id") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert sync.conflicts() == []


def test_retention_purges_expired_records_on_both_sides_with_an_audit_row(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    assert (
        sync_api.patch(f"/v1/orgs/{org_id}", json={"config": {"retentionDays": 30}}, headers=ADMIN).status_code == 200
    )

    kept = purge_expired(sync_context, org_id, now=utcnow() + timedelta(days=29))
    purged = purge_expired(sync_context, org_id, now=utcnow() + timedelta(days=31))

    assert (kept, purged) == (0, 2)
    assert sync.local("SELECT count(*) FROM readings") == [(0,)]
    assert sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(0,)]
    entries = sync_api.get(f"/v1/orgs/{org_id}/audit", headers=sync.org.admin).json()
    purges = [entry for entry in entries if entry["action"] == "sync.purge"]
    assert [(p["detail"]["records"], p["detail"]["retentionDays"]) for p in purges] == [(2, 30)]


def kept_30_days_and_changed_40_days_ago(sync: Sync) -> None:
    """The org keeps records 30 days, and the central records were last changed 40 days ago: stamped so by hand,
    the central triggers told not to log it."""
    config = {"config": {"retentionDays": 30}}
    assert sync.api.patch(f"/v1/orgs/{sync.org.org_id}", json=config, headers=ADMIN).status_code == 200
    forty_days_ago = Stamp(int((utcnow() - timedelta(days=40)).timestamp() * 1000), 0, "local").encode()
    sync.central(
        f"SET LOCAL kiln.applying = 'on'; UPDATE {sync.central_table} SET _kiln_hlc = :at", {"at": forty_days_ago}
    )


def test_retention_keeps_a_record_edited_locally_since_its_last_sync(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Its last change is the local edit, not the central stamp: it is kept on both sides, and the edit goes up."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    kept_30_days_and_changed_40_days_ago(sync)
    sync.local("UPDATE readings SET value = 10.0 WHERE id = 1")

    purged = purge_expired(sync_context, org_id)
    job = sync.run()

    assert (purged, job["pushed"]) == (1, 1)
    assert sync.local("SELECT id, value FROM readings") == [(1, 10.0)]
    assert sync.central(f"SELECT id, value FROM {sync.central_table}") == [(1, 10.0)]
    entries = sync_api.get(f"/v1/orgs/{org_id}/audit", headers=sync.org.admin).json()
    assert [e["detail"]["records"] for e in entries if e["action"] == "sync.purge"] == [1]


def test_retention_keeps_a_record_held_for_review_whose_local_edit_went_up_into_its_conflict_since_the_cutoff(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The push moves past a local edit of a held record, which only joins the conflict, and the central record
    keeps its old stamp: the record is judged by that edit all the same, on both sides."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    held = hold_a_conflict(sync)
    kept_30_days_and_changed_40_days_ago(sync)
    sync.local("UPDATE readings SET value = 123.0 WHERE id = 1")
    sync.run()

    purged = purge_expired(sync_context, org_id)

    assert purged == 1  # record 2
    assert sync.local("SELECT id, value FROM readings") == [(1, 123.0)]
    assert sync.central(f"SELECT id, value FROM {sync.central_table}") == [(1, 99.0)]
    assert [conflict["conflictId"] for conflict in sync.conflicts("open")] == [held["conflictId"]]


def test_retention_leaves_a_source_whose_deletion_is_asked_while_the_purge_waits_for_its_job(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    kept_30_days_and_changed_40_days_ago(sync)

    def deletion_asked_meanwhile(engine: Engine, source_id: str) -> Any:
        deleted = sync_api.delete(f"/v1/orgs/{org_id}/sync-sources/{source_id}", headers=sync.org.admin)
        assert deleted.status_code == 202, deleted.text
        return one_job_per_source(engine, source_id)

    monkeypatch.setattr(retention, "one_job_per_source", deletion_asked_meanwhile)
    purged = purge_expired(sync_context, org_id)

    assert purged == 0
    assert sync.local("SELECT id FROM readings ORDER BY id") == [(1,), (2,)]


def test_a_record_purged_while_held_for_review_settles_its_conflict_and_no_choice_brings_it_back(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Past its retention the record goes from both sides, and its conflict leaves the review queue, settled as
    purged: keeping either version later is refused, and no job writes the record back on either side."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    held = hold_a_conflict(sync)

    purged = purge_expired(sync_context, org_id, now=utcnow() + timedelta(days=3000))
    choice = sync_api.post(
        f"/v1/orgs/{org_id}/conflicts/{held['conflictId']}", json={"keep": "local"}, headers=sync.org.admin
    )
    job = sync.run()

    assert (purged, choice.status_code, job["status"]) == (2, 409, "succeeded")
    assert sync.conflicts("open") == []
    [settled] = sync.conflicts()
    assert (settled["status"], settled["outcome"], settled["resolvedBy"]) == ("resolved", "purged", "retention")
    assert sync.local("SELECT id FROM readings") == sync.central(f"SELECT id FROM {sync.central_table}") == []
    entries = sync_api.get(f"/v1/orgs/{org_id}/audit", headers=sync.org.admin).json()
    settling = [entry for entry in entries if entry["action"] == "sync.conflict.purged"]
    assert [(e["actor"], e["target"], e["detail"]["conflictId"]) for e in settling] == [
        ("retention", "readings/1", held["conflictId"])
    ]


def test_a_held_record_edited_centrally_while_the_purge_runs_stays_with_its_conflict_open(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edit lands after the purge listed the record as expired, before its central delete: no longer expired,
    the record stays, and its conflict stays in the review queue."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    held = hold_a_conflict(sync)
    purge_local = retention._purge_local

    def edited_meanwhile(*args: Any, **kwargs: Any) -> list[str]:
        purged_locally = purge_local(*args, **kwargs)
        sync.central(f"UPDATE {sync.central_table} SET value = 77.0 WHERE id = 1")
        return purged_locally

    monkeypatch.setattr(retention, "_purge_local", edited_meanwhile)
    kept_30_days_and_changed_40_days_ago(sync)
    purged = purge_expired(sync_context, org_id)

    assert purged == 1  # record 2
    assert sync.central(f"SELECT id, value FROM {sync.central_table}") == [(1, 77.0)]
    assert [c["conflictId"] for c in sync.conflicts("open")] == [held["conflictId"]]
    assert "sync.conflict.purged" not in sync.audit_actions()


def add_prediction_records(sync_context: SyncContext, org_id: str, times: list[datetime]) -> None:
    """One answered row of the org's per time, as a predictor records it."""
    with session_scope(sync_context.sessions) as session:
        for at in times:
            record = {"version": "v1", "score": 0.9, "label": "1", "risk_level": "high", "latency_ms": 0.2}
            session.add(Prediction(org_id=org_id, at=at, **record))


def test_retention_purges_prediction_records_older_than_it_with_an_audit_row(
    sync_api: TestClient, sync_context: SyncContext, org_id: str
) -> None:
    """Scores and risk levels of an org's rows are its records too, kept as long as its synced ones."""
    org = create_org_with_keys(sync_api, org_id)
    config = {"retentionDays": 30, "predictions": {"record": True}}
    assert sync_api.patch(f"/v1/orgs/{org_id}", json={"config": config}, headers=ADMIN).status_code == 200
    now = utcnow()
    add_prediction_records(sync_context, org_id, [now - timedelta(days=age) for age in (45, 31, 29, 1)])

    purged = purge_expired(sync_context, org_id, now=now)

    assert purged == 2
    kept = sync_api.get(f"/v1/orgs/{org_id}/predictions", headers=org.viewer).json()
    assert len(kept) == 2
    entries = sync_api.get(f"/v1/orgs/{org_id}/audit", headers=org.admin).json()
    purges = [entry["detail"] for entry in entries if entry["action"] == "predictions.purge"]
    assert [(detail["records"], detail["retentionDays"]) for detail in purges] == [(2, 30)]
    assert org_id in orgs_to_purge(sync_context.sessions)  # the beat purges it, though it has no sync source


def test_prediction_records_kept_before_recording_was_turned_off_are_still_purged(
    sync_api: TestClient, sync_context: SyncContext, org_id: str
) -> None:
    """The beat chose the orgs recording now: records from before the switch were kept past retention for good."""
    create_org_with_keys(sync_api, org_id)
    config = {"retentionDays": 30, "predictions": {"record": True}}
    assert sync_api.patch(f"/v1/orgs/{org_id}", json={"config": config}, headers=ADMIN).status_code == 200
    add_prediction_records(sync_context, org_id, [utcnow() - timedelta(days=400)])
    stopped = {"config": {"predictions": {"record": False}}}
    assert sync_api.patch(f"/v1/orgs/{org_id}", json=stopped, headers=ADMIN).status_code == 200

    assert org_id in orgs_to_purge(sync_context.sessions)
    assert purge_expired(sync_context, org_id) == 1


def test_a_store_out_of_reach_is_audited_and_the_orgs_other_records_are_purged(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    org = create_org_with_keys(sync_api, org_id)
    config = {"retentionDays": 1, "predictions": {"record": True}}
    assert sync_api.patch(f"/v1/orgs/{org_id}", json={"config": config}, headers=ADMIN).status_code == 200
    (tmp_path / org_id).mkdir()
    a, b = (registered_store(sync_api, sync_context, org, tmp_path / org_id / f"{name}.db") for name in "ab")
    a.run(), b.run()
    add_prediction_records(sync_context, org_id, [utcnow()])
    a.local_path.rename(tmp_path / "a-moved.db")

    purged = purge_expired(sync_context, org_id, now=utcnow() + timedelta(days=10))

    assert purged == 3  # b's two records and the prediction record
    assert b.local("SELECT count(*) FROM readings") == [(0,)]
    assert b.central(f"SELECT count(*) FROM {b.central_table}") == [(0,)]
    assert a.central(f"SELECT count(*) FROM {a.central_table}") == [(2,)]
    assert sync_api.get(f"/v1/orgs/{org_id}/predictions", headers=org.viewer).json() == []
    entries = sync_api.get(f"/v1/orgs/{org_id}/audit", headers=org.admin).json()
    [failed] = [entry for entry in entries if entry["action"] == "sync.purge.failed"]
    assert failed["target"] == f"{a.source_id}/readings"
    assert failed["detail"]["error"] == f"the SQLite file {a.local_path} does not exist"
    assert {entry["target"] for entry in entries if entry["action"] == "sync.purge"} == {f"{b.source_id}/readings"}
    assert [entry["detail"]["records"] for entry in entries if entry["action"] == "predictions.purge"] == [1]
    assert any(a.source_id in record.getMessage() for record in caplog.records if record.levelname == "ERROR")


def registered_store(api: TestClient, context: SyncContext, org: OrgKeys, path: Path) -> Sync:
    """A SQLite store of two readings at `path`, registered as a source of the org."""
    make_local_store(path, TWO_READINGS)
    url = f"sqlite:///{path}"
    source_id = register(api, org, url, "last-writer-wins")
    return Sync(api, context, org, url, source_id, context.settings.resolved_database_url)


def test_after_a_key_rotation_every_record_decrypts_and_the_old_key_can_be_destroyed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    old_key = sync.central(f"SELECT patient FROM {sync.central_table} WHERE id = 1")[0][0].split(":")[0]

    summary = rotate_org_key(sync_context, org_id, actor="operator")
    with session_scope(sync_context.sessions) as session:
        destroy_key(session, org_id, old_key, actor="operator")
    sync.central(f"UPDATE {sync.central_table} SET value = 5.0")  # every record comes down again, opened
    sync.run()

    assert summary["drainedKeys"] == [old_key] and summary["resealedValues"] == 2
    assert sync.local("SELECT id, value, patient FROM readings ORDER BY id") == [
        (1, 5.0, "Ada Lovelace"),
        (2, 5.0, "Alan Turing"),
    ]
    sealed = [row[0] for row in sync.central(f"SELECT patient FROM {sync.central_table}")]
    assert all(value.startswith(summary["activeKey"] + ":") for value in sealed)
    assert sync.central("SELECT status, wrapped FROM sync_keys WHERE id = :k", {"k": old_key}) == [("destroyed", None)]


def test_a_rotation_reseals_tables_and_field_merge_bases_larger_than_a_page(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    count = 2 * BATCH_ROWS + 7
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, policy="field-merge", rows=many_readings(count))
    sync.run()

    summary = rotate_org_key(sync_context, org_id, actor="operator")

    assert summary["resealedValues"] == 2 * count  # each record, and its base
    new_key = summary["activeKey"] + ":"
    sealed = [row[0] for row in sync.central(f"SELECT patient FROM {sync.central_table}")]
    assert len(sealed) == count and all(value.startswith(new_key) for value in sealed)
    bases = [row[0] for row in sync.central("SELECT row FROM sync_bases")]
    assert len(bases) == count and all(base["patient"].startswith(new_key) for base in bases)


def test_a_key_rotated_while_a_job_runs_leaves_nothing_sealed_under_the_old_key(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(2000))
    rotations: list[dict[str, Any]] = []

    def rotate_and_destroy_after_the_first_batch(_tally: Tally) -> None:
        if not rotations:
            rotations.append(rotate_org_key(sync_context, org_id, actor="operator"))
            with session_scope(sync_context.sessions) as session:
                for key_id in rotations[0]["drainedKeys"]:
                    destroy_key(session, org_id, key_id, actor="operator")

    status = run_job(sync_context, sync.submit(), after_batch=rotate_and_destroy_after_the_first_batch)
    sync.central(f"UPDATE {sync.central_table} SET value = value + 1")  # every record comes down again, opened
    sync.run()

    assert status == "succeeded"
    sealed = [row[0] for row in sync.central(f"SELECT patient FROM {sync.central_table}")]
    assert len(sealed) == 2000 and all(value.startswith(rotations[0]["activeKey"] + ":") for value in sealed)
    assert sync.local("SELECT count(*) FROM readings WHERE patient = 'patient ' || id AND value = id + 1") == [(2000,)]


def test_a_key_rotated_while_a_job_pulls_leaves_the_job_opening_what_was_resealed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A rotation between two pulled batches reseals the central records the job has still to bring down under a key
    the job's keyring does not hold: the job goes on under the new key, as it does when a batch seals."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(2000))
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET value = value + 1")  # every record comes down, 500 a batch
    rotations: list[dict[str, Any]] = []

    def rotate_after_the_first_batch(_tally: Tally) -> None:
        if not rotations:
            rotations.append(rotate_org_key(sync_context, org_id, actor="operator"))

    status = run_job(sync_context, sync.submit(), after_batch=rotate_after_the_first_batch)

    assert status == "succeeded"
    assert sync.local("SELECT count(*) FROM readings WHERE patient = 'patient ' || id AND value = id + 1") == [(2000,)]


def test_a_value_sealed_under_a_destroyed_key_fails_the_job_that_pulls_it(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Loading the org's keys again does not bring back a destroyed one: the job fails naming it, once."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    [(old_token,)] = sync.central(f"SELECT patient FROM {sync.central_table} WHERE id = 1")
    rotation = rotate_org_key(sync_context, org_id, actor="operator")
    with session_scope(sync_context.sessions) as session:
        destroy_key(session, org_id, rotation["drainedKeys"][0], actor="operator")
    sync.central(f"UPDATE {sync.central_table} SET patient = :token WHERE id = 1", {"token": old_token})

    job = sync.run()

    key_id = rotation["drainedKeys"][0]
    assert (job["status"], job["errors"][-1]["error"]) == (
        "failed",
        f"table 'readings': ValueError: readings.patient was sealed under key {key_id!r}, which this org no longer has",
    )


def test_a_rotation_waits_for_a_transaction_sealing_under_the_active_key(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """A batch holds the key it seals under until it commits: a rotation asked for meanwhile starts after it, so it
    re-encrypts what the batch wrote."""
    open_sync(sync_api, sync_context, org_id, tmp_path).run()  # the org's first key
    with session_scope(sync_context.sessions) as session:
        keyring = load_keyring(session, sync_context.secrets, org_id)
    rotations: list[dict[str, Any]] = []
    rotation = threading.Thread(target=lambda: rotations.append(rotate_org_key(sync_context, org_id, actor="operator")))

    with Session(sync_context.engine) as batch, batch.begin():
        hold_active_key(batch, keyring)
        rotation.start()
        rotation.join(timeout=1)
        rotated_while_held = not rotation.is_alive()
    rotation.join(timeout=30)

    assert not rotated_while_held
    assert [summary["drainedKeys"] for summary in rotations] == [[keyring.active_id]]


def test_two_rotations_at_once_leave_one_active_key_and_every_value_opening(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """Two rotations asked for together (the CLI twice, or the CLI and the api): the second waits for the first,
    then rotates again from the key the first made, so each reports a key of its own and one stays active."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()  # the org's first key, sealing both patients
    with session_scope(sync_context.sessions) as session:
        first = load_keyring(session, sync_context.secrets, org_id)
    rotations: list[dict[str, Any]] = []
    both = [
        threading.Thread(target=lambda: rotations.append(rotate_org_key(sync_context, org_id, actor="operator")))
        for _ in range(2)
    ]

    with Session(sync_context.engine) as batch, batch.begin():
        hold_active_key(batch, first)  # both rotations start while a batch seals, and wait for it
        for rotation in both:
            rotation.start()
        wait_until(lambda: waiting_for_locks(sync) == 2)
    for rotation in both:
        rotation.join(timeout=30)

    keys = sync_api.get(f"/v1/orgs/{org_id}/sync-keys", headers=sync.org.admin).json()
    assert [key["keyId"] for key in keys if key["status"] == "active"] == [rotations[1]["activeKey"]]
    assert rotations[0]["activeKey"] != rotations[1]["activeKey"]
    assert rotations[1]["drainedKeys"] == [rotations[0]["activeKey"]]
    assert {key["keyId"]: key["status"] for key in keys}[first.active_id] == "drained"
    with session_scope(sync_context.sessions) as session:
        keyring = load_keyring(session, sync_context.secrets, org_id)
    sealed = [row[0] for row in sync.central(f"SELECT patient FROM {sync.central_table} ORDER BY id")]
    assert [keyring.open(value, column="readings.patient") for value in sealed] == ["Ada Lovelace", "Alan Turing"]


def test_two_jobs_of_a_new_org_seal_under_one_first_key(
    sync_api: TestClient, sync_context: SyncContext, org_id: str
) -> None:
    """The first job to seal makes the org's key; another starting meanwhile waits for it and seals under it too."""
    org = create_org_with_keys(sync_api, org_id)
    second: list[str] = []

    def load() -> None:
        with session_scope(sync_context.sessions) as session:
            second.append(load_keyring(session, sync_context.secrets, org_id).active_id)

    other_job = threading.Thread(target=load)
    with Session(sync_context.engine) as batch, batch.begin():
        first = load_keyring(batch, sync_context.secrets, org_id).active_id
        other_job.start()
        other_job.join(timeout=1)
    other_job.join(timeout=30)

    keys = sync_api.get(f"/v1/orgs/{org_id}/sync-keys", headers=org.admin).json()
    assert [(key["keyId"], key["status"]) for key in keys] == [(first, "active")]
    assert second == [first]


def waiting_for_locks(sync: Sync) -> int:
    """How many connections to the central database wait for a lock."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    return int(sync.central(query)[0][0])


BLOB_TABLE = "CREATE TABLE t (id INTEGER PRIMARY KEY, img BLOB, reading REAL, note TEXT)"
PNG, INF = b"\x89PNG\r\n\x00\xff", float("inf")


@pytest.mark.parametrize("policy", ["last-writer-wins", "field-merge", "manual"])
def test_bytes_and_infinities_pass_through_deletions_conflicts_and_bases(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, policy: str
) -> None:
    rows = "INSERT INTO t VALUES (1, x'89504e470d0a00ff', 1e999, 'a'), (2, x'89504e470d0a00ff', -1e999, 'b')"
    sync = open_table_sync(sync_api, sync_context, org_id, tmp_path, BLOB_TABLE, rows, policy=policy)
    assert sync.run()["status"] == "succeeded"
    sync.local("DELETE FROM t WHERE id = 2")
    sync.local("UPDATE t SET note = 'local' WHERE id = 1")
    time.sleep(0.01)
    sync.central(f"UPDATE {sync.central_table} SET note = 'central' WHERE id = 1")

    job = sync.run()
    if policy == "manual":
        [held] = sync.conflicts("open")
        choose(sync, held["conflictId"], "local")
        job = sync.run()

    assert job["status"] == "succeeded", job
    expected = [(1, PNG, INF, "local" if policy == "manual" else "central")]
    assert sync.local("SELECT id, img, reading, note FROM t") == expected
    central = sync.central(f"SELECT id, img, reading, note FROM {sync.central_table}")
    assert [(key, bytes(img), reading, note) for key, img, reading, note in central] == expected
    assert "sync.delete" in sync.audit_actions()
