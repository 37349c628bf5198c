"""One training run from claim to registered version: extract, train, export, validate, store, register."""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import traceback
from pathlib import Path
from typing import Any

import lightgbm
import orjson

from services.trainer.context import WorkerContext
from services.trainer.pipeline.data import TrainingData, load_training_data, split_holdout
from services.trainer.pipeline.export import booster_to_onnx
from services.trainer.pipeline.train import fit_booster, predict_proba
from services.trainer.pipeline.validate import Gates, apply_gates, classification_metrics, measure_serving, parity
from services.trainer.runs import RunSpec, TrainedVersion, claim_run, fail_run, register_version, set_progress
from shared.errors import KilnError
from shared.layout import METRICS_FILE, MODEL_FILE, TRAINING_CONFIG_FILE, VALIDATION_FILE, model_prefix
from shared.storage import ObjectStore
from shared.versions import new_version

log = logging.getLogger(__name__)


def run_training(run_id: str, context: WorkerContext) -> str:
    """Carry out a queued run and return its final status; a run that is not queued is left alone."""
    spec = claim_run(context.sessions, run_id)
    if spec is None:
        log.info("run %s is not queued; nothing to do", run_id)
        return "skipped"
    try:
        trained = train_version(spec, context)
        return register_version(context.sessions, spec, trained)
    except KilnError as error:
        fail_run(context.sessions, run_id, error.message)
    except Exception as error:
        log.exception("run %s failed", run_id)
        fail_run(context.sessions, run_id, _short_reason(error))
    return "failed"


def train_version(spec: RunSpec, context: WorkerContext) -> TrainedVersion:
    config = spec.config
    with tempfile.TemporaryDirectory(prefix="kiln-run-") as folder:
        set_progress(context.sessions, spec.run_id, "extracting", 5)
        local = Path(folder) / "dataset.parquet"
        context.store.get_file(spec.dataset_key, local)
        data = load_training_data(
            local,
            feature_columns=config.feature_columns,
            target_column=config.target_column,
            timestamp_column=spec.timestamp_column,
            start=config.data_range.start_date if config.data_range else None,
            end=config.data_range.end_date if config.data_range else None,
        )
    train, holdout = split_holdout(data, config.validation_split)
    set_progress(context.sessions, spec.run_id, "training", 20)
    booster = fit_booster(train, config.hyperparameters.to_lightgbm())
    set_progress(context.sessions, spec.run_id, "exporting", 70)
    model = booster_to_onnx(booster, len(config.feature_columns))
    set_progress(context.sessions, spec.run_id, "validating", 80)
    metrics, validation = _validate(booster, model, train, holdout, Gates().with_overrides(_gate_overrides(spec)))
    set_progress(context.sessions, spec.run_id, "storing", 95)
    version = new_version()
    trained = TrainedVersion(
        version=version,
        sha256=hashlib.sha256(model).hexdigest(),
        size_bytes=len(model),
        artifact_prefix=model_prefix(spec.org_id, version),
        feature_columns=list(config.feature_columns),
        target_column=config.target_column,
        classes=data.classes,
        metrics=metrics,
        validation=validation,
    )
    _store_artifacts(context.store, trained, model, _training_config(spec, booster))
    return trained


def _validate(
    booster: lightgbm.Booster, model: bytes, train: TrainingData, holdout: TrainingData, gates: Gates
) -> tuple[dict[str, Any], dict[str, Any]]:
    measured = classification_metrics(holdout.labels, predict_proba(booster, holdout.features))
    # JSON has no NaN (an AUC on a one-class holdout): it is stored as null.
    metrics: dict[str, Any] = {name: value if math.isfinite(value) else None for name, value in measured.items()}
    metrics["trainRows"] = len(train.labels)
    parity_diff = parity(booster, model, holdout.features)
    report = apply_gates(
        metrics=metrics, model_size_bytes=len(model), parity_diff=parity_diff, onnx_loads=True, gates=gates
    )
    return metrics, {**report, "serving": measure_serving(model, holdout.features)}


def _gate_overrides(spec: RunSpec) -> dict[str, float]:
    return spec.org_config.gates.model_dump(by_alias=True, exclude_none=True)


def _training_config(spec: RunSpec, booster: lightgbm.Booster) -> dict[str, Any]:
    return {
        "organizationId": spec.org_id,
        "runId": spec.run_id,
        **spec.config.to_wire(),
        "lightgbm": spec.config.hyperparameters.to_lightgbm(),
        "trees": booster.num_trees(),
    }


def _store_artifacts(store: ObjectStore, trained: TrainedVersion, model: bytes, config: dict[str, Any]) -> None:
    """Write the version's files; the model goes last, and a failure removes what was written."""
    files = {
        METRICS_FILE: orjson.dumps(trained.metrics, option=orjson.OPT_INDENT_2),
        TRAINING_CONFIG_FILE: orjson.dumps(config, option=orjson.OPT_INDENT_2),
        VALIDATION_FILE: orjson.dumps(trained.validation, option=orjson.OPT_INDENT_2),
        MODEL_FILE: model,
    }
    written: list[str] = []
    try:
        for name, data in files.items():
            key = trained.artifact_prefix + name
            store.put_bytes(key, data)
            written.append(key)
    except BaseException:
        for key in written:
            store.delete(key)
        raise


def _short_reason(error: Exception) -> str:
    frames = traceback.format_exception(error, limit=-3)
    return f"{type(error).__name__}: {error}\n" + "".join(frames)[-2000:]
