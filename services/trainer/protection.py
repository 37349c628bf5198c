"""Keeping training scripts out of the worker's memory and environment.

Scripts run as the worker's own user, so by default they could read /proc/<worker>/environ (KILN_* secrets) or
attach to it. A process that is not "dumpable" can only be inspected that way by root; Celery's pool children
inherit the flag from the main process. The zygote is started by exec, which resets the flag, but it is given a
scrubbed environment and never loads settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4


def refuse_inspection() -> None:
    """prctl(PR_SET_DUMPABLE, 0) on Linux; elsewhere a warning, since the protection is missing."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    if libc is None or libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the worker undumpable: training scripts may read its environment")
