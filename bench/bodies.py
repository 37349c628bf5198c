"""The requests bench/serve.py sends, and the check that every server answers them alike.

One V2 JSON request for all three servers: a single FP32 tensor named `input`, [rows, 6] AI4I features as a sensor
would send them (one decimal). mlserver-lightgbm decodes a request with a single input of any name to a numpy array
(NumpyRequestCodec), so the predictor's tensor name serves it unchanged. For the predictor alone, the same rows with
Triton's binary tensor data extension as well: the JSON header, then the FP32 bytes, binary outputs asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from deploy.local import ai4i

SEED = 99
HEADER_LENGTH = "Inference-Header-Content-Length"
PARITY = 1e-5  # the parity gate's default: ONNX and LightGBM probabilities of the same version


def rows(count: int) -> np.ndarray:
    """AI4I-rule rows, one decimal, in the model's feature order."""
    table = ai4i.generate(count, seed=SEED)
    columns = [np.round(table[name].to_numpy(), 1) for name in ai4i.FEATURES]
    return np.column_stack(columns).astype(np.float32)


def write_json(path: Path, features: np.ndarray) -> Path:
    data = [round(float(value), 1) for value in features.ravel()]
    tensor = {"name": "input", "shape": list(features.shape), "datatype": "FP32", "data": data}
    path.write_bytes(orjson.dumps({"inputs": [tensor]}))
    return path


def write_binary(path: Path, features: np.ndarray) -> tuple[Path, int]:
    """The body and the JSON header's length, for the Inference-Header-Content-Length header."""
    raw = np.ascontiguousarray(features, dtype="<f4").tobytes()
    tensor: dict[str, Any] = {"name": "input", "shape": list(features.shape), "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    path.write_bytes(header + raw)
    return path, len(header)


def check_same_answers(answers: dict[str, np.ndarray], reference: str) -> None:
    """Every server's positive-class probabilities must match the reference's within the parity gate."""
    for server, scores in answers.items():
        difference = float(np.abs(scores - answers[reference]).max())
        if difference > PARITY:
            raise RuntimeError(f"{server} and {reference} disagree by {difference:.2e} on the same rows")


def positive_scores(url: str, headers: dict[str, str], body: Path) -> np.ndarray:
    """P(class 1) per row, from any of the servers' answers: JSON, binary, or mlserver-lightgbm's `predict`."""
    response = httpx.post(url, content=body.read_bytes(), headers={"content-type": "application/json", **headers})
    if response.status_code != httpx.codes.OK:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
    if HEADER_LENGTH.lower() in response.headers:
        return _binary_scores(response.content, int(response.headers[HEADER_LENGTH]))
    outputs: dict[str, Any] = {output["name"]: output for output in response.json()["outputs"]}
    if "predict" in outputs:  # mlserver-lightgbm: the booster's own answer, P(class 1) per row
        return np.asarray(outputs["predict"]["data"], dtype=np.float64)
    probabilities = outputs["probabilities"]
    return np.asarray(probabilities["data"], dtype=np.float64).reshape(probabilities["shape"])[:, 1]


def _binary_scores(content: bytes, header_length: int) -> np.ndarray:
    offset = header_length
    for output in orjson.loads(content[:header_length])["outputs"]:
        size = output["parameters"]["binary_data_size"]
        if output["name"] == "probabilities":
            values = np.frombuffer(content[offset : offset + size], dtype="<f4")
            return values.reshape(output["shape"])[:, 1].astype(np.float64)
        offset += size
    raise RuntimeError("the binary answer holds no probabilities output")
