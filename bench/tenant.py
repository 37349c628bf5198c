"""The model every server in bench/serve.py answers with, made the way production makes it.

Through the running stack's api: create an organization and an admin key, upload AI4I-rule rows, train two
versions (100 trees, 31 leaves; two seeds, so that deploys alternate between two different models), deploy the
first. The predictor then serves it exactly as in production; MLServer gets the same version's `model.txt`
(LightGBM's own file) and the bare app and in-process onnxruntime its `model.onnx`, read from the object store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from deploy.local import ai4i, stack
from shared.layout import MODEL_FILE, NATIVE_MODEL_FILE, model_prefix
from shared.settings import Settings
from shared.storage import open_object_store

ORG = "bench-serve"
ROWS = 100_000
DATA_SEED = 2  # with these rows and hyperparameters both versions pass the gates (recall ~0.79, see demo.py)
HYPERPARAMETERS = {
    "numLeaves": 31,
    "learningRate": 0.05,
    "featureFraction": 0.9,
    "baggingFraction": 0.8,
    "baggingFreq": 5,
    "numIterations": 100,
    "objective": "binary",
}
TRAINING_SEEDS = (1, 2)
TRAINING_TIMEOUT_S = 180.0
POLL_S = 0.2


class TenantError(RuntimeError):
    """A step of preparing the org that did not answer as it should."""


@dataclass(frozen=True)
class Tenant:
    org: str
    key: str
    versions: tuple[str, str]
    model_onnx: Path
    model_txt: Path


def prepare(running: stack.Stack, settings: Settings, folder: Path) -> Tenant:
    """Org, key, dataset, two trained versions, the first deployed; its artifacts copied into `folder`."""
    data = folder / "ai4i.parquet"
    ai4i.write_parquet(ai4i.generate(ROWS, seed=DATA_SEED), data)
    with httpx.Client(base_url=running.api, timeout=120) as api:
        admin = {"Authorization": f"Bearer {running.admin_token}"}
        _call(api, "POST", "/v1/orgs", 201, json={"id": ORG, "name": "serving benchmark"}, headers=admin)
        key = str(_call(api, "POST", f"/v1/orgs/{ORG}/keys", 201, json={"role": "admin"}, headers=admin)["key"])
        api.headers["Authorization"] = f"Bearer {key}"
        with data.open("rb") as handle:
            dataset = _call(api, "POST", f"/v1/orgs/{ORG}/datasets", 201, files={"file": ("ai4i.parquet", handle)})
        first, second = (_train(api, str(dataset["datasetId"]), seed) for seed in TRAINING_SEEDS)
        _call(api, "POST", f"/v1/orgs/{ORG}/deployments", 201, json={"version": first})
    return Tenant(
        org=ORG,
        key=key,
        versions=(first, second),
        model_onnx=_copy_artifact(settings, first, MODEL_FILE, folder),
        model_txt=_copy_artifact(settings, first, NATIVE_MODEL_FILE, folder),
    )


def _train(api: httpx.Client, dataset_id: str, seed: int) -> str:
    config = {
        "datasetId": dataset_id,
        "targetColumn": ai4i.TARGET,
        "featureColumns": list(ai4i.FEATURES),
        "validationSplit": 0.2,
        "hyperparameters": {**HYPERPARAMETERS, "seed": seed},
    }
    run_id = _call(api, "POST", f"/v1/orgs/{ORG}/trainings", 202, json=config)["runId"]
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while time.monotonic() < deadline:
        run = _call(api, "GET", f"/v1/orgs/{ORG}/trainings/{run_id}", 200)
        if run["status"] == "succeeded":
            return str(run["version"])
        if run["status"] in {"rejected", "failed", "cancelled"}:
            raise TenantError(f"training run {run_id} ended {run['status']}: {run.get('error')}")
        time.sleep(POLL_S)
    raise TenantError(f"training run {run_id} did not finish within {TRAINING_TIMEOUT_S:.0f} s")


def _copy_artifact(settings: Settings, version: str, name: str, folder: Path) -> Path:
    path = folder / name
    path.write_bytes(open_object_store(settings).get_bytes(model_prefix(ORG, version) + name))
    return path


def _call(api: httpx.Client, method: str, path: str, expect: int, **kwargs: Any) -> dict[str, Any]:
    response = api.request(method, path, **kwargs)
    if response.status_code != expect:
        raise TenantError(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
    body: dict[str, Any] = response.json()
    return body
