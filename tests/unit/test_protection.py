"""A worker refuses inspection, so its training scripts cannot read its environment or memory."""

from __future__ import annotations

import subprocess
import sys

PR_GET_DUMPABLE = 3

PROBE = f"""
import ctypes
from services.trainer.protection import refuse_inspection
libc = ctypes.CDLL(None)
before = libc.prctl({PR_GET_DUMPABLE}, 0, 0, 0, 0)
refuse_inspection()
print(before, libc.prctl({PR_GET_DUMPABLE}, 0, 0, 0, 0))
"""


def test_the_worker_process_is_no_longer_dumpable() -> None:
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["1", "0"]
