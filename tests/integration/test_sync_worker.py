"""A real sync worker process (`celery -A services.sync.celery_app worker`) on real Redis runs an HTTP-queued job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.sync.context import SyncContext
from shared.settings import Settings
from tests.integration.sync_support import Sync, open_sync

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sync_worker(central_settings: Settings, tmp_path: Path) -> Iterator[None]:
    env = {**os.environ, **central_settings.as_env(), "KILN_DATA_DIR": str(tmp_path / "kiln")}
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "services.sync.celery_app",
        "worker",
        "--concurrency",
        "1",
        "--pool",
        "solo",
        "--loglevel",
        "INFO",
        "--hostname",
        f"sync-test-{os.getpid()}@%h",
    ]
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()


def finished(sync: Sync, job_id: str, worker_log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while sync.job(job_id)["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
    job = sync.job(job_id)
    assert job["status"] == "succeeded", worker_log.read_text()
    return job


def test_a_job_queued_over_http_is_run_by_a_sync_worker(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, sync_worker: None
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)

    job = finished(sync, sync.submit(), tmp_path / "worker.log")

    assert job["pushed"] == 2
    assert sync.central(f"SELECT id, device FROM {sync.central_table} ORDER BY id") == [(1, "pump-1"), (2, "pump-2")]


def test_a_key_rotation_asked_over_http_is_run_by_a_sync_worker_and_the_old_key_destroyed(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, sync_worker: None
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)
    finished(sync, sync.submit(), tmp_path / "worker.log")
    keys = f"/v1/orgs/{org_id}/sync-keys"
    [old] = sync_api.get(keys, headers=sync.org.viewer).json()

    by_a_trainer = sync_api.post(f"{keys}/rotate", headers=sync.org.trainer)
    rotation = sync_api.post(f"{keys}/rotate", headers=sync.org.admin)
    deadline = time.monotonic() + 60
    while len(sync_api.get(keys, headers=sync.org.viewer).json()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    new, drained = sync_api.get(keys, headers=sync.org.viewer).json()
    destroy_active = sync_api.delete(f"{keys}/{new['keyId']}", headers=sync.org.admin)
    destroy_drained = sync_api.delete(f"{keys}/{old['keyId']}", headers=sync.org.admin)
    destroy_again = sync_api.delete(f"{keys}/{old['keyId']}", headers=sync.org.admin)

    assert (old["status"], by_a_trainer.status_code, rotation.status_code) == ("active", 403, 202)
    assert rotation.json() == {"status": "queued", "queue": f"sync.{org_id}"}
    assert (new["status"], drained["keyId"], drained["status"]) == ("active", old["keyId"], "drained")
    assert (destroy_active.status_code, destroy_drained.status_code, destroy_again.status_code) == (409, 204, 404)
    assert "drained" in destroy_active.json()["error"]
    assert sync_api.get(keys, headers=sync.org.viewer).json()[1]["status"] == "destroyed"
    sealed = [row[0] for row in sync.central(f"SELECT patient FROM {sync.central_table}")]
    assert sealed and all(value.startswith(new["keyId"] + ":") for value in sealed)
    audited = sync.central(
        "SELECT action, actor FROM audit_log WHERE org_id = :o AND action LIKE 'sync.key.%' ORDER BY id", {"o": org_id}
    )
    assert [action for action, _ in audited] == ["sync.key.rotation.queued", "sync.key.rotated", "sync.key.destroyed"]
    [actor] = {actor for _, actor in audited}  # the admin key that asked, carried through to the worker's rotation
    assert actor not in ("sync", "cli")
