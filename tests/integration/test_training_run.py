"""A training run on real PostgreSQL and S3: from a queued row to a registered version with its artifacts."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from deploy.local import ai4i
from services.trainer import artifacts, candidates, runs
from services.trainer.candidates import CandidateStores
from services.trainer.context import WorkerContext
from services.trainer.reaper import SWEEP_SECONDS
from services.trainer.training import run_training
from shared.db.models import CandidateFolder
from shared.db.session import session_scope
from shared.db.types import utcnow
from shared.errors import TransientError
from shared.layout import (
    HOLDOUT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    NATIVE_MODEL_FILE,
    TRAINING_CONFIG_FILE,
    VALIDATION_FILE,
    model_key,
    model_prefix,
)
from shared.settings import Settings
from shared.storage import ObjectStore, open_object_store
from tests.integration.conftest import (
    ADMIN,
    OrgKeys,
    cancel_just_before,
    create_org_with_keys,
    run_of,
    stall_just_before,
    submit,
    upload_table,
)
from tests.support.polling import eventually
from tests.support.workers import celery_worker

START = datetime(2024, 1, 1, tzinfo=UTC)


def test_a_run_trains_validates_stores_and_registers_a_version(
    api: TestClient, org: OrgKeys, worker: WorkerContext, settings: Settings, tmp_path: Path
) -> None:
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(50_000, seed=1), tmp_path))
    assert run_training(run_id, worker) == "succeeded"
    run = run_of(api, org, run_id)
    assert run["status"] == "succeeded" and run["attempts"] == 1 and run["error"] is None
    assert run["progress"] == {"stage": "succeeded", "percent": 100}
    assert run["metrics"]["accuracy"] >= 0.9 and run["metrics"]["auc"] >= 0.9
    version = api.get(f"/v1/orgs/{org.org_id}/models/{run['version']}", headers=org.viewer).json()
    assert version["status"] == "validated" and version["validation"]["passed"] is True
    assert {g["name"] for g in version["validation"]["gates"]} >= {"accuracy", "precision", "recall", "parity"}
    store = open_object_store(settings)
    prefix = model_prefix(org.org_id, run["version"])
    stored = (METRICS_FILE, MODEL_FILE, TRAINING_CONFIG_FILE, VALIDATION_FILE, NATIVE_MODEL_FILE, HOLDOUT_FILE)
    assert store.list(prefix) == sorted(prefix + name for name in stored)
    assert hashlib.sha256(store.get_bytes(model_key(org.org_id, run["version"]))).hexdigest() == version["sha256"]
    artifacts = api.get(f"/v1/orgs/{org.org_id}/models/{run['version']}/artifacts", headers=org.trainer).json()
    assert [artifact["name"] for artifact in artifacts] == [
        MODEL_FILE,
        NATIVE_MODEL_FILE,
        METRICS_FILE,
        TRAINING_CONFIG_FILE,
        VALIDATION_FILE,
    ]


def test_a_repeated_message_for_a_finished_run_changes_nothing(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(50_000, seed=2), tmp_path))
    assert run_training(run_id, worker) == "succeeded"
    assert run_training(run_id, worker) == "skipped"
    assert len(api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json()) == 1
    assert run_of(api, org, run_id)["attempts"] == 1


def test_the_data_range_limits_the_rows_trained_on(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    table = ai4i.generate(6_000, seed=3, start=START, interval=timedelta(hours=1))
    dataset_id = upload_table(api, org, table, tmp_path)
    end = START + timedelta(hours=2_999)
    run_id = submit(api, org, dataset_id, dataRange={"startDate": START.isoformat(), "endDate": end.isoformat()})
    run_training(run_id, worker)
    metrics = run_of(api, org, run_id)["metrics"]
    in_range = pc.sum(pc.less_equal(table.column("timestamp"), pa.scalar(end, pa.timestamp("us", tz="UTC")))).as_py()
    assert in_range == 3_000
    assert metrics["trainRows"] + metrics["rows"] == in_range


def test_an_unlearnable_dataset_is_rejected_naming_the_failed_gates_and_cannot_be_deployed(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    table = ai4i.generate(4_000, seed=4)
    shuffled = table.set_column(
        table.column_names.index(ai4i.TARGET),
        ai4i.TARGET,
        pa.array(pa.array([i % 2 for i in range(4_000)], pa.int64())),
    )
    noise = shuffled.set_column(
        table.column_names.index("torque"), "torque", pa.array([float((i * 7919) % 13) for i in range(4_000)])
    )
    run_id = submit(api, org, upload_table(api, org, noise, tmp_path), featureColumns=["torque"])
    assert run_training(run_id, worker) == "rejected"
    run = run_of(api, org, run_id)
    assert run["status"] == "rejected" and run["version"] is not None
    assert "accuracy" in run["error"]
    response = api.post(f"/v1/orgs/{org.org_id}/deployments", json={"version": run["version"]}, headers=org.admin)
    assert response.status_code == 409
    assert "accuracy" in response.json()["failedGates"]


def test_a_run_whose_data_is_gone_fails_with_the_reason(
    api: TestClient, org: OrgKeys, worker: WorkerContext, settings: Settings, tmp_path: Path
) -> None:
    dataset_id = upload_table(api, org, ai4i.generate(500, seed=5), tmp_path)
    open_object_store(settings).delete(f"orgs/{org.org_id}/datasets/{dataset_id}.parquet")
    run_id = submit(api, org, dataset_id)
    assert run_training(run_id, worker) == "failed"
    run = run_of(api, org, run_id)
    assert run["status"] == "failed" and "no object at" in run["error"]
    assert api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json() == []


def test_a_range_with_no_rows_fails_with_the_reason(
    api: TestClient, org: OrgKeys, worker: WorkerContext, tmp_path: Path
) -> None:
    dataset_id = upload_table(api, org, ai4i.generate(500, seed=6, start=START), tmp_path)
    run_id = submit(api, org, dataset_id, dataRange={"startDate": "2030-01-01", "endDate": "2030-02-01"})
    assert run_training(run_id, worker) == "failed"
    assert "no rows" in run_of(api, org, run_id)["error"]


def test_a_cancel_accepted_before_the_version_is_registered_leaves_no_version(
    api: TestClient,
    org: OrgKeys,
    worker: WorkerContext,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cancel's 202 said the run would stop: it must not end succeeded with a version one could deploy."""
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(20_000, seed=1), tmp_path))
    cancel_just_before(monkeypatch, "register_version", api, org)
    assert run_training(run_id, worker) == "cancelled"
    run = run_of(api, org, run_id)
    assert (run["status"], run["version"], run["metrics"]) == ("cancelled", None, None)
    assert api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/models/") == []
    lines = api.get(f"/v1/orgs/{org.org_id}/trainings/{run_id}/logs", headers=org.viewer).json()
    assert lines[-1]["stage"] == "cancelled" and not any("registered" in line["message"] for line in lines)


def test_an_attempt_whose_lease_ran_out_before_it_registered_leaves_no_version_and_the_run_is_handed_back(
    api: TestClient,
    org: OrgKeys,
    worker: WorkerContext,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that stalled past its lease may have had its slot counted free and given to another run: it must
    not end the run with a version; the run goes back to the queue instead."""
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(20_000, seed=1), tmp_path))
    stall_just_before(monkeypatch, "register_version")
    assert run_training(run_id, worker) == "lost"
    assert api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json() == []
    assert open_object_store(settings).list(f"orgs/{org.org_id}/models/") == []
    lines = api.get(f"/v1/orgs/{org.org_id}/trainings/{run_id}/logs", headers=org.viewer).json()
    assert not any("registered" in line["message"] for line in lines)
    assert runs.reap_expired(worker.sessions, max_attempts=3, retry_backoff_s=0)
    run = run_of(api, org, run_id)
    assert (run["status"], run["version"]) == ("queued", None) and "attempt 1 stopped renewing" in run["error"]


def unreachable(*_args: Any, **_kwargs: Any) -> None:
    raise TransientError("the object store does not answer")


def test_a_store_lost_while_storing_leaves_no_object_that_no_version_names_once_the_retry_succeeded(
    api: TestClient,
    org: OrgKeys,
    worker: WorkerContext,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store stops answering once the candidate's model and held-out rows are up, before its reports: the
    attempt cannot remove what it uploaded, and the run is retried under another version. Its held-out rows are a
    share of the org's rows that no version names, so no erasure would ever reach them: they must go."""
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(20_000, seed=1), tmp_path))
    monkeypatch.setattr(artifacts, "upload_reports", unreachable)
    monkeypatch.setattr(artifacts, "remove_version", unreachable)
    assert run_training(run_id, worker) == "retrying"
    monkeypatch.undo()  # the store answers again

    assert run_training(run_id, worker) == "succeeded"
    assert run_of(api, org, run_id)["attempts"] == 2
    registered = {model["version"] for model in api.get(f"/v1/orgs/{org.org_id}/models", headers=org.viewer).json()}
    stored = open_object_store(settings).list(f"orgs/{org.org_id}/models/")
    assert [key for key in stored if key.split("/")[3] not in registered] == []


def test_a_cancelled_run_whose_clean_up_the_store_failed_leaves_no_object_once_a_sweep_passes(
    api: TestClient,
    org: OrgKeys,
    worker: WorkerContext,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No attempt comes after a cancelled run to remove what its last one left: every worker's sweep does, once the
    store answers again, and keeps the folder to remove until then."""
    run_id = submit(api, org, upload_table(api, org, ai4i.generate(20_000, seed=1), tmp_path))
    cancel_just_before(monkeypatch, "register_version", api, org)
    monkeypatch.setattr(artifacts, "remove_version", unreachable)
    assert run_training(run_id, worker) == "cancelled"
    models = f"orgs/{org.org_id}/models/"
    assert open_object_store(settings).list(models)
    assert candidates.remove_abandoned(worker.sessions, CandidateStores.open(settings)) == []  # kept for later
    monkeypatch.undo()  # the store answers again

    with celery_worker("services.trainer.celery_app", settings, tmp_path / "worker.log"):
        assert eventually(lambda: open_object_store(settings).list(models) == [], seconds=3 * SWEEP_SECONDS)


def test_a_retry_starts_after_its_backoff_on_an_idle_worker_while_the_worker_that_failed_it_is_busy(
    api: TestClient, settings: Settings, org_id: str, tmp_path: Path
) -> None:
    """The retry's message waits in the outbox, not in a worker: sent with a countdown, it was held by the worker
    that received it, behind that worker's next training (and for the broker's visibility timeout, 70 minutes by
    default, had that worker died), while another worker stood idle."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "slow.py").write_text("import time\ntime.sleep(60)\n")
    backoff_s = 10.0  # far longer than the first worker takes to claim the slow run once it is submitted
    settings = settings.model_copy(update={"training_scripts_dir": scripts, "run_retry_backoff_s": backoff_s})
    flaky, slow = create_org_with_keys(api, f"{org_id}-flaky"), create_org_with_keys(api, f"{org_id}-slow")
    slow_script = {"config": {"training": {"scriptPath": str(scripts / "slow.py")}}}
    busy = api.patch(f"/v1/orgs/{slow.org_id}", json=slow_script, headers=ADMIN)
    unreachable = api.put(
        f"/v1/orgs/{flaky.org_id}/datasource",
        json={"url": "postgresql://nobody@127.0.0.1:1/nothing", "table": "readings"},
        headers=flaky.admin,
    )
    assert (busy.status_code, unreachable.status_code) == (200, 200), (busy.text, unreachable.text)
    slow_dataset = upload_table(api, slow, ai4i.generate(2_000, seed=1), tmp_path)

    with celery_worker("services.trainer.celery_app", settings, tmp_path / "first.log") as first:
        flaky_run = submit(api, flaky, None)
        assert eventually(lambda: run_of(api, flaky, flaky_run)["attempts"] == 1, seconds=60)
        assert eventually(lambda: run_of(api, flaky, flaky_run)["status"] == "queued", seconds=30)
        slow_run = submit(api, slow, slow_dataset)
        assert eventually(lambda: run_of(api, slow, slow_run)["status"] == "running", seconds=30)
        with celery_worker("services.trainer.celery_app", settings, tmp_path / "second.log") as second:
            assert eventually(lambda: run_of(api, flaky, flaky_run)["attempts"] == 2, seconds=backoff_s + 20)

            assert run_of(api, flaky, flaky_run)["worker"] == second
            assert run_of(api, slow, slow_run)["status"] == "running"
            assert run_of(api, slow, slow_run)["worker"] == first


def test_a_candidate_the_store_refuses_to_remove_keeps_no_other_from_being_removed(
    api: TestClient,
    org: OrgKeys,
    worker: WorkerContext,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A held object or a permission refuses one folder for good: it stays recorded, and the sweep goes on."""
    run_id = submit(
        api, org, upload_table(api, org, ai4i.generate(200, seed=1), tmp_path)
    )  # queued: no attempt holds it
    refused, other = model_prefix(org.org_id, "vrefused"), model_prefix(org.org_id, "vother")
    store = open_object_store(settings)
    with session_scope(worker.sessions) as session:
        for age_s, prefix in ((120, refused), (60, other)):  # the refused one first, as the sweep takes the oldest
            store.put_bytes(prefix + HOLDOUT_FILE, b"rows")
            created_at = utcnow() - timedelta(seconds=age_s)
            session.add(
                CandidateFolder(
                    prefix=prefix,
                    run_id=run_id,
                    org_id=org.org_id,
                    claim_token=0,
                    holdout_on_premises=False,
                    created_at=created_at,
                )
            )
    remove_version = artifacts.remove_version

    def refusing_one(prefix: str, *stores: ObjectStore) -> None:
        if prefix == refused:
            raise PermissionError(f"the store refuses to remove {prefix}")
        remove_version(prefix, *stores)

    monkeypatch.setattr(artifacts, "remove_version", refusing_one)

    removed = candidates.remove_abandoned(worker.sessions, CandidateStores.open(settings))

    assert (removed, store.list(other), store.list(refused)) == ([other], [], [refused + HOLDOUT_FILE])
    with session_scope(worker.sessions) as session:
        assert session.scalars(select(CandidateFolder.prefix)).all() == [refused]
