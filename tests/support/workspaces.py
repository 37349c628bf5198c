"""A worker process holding a run's workspace, with an org's rows in it, as a real worker does mid-run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.workspaces import LOCK_SUFFIX

HOLDER = """
import sys, time
from pathlib import Path
from services.trainer.sandbox import Sandbox
sandbox = Sandbox(workspaces_root=Path(sys.argv[1])) if len(sys.argv) > 1 else Sandbox()
with sandbox.workspace() as path:
    (path / "source.parquet").write_bytes(b"an org's rows")
    print(path, flush=True)
    time.sleep(600)
"""


@contextmanager
def workspace_holder(root: Path | None = None) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A process that made a workspace in `root` (by default the workers' own) and holds it until it is killed."""
    command = [sys.executable, "-c", HOLDER, *([str(root)] if root else [])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    path = Path(process.stdout.readline().strip())
    # An empty line (the holder failed) would name the current folder: only a workspace it made is removed after.
    made = path.is_absolute() and (path / "source.parquet").is_file()
    try:
        assert made, f"the holder made no workspace: {path}"
        yield process, path
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        if made:  # killed, it left its workspace: the test's sweep may not have run, and another's must not find it
            shutil.rmtree(path, ignore_errors=True)
            path.with_name(path.name + LOCK_SUFFIX).unlink(missing_ok=True)
