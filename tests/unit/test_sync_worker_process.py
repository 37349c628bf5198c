"""What a sync worker's process does when Celery starts it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# The signal every Celery pool sends in each process it starts to run tasks (the solo pool in its only one).
STARTED_AS_A_WORKER = """
import gc
from celery.signals import worker_process_init
import services.sync.celery_app
before = gc.get_freeze_count()
worker_process_init.send(sender=None)
print(before, gc.get_freeze_count())
"""


def test_a_sync_worker_process_leaves_what_it_imported_out_of_garbage_collections() -> None:
    result = subprocess.run(
        [sys.executable, "-c", STARTED_AS_A_WORKER], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    before, after = (int(count) for count in result.stdout.split())
    assert before == 0
    # Celery, SQLAlchemy and the sync service's own modules: tens of thousands of objects, never walked again.
    assert after > 20_000
