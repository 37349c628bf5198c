"""Requests to arrays and arrays to answers, for both protocols. Knows nothing of HTTP."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from services.predictor.models import LoadedModel
from shared.errors import BadRequest, InvalidInput

FP32_MAX = float(np.finfo(np.float32).max)


def rows_to_features(model: LoadedModel, rows: Any) -> np.ndarray:
    """`[{feature: number}, ...]` to a float32 matrix in the model's feature order."""
    if not isinstance(rows, list) or not rows:
        raise InvalidInput("rows must be a non-empty list of {feature: value} objects", field="rows")
    columns = model.deployed.feature_columns
    expected = set(columns)
    matrix = np.empty((len(rows), len(columns)), dtype=np.float32)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidInput(f"rows[{index}] must be an object of feature values", field=f"rows[{index}]")
        if row.keys() != expected:
            _refuse_feature_names(row.keys(), expected, f"rows[{index}]")
        for position, name in enumerate(columns):
            matrix[index, position] = _finite_number(row[name], f"rows[{index}].{name}")
    return matrix


def _refuse_feature_names(given: Any, expected: set[str], field: str) -> None:
    missing = sorted(expected - set(given))
    extra = sorted(set(given) - expected)
    parts = ([f"missing features: {', '.join(missing)}"] if missing else []) + (
        [f"unknown features: {', '.join(map(str, extra))}"] if extra else []
    )
    raise InvalidInput(f"{field}: {'; '.join(parts)}", field=field)


def _finite_number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{field} must be a number, not {value!r}", field=field)
    if not math.isfinite(value):
        raise InvalidInput(f"{field} must be finite", field=field)
    if abs(value) > FP32_MAX:  # the model runs on FP32, where it would be ±Inf: refused, as V2 refuses it
        raise InvalidInput(f"{field} is {value!r}, beyond FP32's range (±3.4e38), which the model runs on", field=field)
    return float(value)


def predictions(model: LoadedModel, probabilities: np.ndarray, bands: tuple[float, float]) -> list[dict[str, Any]]:
    """score = probability of the positive class (binary) or of the predicted class (multiclass)."""
    classes = model.deployed.classes
    winners = probabilities.argmax(axis=1)
    scores = probabilities[:, 1] if len(classes) == 2 else probabilities.max(axis=1)
    return [
        {"score": float(score), "label": classes[int(winner)], "riskLevel": risk_level(float(score), bands)}
        for score, winner in zip(scores, winners, strict=True)
    ]


def risk_level(score: float, bands: tuple[float, float]) -> str:
    low, high = bands
    return "low" if score < low else "medium" if score < high else "high"


def parse_json(body: bytes) -> object:
    if not body:
        raise BadRequest("the request body is empty; send JSON", field="body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"the request body is not valid JSON: {error}", field="body") from None
