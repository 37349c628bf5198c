"""The floor for bench/serve.py: the least a FastAPI app can do to answer V2 infer from one onnxruntime session.

    BARE_MODEL_PATH=model.onnx python -m uvicorn --factory bench.bare_app:create_app --workers 2

One route, `POST /v2/models/{name}/infer`: the body parsed with orjson, the one input tensor made a float32 array,
the session run (one thread, sequential: the predictor's options), the V2 outputs `label` and `probabilities`
written with orjson. No pydantic, no auth, no validation beyond what a malformed body breaks on its own.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import orjson
from fastapi import FastAPI, Request, Response

MODEL_PATH_VARIABLE = "BARE_MODEL_PATH"


def create_app() -> FastAPI:
    session = open_session(os.environ[MODEL_PATH_VARIABLE])
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        tensor = orjson.loads(await request.body())["inputs"][0]
        features = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        probabilities = np.asarray(session.run(["probabilities"], {"input": features})[0])
        outputs = [
            {"name": "label", "datatype": "INT64", "shape": [len(features)], "data": probabilities.argmax(1).tolist()},
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": list(probabilities.shape),
                "data": probabilities.ravel().tolist(),
            },
        ]
        answer = {"model_name": name, "outputs": outputs}
        return Response(orjson.dumps(answer), media_type="application/json")

    return app


def open_session(model_path: str) -> ort.InferenceSession:
    """One thread, sequential: what the predictor gives each session (services/predictor/models.py)."""
    return ort.InferenceSession(model_path, _session_options(), providers=["CPUExecutionProvider"])


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options
