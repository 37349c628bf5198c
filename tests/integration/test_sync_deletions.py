"""Deletions between a SQLite local store and the central PostgreSQL: carried both ways, through the table's policy,
audited with the version they removed, and replayed batches change nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

import services.sync.deletions as deletions
import services.sync.transfer as transfer
from services.sync.context import SyncContext
from services.sync.envelope import load_keyring
from services.sync.jobs import run_job
from services.sync.pair import TablePair, Tally
from services.sync.rotation import rotate_org_key
from shared.db.session import session_scope
from shared.errors import TransientError
from shared.sync_keys import destroy_key
from tests.integration.sync_support import (
    LOCAL_ONLY,
    Sync,
    a_job_cut_off_before_its_pull_is_acknowledged,
    allow_connections,
    central_copies,
    many_readings,
    open_down_only_vitals,
    open_sync,
)
from tests.support.polling import start_until_it_waits_for_a_lock


def deletions_audited(sync: Sync) -> list[tuple[str, str]]:
    """Each sync.delete audit row as (record, direction), oldest first."""
    rows = sync.central(
        "SELECT target, detail FROM audit_log WHERE org_id = :o AND action = 'sync.delete' ORDER BY id",
        {"o": sync.org.org_id},
    )
    return [(target, detail["direction"]) for target, detail in rows]


def both_sides(sync: Sync, record: int = 1) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    local = sync.local("SELECT value FROM readings WHERE id = :i", {"i": record})
    central = sync.central(f"SELECT value FROM {sync.central_table} WHERE id = :i", {"i": record})
    return local, central


def test_a_local_deletion_goes_up_and_is_audited_with_the_record_it_removed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.local("DELETE FROM readings WHERE id = 1")

    job = sync.run()

    assert (job["pushed"], job["pulled"], job["conflicts"]) == (1, 0, 0)
    assert sync.central(f"SELECT id FROM {sync.central_table}") == [(2,)]
    assert deletions_audited(sync) == [("readings/1", "up")]
    [(deleted,)] = sync.central(
        "SELECT detail FROM audit_log WHERE action = 'sync.delete' AND org_id = :o", {"o": sync.org.org_id}
    )
    assert deleted["deleted"]["device"] == "pump-1"
    assert not deleted["deleted"]["patient"].startswith("Ada")  # kept sealed, as the central store holds it


def test_a_deleted_records_audit_copy_still_opens_after_its_key_is_rotated_and_destroyed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The sync.delete audit row holds the only copy of a deleted record: a rotation re-encrypts it too."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.local("DELETE FROM readings WHERE id = 1")
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")
    sync.run()

    summary = rotate_org_key(sync_context, org_id, actor="operator")
    with session_scope(sync_context.sessions) as session:
        for key_id in summary["drainedKeys"]:
            destroy_key(session, org_id, key_id, actor="operator")

    entries = sync_api.get(f"/v1/orgs/{org_id}/audit", headers=sync.org.admin).json()
    copies = {e["target"]: e["detail"]["deleted"] for e in entries if e["action"] == "sync.delete"}
    with session_scope(sync_context.sessions) as session:
        keyring = load_keyring(session, sync_context.secrets, org_id)
        opened = {target: keyring.open(row["patient"], column="readings.patient") for target, row in copies.items()}
    assert opened == {"readings/1": "Ada Lovelace", "readings/2": "Alan Turing"}
    assert summary["resealedValues"] == 2


def test_a_central_deletion_pulled_while_the_key_rotates_is_audited_once_the_batch_lets_the_rotation_switch(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation asked while a pull writes its batch locally waits for the batch: had it switched keys between
    the batch's local commit and its central one, the batch would have been redone with its deletion done, and the
    audit row holding the deleted record (its only copy) never written."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")
    rotation = threading.Thread(target=lambda: rotate_org_key(sync_context, org_id, actor="operator"))
    pull_deletions = transfer._pull_deletions

    def rotate_while_deleting(*args: Any) -> Any:
        if rotation.ident is None:
            start_until_it_waits_for_a_lock(rotation, sync.central_url)  # the switch waits for the batch
        return pull_deletions(*args)

    monkeypatch.setattr(transfer, "_pull_deletions", rotate_while_deleting)
    job = sync.run()
    rotation.join()

    assert (job["status"], job["pulled"]) == ("succeeded", 1)
    assert deletions_audited(sync) == [("readings/2", "down")]
    assert sync.local("SELECT id FROM readings ORDER BY id") == [(1,)]


def test_a_central_deletion_whose_pull_was_cut_off_before_its_acknowledgement_is_audited_once_by_the_retry(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local store committed the deletion, the central store lost the connection before the audit row landed:
    the retry finds the record gone, and audits it from the note the deletion left, sealed as the central store
    holds it."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")
    job_id = a_job_cut_off_before_its_pull_is_acknowledged(sync, monkeypatch)
    assert sync.local("SELECT id FROM readings") == [(1,)]

    assert run_job(sync_context, job_id) == "succeeded"  # the worker's retry
    sync.run()

    assert sync.job(job_id)["pulled"] == 1
    assert deletions_audited(sync) == [("readings/2", "down")]
    [(detail,)] = sync.central(
        "SELECT detail FROM audit_log WHERE org_id = :o AND action = 'sync.delete'", {"o": sync.org.org_id}
    )
    with session_scope(sync_context.sessions) as session:
        keyring = load_keyring(session, sync_context.secrets, org_id)
    assert (detail["deleted"]["device"], detail["deleted"]["value"]) == ("pump-2", 2.0)
    assert keyring.open(detail["deleted"]["patient"], column="readings.patient") == "Alan Turing"
    assert sync.local("SELECT count(*) FROM _kiln_deleted") == [(0,)]


def test_a_central_deletion_on_a_down_only_table_cut_off_before_its_acknowledgement_is_audited_by_key(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = open_down_only_vitals(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"INSERT INTO {sync.central_table} (id, diagnosis, temperature) VALUES (2, 'central', 36.0)")
    sync.run()
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")
    job_id = a_job_cut_off_before_its_pull_is_acknowledged(sync, monkeypatch)

    assert run_job(sync_context, job_id) == "succeeded"

    assert sync.local("SELECT id FROM vitals") == [(1,)]
    [(detail,)] = sync.central(
        "SELECT detail FROM audit_log WHERE org_id = :o AND action = 'sync.delete'", {"o": sync.org.org_id}
    )
    assert detail == {"direction": "down"}


def test_a_deletion_audited_before_the_local_store_could_forget_its_note_is_not_audited_again(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off from the local store right after the central commit: the note outlives its audit row, and the
    next batch, seeing the batch acknowledged, forgets it."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")

    def local_store_cut_off(*args: object, **kwargs: object) -> None:
        raise OperationalError("DELETE FROM _kiln_deleted", {}, Exception("disk I/O error"))

    job_id = sync.submit()
    with monkeypatch.context() as cut:
        cut.setattr(transfer, "forget_audited_deletions", local_store_cut_off)
        with pytest.raises(TransientError):
            run_job(sync_context, job_id)
    assert sync.local("SELECT count(*) FROM _kiln_deleted") == [(1,)]
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 1")

    assert run_job(sync_context, job_id) == "succeeded"

    assert deletions_audited(sync) == [("readings/2", "down"), ("readings/1", "down")]
    assert sync.local("SELECT count(*) FROM _kiln_deleted") == [(0,)]


def test_a_pull_batch_run_between_another_batchs_two_commits_leaves_one_audit_row_and_one_count(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches of one table at once (a job whose lock was lost, and a second job let in): the second, run while
    the first sat between its local and central commits, audited the first's deletion from its note, and the first
    audited it again. The first, acknowledged after the second, is now undone centrally and its job tries again."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")
    acknowledge_pull = transfer._acknowledge_pull
    second_batch: list[bool] = []

    def second_batch_between_the_commits(session: Any, pair: TablePair, *args: Any) -> None:
        if not second_batch:
            second_batch.append(True)
            assert transfer.pull_batch(pair)
        acknowledge_pull(session, pair, *args)

    job_id = sync.submit()
    with monkeypatch.context() as twice:
        twice.setattr(transfer, "_acknowledge_pull", second_batch_between_the_commits)
        with pytest.raises(TransientError):
            run_job(sync_context, job_id)
    assert "acknowledged up to another position" in sync.job(job_id)["errors"][-1]["error"]

    assert run_job(sync_context, job_id) == "succeeded"
    assert deletions_audited(sync) == [("readings/2", "down")]
    assert sync.job(job_id)["pulled"] == 1
    assert sync.local("SELECT id FROM readings") == [(1,)]


def test_a_pull_batch_acknowledged_before_another_that_carried_its_note_forgets_that_note(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: the second batch, its local transaction run between the first's two commits, carried the
    first's note on to its own, later, position; the first was acknowledged first and forgot only the notes up to
    its position, and its job's next batch audited the deletion again."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")
    acknowledge_pull, forget_audited_deletions = transfer._acknowledge_pull, deletions.forget_audited_deletions
    second_waits, first_acknowledged = threading.Event(), threading.Event()
    second_batch: list[object] = []

    def run_second_batch(pair: TablePair) -> None:
        try:
            second_batch.append(transfer.pull_batch(pair))
        except Exception as error:
            second_batch.append(error)

    def batches_overlap(session: Any, pair: TablePair, *args: Any) -> None:
        if threading.current_thread().name == "second":
            second_waits.set()
            assert first_acknowledged.wait(20)
        elif not second_waits.is_set():
            sync.central(f"UPDATE {sync.central_table} SET value = 10.0 WHERE id = 1")  # past the first's batch
            threading.Thread(target=run_second_batch, args=(pair,), name="second").start()
            assert second_waits.wait(20)
        acknowledge_pull(session, pair, *args)

    def forget_then_let_the_second_on(pair: TablePair, **kwargs: Any) -> None:
        forget_audited_deletions(pair, **kwargs)
        first_acknowledged.set()

    monkeypatch.setattr(transfer, "_acknowledge_pull", batches_overlap)
    monkeypatch.setattr(transfer, "forget_audited_deletions", forget_then_let_the_second_on)
    job_id = sync.submit()

    assert run_job(sync_context, job_id) == "succeeded"
    [refused] = second_batch
    assert isinstance(refused, TransientError) and "another position" in refused.message
    assert deletions_audited(sync) == [("readings/2", "down")]
    assert sync.job(job_id)["pulled"] == 2
    assert sync.local("SELECT id, value FROM readings") == [(1, 10.0)]


def test_a_central_deletion_comes_down(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")

    job = sync.run()

    assert (job["pushed"], job["pulled"], job["conflicts"]) == (0, 1, 0)
    assert sync.local("SELECT id FROM readings") == [(1,)]
    assert deletions_audited(sync) == [("readings/2", "down")]
    assert sync.run()["pushed"] == 0  # the deletion carried down is not sent back up


def test_a_central_deletion_on_a_down_only_table_is_audited_without_the_local_record(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    """The record deleted locally was never sent up, and its audit row does not send it: key and direction only."""
    sync = open_down_only_vitals(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"INSERT INTO {sync.central_table} (id, diagnosis, temperature) VALUES (2, 'central', 36.0)")
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")

    job = sync.run()

    assert (job["status"], job["pulled"], job["conflicts"]) == ("succeeded", 1, 0), job
    assert sync.local("SELECT id FROM vitals") == [(1,)]
    [(detail,)] = sync.central(
        "SELECT detail FROM audit_log WHERE org_id = :o AND action = 'sync.delete'", {"o": sync.org.org_id}
    )
    assert detail == {"direction": "down"}
    assert LOCAL_ONLY not in central_copies(sync)


def test_a_deletion_either_way_leaves_no_field_merge_base_behind(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "field-merge")
    sync.run()
    bases_before = sync.central(
        "SELECT record_key FROM sync_bases WHERE source_id = :s ORDER BY 1", {"s": sync.source_id}
    )
    sync.local("DELETE FROM readings WHERE id = 1")
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")

    sync.run()

    assert bases_before == [("1",), ("2",)]
    assert sync.central("SELECT record_key FROM sync_bases WHERE source_id = :s", {"s": sync.source_id}) == []


def test_a_local_deletion_after_a_central_edit_wins_under_last_writer_wins(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "last-writer-wins")
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")
    time.sleep(0.05)
    sync.local("DELETE FROM readings WHERE id = 1")

    job = sync.run()
    sync.run()

    assert job["conflicts"] == 1
    assert both_sides(sync) == ([], [])
    [conflict] = sync.conflicts()
    assert conflict["outcome"] == "local-won"
    assert conflict["localVersion"]["_kiln_deleted"] is True
    assert conflict["centralVersion"]["value"] == 99.0  # the edit that lost is kept
    assert deletions_audited(sync) == [("readings/1", "up")]


def test_a_central_edit_after_a_local_deletion_wins_and_the_record_comes_back(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "last-writer-wins")
    sync.run()
    sync.local("DELETE FROM readings WHERE id = 1")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")

    sync.run()
    sync.run()

    assert both_sides(sync) == ([(99.0,)], [(99.0,)])
    assert sync.local("SELECT patient FROM readings WHERE id = 1") == [("Ada Lovelace",)]
    [conflict] = sync.conflicts()
    assert (conflict["outcome"], conflict["localVersion"]["_kiln_deleted"]) == ("central-won", True)


def test_a_record_written_again_locally_while_its_losing_deletion_is_pushed_keeps_that_write(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The push finds the local deletion lost and puts the central record back locally; the application wrote the
    record again after the push read the store, and that later write is what both sides end with."""
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "last-writer-wins")
    sync.run()
    sync.local("DELETE FROM readings WHERE id = 1")
    time.sleep(0.05)
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")
    restore = deletions.restore_locally

    def written_again_first(pair: TablePair, rows: list[dict[str, Any]], **position: int) -> set[str]:
        sync.local("INSERT INTO readings VALUES (1, 'pump-1', 7.0, 'Ada Lovelace')")
        return restore(pair, rows, **position)

    with monkeypatch.context() as between:
        between.setattr(transfer, "restore_locally", written_again_first)
        sync.run()
    sync.run()

    assert both_sides(sync) == ([(7.0,)], [(7.0,)])


def test_a_central_deletion_against_a_local_edit_goes_to_the_later_stamp(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "last-writer-wins")
    sync.run()
    sync.local("UPDATE readings SET value = 10.0 WHERE id = 1")
    sync.central(f"UPDATE {sync.central_table} SET value = 20.0 WHERE id = 2")
    time.sleep(0.05)
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 1")
    sync.local("DELETE FROM readings WHERE id = 2")

    sync.run()
    sync.run()

    assert sync.local("SELECT id FROM readings") == []
    assert sync.central(f"SELECT id FROM {sync.central_table}") == []
    outcomes = {c["recordKey"]: (c["outcome"], c["centralVersion"], c["localVersion"]) for c in sync.conflicts()}
    assert outcomes["1"][0] == "central-won" and outcomes["1"][1]["_kiln_deleted"] is True
    assert outcomes["1"][2]["value"] == 10.0  # the local edit that lost is kept
    assert outcomes["2"][0] == "local-won" and outcomes["2"][1]["value"] == 20.0


def test_manual_holds_a_deletion_against_an_edit_until_someone_decides(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    sync.run()
    sync.central(f"UPDATE {sync.central_table} SET value = 99.0 WHERE id = 1")
    sync.local("DELETE FROM readings WHERE id = 1")

    sync.run()
    sync.run()
    [held] = sync.conflicts("open")

    assert held["localVersion"]["_kiln_deleted"] is True
    assert both_sides(sync) == ([], [(99.0,)])

    decided = sync_api.post(
        f"/v1/orgs/{org_id}/conflicts/{held['conflictId']}", json={"keep": "local"}, headers=sync.org.admin
    )
    assert decided.status_code == 200, decided.text
    sync.run()

    assert both_sides(sync) == ([], [])
    assert sync.conflicts("open") == []
    assert deletions_audited(sync) == [("readings/1", "up")]


def test_manual_review_can_keep_a_central_deletion_over_a_local_edit(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "manual")
    sync.run()
    sync.local("UPDATE readings SET value = 10.0 WHERE id = 1")
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 1")
    sync.run()
    [held] = sync.conflicts("open")
    assert both_sides(sync) == ([(10.0,)], [])

    decided = sync_api.post(
        f"/v1/orgs/{org_id}/conflicts/{held['conflictId']}", json={"keep": "central"}, headers=sync.org.admin
    )
    assert decided.status_code == 200, decided.text
    sync.run()

    assert both_sides(sync) == ([], [])
    assert deletions_audited(sync) == [("readings/1", "down")]


def test_append_only_refuses_a_deletion_on_either_side_and_restores_the_record(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, "append-only")
    sync.run()
    sync.local("DELETE FROM readings WHERE id = 1")
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 2")

    sync.run()
    sync.run()

    assert sync.local("SELECT id, value, patient FROM readings ORDER BY id") == [
        (1, 1.0, "Ada Lovelace"),
        (2, 2.0, "Alan Turing"),
    ]
    assert sync.central(f"SELECT id, value FROM {sync.central_table} ORDER BY id") == [(1, 1.0), (2, 2.0)]
    refused = {c["recordKey"]: c for c in sync.conflicts()}
    assert {key: c["outcome"] for key, c in refused.items()} == {"1": "delete-refused", "2": "delete-refused"}
    assert refused["1"]["localVersion"]["_kiln_deleted"] is True
    assert refused["2"]["centralVersion"]["_kiln_deleted"] is True
    assert deletions_audited(sync) == []


def test_a_replayed_pull_of_deletions_neither_resurrects_nor_counts_twice(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    sync.run()
    sync.central(f"DELETE FROM {sync.central_table} WHERE id = 1")
    sync.run()
    # As if the job had died after the local commit and before the acknowledgement: the batch comes again.
    sync.central(
        "UPDATE sync_watermarks SET seq = 0 WHERE source_id = :s AND direction = 'down'", {"s": sync.source_id}
    )

    replayed = sync.run()

    assert (replayed["pulled"], replayed["conflicts"]) == (0, 0)
    assert sync.local("SELECT id FROM readings") == [(2,)]
    assert deletions_audited(sync) == [("readings/1", "down")]


def test_deletions_cut_off_from_the_central_store_resume_from_the_watermark(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path, rows=many_readings(2000))
    sync.run()
    sync.local("DELETE FROM readings WHERE id <= 1500")
    job_id = sync.submit()
    database = sync.central_url.rsplit("/", 1)[-1]

    def cut_after_two_batches(tally: Tally) -> None:
        if tally.pushed == 1000:
            allow_connections(database, allowed=False)

    assert run_job(sync_context, job_id, after_batch=cut_after_two_batches) == "running"  # left for the sync beat
    allow_connections(database, allowed=True)
    assert sync.central(f"SELECT count(*) FROM {sync.central_table}") == [(1000,)]

    assert run_job(sync_context, job_id) == "succeeded"

    assert sync.job(job_id)["pushed"] == 1500
    assert sync.central(f"SELECT count(*), min(id) FROM {sync.central_table}") == [(500, 1501)]
    assert sync.local("SELECT count(*), min(id) FROM readings") == [(500, 1501)]
    assert len(deletions_audited(sync)) == 1500
