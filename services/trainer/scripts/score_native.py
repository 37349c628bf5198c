"""Kiln's own script for the parity gate: the LightGBM model a training script left (model.txt), run on the held-out
rows. Kiln runs it in the sandbox, as it runs training scripts, because LightGBM parses a model inside an OpenMP
region, where a malformed file aborts the whole process (std::terminate): a worker that loaded one itself died.

    python score_native.py CONFIG.json
    {"model": ".../model.txt", "features": ".../features.npy", "output": ".../probabilities.npy"}

It writes the [rows, classes] probabilities as float64 to `output`, and exits 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightgbm
import numpy as np

from services.trainer.pipeline.train import predict_proba


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    booster = lightgbm.Booster(model_file=config["model"])
    features = np.load(config["features"], allow_pickle=False)
    np.save(config["output"], predict_proba(booster, features), allow_pickle=False)


if __name__ == "__main__":
    main(sys.argv[1])
