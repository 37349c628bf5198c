"""What the platform adds to a training: submit -> version registered, against bare LightGBM + ONNX export.

    .venv/bin/python bench/train.py [--rows 100000 1000000] [--repeats 3]

Both sides run in the same invocation, alternating, on the same AI4I-rule rows and the same hyperparameters
(100 trees, 31 leaves), with the same OpenMP spin count (1000, Kiln's: services/trainer/sandbox.py).

- platform: the real stack as processes (`kiln up` on the embedded default: SQLite, a folder object store, a
  private Redis, one Celery worker), timed from the POST that submits the run until the version is registered
  (the run's finishedAt, written in the same transaction). That includes queueing, reading the dataset from the
  store, the holdout split, the sandboxed script (fit + export + floored thresholds), judging the stored artifact
  (holdout metrics, parity with the booster, latency, memory), writing the artifacts and the database rows.
- bare: one process reading the same Parquet file, taking the same 80/20 split, fitting with lightgbm.train
  and converting with onnxmltools, which is what a data scientist runs by hand with no validation at all.
- bare + checks: bare plus the same holdout metrics and parity computation, for the share validation takes.

Dataset uploads happen before the clock starts on both sides. Figures are medians; ratios are platform / bare.
"""

from __future__ import annotations

import os

from services.trainer.sandbox import OPENMP_SPINCOUNT

# Before LightGBM loads, as the worker and the sandbox have it (services/trainer/celery_app.py, sandbox.py).
os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINCOUNT)

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import lightgbm
import numpy as np
import onnxmltools
import onnxruntime
import pyarrow.parquet as pq
from onnxmltools.convert.common.data_types import FloatTensorType

from deploy.local import ai4i, stack
from shared.settings import build_settings

PARAMS = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.1, "num_iterations": 100, "verbosity": -1}
HYPERPARAMETERS = {"numLeaves": 31, "learningRate": 0.1, "numIterations": 100, "objective": "binary"}
HOLDOUT = 0.2
# Polling is not free: ten GETs a second took ~7% of a core (the api's and this client's) from the training, whose
# OpenMP threads on 2 cores pay for any neighbour out of proportion. So the bench looks once a second and takes
# the end from the run's own finishedAt, on this machine's clock.
POLL_S = 1.0


@dataclass(frozen=True)
class Timings:
    platform: list[float]
    bare: list[float]
    bare_checked: list[float]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as folder:
        settings = build_settings(data_dir=Path(folder) / "kiln")
        running = stack.start(settings, ports={"api": 0, "predictor": 0, "flower": 0}, timeout_s=180, grace_s=5)
        try:
            results = {rows: measure(running, Path(folder), rows, args.repeats) for rows in args.rows}
        finally:
            stack.stop(settings.data_dir, grace_s=5)
    report(results)


def measure(running: stack.Stack, folder: Path, rows: int, repeats: int) -> Timings:
    data = folder / f"ai4i-{rows}.parquet"
    ai4i.write_parquet(ai4i.generate(rows, seed=1), data)
    with httpx.Client(
        base_url=running.api, headers={"Authorization": f"Bearer {running.admin_token}"}, timeout=120
    ) as api:
        org = f"bench-{rows}"
        api.post("/v1/orgs", json={"id": org, "name": org}).raise_for_status()
        with data.open("rb") as handle:
            upload = api.post(f"/v1/orgs/{org}/datasets", files={"file": ("ai4i.parquet", handle)})
        upload.raise_for_status()
        dataset_id = upload.json()["datasetId"]
        timings = Timings([], [], [])
        for repeat in range(repeats + 1):
            platform = through_platform(api, org, dataset_id)
            bare, checked = bare_training(data, checks=False), bare_training(data, checks=True)
            if repeat:  # the first round warms the worker's caches and this process's imports
                timings.platform.append(platform)
                timings.bare.append(bare)
                timings.bare_checked.append(checked)
            print(
                f"{rows:>9,} rows  platform {platform:6.2f} s   bare {bare:6.2f} s   bare + checks {checked:6.2f} s",
                flush=True,
            )
        return timings


def stages(api: httpx.Client, org: str, run_id: str) -> str:
    """Where the platform's time went, from the run's training log."""
    lines = api.get(f"/v1/orgs/{org}/trainings/{run_id}/logs").json()
    first: dict[str, datetime] = {}
    for line in lines:
        first.setdefault(line["stage"], datetime.fromisoformat(line["at"]))
    marks = [
        ("extract", "started", "extracted"),
        ("script", "extracted", "exported"),
        ("judge+store", "exported", "stored"),
    ]
    return "  ".join(
        f"{name} {(first[end] - first[start]).total_seconds():.2f}"
        for name, start, end in marks
        if start in first and end in first
    )


def through_platform(api: httpx.Client, org: str, dataset_id: str) -> float:
    body = {
        "datasetId": dataset_id,
        "targetColumn": ai4i.TARGET,
        "featureColumns": list(ai4i.FEATURES),
        "validationSplit": HOLDOUT,
        "hyperparameters": HYPERPARAMETERS,
    }
    submitted = datetime.now(UTC)
    run_id = api.post(f"/v1/orgs/{org}/trainings", json=body).json()["runId"]
    while True:
        run = api.get(f"/v1/orgs/{org}/trainings/{run_id}").json()
        if run["status"] in {"succeeded", "rejected"}:
            print(f"    platform stages (s): {stages(api, org, run_id)}", flush=True)
            return (datetime.fromisoformat(run["finishedAt"]) - submitted).total_seconds()
        if run["status"] in {"failed", "cancelled"}:
            raise RuntimeError(f"run {run_id} {run['status']}: {run['error']}")
        time.sleep(POLL_S)


def bare_training(data: Path, *, checks: bool) -> float:
    started = time.perf_counter()
    table = pq.read_table(data, columns=[*ai4i.FEATURES, ai4i.TARGET])
    features = np.column_stack([table[name].to_numpy() for name in ai4i.FEATURES]).astype(np.float32)
    labels = table[ai4i.TARGET].to_numpy()
    held_out = np.random.default_rng(0).random(len(labels)) < HOLDOUT
    booster = lightgbm.train(PARAMS, lightgbm.Dataset(features[~held_out], label=labels[~held_out]))
    onnx_model = onnxmltools.convert_lightgbm(
        booster, initial_types=[("input", FloatTensorType([None, len(ai4i.FEATURES)]))], zipmap=False
    ).SerializeToString()
    if checks:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # the stock model declares its label output [1]; ORT warns on each batch
        session = onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        served = session.run(None, {"input": features[held_out]})[1]
        native = booster.predict(features[held_out])
        _ = float(np.abs(served[:, 1] - native).max()), float(((served[:, 1] > 0.5) == labels[held_out]).mean())
    return time.perf_counter() - started


def report(results: dict[int, Timings]) -> None:
    print("\nmedians (s)          platform     bare   bare+checks   platform/bare   platform/(bare+checks)")
    for rows, timings in results.items():
        platform, bare, checked = (statistics.median(t) for t in (timings.platform, timings.bare, timings.bare_checked))
        print(
            f"{rows:>9,} rows      {platform:8.2f} {bare:8.2f} {checked:12.2f} {platform / bare:14.2f}x"
            f" {platform / checked:20.2f}x"
        )


if __name__ == "__main__":
    main()
