"""What the zygote buys: the cost of starting a training script through the Sandbox against a fresh `python`.

    .venv/bin/python bench/sandbox_startup.py [--repeats 20]

Two scripts: one that does nothing, and one that imports what a training script imports (LightGBM, pyarrow,
onnxmltools and Kiln's pipeline), which is what a run would pay for at every start without the zygote. Figures
are medians of wall-clock time per run; a Sandbox run includes making and removing its workspace.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from services.trainer.sandbox import Limits, Sandbox

LIMITS = Limits(timeout_s=60, cpu_s=60, memory_mb=8192, max_file_mb=64, max_open_files=256, disk_mb=4096)
SCRIPTS = {
    "does nothing": "",
    "imports the training stack": (
        "import lightgbm, numpy, onnx, onnxmltools, onnxmltools.convert.lightgbm, pyarrow.parquet\n"
        "import services.trainer.pipeline.export, services.trainer.pipeline.train, shared.schemas\n"
    ),
}
# A fresh interpreter importing the stack takes ~1.7 s: fewer repeats keep the benchmark short.
FRESH_IMPORT_REPEATS = 5
COLD_STARTS = 3


def median_ms(action: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def fresh_python(script: Path) -> None:
    subprocess.run([sys.executable, str(script), "config.json"], env={}, check=True)


def through(sandbox: Sandbox, script: Path) -> None:
    with sandbox.workspace() as workdir:
        result = sandbox.run(
            script, workdir / "config.json", workdir, LIMITS, should_stop=lambda: False, on_output=lambda _: None
        )
    if not result.ok:
        raise RuntimeError(result.reason())


def cold_start(script: Path) -> None:
    with Sandbox() as sandbox:
        through(sandbox, script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    repeats = parser.parse_args().repeats
    with tempfile.TemporaryDirectory() as folder, Sandbox() as sandbox:
        scripts = {name: Path(folder) / f"script{index}.py" for index, name in enumerate(SCRIPTS)}
        for name, path in scripts.items():
            path.write_text(SCRIPTS[name])
        through(sandbox, scripts["does nothing"])  # the zygote's own start is measured apart, below
        print(f"{'script':<28} {'fresh python':>14} {'sandbox':>10}   (median ms per run)")
        for name, path in scripts.items():
            fresh_repeats = FRESH_IMPORT_REPEATS if SCRIPTS[name] else repeats
            fresh = median_ms(partial(fresh_python, path), fresh_repeats)
            sandboxed = median_ms(partial(through, sandbox, path), repeats)
            print(f"{name:<28} {fresh:>14.1f} {sandboxed:>10.1f}")
        cold = median_ms(partial(cold_start, scripts["does nothing"]), COLD_STARTS)
        print(f"first run of a new Sandbox (the zygote's start): {cold:.0f} ms")


if __name__ == "__main__":
    main()
