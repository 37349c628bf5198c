"""Cutting off, from a watcher thread, a wait that may never end by itself (a data source or an object store that
stopped answering) as soon as the work it serves is asked to stop: a cancel is honoured within a fraction of a
second, not once the wait reaches its own bound."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# How often a watcher looks whether its work was asked to stop.
STOP_CHECK_S = 0.1


def never() -> bool:
    return False


@contextmanager
def cut_off_when(should_stop: Callable[[], bool], cut_off: Callable[[], None]) -> Iterator[None]:
    """While the block runs, call `cut_off()` once as soon as `should_stop()`. The watcher ends before the block
    does, so it never touches a connection or a response closed meanwhile."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(STOP_CHECK_S):
            if should_stop():
                cut_off()
                return

    watcher = threading.Thread(target=watch, name="stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
