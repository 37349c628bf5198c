"""Requests to arrays and arrays to answers, for both protocols. Knows nothing of HTTP."""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any

import numpy as np
import orjson

from services.predictor.models import LoadedModel
from shared.errors import BadRequest, InvalidInput
from shared.json_keys import keys_within, refuse_repeated_keys

FP32_MAX = float(np.finfo(np.float32).max)
# Why a number too large is refused, whether FP32 or even FP64 (the JSON parser's) cannot hold it.
BEYOND_FP32 = "beyond FP32's range (±3.4e38), which the model runs on"


def v1_features(model: LoadedModel, body: bytes) -> np.ndarray:
    """The float32 matrix of a V1 body, `{"rows": [{feature: number}, ...]}`."""
    payload = parse_json(body)
    rows = payload.get("rows") if isinstance(payload, dict) else None
    features = _rows_to_features(model, rows)
    assert isinstance(payload, dict)  # it holds the rows just read
    _refuse_repeated_keys(body, payload, len(features), model.deployed.feature_columns)
    return features


def _rows_to_features(model: LoadedModel, rows: Any) -> np.ndarray:
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


def _refuse_repeated_keys(body: bytes, payload: dict[str, Any], rows: int, columns: list[str]) -> None:
    """The V1 body's keys: those of the rows counted from the model's features, the rest walked."""
    keys = len(payload) + rows * (len(columns) + "".join(columns).count(":"))
    if len(payload) > 1:  # members beside the rows, and the keys within them
        keys += keys_within(value for name, value in payload.items() if name != "rows")
    refuse_repeated_keys(body, keys)


def _refuse_feature_names(given: Any, expected: set[str], field: str) -> None:
    missing = sorted(expected - set(given))
    extra = sorted(set(given) - expected)
    parts = ([f"missing features: {', '.join(missing)}"] if missing else []) + (
        [f"unknown features: {', '.join(map(str, extra))}"] if extra else []
    )
    raise InvalidInput(f"{field}: {'; '.join(parts)}", field=field)


def _finite_number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{field} must be a number, not {_as_json(value)}", field=field)
    if not math.isfinite(value):
        raise InvalidInput(f"{field} must be finite", field=field)
    if abs(value) > FP32_MAX:  # the model runs on FP32, where it would be ±Inf: refused, as V2 refuses it
        raise InvalidInput(f"{field} is {value!r}, {BEYOND_FP32}", field=field)
    return float(value)


def _as_json(value: Any) -> str:
    """A value as the client wrote it (true, null, "text"), for an error message, at most 60 characters of it.
    orjson writes no list nested past 254 levels, which it reads up to 1024: such a value is shown as Python's."""
    try:
        text = orjson.dumps(value, default=str).decode()
    except TypeError:
        text = reprlib.repr(value)
    return _shortened(text)


def _shortened(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def predictions(model: LoadedModel, probabilities: np.ndarray, bands: tuple[float, float]) -> list[dict[str, Any]]:
    """score = probability of the positive class (binary) or of the predicted class (multiclass); riskLevel grades
    the risk, the probability that something is wrong (see _risks), or is None where there is no telling it."""
    classes = model.deployed.classes
    winners = probabilities.argmax(axis=1).tolist()  # Python numbers: cheaper to read one by one than numpy's
    binary = len(classes) == 2
    scores = (probabilities[:, 1] if binary else probabilities.max(axis=1)).tolist()
    risks = scores if binary else _multiclass_risks(model, probabilities)
    if risks is None:
        return [
            {"score": score, "label": classes[winner], "riskLevel": None}
            for score, winner in zip(scores, winners, strict=True)
        ]
    return [
        {"score": score, "label": classes[winner], "riskLevel": risk_level(risk, bands)}
        for score, winner, risk in zip(scores, winners, risks, strict=True)
    ]


def _multiclass_risks(model: LoadedModel, probabilities: np.ndarray) -> list[float] | None:
    """1 - the probability of the org's normal class. The winning class's probability would read backwards: a
    confident "none" (no failure) is a high probability, which is no high risk. None without a normal class."""
    column = model.deployed.normal_column
    return None if column is None else (1 - probabilities[:, column]).tolist()


def risk_level(risk: float, bands: tuple[float, float]) -> str:
    low, high = bands
    return "low" if risk < low else "medium" if risk < high else "high"


def parse_json(body: bytes) -> object:
    if not body:
        raise BadRequest("the request body is empty; send JSON", field="body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(_what_is_wrong(body, error), field="body") from None


_NOT_JSON = "the request body is not valid JSON: "
# What Python's json.dumps writes for a float that is missing or infinite, which JSON has no word for.
_NOT_JSON_NUMBERS = ("NaN", "-Infinity", "Infinity")
# A JSON number: orjson reads each as a double, and refuses one past even FP64's range (1e400) as infinity.
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
# What stands between a key and a number within its value: other numbers, and the lists that hold them.
_WITHIN_NUMBERS = "0123456789.eE+-, \t\r\n[]"
# The key of a value: `"name": ` before it.
_KEY_BEFORE = re.compile(r'"((?:[^"\\]|\\.){1,200})"\s*:\s*$')


def _what_is_wrong(body: bytes, error: orjson.JSONDecodeError) -> str:
    """orjson's words, or, for a NaN, an Infinity or a number past FP64's range, what it is and the key it is the
    value of, or among the value of, if any (the character offset alone leaves a user counting)."""
    text = body.decode(errors="replace")  # orjson counts characters, not bytes
    at = error.pos - 1 if text[error.pos - 1 : error.pos] == "-" else error.pos  # past a sign, for -Infinity
    where = f"{_held_by(text, at)} (line {error.lineno} column {error.colno})"
    token = next((word for word in _NOT_JSON_NUMBERS if text.startswith(word, at)), None)
    if token is not None:
        return f"{_NOT_JSON}{token}{where} is no JSON number, and each feature must be a finite number"
    number = _NUMBER.match(text, at)
    if number is not None and math.isinf(float(number.group())):
        return f"the request body holds {_shortened(number.group())}{where}, {BEYOND_FP32}"
    return _NOT_JSON + str(error)


def _held_by(text: str, at: int) -> str:
    """` as the value of 'torque'` for the value that starts at `at`, ` in the value of 'data'` for one among
    numbers in lists (a V2 tensor's data), or nothing when no key holds it."""
    value_of = text[max(0, at - 4096) : at].rstrip()
    before = value_of.rstrip(_WITHIN_NUMBERS)
    key = _KEY_BEFORE.search(before[-256:])
    if key is None:
        return ""
    return f" {'as' if before == value_of else 'in'} the value of {key.group(1)!r}"
