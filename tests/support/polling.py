"""Waiting in tests for what happens in another thread or process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import URL, create_engine, text
from sqlalchemy.pool import NullPool


def eventually(check: Callable[[], Any], seconds: float = 10) -> Any:
    """`check()`'s first true result within `seconds`, or its last result once they are over."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def waiting_for_a_lock(url: str | URL) -> bool:
    """Whether a connection to the PostgreSQL database at `url` waits for a lock: a row's, or an advisory one."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return bool(connection.scalar(text(query)))
    finally:
        engine.dispose()


def start_until_it_waits_for_a_lock(thread: threading.Thread, url: str | URL) -> None:
    """Start `thread`, and return once it waits for a lock in the database at `url`, or has ended (it never did)."""
    thread.start()
    eventually(lambda: not thread.is_alive() or waiting_for_a_lock(url))


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
