"""Where things live in the object store (DESIGN §6). Artifacts are written once and never overwritten."""

from __future__ import annotations

MODEL_FILE = "model.onnx"
METRICS_FILE = "metrics.json"
TRAINING_CONFIG_FILE = "training_config.json"
VALIDATION_FILE = "validation.json"
NATIVE_MODEL_FILE = "model.txt"
HOLDOUT_FILE = "holdout.parquet"


def dataset_key(org_id: str, dataset_id: str) -> str:
    return f"orgs/{org_id}/datasets/{dataset_id}.parquet"


def model_prefix(org_id: str, version: str) -> str:
    return f"orgs/{org_id}/models/{version}/"


def model_key(org_id: str, version: str) -> str:
    return model_prefix(org_id, version) + MODEL_FILE
