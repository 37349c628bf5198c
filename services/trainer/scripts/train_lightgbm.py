"""Kiln's built-in training script, and the reference for writing your own.

Kiln runs a training script as `python SCRIPT CONFIG.json`, sandboxed (services/trainer/sandbox.py): its own
process group, an environment without Kiln's settings or secrets, limits on time, memory and file size, and a
private working folder. A script needs nothing but the config and the files it names:

    {"organizationId": "...", "runId": "...",
     "featureColumns": ["air_temperature", ...], "targetColumn": "machine_failure", "classes": [0, 1],
     "hyperparameters": {"numLeaves": 31, "earlyStoppingRounds": 10, ...},
     "data": {"train": "/.../train.parquet"},
     "outputPath": "/.../outputs"}

The train file holds the feature columns as float32, the values the model will be served, and the target as
class indices 0..len(classes)-1 (int64). Hyperparameters are named as the API takes them.

What a script must leave in outputPath: model.onnx, a classifier with float input "input" [N, features] and
outputs "label" [N] and "probabilities" [N, classes]; model.txt, the LightGBM model that Kiln checks model.onnx
against (leave it out and that check fails); and metrics.json, figures of the script's own, kept with the
version: a JSON object of at most 1 MB, nested at most 8 deep. While it works it may print progress to stdout, one
JSON object a line, flushed: {"stage": "training", "iteration": i, "of": n}, then {"stage": "exporting"} and
{"stage": "done"}; the latest is written every 0.5 s, a stage is cut to 32 characters, one naming a run status is
not taken, and other lines are not read. It exits 0 on success: any other end fails the run, with the end of
stderr (the traceback) as the reason.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import pyarrow.parquet as pq

from services.trainer.pipeline.data import TrainingData
from services.trainer.pipeline.export import booster_to_onnx
from services.trainer.pipeline.train import fit_booster, split_watched
from shared.schemas import Hyperparameters

PROGRESS_STEPS = 20


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    train = read_train_file(config)
    params = Hyperparameters.model_validate(config["hyperparameters"]).to_lightgbm()
    output = Path(config["outputPath"])
    output.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    fitted, watched = split_watched(train, params)
    booster = fit_booster(fitted, params, valid=watched, callbacks=[report_training])
    fit_seconds = time.perf_counter() - started
    report(stage="exporting")
    started = time.perf_counter()
    (output / "model.onnx").write_bytes(booster_to_onnx(booster, len(train.feature_columns)))
    booster.save_model(output / "model.txt")
    export_seconds = time.perf_counter() - started

    # With early stopping the booster holds the rounds past the best one too; both files hold up to the best.
    iterations = booster.best_iteration or booster.current_iteration()
    metrics = {
        "rows": len(fitted.labels),
        "earlyStoppingRows": 0 if watched is None else len(watched.labels),
        "features": len(train.feature_columns),
        "trees": iterations * booster.num_model_per_iteration(),
        "best_iteration": iterations,
        "fit_seconds": round(fit_seconds, 3),
        "export_seconds": round(export_seconds, 3),
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report(stage="done")


def read_train_file(config: dict[str, Any]) -> TrainingData:
    """The train rows; each label is an index into config["classes"]."""
    columns, target = config["featureColumns"], config["targetColumn"]
    table = pq.read_table(config["data"]["train"], columns=[*columns, target])
    features = np.column_stack([table[name].to_numpy() for name in columns]).astype(np.float32, copy=False)
    labels = table[target].to_numpy().astype(np.int64, copy=False)
    return TrainingData(features=features, labels=labels, classes=config["classes"], feature_columns=columns)


def report_training(env: lightgbm.callback.CallbackEnv) -> None:
    """A LightGBM callback: a progress line about every 5% of the boosting rounds."""
    done, total = env.iteration + 1, env.end_iteration
    if done % max(1, total // PROGRESS_STEPS) == 0 or done == total:
        report(stage="training", iteration=done, of=total)


def report(**progress: Any) -> None:
    print(json.dumps(progress), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} CONFIG.json")
    main(sys.argv[1])
