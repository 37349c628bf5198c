"""A real Celery worker process (`celery -A <app> worker`) on the tests' database, Redis and object store."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy.local.launch import worker_ready
from deploy.local.processes import spawn, stop_groups, wait_until
from shared.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def celery_worker(
    app: str, settings: Settings, log_path: Path, *, orgs: str | None = None, pool: str = "solo"
) -> Iterator[str]:
    """A worker of `app` (one process, the solo pool; or `pool` with one child, as `kiln up` runs them, where the
    worker's main process stays free to take control commands while a task runs) with `settings` as its KILN_*
    environment, for the orgs named in `orgs` only (KILN_WORKER_ORGS) when given. Yields its node name once it
    answers through the broker; stopped, with anything it started, at the end."""
    node = f"test-{os.getpid()}-{secrets.token_hex(3)}@{os.uname().nodename}"  # the broker is shared: a name of its own
    env = {**os.environ, **settings.as_env(), **({"KILN_WORKER_ORGS": orgs} if orgs else {})}
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--pool",
        pool,
        "--concurrency",
        "1",
        "--loglevel",
        "INFO",
    ]
    process = spawn([*command, "--hostname", node], env=env, cwd=REPO_ROOT, log_path=log_path)
    try:
        ready = worker_ready(settings.redis_url, node, process.pid)
        wait_until(ready, name=node, processes={node: process}, logs=lambda _node: log_path, timeout_s=60)
        yield node
    finally:
        stop_groups([process.pid], grace_s=10)
        process.wait()
