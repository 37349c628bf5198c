"""The Open Inference Protocol's messages (KServe / Triton "V2"), apart from HTTP: infer requests decoded and
checked, features built for a model, answers and metadata encoded, with Triton's binary tensor data extension.

A model takes its rows in either of two forms:
- one tensor named `input` of shape [rows, n_features], columns in the order the model metadata lists under
  `inputs[0].parameters.features`;
- one tensor per feature, named by the feature, each of shape [rows] or [rows, 1], the same rows for all
  (for a model with a feature named `input`, a lone `input` of [rows, n_features] is the first form).
Any numeric datatype is taken and converted to FP32 (FP32 is what the model runs on); values must be finite.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import orjson

from services.predictor.inference import parse_json
from services.predictor.models import LoadedModel
from shared.errors import BadRequest, InvalidInput
from shared.json_keys import keys_within, refuse_repeated_keys
from shared.model_contract import INPUT_NAME, LABEL_OUTPUT, PROBABILITIES_OUTPUT

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUTS = (LABEL_OUTPUT, PROBABILITIES_OUTPUT)
# Past what a request carries in practice (2**31 one-byte values make a 2 GiB body); numpy shapes nothing that way.
_LARGEST_DIMENSION = 2**31 - 1
# Integer classes go back in the first of these that holds them all.
INTEGER_LABELS: dict[str, np.dtype[Any]] = {"INT64": np.dtype("<i8"), "UINT64": np.dtype("<u8")}
# Every label datatype but BYTES, as its values are packed: a BOOL is one byte, 1 for true and 0 for false.
LABEL_TYPES: dict[str, np.dtype[Any]] = {"BOOL": np.dtype("?"), **INTEGER_LABELS, "FP64": np.dtype("<f8")}
# Binary tensors are packed little-endian (the extension's layout); JSON numbers are checked against the same types.
NUMERIC_TYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
}
# What JSON numbers and the punctuation between them are made of; none of it is in `true` or `false`.
NUMBER_BYTES = b"0123456789.-+,[] \t\r\n"


@dataclass(frozen=True)
class Tensor:
    """One request input, decoded: finite FP32 values in the shape the request gave."""

    name: str
    field: str
    values: np.ndarray


@dataclass(frozen=True)
class InferRequest:
    """What an infer request asks, checked as far as it can be without the model."""

    id: str | None
    tensors: list[Tensor]
    outputs: dict[str, bool]  # the outputs to answer, in order, each with whether it goes back as binary


# Requests


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Framing, JSON, input tensors and requested outputs: everything that does not depend on the model."""
    header, binary = _split(body, header_length)
    payload = _parse_header(header, header_length)
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object with `inputs`", field="body")
    refuse_repeated_keys(header, _keys_of(payload))
    parameters = _parameters(payload.get("parameters"), "parameters")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("id must be a string", field="id")
    return InferRequest(
        id=request_id,
        tensors=_tensors(payload.get("inputs"), binary, _may_hold_booleans(header)),
        outputs=_requested_outputs(payload.get("outputs"), _flag(parameters, "binary_data_output", "parameters")),
    )


def _keys_of(payload: dict[str, Any]) -> int:
    """The keys of a request, but for any within the inputs' data lists: walking those would cost more than the
    request's parsing. Data holding an object is refused later; until then the count is short, and the body is
    checked the slow way."""
    inputs = payload.get("inputs")
    tensors = [spec for spec in inputs if isinstance(spec, dict)] if isinstance(inputs, list) else []
    return (
        len(payload)
        + keys_within(value for name, value in payload.items() if name != "inputs")
        + sum(len(spec) + keys_within(value for name, value in spec.items() if name != "data") for spec in tensors)
    )


def _may_hold_booleans(header: bytes) -> bool:
    """Whether the JSON has a `true` or `false` anywhere: only then are the data lists scanned for one, as numpy
    reads true as 1. Looked for once the numbers are taken out: 8 us instead of 32 for a 1000-row body, where the
    digits' bytes slow the search down. A boolean flag elsewhere (`"binary_data_output": true`) sends the data
    through the scan too, which then costs time, never a wrong answer."""
    rest = header.translate(None, NUMBER_BYTES)
    return b"true" in rest or b"false" in rest


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensor data after it; without the header the whole body is JSON."""
    if header_length is None:
        return body, memoryview(b"")
    # Digits only, as a Content-Length: int() would also take "-0", "+5", " 5" and "1_0".
    length = int(header_length) if header_length.isascii() and header_length.isdigit() else -1
    if not 0 <= length <= len(body):
        raise BadRequest(
            f"{HEADER_LENGTH} must be the JSON header's length in bytes, at most the body's {len(body)}, "
            f"not {reprlib.repr(header_length)}",
            field=HEADER_LENGTH,
        )
    return body[:length], memoryview(body)[length:]


def _parse_header(header: bytes, header_length: str | None) -> object:
    """The JSON header. A body that breaks as JSON only where one whole JSON object ends most likely carries binary
    tensor data without the header that says where the JSON ends: that header is named, not the bytes after it."""
    try:
        return parse_json(header)
    except BadRequest:
        if header_length is None and _continues_past_a_json_object(header):
            raise BadRequest(
                f"the body goes on after its JSON object: binary tensor data needs the {HEADER_LENGTH} header, the "
                "JSON's length in bytes",
                field=HEADER_LENGTH,
            ) from None
        raise


def _continues_past_a_json_object(body: bytes) -> bool:
    """Whether the body starts with a whole JSON object and holds more than whitespace after it. Read by the standard
    library, which (unlike orjson) stops where the object ends; the binary after it needs not be UTF-8."""
    text = body.decode(errors="replace")
    start = len(text) - len(text.lstrip())
    try:
        value, end = _STRICT_JSON.raw_decode(text, start)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and bool(text[end:].strip())


def _refuse_constant(word: str) -> NoReturn:
    raise ValueError(f"{word} is no JSON number")


# Python's reader takes NaN and Infinity, which JSON (and orjson) refuse.
_STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def _parameters(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} must be an object of name: value pairs", field=field)
    return value


def _flag(parameters: dict[str, Any], name: str, field: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{field}.{name} must be true or false", field=f"{field}.{name}")
    return value


def _tensors(inputs: Any, binary: memoryview, booleans: bool) -> list[Tensor]:
    """Each input decoded; binary inputs take their bytes from the data after the JSON, in input order. `booleans`:
    whether the JSON data may hold a boolean."""
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("inputs must be a non-empty list of tensors", field="inputs")
    tensors: dict[str, Tensor] = {}
    offset = 0
    for index, spec in enumerate(inputs):
        tensor, offset = _tensor(spec, f"inputs[{index}]", binary, offset, booleans)
        if tensor.name in tensors:
            raise InvalidInput(f"input {reprlib.repr(tensor.name)} is given twice", field=f"{tensor.field}.name")
        tensors[tensor.name] = tensor
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes follow the JSON header beyond what the inputs' binary_data_size account for",
            field="body",
        )
    return list(tensors.values())


def _tensor(spec: Any, field: str, binary: memoryview, offset: int, booleans: bool) -> tuple[Tensor, int]:
    """One input and the offset of the next one's binary data."""
    if not isinstance(spec, dict):
        raise InvalidInput(f"{field} must be an object with name, shape, datatype and data", field=field)
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{field}.name must be a non-empty string", field=f"{field}.name")
    datatype = _datatype(_required(spec, "datatype", field), field)
    shape = _shape(_required(spec, "shape", field), field)
    size = _binary_data_size(_parameters(spec.get("parameters"), f"{field}.parameters"), field)
    if size is None:
        return Tensor(name, field, _json_values(spec.get("data"), datatype, shape, field, booleans)), offset
    if "data" in spec:
        raise InvalidInput(f"{field} has both data and a binary_data_size; send one of them", field=f"{field}.data")
    end = offset + size
    if end > len(binary):
        raise BadRequest(
            f"{field}.parameters.binary_data_size is {size} but only {len(binary) - offset} bytes of binary data "
            "are left after the JSON header",
            field=f"{field}.parameters.binary_data_size",
        )
    return Tensor(name, field, _binary_values(binary[offset:end], datatype, shape, field)), end


def _required(spec: dict[str, Any], member: str, field: str) -> Any:
    """A member every tensor has: left out (or null), it is said to be required, not shown as Python's None."""
    value = spec.get(member)
    if value is None:
        raise InvalidInput(f"{field}.{member} is required", field=f"{field}.{member}")
    return value


def _datatype(datatype: Any, field: str) -> str:
    if not isinstance(datatype, str) or datatype not in NUMERIC_TYPES:
        others = ", ".join(name for name in NUMERIC_TYPES if name != "FP32")
        raise InvalidInput(
            f"{field}.datatype {reprlib.repr(datatype)} is not numeric; send FP32 (or {others})",
            field=f"{field}.datatype",
        )
    return datatype


def _shape(shape: Any, field: str) -> list[int]:
    """[rows] or [rows, columns]: the only shapes rows of features take. A dimension no body could fill is refused
    here: beside a 0 it passes the element count, and numpy cannot even shape nothing that way."""
    if not (
        isinstance(shape, list)
        and 1 <= len(shape) <= 2
        and all(type(dim) is int and 0 <= dim <= _LARGEST_DIMENSION for dim in shape)
    ):
        raise InvalidInput(
            f"{field}.shape must be [rows] or [rows, columns] of integers from 0 to {_LARGEST_DIMENSION}, not "
            f"{reprlib.repr(shape)}",
            field=f"{field}.shape",
        )
    return shape


def _binary_data_size(parameters: dict[str, Any], field: str) -> int | None:
    shared = next((key for key in parameters if key.startswith("shared_memory")), None)
    if shared is not None:
        raise InvalidInput(
            "the shared memory extension is not supported; send the tensor in the body",
            field=f"{field}.parameters.{shared}",
        )
    size = parameters.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise InvalidInput(
            f"{field}.parameters.binary_data_size must be a byte count, not {reprlib.repr(size)}",
            field=f"{field}.parameters.binary_data_size",
        )
    return size


def _json_values(data: Any, datatype: str, shape: list[int], field: str, booleans: bool) -> np.ndarray:
    """Numbers, flat or nested, row-major, never booleans (as V1 refuses them); whole numbers within range for the
    integer datatypes, numbers within range for FP16."""
    dtype = NUMERIC_TYPES[datatype]
    values = None
    if isinstance(data, list):
        try:
            values = np.asarray(data)
            if dtype.kind in "iu" and values.dtype.kind in "fO" and _holds_only_integers(data, values.ndim):
                values = _integers(data, dtype)
        except (ValueError, TypeError, OverflowError, RecursionError):
            values = None  # ragged nesting, or deeper than numpy goes
    if values is None or values.dtype.kind not in "iuf" or (booleans and _holds_boolean(data, values.ndim)):
        raise InvalidInput(f"{field}.data must be a list of numbers, flat or nested row-major", field=f"{field}.data")
    if values.ndim > 1 and list(values.shape) != shape:
        raise InvalidInput(
            f"{field}.data is nested as {list(values.shape)}, not as its shape {shape}; nest it as the shape or send "
            "it flat",
            field=f"{field}.data",
        )
    if not _fits(values, dtype):
        numbers = "numbers" if dtype.kind == "f" else "whole numbers"
        raise InvalidInput(
            f"{field}.data must be {numbers} within the range of {datatype} ({_range_of(dtype)})", field=f"{field}.data"
        )
    return _finite_fp32(values, shape, field)


def _holds_boolean(data: list[Any], depth: int) -> bool:
    """Whether a true or false hides among numbers, which numpy took for 1 and 0 (the nesting is even: numpy read
    it as an array of `depth` dimensions)."""
    return bool in set(map(type, _items(data, depth)))


def _holds_only_integers(data: list[Any], depth: int) -> bool:
    return set(map(type, _items(data, depth))) == {int}


def _items(data: list[Any], depth: int) -> Iterable[Any]:
    items: Iterable[Any] = data
    for _ in range(depth - 1):
        items = itertools.chain.from_iterable(items)
    return items


def _integers(data: list[Any], dtype: np.dtype[Any]) -> np.ndarray:
    """Whole numbers as the integer datatype holds them: numpy reads one past INT64's range, beside smaller ones, as
    a float (losing it) and one past UINT64's as an object. Past the datatype's range, a float that _fits refuses."""
    try:
        return np.asarray(data, dtype=dtype)
    except OverflowError:
        return np.asarray(data, dtype=np.float64)


def _fits(values: np.ndarray, dtype: np.dtype) -> bool:
    """Whether the datatype holds the values. FP32 and FP64 always do here: every request becomes FP32, which
    refuses what it cannot hold, and JSON carries no number beyond FP64. A float narrower than FP32 holds what does
    not become ±Inf in it, as FP32 does."""
    if values.size == 0:
        return True
    if dtype.kind == "f":
        if dtype.itemsize >= NUMERIC_TYPES["FP32"].itemsize:
            return True
        with np.errstate(over="ignore"):
            return bool(np.isfinite(values.astype(dtype)).all())
    if values.dtype.kind == "f":
        return False
    limits = np.iinfo(dtype)
    return bool(values.min() >= limits.min and values.max() <= limits.max)


def _range_of(dtype: np.dtype) -> str:
    if dtype.kind == "f":
        return f"±{np.finfo(dtype).max:g}"
    limits = np.iinfo(dtype)
    return f"{limits.min} to {limits.max}"


def _binary_values(raw: memoryview, datatype: str, shape: list[int], field: str) -> np.ndarray:
    dtype = NUMERIC_TYPES[datatype]
    needed = math.prod(shape) * dtype.itemsize
    if len(raw) != needed:
        raise InvalidInput(
            f"{field} has {len(raw)} bytes of binary data; shape {shape} of {datatype} needs {needed}",
            field=f"{field}.parameters.binary_data_size",
        )
    return _finite_fp32(np.frombuffer(raw, dtype=dtype), shape, field)


def _finite_fp32(values: np.ndarray, shape: list[int], field: str) -> np.ndarray:
    """FP32 in the request's shape. LightGBM would score NaN as a missing value, but a NaN or ±Inf in a request is
    more often a client's bug than a choice, so it is refused rather than silently scored."""
    count = math.prod(shape)
    if values.size != count:
        raise InvalidInput(
            f"{field}.data holds {values.size} values; shape {shape} needs {count}", field=f"{field}.data"
        )
    with np.errstate(over="ignore"):  # FP64 beyond FP32's range becomes ±Inf here, and is refused just below
        fp32 = values.astype(np.float32, copy=False)
    if not np.isfinite(fp32).all():
        raise InvalidInput(
            f"{field}.data holds NaN, ±Inf or a number beyond FP32's range: requests must carry finite numbers "
            "(the model could read NaN as a missing value, but Kiln refuses non-finite input)",
            field=f"{field}.data",
        )
    return fp32.reshape(shape)


# Features


def request_features(model: LoadedModel, tensors: list[Tensor]) -> np.ndarray:
    """The FP32 [rows, n_features] matrix, from one `input` tensor or from one tensor per feature."""
    if _is_matrix_form(model, tensors):
        return _matrix(model, tensors)
    return _columns(model, tensors)


def _is_matrix_form(model: LoadedModel, tensors: list[Tensor]) -> bool:
    """A tensor named `input` holds every feature, unless the model has a feature of that name (feature names are
    the client's): then only a lone `input` of shape [rows, n_features] is the matrix, and the rest is per feature."""
    if not any(tensor.name == INPUT_NAME for tensor in tensors):
        return False
    if INPUT_NAME not in model.deployed.feature_columns:
        return True
    shape = tensors[0].values.shape
    return len(tensors) == 1 and len(shape) == 2 and shape[1] == model.n_features


def _matrix(model: LoadedModel, tensors: list[Tensor]) -> np.ndarray:
    other = next((tensor for tensor in tensors if tensor.name != INPUT_NAME), None)
    if other is not None:
        raise InvalidInput(
            f"{INPUT_NAME!r} holds every feature; send it alone, or one tensor per feature", field=f"{other.field}.name"
        )
    tensor = tensors[0]
    if tensor.values.ndim != 2 or tensor.values.shape[1] != model.n_features:
        raise InvalidInput(
            f"{tensor.field}.shape must be [rows, {model.n_features}], not {list(tensor.values.shape)}",
            field=f"{tensor.field}.shape",
        )
    _refuse_empty(tensor)
    return tensor.values


def _columns(model: LoadedModel, tensors: list[Tensor]) -> np.ndarray:
    by_name = {tensor.name: tensor for tensor in tensors}
    _check_feature_names(model, tensors)
    first = by_name[model.deployed.feature_columns[0]]
    rows = first.values.shape[0]
    for tensor in tensors:
        if tensor.values.shape not in ((rows,), (rows, 1)):
            raise InvalidInput(
                f"{tensor.field}.shape is {list(tensor.values.shape)}; a feature's tensor must be [rows] or "
                f"[rows, 1], with the same rows for every feature ({first.name!r} has {rows})",
                field=f"{tensor.field}.shape",
            )
    _refuse_empty(first)
    return np.column_stack([by_name[name].values.reshape(rows) for name in model.deployed.feature_columns])


def _check_feature_names(model: LoadedModel, tensors: list[Tensor]) -> None:
    features = model.deployed.feature_columns
    given = {tensor.name for tensor in tensors}
    missing = [name for name in features if name not in given]
    unknown = [tensor for tensor in tensors if tensor.name not in set(features)]
    if len(unknown) == len(tensors):
        raise InvalidInput(
            f"this model takes one tensor {INPUT_NAME!r} of shape [rows, {model.n_features}], or one tensor per "
            f"feature ({_listed(features)}); got {_listed([t.name for t in tensors])}",
            field="inputs",
        )
    if missing or unknown:
        problems = ([f"missing features: {_listed(missing)}"] if missing else []) + (
            [f"unknown inputs: {_listed([t.name for t in unknown])}"] if unknown else []
        )
        field = f"inputs.{missing[0]}" if missing else f"{unknown[0].field}.name"
        raise InvalidInput("; ".join(problems), field=field)


def _refuse_empty(tensor: Tensor) -> None:
    if tensor.values.shape[0] == 0:
        raise InvalidInput(f"{tensor.field}.shape has 0 rows: the batch is empty", field=f"{tensor.field}.shape")


def _listed(names: list[str], most: int = 10) -> str:
    shown = ", ".join(reprlib.repr(name) for name in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


# Responses


def _requested_outputs(outputs: Any, binary_default: bool) -> dict[str, bool]:
    """Output name → whether it goes back as binary; no list (or an empty one) asks for every output."""
    if outputs is None or outputs == []:
        return dict.fromkeys(OUTPUTS, binary_default)
    if not isinstance(outputs, list):
        raise InvalidInput("outputs must be a list of {name, parameters} objects", field="outputs")
    wanted: dict[str, bool] = {}
    for index, spec in enumerate(outputs):
        field = f"outputs[{index}]"
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or name not in OUTPUTS:
            raise InvalidInput(
                f"{field}.name must be {LABEL_OUTPUT!r} or {PROBABILITIES_OUTPUT!r}, not {reprlib.repr(name)}",
                field=f"{field}.name",
            )
        parameters = _parameters(spec.get("parameters"), f"{field}.parameters")
        if "classification" in parameters:
            raise InvalidInput(
                "the classification extension is not supported; ask for label or probabilities",
                field=f"{field}.parameters.classification",
            )
        wanted[name] = _flag(parameters, "binary_data", f"{field}.parameters", binary_default)
    return wanted


def encode_answer(
    org: str, model: LoadedModel, probabilities: np.ndarray, inference: InferRequest
) -> tuple[bytes, str, dict[str, str]]:
    """(body, media type, headers): JSON alone, or, when any output goes back as binary, the JSON header followed
    by those outputs' bytes."""
    header: dict[str, Any] = {"model_name": org, "model_version": model.version}
    if inference.id is not None:
        header["id"] = inference.id
    outputs = [_output(model, name, binary, probabilities) for name, binary in inference.outputs.items()]
    header["outputs"] = [output for output, _ in outputs]
    content = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    blobs = [blob for _, blob in outputs if blob is not None]
    if not blobs:
        return content, "application/json", {}
    return b"".join([content, *blobs]), "application/octet-stream", {HEADER_LENGTH: str(len(content))}


def _output(
    model: LoadedModel, name: str, binary: bool, probabilities: np.ndarray
) -> tuple[dict[str, Any], bytes | None]:
    datatype, values = _output_values(model, name, probabilities)
    output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
    if not binary:
        output["data"] = values.tolist() if datatype == "BYTES" else values.ravel()
        return output, None
    blob = _bytes_tensor(values) if datatype == "BYTES" else values.tobytes()
    output["parameters"] = {"binary_data_size": len(blob)}
    return output, blob


def _output_values(model: LoadedModel, name: str, probabilities: np.ndarray) -> tuple[str, np.ndarray]:
    if name == PROBABILITIES_OUTPUT:
        return "FP32", np.ascontiguousarray(probabilities, dtype="<f4")
    classes = model.deployed.classes
    winners = probabilities.argmax(axis=1)
    datatype = _label_datatype(classes)
    if datatype == "BYTES":
        return datatype, np.asarray([str(label) for label in classes], dtype=object)[winners]
    return datatype, np.asarray(classes, dtype=LABEL_TYPES[datatype])[winners]


def _bytes_tensor(values: np.ndarray) -> bytes:
    """BYTES in the extension's layout: each element as a little-endian uint32 length, then its UTF-8 bytes."""
    encoded = [str(value).encode() for value in values.ravel()]
    return b"".join(len(item).to_bytes(4, "little") + item for item in encoded)


def _label_datatype(classes: list[Any]) -> str:
    # The classes' types are part of the cache's key: Python finds (False, True), (0, 1) and (0.0, 1.0) equal.
    return _datatype_of_classes(tuple(classes), frozenset(map(type, classes)))


@functools.lru_cache(maxsize=1024)  # asked on every answer: the scan over the classes is done once per class set
def _datatype_of_classes(classes: tuple[Any, ...], types: frozenset[type]) -> str:
    """BOOL for a boolean target's classes and FP64 for a float one's, so a client reads them as the values they
    are (as text, `b'False'` is true to any truthiness test); for integer classes the first integer type that holds
    them all (a uint64 target can have classes of 2^63 and more); else BYTES, which holds any label as text."""
    if types == {bool}:
        return "BOOL"
    if types == {float}:
        return "FP64"
    if types == {int}:
        for datatype, dtype in INTEGER_LABELS.items():
            limits = np.iinfo(dtype)
            if all(limits.min <= label <= limits.max for label in classes):
                return datatype
    return "BYTES"


def model_metadata(org: str, model: LoadedModel) -> dict[str, Any]:
    """The `input` tensor stock clients build from this, its columns named in `parameters.features`; one tensor per
    feature, named by the feature, is accepted too (see the module docstring) but has no place in V2 metadata."""
    classes = model.deployed.classes
    return {
        "name": org,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": "FP32",
                "shape": [-1, model.n_features],
                "parameters": {"features": model.deployed.feature_columns},
            }
        ],
        "outputs": [
            {"name": LABEL_OUTPUT, "datatype": _label_datatype(classes), "shape": [-1]},
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(classes)]},
        ],
        "parameters": {"classes": classes},
    }
