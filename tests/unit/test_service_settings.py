"""A service process started with a wrong KILN_* value exits at once, saying which, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# As docker-compose starts each.
SERVICES = {
    "trainer beat": (["celery", "-A", "services.trainer.celery_app", "beat"], "kiln-trainer"),
    "trainer worker": (["celery", "-A", "services.trainer.celery_app", "worker"], "kiln-trainer"),
    "flower": (["celery", "-A", "services.trainer.celery_app", "flower", "--port=0"], "kiln-trainer"),
    "sync beat": (["celery", "-A", "services.sync.celery_app", "beat"], "kiln-sync"),
    "sync worker": (["celery", "-A", "services.sync.celery_app", "worker"], "kiln-sync"),
    "api": (["uvicorn", "--factory", "services.api.app:create_app", "--port", "0"], "api"),
    "predictor": (["services.predictor", "--port", "0", "--workers", "2"], "predictor"),
}


@pytest.mark.parametrize(("command", "process"), SERVICES.values(), ids=SERVICES.keys())
def test_a_wrong_setting_ends_the_process_naming_the_variable(tmp_path: Path, command: list[str], process: str) -> None:
    """The beats ran on Celery's defaults (an AMQP broker on localhost, a schedule file in the working folder) and
    said nothing; the workers retried that broker; the api and predictor printed a 40-line traceback."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "KILN_DATA_DIR": str(tmp_path / "data"),
        "KILN_BEAT_TICK_S": "-5",
    }
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == f"{process}: KILN_BEAT_TICK_S: Input should be greater than 0"
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no schedule file, no data folder
