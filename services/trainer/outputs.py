"""The training script's output files, taken out of its reach before the worker reads any of them.

A script may leave anything in outputPath: a link to the worker's secrets or to another org's objects (which the
worker, reading as itself, would upload as the model), or a FIFO that blocks whoever opens it. Each file the
worker uses is opened inside the outputs folder (not followed if that is a link), without following a link and
without blocking, must be a regular file, and is copied into a folder the worker makes after the script is gone;
only those copies are read, judged and uploaded. A model.onnx over the size gate is not copied at all: a script can
make one as large as its largest file allows without spending its disk quota (a sparse file), and its size is all
the gate needs.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidInput
from shared.layout import MODEL_FILE, NATIVE_MODEL_FILE

SCRIPT_METRICS_FILE = "metrics.json"
# LightGBM's text dump of a model runs ~1.5 times its ONNX form (100 trees of 31 leaves, 1,000 of 255): a model.txt
# may be up to this many times its model.onnx (counted up to the size gate), and NATIVE_SLACK_BYTES more.
NATIVE_PER_MODEL_BYTES = 4
NATIVE_SLACK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Collected:
    """The worker's copies of the script's output files, and the size of the model.onnx the script wrote."""

    folder: Path
    model_size: int | None  # None when the script wrote no model.onnx


def collect_outputs(outputs: Path, workdir: Path, *, max_model_bytes: int, max_metrics_bytes: int) -> Collected:
    """A new folder under `workdir`, named at random so that the script cannot have made it, holding copies of the
    script's output files that exist, but for a model.onnx over `max_model_bytes`. InvalidInput naming a file that
    is a link or not a regular file, a model.txt over NATIVE_PER_MODEL_BYTES times the model.onnx (up to
    `max_model_bytes`) and NATIVE_SLACK_BYTES more, or a metrics.json over `max_metrics_bytes`: each is read whole
    later, and a sparse file costs its script no quota."""
    collected = Path(tempfile.mkdtemp(prefix="collected-", dir=workdir))
    try:
        folder = os.open(outputs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        raise InvalidInput(
            "the training script replaced its outputPath folder (by a link, or removed it)", field="trainingScript"
        ) from None
    try:
        model_size = _copy_regular_file(folder, MODEL_FILE, collected / MODEL_FILE, max_bytes=max_model_bytes)
        native_limit = NATIVE_PER_MODEL_BYTES * min(model_size or 0, max_model_bytes) + NATIVE_SLACK_BYTES
        _copy_regular_file(folder, NATIVE_MODEL_FILE, collected / NATIVE_MODEL_FILE, refuse_over=native_limit)
        _copy_regular_file(folder, SCRIPT_METRICS_FILE, collected / SCRIPT_METRICS_FILE, refuse_over=max_metrics_bytes)
    finally:
        os.close(folder)
    return Collected(collected, model_size)


def _copy_regular_file(
    folder: int, name: str, target: Path, *, max_bytes: int | None = None, refuse_over: int | None = None
) -> int | None:
    """The file's size, or None when there is none; copied to `target` unless over `max_bytes`, and refused
    (InvalidInput) over `refuse_over`."""
    try:
        source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
    except FileNotFoundError:
        return None
    except OSError as error:
        kind = "a link" if error.errno == errno.ELOOP else f"unreadable ({error.strerror})"
        raise InvalidInput(
            f"the training script's {name} is {kind}; outputPath must hold regular files", field="trainingScript"
        ) from None
    try:
        status = os.fstat(source)
        if not stat.S_ISREG(status.st_mode):
            raise InvalidInput(
                f"the training script's {name} is not a regular file; outputPath must hold regular files",
                field="trainingScript",
            )
        if refuse_over is not None and status.st_size > refuse_over:
            raise InvalidInput(
                f"the training script's {name} is {status.st_size} bytes, over the limit of {refuse_over} bytes",
                field="trainingScript",
            )
        if max_bytes is None or status.st_size <= max_bytes:
            with open(source, "rb", closefd=False) as reader, target.open("xb") as writer:
                shutil.copyfileobj(reader, writer)
        return status.st_size
    finally:
        os.close(source)
