"""An ASGI app under a real uvicorn, in a thread of the test process: for clients that open their own sockets
(tritonclient speaks HTTP through geventhttpclient, so an in-process TestClient cannot stand in)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from tests.support.servers import free_port


@contextmanager
def serving_in_thread(app: Any, *, timeout: float = 30) -> Iterator[str]:
    """Yields "127.0.0.1:port" once the app's lifespan has started; shuts it down (lifespan included) after."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="on", ws="none", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {config.port}")
            time.sleep(0.02)
        yield f"127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
