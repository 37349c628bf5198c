"""The stack as a user starts it: `kiln up` in a child process, here pointed at the test servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local import stack
from shared.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
ANY_FREE_PORTS = ("--api-port", "0", "--predictor-port", "0", "--flower-port", "0")


def kiln(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "deploy.local.cli", *args]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False)


@pytest.fixture
def running(settings: Settings) -> Iterator[stack.Stack]:
    """api, a trainer worker, the predictor (two workers) and Flower on real PostgreSQL, Redis and S3."""
    env = {**os.environ, **settings.as_env()}
    up = kiln(env, "up", *ANY_FREE_PORTS)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield stack.Stack.model_validate(json.loads((settings.data_dir / "stack.json").read_text()))
    finally:
        kiln(env, "down")
