"""Fitting a LightGBM booster on TrainingData, and reading class probabilities back from it."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightgbm
import numpy as np

from services.trainer.pipeline.data import TrainingData, holdout_rows, split_holdout
from shared.errors import InvalidInput
from shared.schemas import Hyperparameters

EARLY_STOPPING_SHARE = 0.1

_THREAD_ALIASES = frozenset({"num_threads", "num_thread", "nthread", "nthreads", "n_jobs"})
_MULTICLASS_OBJECTIVES = frozenset({"multiclass", "softmax", "multiclassova", "multiclass_ova", "ova", "ovr"})


def check_objective(hyperparameters: Hyperparameters, n_classes: int) -> None:
    """Refuse, before a script runs, a binary objective on a target of more classes, and a multiclass one on a
    target of two: a model of two classes is judged as binary (precision and recall of the positive class), so a
    multiclass run would have got neither macro averages nor a way to name the class that counts."""
    if hyperparameters.objective == "binary" and n_classes != 2:
        raise InvalidInput(
            f"objective binary needs a target with 2 classes; this one has {n_classes}: use multiclass",
            field="hyperparameters.objective",
        )
    if hyperparameters.objective == "multiclass" and n_classes == 2:
        raise InvalidInput(
            "objective multiclass needs a target with 3 or more classes; this one has 2: use binary, with "
            "positiveClass naming the class that counts",
            field="hyperparameters.objective",
        )


def check_trainable(hyperparameters: Hyperparameters, train_rows: int) -> None:
    """Refuse, before a script runs, settings that leave LightGBM no row to fit or watch: they would otherwise end
    in a traceback about an internal share of the rows, or in LightGBM's own "Check failed"."""
    fitted = rows_fitted(hyperparameters, train_rows)[0]
    if hyperparameters.early_stopping_rounds and fitted < 1:
        raise InvalidInput(
            f"earlyStoppingRounds watches {EARLY_STOPPING_SHARE:.0%} of the rows trained on, and {train_rows} "
            "row cannot be split: leave earlyStoppingRounds out, or give more rows or a smaller validationSplit",
            field="hyperparameters.earlyStoppingRounds",
        )
    # LightGBM bags int(baggingFraction * rows) rows each round, and stops when that is 0.
    bagging = hyperparameters.bagging_freq > 0 and hyperparameters.bagging_fraction < 1
    if bagging and int(hyperparameters.bagging_fraction * fitted) == 0:
        raise InvalidInput(
            f"baggingFraction {hyperparameters.bagging_fraction:g} of the {fitted} rows trained on is less than "
            f"one row: make it 1/{fitted} or more, or leave bagging off (baggingFreq 0)",
            field="hyperparameters.baggingFraction",
        )


def rows_fitted(hyperparameters: Hyperparameters, train_rows: int) -> tuple[int, int]:
    """(rows the booster is fitted on, rows early stopping watches instead) of train_rows, as split_watched does."""
    watched = holdout_rows(EARLY_STOPPING_SHARE, train_rows) if hyperparameters.early_stopping_rounds else 0
    return train_rows - watched, watched


def split_watched(train: TrainingData, params: Mapping[str, Any]) -> tuple[TrainingData, TrainingData | None]:
    """(rows to fit, rows early stopping watches): a stratified tenth of the train rows when params ask for early
    stopping, else every row and none."""
    if not params.get("early_stopping_round"):
        return train, None
    return split_holdout(train, EARLY_STOPPING_SHARE)


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
