"""One log format for every Kiln process, set up by its composition root."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def configure_logging(level: str) -> None:
    """Kiln's own loggers at `level`, to stderr; servers (uvicorn, Celery) keep their own handlers."""
    kiln = logging.getLogger("services")
    if not kiln.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        for name in ("services", "shared", "deploy"):
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.propagate = False
    for name in ("services", "shared", "deploy"):
        logging.getLogger(name).setLevel(level)
