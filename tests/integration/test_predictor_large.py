"""A large batch is parsed, scored and answered off the event loop: while it runs, the other orgs served by the same
worker process keep getting their answers, under a real uvicorn over real PostgreSQL, Redis and S3."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.predictor.app import create_app
from services.predictor.offload import LARGE_BODY_BYTES
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.integration.conftest import OrgKeys, create_org_with_keys
from tests.integration.predictor_support import deploy_quietly
from tests.support.models import FEATURES, ai4i_row, register_model, tiny_model
from tests.support.polling import eventually
from tests.support.threaded_server import serving_in_thread

HEADER_LENGTH = "Inference-Header-Content-Length"


def v1_batch(rows: int) -> tuple[str, bytes, dict[str, str]]:
    """~20 MB of named rows: mostly parsing and building features, all of it holding the GIL."""
    row = ai4i_row()
    return "/v1/orgs/{org}/predict", orjson.dumps({"rows": [row] * rows}), {"content-type": "application/json"}


def v2_binary_batch(rows: int) -> tuple[str, bytes, dict[str, str]]:
    """~24 MB of FP32 rows: mostly inference, in onnxruntime, which lets go of the GIL."""
    row = ai4i_row()
    matrix = np.tile(np.array([[row[name] for name in FEATURES]], dtype="<f4"), (rows, 1))
    tensor = {"name": "input", "datatype": "FP32", "shape": list(matrix.shape)}
    header = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": matrix.nbytes}}]})
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return "/v2/models/{org}/infer", header + matrix.tobytes(), headers


@pytest.fixture
def address(settings: Settings) -> Iterator[str]:
    with serving_in_thread(create_app(settings.model_copy(update={"predictor_reconcile_s": 0.5}))) as address:
        yield address


def serve(engine: Engine, store: ObjectStore, org: OrgKeys, address: str) -> None:
    deploy_quietly(engine, org.org_id, register_model(engine, store, org.org_id, tiny_model(trees=100)))
    url = f"http://{address}/v1/orgs/{org.org_id}/predict"
    assert eventually(lambda: httpx.post(url, json={"rows": [ai4i_row()]}, headers=org.viewer).is_success)


def single_rows_until(done: threading.Event, address: str, org: OrgKeys, latencies: list[float]) -> None:
    """Another org's client, one row at a time, as fast as it is answered."""
    with httpx.Client(base_url=f"http://{address}", headers=org.viewer, timeout=60) as client:
        while not done.is_set():
            started = time.perf_counter()
            assert client.post(f"/v1/orgs/{org.org_id}/predict", json={"rows": [ai4i_row()]}).is_success
            latencies.append(time.perf_counter() - started)


@pytest.mark.parametrize("batch", [v1_batch(160_000), v2_binary_batch(1_000_000)], ids=["v1 JSON", "v2 binary"])
def test_another_org_is_answered_while_a_large_batch_runs_on_the_same_worker(
    api: TestClient,
    org: OrgKeys,
    engine: Engine,
    store: ObjectStore,
    address: str,
    batch: tuple[str, bytes, dict[str, str]],
) -> None:
    path, body, headers = batch
    assert len(body) > LARGE_BODY_BYTES
    other = create_org_with_keys(api, "x" + org.org_id)
    for served in (org, other):
        serve(engine, store, served, address)
    latencies: list[float] = []
    done = threading.Event()
    client = threading.Thread(target=single_rows_until, args=(done, address, other, latencies))
    client.start()
    try:
        url = f"http://{address}{path.format(org=org.org_id)}"
        started = time.perf_counter()
        answer = httpx.post(url, content=body, headers={**org.viewer, **headers}, timeout=120)
        batch_s = time.perf_counter() - started
    finally:
        done.set()
        client.join()

    assert answer.status_code == 200, answer.text[:500]
    # On the event loop, a request arriving while the batch is scored waits for all of it: most of batch_s (0.83-0.85
    # of it, measured with the batch kept on the loop). Off it, the longest wait was 0.04-0.18 of batch_s alone and
    # 0.38 once beside the whole suite on 2 cores, so half of batch_s tells the two apart without timing the machine.
    assert max(latencies) < batch_s / 2, (max(latencies), batch_s, len(latencies))
    assert len(latencies) >= 20
