"""Fitting a LightGBM booster on TrainingData, and reading class probabilities back from it."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightgbm
import numpy as np

from services.trainer.pipeline.data import TrainingData
from shared.errors import InvalidInput

_THREAD_ALIASES = frozenset({"num_threads", "num_thread", "nthread", "nthreads", "n_jobs"})
_MULTICLASS_OBJECTIVES = frozenset({"multiclass", "softmax", "multiclassova", "multiclass_ova", "ova", "ovr"})


def fit_booster(
    train: TrainingData,
    params: Mapping[str, Any],
    *,
    valid: TrainingData | None = None,
    callbacks: Sequence[Callable[[Any], None]] = (),
) -> lightgbm.Booster:
    """Train with LightGBM-named `params`; threads default to every core, and LightGBM's logging to off.

    `valid` is the set that early stopping (params' early_stopping_round) watches; `callbacks` are LightGBM's,
    called after each boosting round with a lightgbm.callback.CallbackEnv.
    """
    settings: dict[str, Any] = {"verbosity": -1, **params}
    if not _THREAD_ALIASES & settings.keys():
        settings["num_threads"] = os.cpu_count() or 1
    objective = settings.get("objective")
    if objective in _MULTICLASS_OBJECTIVES:
        settings.setdefault("num_class", len(train.classes))
    elif objective == "binary" and len(train.classes) != 2:
        raise InvalidInput(
            f"objective 'binary' needs a target with 2 distinct values, this one has {len(train.classes)}",
            field="targetColumn",
        )
    dataset = lightgbm.Dataset(train.features, label=train.labels, free_raw_data=True)
    valid_sets = [] if valid is None else [lightgbm.Dataset(valid.features, label=valid.labels, reference=dataset)]
    return lightgbm.train(settings, dataset, valid_sets=valid_sets, callbacks=list(callbacks))


def predict_proba(booster: lightgbm.Booster, features: np.ndarray) -> np.ndarray:
    """[n, classes] probabilities; LightGBM gives binary models only P(class 1), so class 0 is added."""
    scores = np.asarray(booster.predict(features))
    if scores.ndim == 1:
        return np.column_stack((1.0 - scores, scores))
    return scores
