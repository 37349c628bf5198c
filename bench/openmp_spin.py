"""How long OpenMP threads spin before they sleep, and what it does to a LightGBM fit: alone, and beside a busy core.

    .venv/bin/python bench/openmp_spin.py [--rows 1000000] [--repeats 2]

libgomp reads its environment once, when LightGBM loads it, so each setting fits in a fresh interpreter of its
own: OMP_WAIT_POLICY=PASSIVE (sleep at once), GOMP_SPINCOUNT=1000 (Kiln's: services/trainer/sandbox.py) and
libgomp's default (300,000 spins). The same AI4I-rule rows and split, 100 trees of 31 leaves. "Busy" runs the fit
beside a process that keeps one core busy. Figures are medians of `--repeats` fits after a warm-up fit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

SETTINGS = {
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 1000 (Kiln)": {"GOMP_SPINCOUNT": "1000"},
    "libgomp default": {},
}
REPO_ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: prints the median wall time of its timed fits.
_FIT = """
import statistics, sys, time
import lightgbm, numpy as np
from deploy.local import ai4i
rows, repeats = int(sys.argv[1]), int(sys.argv[2])
table = ai4i.generate(rows, seed=1)
features = np.column_stack([table[name].to_numpy() for name in ai4i.FEATURES]).astype(np.float32)
labels = table[ai4i.TARGET].to_numpy()
train = np.random.default_rng(0).random(rows) >= 0.2
params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.1, "verbosity": -1}
times = []
for _ in range(repeats + 1):
    started = time.perf_counter()
    lightgbm.train(params, lightgbm.Dataset(features[train], label=labels[train]), num_boost_round=100)
    times.append(time.perf_counter() - started)
print(statistics.median(times[1:]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    figures: dict[tuple[str, str], float] = {}
    for condition in ("alone", "busy"):
        with busy_core() if condition == "busy" else nullcontext():
            for name, environment in SETTINGS.items():
                figures[name, condition] = fit_seconds(environment, args.rows, args.repeats)
                print(f"{name:<18} {condition:<6} {figures[name, condition]:6.2f} s", flush=True)
    print("\nfit time / PASSIVE's in the same condition")
    for name in SETTINGS:
        alone, busy = (figures[name, c] / figures["PASSIVE", c] for c in ("alone", "busy"))
        print(f"{name:<18} alone {alone:5.2f}   busy {busy:5.2f}")


def fit_seconds(environment: dict[str, str], rows: int, repeats: int) -> float:
    inherited = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    command = [sys.executable, "-c", _FIT, str(rows), str(repeats)]
    done = subprocess.run(
        command, env={**inherited, **environment}, cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


@contextmanager
def busy_core() -> Iterator[None]:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


if __name__ == "__main__":
    main()
