"""A real sync worker process (`celery -A services.sync.celery_app worker`) on real Redis runs an HTTP-queued job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.sync.context import SyncContext
from shared.settings import Settings
from tests.integration.sync_support import open_sync

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


def test_a_job_queued_over_http_is_run_by_a_sync_worker(
    sync_api: TestClient, sync_context: SyncContext, org_id: str, tmp_path: Path, sync_worker: None
) -> None:
    sync = open_sync(sync_api, sync_context, org_id, tmp_path)

    job_id = sync.submit()
    deadline = time.monotonic() + 60
    while sync.job(job_id)["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)

    job = sync.job(job_id)
    assert (job["status"], job["pushed"]) == ("succeeded", 2), (tmp_path / "worker.log").read_text()
    assert sync.central(f"SELECT id, device FROM {sync.central_table} ORDER BY id") == [(1, "pump-1"), (2, "pump-2")]
